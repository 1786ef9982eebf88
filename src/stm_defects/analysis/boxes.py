"""Scores of defect predictions against human-drawn box truth (real, labelled STM scans).

The labels are for measuring only: nothing here may be used to train, tune or select a model on
the scans it is scored on.

Truth: one JSON per image, ``{"image", "shape": [H, W], "scan_nm": [w, h], "pixel_nm",
"defects": [{"x", "y", "w", "h", "class", "class_name"}]}``, with ``x`` = column and ``y`` = row
of the box centre in pixels (pixel centres at integer coordinates) and ``w``, ``h`` the box size in
pixels.  Predictions: the JSON ``stm predict`` writes per scan (``image``, ``shape``,
``pixel_size_nm``, ``defects`` with ``x``, ``y``, ``class`` in original-scan pixels).

Matching rule: a prediction matches a box when its centre lies within ``max(w, h) / 2 + slack_px``
of the box centre (inclusive).  Matching is one-to-one: the number of matched pairs is maximised,
then the total normalised distance (distance / that radius) is minimised
(``linear_sum_assignment`` with a prohibitive cost for infeasible pairs, as in
:func:`stm_defects.analysis.scores.match_points`).  Unmatched predictions are false positives,
unmatched boxes false negatives.

:func:`score_boxes` pools scans: micro precision/recall/F1 (tp/fp/fn summed over scans) with 95%
percentile-bootstrap intervals that resample whole scans (seeded, deterministic), the same per
field-size bin, and the agreement of predicted classes with the annotators' classes over matched
pairs (ARI, NMI, purity; predictions without a class are left out).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.distance import cdist

from stm_defects.analysis.scores import assign_feasible, class_scores, detection_from_counts

__all__ = [
    "DEFAULT_SIZE_BINS_NM",
    "bin_label",
    "load_box_truth",
    "load_truth_dir",
    "markdown_table",
    "match_boxes",
    "pair_by_image",
    "pooled_counts",
    "score_boxes",
    "score_scan",
]

DEFAULT_SIZE_BINS_NM: tuple[float, ...] = (0.0, 15.0, 60.0, 150.0, math.inf)
_NAN = float("nan")


# --------------------------------------------------------------------------- #
# loading truth
# --------------------------------------------------------------------------- #
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pair_of(d: Mapping, key: str, name: str, *, integer: bool) -> list:
    v = d.get(key)
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(_is_number(x) and x > 0 for x in v):
        raise ValueError(f"{name}: '{key}' must be two positive numbers, got {v!r}")
    if integer:
        if not all(float(x).is_integer() for x in v):
            raise ValueError(f"{name}: '{key}' must be two positive integers, got {v!r}")
        return [int(x) for x in v]
    return [float(x) for x in v]


def _check_truth(data: Any, name: str) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{name}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in ("image", "shape", "scan_nm", "pixel_nm", "defects") if k not in data]
    if missing:
        raise ValueError(f"{name}: missing key(s) {', '.join(missing)}")
    if not isinstance(data["image"], str) or not data["image"]:
        raise ValueError(f"{name}: 'image' must be a non-empty file name")
    shape = _pair_of(data, "shape", name, integer=True)
    scan_nm = _pair_of(data, "scan_nm", name, integer=False)
    if not (_is_number(data["pixel_nm"]) and data["pixel_nm"] > 0):
        raise ValueError(f"{name}: 'pixel_nm' must be a positive number, got {data['pixel_nm']!r}")
    if not isinstance(data["defects"], list):
        raise ValueError(f"{name}: 'defects' must be a list")
    defects = []
    for i, d in enumerate(data["defects"]):
        if not isinstance(d, dict):
            raise ValueError(f"{name}: defect {i} is not an object")
        for k in ("x", "y", "w", "h"):
            if not _is_number(d.get(k)):
                raise ValueError(f"{name}: defect {i} needs a finite number '{k}', got {d.get(k)!r}")
        if d["w"] < 0 or d["h"] < 0:
            raise ValueError(f"{name}: defect {i} has a negative box size ({d['w']} x {d['h']})")
        cls = d.get("class")
        if cls is None or isinstance(cls, bool) or not isinstance(cls, (str, int)):
            raise ValueError(f"{name}: defect {i} needs a 'class' (string or integer), got {cls!r}")
        defects.append(dict(d, x=float(d["x"]), y=float(d["y"]), w=float(d["w"]), h=float(d["h"])))
    return dict(data, shape=shape, scan_nm=scan_nm, pixel_nm=float(data["pixel_nm"]), defects=defects)


def load_box_truth(path: str | Path) -> dict:
    """Read and check one truth JSON; numbers come back as floats, ``shape`` as ints.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming the file and the
    reason) for one that is not valid JSON or not in the truth format.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p.name}: not a UTF-8 text file ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p.name}: not valid JSON ({e})") from None
    return _check_truth(data, p.name)


