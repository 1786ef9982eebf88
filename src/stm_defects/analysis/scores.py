"""Scores of detections and classes against synthetic ground truth.

Points are ``(x, y)`` = (column, row) pixel coordinates, arrays of shape
(N, 2).  A scan's scores are collected by :func:`evaluate_scan` into one flat
dict; :func:`aggregate` combines a list of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from skimage.draw import disk as draw_disk
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, roc_auc_score
from sklearn.metrics.cluster import contingency_matrix

__all__ = [
    "aggregate",
    "assign_feasible",
    "class_scores",
    "detection_scores",
    "evaluate_scan",
    "match_points",
    "pixel_auroc",
    "step_edge_false_positives",
    "truth_mask",
]

_NAN = float("nan")


def _points(a) -> np.ndarray:
    a = np.asarray(a if a is not None else [], dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, 2))
    return a.reshape(-1, 2)


def _ratio(num: int, den: int, other_empty: bool) -> float:
    """num/den; for 0/0: 1.0 when the other side is empty too, else 0.0."""
    if den > 0:
        return num / den
    return 1.0 if other_empty else 0.0


# --------------------------------------------------------------------------- #
# detection
# --------------------------------------------------------------------------- #
def match_points(pred_xy, true_xy, radius=6.0) -> list[tuple[int, int]]:
    """One-to-one matching of predictions to truths within ``radius`` px (a number, or one
    radius per truth).

    Maximises the number of matched pairs, then minimises their total
    distance (``linear_sum_assignment`` with a prohibitive cost beyond the
    radius).  Returns ``[(pred_idx, true_idx), ...]`` sorted by pred_idx.
    """
    p, t = _points(pred_xy), _points(true_xy)
    if len(p) == 0 or len(t) == 0:
        return []
    d = cdist(p, t)
    r = np.broadcast_to(np.asarray(radius, float), (len(t),))
    big = float(r.max()) * (min(len(p), len(t)) + 1) + 1.0  # > any feasible total
    return assign_feasible(d, d <= r[None, :], big)


def assign_feasible(cost: np.ndarray, feasible: np.ndarray, big: float) -> list[tuple[int, int]]:
    """One-to-one pairs (row, col) among the ``feasible`` entries of ``cost``: the most pairs,
    then the least total cost. ``big`` must exceed any total of feasible costs; it stands in
    for the infeasible entries. Sorted by row."""
    if not feasible.any():
        return []
    rows, cols = linear_sum_assignment(np.where(feasible, cost, big))
    ok = feasible[rows, cols]
    return sorted((int(r), int(c)) for r, c in zip(rows[ok], cols[ok]))


def detection_scores(pred_xy, true_xy, radius: float = 6.0) -> dict:
    """tp, fp, fn, precision, recall, f1 of point detections.

    An undefined ratio (0/0) is 1.0 when both sides are empty (nothing
    predicted, nothing to find) and 0.0 otherwise; f1 is 0 when precision +
    recall is 0.
    """
    p, t = _points(pred_xy), _points(true_xy)
    tp = len(match_points(p, t, radius))
    return detection_from_counts(tp, len(p) - tp, len(t) - tp)


def detection_from_counts(tp: int, fp: int, fn: int) -> dict:
    n_pred, n_true = tp + fp, tp + fn
    both_empty = n_pred == 0 and n_true == 0
    precision = _ratio(tp, n_pred, both_empty)
    recall = _ratio(tp, n_true, both_empty)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


# --------------------------------------------------------------------------- #
# classes
# --------------------------------------------------------------------------- #
def class_scores(true_labels, pred_labels) -> dict:
    """ARI, NMI, purity and Hungarian accuracy of a predicted labelling.

    Purity: each predicted cluster counts its most frequent true class.
    Hungarian accuracy: best one-to-one mapping of clusters to classes
    (``linear_sum_assignment`` on the contingency matrix).  All NaN for
    empty input.
    """
    t = np.asarray(true_labels).ravel()
    p = np.asarray(pred_labels).ravel()
    if t.shape != p.shape:
        raise ValueError(f"got {t.size} true and {p.size} predicted labels")
    n = t.size
    if n == 0:
        return {"ari": _NAN, "nmi": _NAN, "purity": _NAN, "hungarian_accuracy": _NAN, "n": 0}
    c = contingency_matrix(t, p)  # (n_true_classes, n_pred_clusters)
    rows, cols = linear_sum_assignment(c, maximize=True)
    return {
        "ari": float(adjusted_rand_score(t, p)),
        "nmi": float(normalized_mutual_info_score(t, p)),
        "purity": float(c.max(axis=0).sum() / n),
        "hungarian_accuracy": float(c[rows, cols].sum() / n),
        "n": int(n),
    }


# --------------------------------------------------------------------------- #
# step edges, pixels
# --------------------------------------------------------------------------- #
def step_edge_false_positives(pred_xy, matched_pred_idx, step_mask, radius: float = 3) -> int:
    """Number of unmatched predictions lying within ``radius`` px of a step
    edge (a True pixel of ``step_mask``).  Predictions outside the image are
    ignored."""
    p = _points(pred_xy)
    sm = np.asarray(step_mask, dtype=bool)
    if len(p) == 0 or not sm.any():
        return 0
    matched = {int(i) for i in (matched_pred_idx if matched_pred_idx is not None else [])}
    unmatched = np.array([i for i in range(len(p)) if i not in matched], dtype=np.int64)
    if unmatched.size == 0:
        return 0
    dist = ndi.distance_transform_edt(~sm)  # distance to the nearest step pixel
    h, w = sm.shape
    cols = np.rint(p[unmatched, 0]).astype(np.int64)
    rows = np.rint(p[unmatched, 1]).astype(np.int64)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    return int(np.count_nonzero(dist[rows[inside], cols[inside]] <= radius))


def pixel_auroc(score_map, truth_mask) -> float:
    """Pixel-level ROC AUC of ``score_map`` against a boolean truth mask;
    non-finite scores are ignored; NaN when the truth has a single class."""
    s = np.asarray(score_map, dtype=np.float64).ravel()
    t = np.asarray(truth_mask, dtype=bool).ravel()
    if s.shape != t.shape:
        raise ValueError(f"score map and truth mask differ in size ({s.size} vs {t.size})")
    ok = np.isfinite(s)
    s, t = s[ok], t[ok]
    if t.size == 0 or t.all() or not t.any():
        return _NAN
    return float(roc_auc_score(t, s))


def truth_mask(shape, true_xy, radii) -> np.ndarray:
    """Boolean (H, W) mask of discs centred on the true ``(x, y)`` points;
    ``radii`` is a scalar or one radius per point."""
    h, w = (int(v) for v in tuple(shape)[:2])
    p = _points(true_xy)
    r = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(p),))
    out = np.zeros((h, w), bool)
    for (x, y), rad in zip(p, r):
        if rad <= 0:
            continue
        rr, cc = draw_disk((y, x), rad, shape=(h, w))
        out[rr, cc] = True
        yi, xi = round(float(y)), round(float(x))
        if 0 <= yi < h and 0 <= xi < w:
            out[yi, xi] = True  # the centre itself, even for tiny radii
    return out


# --------------------------------------------------------------------------- #
# per scan and aggregate
# --------------------------------------------------------------------------- #
def evaluate_scan(
    pred_xy,
    true_xy,
    pred_labels=None,
    true_labels=None,
    step_mask=None,
    score_map=None,
    truth_radii=None,
    radius: float = 6.0,
    step_radius: float = 3,
) -> dict:
    """All scores of one scan in a flat dict, the input of :func:`aggregate`.

    Keys: the :func:`detection_scores` keys; ``matches`` (list of pairs);
    ``true_labels_matched`` / ``pred_labels_matched`` (labels of the matched
    pairs, when both label arrays are given) and :func:`class_scores` of
    them under ``class``; ``step_edge_fp`` (when ``step_mask`` is given);
    ``auroc`` (when ``score_map`` and ``truth_radii`` are given).
    """
    p, t = _points(pred_xy), _points(true_xy)
    matches = match_points(p, t, radius)
    out = {**detection_scores(p, t, radius), "n_pred": len(p), "n_true": len(t), "matches": matches}
    if pred_labels is not None and true_labels is not None:
        pl, tl = np.asarray(pred_labels).ravel(), np.asarray(true_labels).ravel()
        if pl.size != len(p) or tl.size != len(t):
            raise ValueError("need one label per predicted and per true point")
        pm = [pl[i].item() for i, _ in matches]
        tm = [tl[j].item() for _, j in matches]
        out["pred_labels_matched"] = pm
        out["true_labels_matched"] = tm
        out["class"] = class_scores(tm, pm)
    if step_mask is not None:
        out["step_edge_fp"] = step_edge_false_positives(p, [i for i, _ in matches], step_mask, step_radius)
    if score_map is not None and truth_radii is not None:
        sm = np.asarray(score_map)
        out["auroc"] = pixel_auroc(sm, truth_mask(sm.shape, t, truth_radii))
    return out


def _nanmean(values: Sequence[float]) -> float:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else _NAN


def aggregate(per_scan: list[dict]) -> dict:
    """Combine per-scan results (as from :func:`evaluate_scan`).

    * detection: micro-average -- tp/fp/fn summed, then precision/recall/f1;
    * classes: :func:`class_scores` on the matched defects of all scans
      pooled (``true_labels_matched`` / ``pred_labels_matched``);
    * ``step_edge_fp_mean``: mean over the scans that report ``step_edge_fp``;
    * ``auroc_mean``: mean of the finite per-scan ``auroc`` values.
    Missing quantities give NaN.
    """
    tp = sum(int(s.get("tp", 0)) for s in per_scan)
    fp = sum(int(s.get("fp", 0)) for s in per_scan)
    fn = sum(int(s.get("fn", 0)) for s in per_scan)
    out = {"n_scans": len(per_scan), **detection_from_counts(tp, fp, fn)}

    tl: list = []
    pl: list = []
    for s in per_scan:
        if "true_labels_matched" in s and "pred_labels_matched" in s:
            tl.extend(s["true_labels_matched"])
            pl.extend(s["pred_labels_matched"])
    cs = class_scores(np.asarray(tl), np.asarray(pl))
    out.update(
        ari=cs["ari"],
        nmi=cs["nmi"],
        purity=cs["purity"],
        hungarian_accuracy=cs["hungarian_accuracy"],
        n_matched_labelled=cs["n"],
    )

    steps = [s["step_edge_fp"] for s in per_scan if s.get("step_edge_fp") is not None]
    out["step_edge_fp_mean"] = float(np.mean(steps)) if steps else _NAN
    out["auroc_mean"] = _nanmean([s.get("auroc") for s in per_scan])
    return out