def load_truth_dir(folder: str | Path) -> dict[str, dict]:
    """All ``*.json`` truth files of a folder, keyed by their ``image`` file name (sorted).

    Raises ``FileNotFoundError`` when the folder is missing and ``ValueError`` when it holds no
    truth file, a malformed one, or two files for the same image.
    """
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"truth folder not found: {d}")
    files = sorted(d.glob("*.json"))
    if not files:
        raise ValueError(f"{d}: no *.json truth files")
    out: dict[str, dict] = {}
    seen: dict[str, str] = {}
    for f in files:
        t = load_box_truth(f)
        key = t["image"]
        if key in out:
            raise ValueError(f"{f.name}: image {key!r} already described by {seen[key]}")
        out[key], seen[key] = t, f.name
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- #
# matching one scan
# --------------------------------------------------------------------------- #
def _boxes_array(boxes: Any) -> np.ndarray:
    """(N, 4) array of box centre x, y and size w, h from dicts or an array-like."""
    if boxes is None:
        return np.zeros((0, 4))
    if len(boxes) and isinstance(boxes[0], Mapping):
        boxes = [[b["x"], b["y"], b["w"], b["h"]] for b in boxes]
    a = np.asarray(boxes, dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, 4))
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) = x, y, w, h; got shape {a.shape}")
    return a


def _xy_array(xy: Any) -> np.ndarray:
    a = np.asarray(xy if xy is not None else [], dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, 2))
    return a.reshape(-1, 2)


def match_boxes(pred_xy: Any, boxes: Any, slack_px: float = 2.0) -> list[tuple[int, int]]:
    """One-to-one matching of predicted centres to truth boxes.

    ``pred_xy``: (N, 2) ``(x, y)`` points; ``boxes``: (M, 4) ``(x, y, w, h)`` rows or a list of
    dicts with those keys.  A pair is feasible when the distance of the centres is at most
    ``max(w, h) / 2 + slack_px``.  Maximises the number of pairs, then minimises the sum of
    distance / radius.  Returns ``[(pred_idx, box_idx), ...]`` sorted by pred_idx.
    """
    if not (math.isfinite(slack_px) and slack_px >= 0):
        raise ValueError(f"slack_px must be a finite number >= 0, got {slack_px!r}")
    p, b = _xy_array(pred_xy), _boxes_array(boxes)
    if len(p) == 0 or len(b) == 0:
        return []
    radius = np.maximum(b[:, 2], b[:, 3]) / 2.0 + float(slack_px)  # (M,)
    d = cdist(p, b[:, :2])  # (N, M)
    safe = np.where(radius > 0, radius, 1.0)[None, :]
    norm = np.where(radius[None, :] > 0, d / safe, 0.0)  # <= 1 for feasible pairs
    big = float(min(len(p), len(b)) + 1)  # > any total of feasible normalised distances
    return assign_feasible(norm, d <= radius[None, :], big)


def _pred_xy_classes(pred: Mapping, name: str) -> tuple[np.ndarray, list]:
    defects = pred.get("defects")
    if defects is None:
        defects = []
    if not isinstance(defects, list):
        raise ValueError(f"{name}: prediction 'defects' must be a list")
    xy, classes = [], []
    for i, d in enumerate(defects):
        if not (isinstance(d, Mapping) and _is_number(d.get("x")) and _is_number(d.get("y"))):
            raise ValueError(f"{name}: predicted defect {i} needs finite numbers 'x' and 'y'")
        xy.append((float(d["x"]), float(d["y"])))
        classes.append(d.get("class"))
    return _xy_array(xy), classes


def score_scan(pred: Mapping, truth: Mapping, slack_px: float = 2.0) -> dict:
    """Detection scores of one scan's prediction JSON against its box truth.

    When the prediction's ``shape`` differs from the truth's, prediction coordinates are mapped to
    the truth's pixel grid (pixel centres at integers: ``x' = (x + 0.5) * W_t / W_p - 0.5``).

    Keys: ``image`` (truth image name), ``field_nm`` (max of ``scan_nm``), ``n_pred``,
    ``n_true``, ``tp``, ``fp``, ``fn``, ``precision``, ``recall``, ``f1`` (0/0 conventions of
    :func:`stm_defects.analysis.scores.detection_scores`), ``matches`` (``[(pred_idx,
    box_idx)]``), ``true_classes`` / ``pred_classes`` (classes of the matched pairs, in
    ``matches`` order; a predicted class may be ``None``) and ``rescaled`` (bool).
    """
    name = str(truth.get("image", "<truth>"))
    xy, pred_cls = _pred_xy_classes(pred, name)
    boxes = truth.get("defects") or []
    t_shape = truth.get("shape")
    p_shape = pred.get("shape")
    rescaled = False
    if p_shape is not None and t_shape is not None and list(p_shape)[:2] != list(t_shape)[:2]:
        hp, wp = (float(v) for v in list(p_shape)[:2])
        ht, wt = (float(v) for v in list(t_shape)[:2])
        if min(hp, wp, ht, wt) <= 0:
            raise ValueError(f"{name}: bad shapes for rescaling ({p_shape} -> {t_shape})")
        if len(xy):
            xy = np.column_stack([(xy[:, 0] + 0.5) * (wt / wp) - 0.5, (xy[:, 1] + 0.5) * (ht / hp) - 0.5])
        rescaled = True
    matches = match_boxes(xy, boxes, slack_px)
    tp = len(matches)
    n_pred, n_true = len(xy), len(boxes)
    scan_nm = truth.get("scan_nm")
    field_nm = float(max(scan_nm)) if scan_nm else _NAN
    return {
        "image": name,
        "field_nm": field_nm,
        "n_pred": n_pred,
        "n_true": n_true,
        **detection_from_counts(tp, n_pred - tp, n_true - tp),
        "matches": matches,
        "true_classes": [boxes[j]["class"] for _, j in matches],
        "pred_classes": [pred_cls[i] for i, _ in matches],
        "rescaled": rescaled,
    }


def pair_by_image(predictions: Sequence[Mapping], truths: Mapping[str, Mapping]) -> list[tuple]:
    """``(pred, truth)`` pairs, joining a prediction's ``image`` path by its file name to the keys
    of ``truths`` (as from :func:`load_truth_dir`); predictions without truth are skipped."""
    out = []
    for p in predictions:
        key = Path(str(p.get("image", ""))).name
        if key in truths:
            out.append((p, truths[key]))
    return out


# --------------------------------------------------------------------------- #
# pooling scans
# --------------------------------------------------------------------------- #
def bin_label(lo: float, hi: float) -> str:
    """``"≤15 nm"``, ``"15-60 nm"``, ``">150 nm"`` for the field-size bin (lo, hi]."""
    if lo <= 0 and math.isinf(hi):
        return "all sizes"
    if lo <= 0:
        return f"≤{hi:g} nm"
    if math.isinf(hi):
        return f">{lo:g} nm"
    return f"{lo:g}-{hi:g} nm"


def _prf_arrays(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Vectorised micro precision/recall/F1 with the 0/0 conventions of detection_scores."""
    n_pred, n_true = tp + fp, tp + fn
    both_empty = (n_pred == 0) & (n_true == 0)
    empty_val = np.where(both_empty, 1.0, 0.0)
    prec = np.where(n_pred > 0, tp / np.maximum(n_pred, 1), empty_val)
    rec = np.where(n_true > 0, tp / np.maximum(n_true, 1), empty_val)
    s = prec + rec
    f1 = np.where(s > 0, 2 * prec * rec / np.where(s > 0, s, 1.0), 0.0)
    return np.stack([prec, rec, f1], axis=-1)


def pooled_counts(rows: list[dict], n_boot: int, rng: np.random.Generator) -> dict:
    """Pooled P/R/F1 of per-scan ``tp``/``fp``/``fn`` counts, with 95% percentile-bootstrap
    intervals (``<key>_ci``) over ``n_boot`` resamples of whole scans."""
    counts = np.array([[r["tp"], r["fp"], r["fn"]] for r in rows], dtype=np.int64).reshape(-1, 3)
    tp, fp, fn = (int(v) for v in counts.sum(axis=0))
    out: dict[str, Any] = {
        "n_scans": len(rows),
        "n_true": tp + fn,
        "n_pred": tp + fp,
        **detection_from_counts(tp, fp, fn),
    }
    ci = {k: [_NAN, _NAN] for k in ("precision", "recall", "f1")}
    if len(rows) == 0:
        out.update(precision=_NAN, recall=_NAN, f1=_NAN)
    elif n_boot > 0:
        idx = rng.integers(0, len(rows), size=(n_boot, len(rows)))
        s = counts[idx].sum(axis=1)  # (n_boot, 3)
        boot = _prf_arrays(s[:, 0], s[:, 1], s[:, 2])
        lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
        for j, k in enumerate(("precision", "recall", "f1")):
            ci[k] = [float(lo[j]), float(hi[j])]
    for k, v in ci.items():
        out[f"{k}_ci"] = v
    return out


def score_boxes(
    pairs: Sequence[tuple[Mapping, Mapping]],
    size_bins_nm: Sequence[float] = DEFAULT_SIZE_BINS_NM,
    n_boot: int = 1000,
    seed: int = 0,
    slack_px: float = 2.0,
) -> dict:
    """Score many ``(prediction, truth)`` scan pairs.

    Returns a dict with:

    * ``overall``: ``n_scans``, ``n_true``, ``n_pred``, ``tp``, ``fp``, ``fn``, micro
      ``precision`` / ``recall`` / ``f1`` and their 95% percentile-bootstrap intervals
      ``precision_ci`` etc. (``[lo, hi]``; ``n_boot`` resamples of whole scans with
      ``numpy.random.default_rng(seed)``);
    * ``bins``: the same per field-size bin (``label``, ``lo_nm``, ``hi_nm``; a scan belongs to
      the bin with ``lo < field_nm <= hi``, the first bin also taking ``field_nm == lo``; empty
      bins have NaN scores); bin k resamples with ``default_rng([seed, k + 1])``;
    * ``classes``: ``ari``, ``nmi``, ``purity``, ``hungarian_accuracy`` and ``n`` of the
      predicted class against the annotator class over all matched pairs whose predicted class is
      not ``None`` (``-1``, unknown, counts as a cluster of its own); ``n_unclassified`` matched
      pairs were left out;
    * ``scans``: per-scan rows ``image``, ``field_nm``, ``n_true``, ``n_pred``, ``tp``, ``fp``,
      ``fn``, ``f1``;
    * ``n_boot``, ``seed``, ``slack_px``.
    """
    edges = [float(e) for e in size_bins_nm]
    if len(edges) < 2 or any(b <= a for a, b in pairwise(edges)):
        raise ValueError(f"size_bins_nm must be at least two increasing edges, got {list(size_bins_nm)}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    per_scan = [score_scan(p, t, slack_px) for p, t in pairs]
    overall = pooled_counts(per_scan, n_boot, np.random.default_rng(seed))

    bins = []
    for k, (lo, hi) in enumerate(pairwise(edges)):
        inside = [
            s for s in per_scan
            if (lo < s["field_nm"] <= hi) or (k == 0 and s["field_nm"] == lo)
        ]
        pooled = pooled_counts(inside, n_boot, np.random.default_rng([seed, k + 1]))
        bins.append({"label": bin_label(lo, hi), "lo_nm": lo, "hi_nm": hi, **pooled})

    tl: list = []
    pl: list = []
    n_unclassified = 0
    for s in per_scan:
        for t, p in zip(s["true_classes"], s["pred_classes"]):
            if p is None:
                n_unclassified += 1
            else:
                tl.append(str(t))
                pl.append(str(p))
    classes = {**class_scores(np.asarray(tl, dtype=object), np.asarray(pl, dtype=object)),
               "n_unclassified": n_unclassified}

    scans = [{k: s[k] for k in ("image", "field_nm", "n_true", "n_pred", "tp", "fp", "fn", "f1")}
             for s in per_scan]
    return {"overall": overall, "bins": bins, "classes": classes, "scans": scans,
            "n_boot": int(n_boot), "seed": seed, "slack_px": float(slack_px)}


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #
def _fmt(v: float) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.2f}"


def _with_ci(row: Mapping, key: str) -> str:
    v = row.get(key)
    if v is None or not math.isfinite(v):
        return "–"
    lo, hi = row.get(f"{key}_ci") or (_NAN, _NAN)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return _fmt(v)
    return f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"


def markdown_table(result: Mapping) -> str:
    """A short markdown report of :func:`score_boxes`: an overall row and one row per field-size
    bin (scores as ``"0.71 [0.65, 0.77]"``), then a line with ARI / NMI / purity."""
    lines = [
        "| field | scans | boxes | predictions | precision | recall | F1 |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    rows = [("all", result["overall"])] + [(b["label"], b) for b in result["bins"]]
    for label, r in rows:
        lines.append(
            f"| {label} | {r['n_scans']} | {r['n_true']} | {r['n_pred']} | "
            f"{_with_ci(r, 'precision')} | {_with_ci(r, 'recall')} | {_with_ci(r, 'f1')} |"
        )
    c = result["classes"]
    lines += [
        "",
        (f"Class agreement over {c['n']} matched, classified predictions "
         f"({c.get('n_unclassified', 0)} unclassified left out): ARI {_fmt(c['ari'])}, "
         f"NMI {_fmt(c['nmi'])}, purity {_fmt(c['purity'])}."),
        "",
        (f"Matching: centre within max(w, h)/2 + {result.get('slack_px', 2.0):g} px of a box, "
         f"one-to-one; intervals: 95% bootstrap over scans ({result.get('n_boot', '?')} resamples, "
         f"seed {result.get('seed', '?')})."),
    ]
    return "\n".join(lines) + "\n"
