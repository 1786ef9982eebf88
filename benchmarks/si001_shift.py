"""Si(001) scans unlike the training data, trained on as a user would, scored with intervals.

    python benchmarks/si001_shift.py --split dev --shift all --n-train 24 --n-test 40
    python benchmarks/si001_shift.py --split test --shift all --out reports/si001_shift_test

What a user does with their own Si(001) scans is `stm train` on them (unlabelled), then `stm
predict`. Of the trained models, the default method uses the classes that `fit_improved` fits on
the training scans' detections; detection itself takes nothing from training. This script does
exactly that part, outside DVC, for each *shift* of the scan distribution away from the
project's own synthetic data (`params.yaml: synth`):

- ``normal``: pixel size 0.06-0.2 nm/px (log-uniform), 384 or 512 px, SNR 2-6, 0-3 steps;
- ``noisy``: the same pixel sizes, SNR 1.2-3, 2-4 steps, more scars, tip changes, line offsets;
- ``skewed``: as ``normal``, with class frequencies 50 : 12 : 4 : 2 : 1 (shuffled per split).

Every scan draws its own conditions from its seed. A split is a pair of disjoint seed ranges,
one for training scans and one for test scans: ``dev`` (seeds from 0) is the split to look at
while changing the method, ``test`` (seeds from 1,000,000) is for reporting only, and
``holdout`` (seeds from 2,000,000) is a second reporting split, for a change whose test figures
were seen while it was being made.

Reported per shift: pooled detection P/R/F1, ARI / NMI / purity of the classes against the
generator's five classes (on matched defects), false detections within 0.3 nm of a step per
scan, and the share of defects that keep their class when the scan is turned by 90 degrees;
each with a 95% percentile-bootstrap interval over test scans. Lengths are physical: a
detection matches a true defect within 0.6 nm (`evaluate.match_radius` 6 px at 0.1 nm/px).
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

SPLIT_SEED = {"dev": 0, "test": 1_000_000, "holdout": 2_000_000}
TRAIN_OFFSET = 500_000
TRAIN_DRAW = 10_000     # --train-draw J: another sample of training scans, seeds from TRAIN_OFFSET + J * this
SHIFTS = ("normal", "noisy", "skewed")
MATCH_NM, STEP_NM = 0.6, 0.3


def synth_config(shift: str, seed: int, split: str):
    """The generator settings of one scan (deterministic in shift, seed and split)."""
    from stm_defects.data.synth import SynthConfig

    rng = np.random.default_rng([seed, sum(map(ord, shift))])
    px = float(np.exp(rng.uniform(np.log(0.06), np.log(0.2))))
    size = int(rng.choice([384, 512]))
    base = dict(size=size, pixel_nm=px, min_defect_distance_px=max(8, int(round(2.0 / px))))
    if shift == "noisy":
        return SynthConfig(**base, n_steps=(2, 4), snr=(1.2, 3.0), scar_prob=0.6, tip_change_prob=0.4,
                           line_offset_nm=0.04, pink_fraction=0.5)
    if shift == "skewed":
        w = np.array([50.0, 12.0, 4.0, 2.0, 1.0])
        np.random.default_rng([SPLIT_SEED[split], 7]).shuffle(w)
        return SynthConfig(**base, class_weights=tuple(float(v) for v in w))
    return SynthConfig(**base)


def _prepared(shift: str, seed: int, split: str, cfg):
    from stm_defects.data.synth import synth_scan
    from stm_defects.image.preprocess import preprocess

    s = synth_scan(synth_config(shift, seed, split), seed)
    img, scale = preprocess(s.height, s.pixel_nm, cfg.preprocess)
    return s, img, scale


def train_image(args) -> tuple[np.ndarray, float]:
    shift, seed, split, params = args
    cfg = _config(params)
    s, img, scale = _prepared(shift, seed, split, cfg)
    return img, s.pixel_nm / scale


def test_scan(args) -> dict:
    shift, seed, split, params, state = args
    from stm_defects.analysis.dispatch import analyse
    from stm_defects.analysis.evaluation import rotation_pairs
    from stm_defects.analysis.scores import evaluate_scan
    from stm_defects.results import Models

    cfg = _config(params)
    s, img, scale = _prepared(shift, seed, split, cfg)
    px = s.pixel_nm / scale
    models = Models(improved=state)
    res = analyse(img, models, cfg, px)
    pred = [(r["x"] / scale, r["y"] / scale) for r in res.regions]
    labels = [-1 if r["class"] is None else r["class"] for r in res.regions]
    t = s.defects
    ev = evaluate_scan(pred, [(d["x"], d["y"]) for d in t], labels, [d["class_id"] for d in t],
                       step_mask=s.step_mask, radius=MATCH_NM / s.pixel_nm,
                       step_radius=max(1, int(round(STEP_NM / s.pixel_nm))))
    same, pairs = rotation_pairs(img, models, cfg, MATCH_NM / px, px)
    return {"seed": seed, "pixel_nm": s.pixel_nm, "size": s.height.shape[0], "n_steps": s.meta["n_steps"],
            "tp": ev["tp"], "fp": ev["fp"], "fn": ev["fn"], "step_edge_fp": ev["step_edge_fp"],
            "true": ev["true_labels_matched"], "pred": ev["pred_labels_matched"],
            "rot_same": same, "rot_pairs": pairs}


def _config(params: str | None):
    from stm_defects.analysis.dispatch import PredictConfig

    if params:
        from stm_defects.config import load_params, predict_config

        return predict_config(load_params(params))
    return PredictConfig()


def summarise(rows: list[dict], n_boot: int = 1000) -> dict:
    from stm_defects.analysis.boxes import pooled_counts
    from stm_defects.analysis.scores import class_scores

    rng = np.random.default_rng(0)
    out = pooled_counts(rows, n_boot, rng)

    def stats(sel):
        tl = [v for r in sel for v in r["true"]]
        pl = [v for r in sel for v in r["pred"]]
        cs = class_scores(np.asarray(tl), np.asarray(pl))
        rp = sum(r["rot_pairs"] for r in sel)
        return {"ari": cs["ari"], "nmi": cs["nmi"], "purity": cs["purity"],
                "step_fp_per_scan": float(np.mean([r["step_edge_fp"] for r in sel])),
                "rotation_agreement": sum(r["rot_same"] for r in sel) / rp if rp else float("nan")}

    point = stats(rows)
    boot = [stats([rows[i] for i in rng.integers(0, len(rows), len(rows))]) for _ in range(min(n_boot, 200))]
    for k, v in point.items():
        vals = np.array([b[k] for b in boot], np.float64)
        out[k] = v
        out[f"{k}_ci"] = [float(np.nanpercentile(vals, 2.5)), float(np.nanpercentile(vals, 97.5))]
    out["n_pred_classes"] = len({v for r in rows for v in r["pred"]} - {-1})
    return out


def run_shift(shift: str, split: str, n_train: int, n_test: int, params: str | None, workers: int, seed: int,
              draw: int = 0) -> dict:
    from tqdm import tqdm

    from stm_defects.improved.method import fit_improved

    base = SPLIT_SEED[split]
    cfg = _config(params)
    with ProcessPoolExecutor(workers) as pool:
        first = base + TRAIN_OFFSET + draw * TRAIN_DRAW
        train = list(tqdm(pool.map(train_image, [(shift, first + i, split, params)
                                                 for i in range(n_train)]),
                          total=n_train, unit="scan", desc=f"{shift} train"))
        state = fit_improved([im for im, _ in train], cfg.improved, seed, [px for _, px in train])
        rows = list(tqdm(pool.map(test_scan, [(shift, base + i, split, params, state) for i in range(n_test)]),
                         total=n_test, unit="scan", desc=f"{shift} test"))
    summary = summarise(rows)
    summary["n_classes_fitted"] = (state["classes"] or {}).get("n_classes")
    summary["n_train_defects"] = state["n_train_defects"]
    return {"summary": summary, "scans": rows}


def markdown(results: dict, split: str) -> str:
    def ci(s, k, fmt=".2f"):
        lo, hi = s[f"{k}_ci"]
        return f"{s[k]:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"

    lines = [f"Split `{split}` (95% bootstrap intervals over test scans).", "",
             "| shift | train / test scans | F1 | precision | recall | ARI | purity | classes | "
             "step FP / scan | rotation agreement |", "|---|---|---|---|---|---|---|---|---|---|"]
    for shift, r in results.items():
        s = r["summary"]
        lines.append(f"| {shift} | {r['n_train']} / {s['n_scans']} | {ci(s, 'f1')} | {ci(s, 'precision')} | "
                     f"{ci(s, 'recall')} | {ci(s, 'ari')} | {ci(s, 'purity')} | {s['n_classes_fitted']} | "
                     f"{ci(s, 'step_fp_per_scan')} | {ci(s, 'rotation_agreement')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=sorted(SPLIT_SEED), default="dev")
    ap.add_argument("--shift", choices=(*SHIFTS, "all"), default="all")
    ap.add_argument("--n-train", type=int, default=24)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42, help="the training seed (params.yaml: seed)")
    ap.add_argument("--params", default=None, help="a params.yaml whose prediction config to use "
                                                    "(default: the library defaults, equal to the project's)")
    ap.add_argument("--train-draw", type=int, default=0,
                    help="another sample of training scans from the same split (0: the usual one): "
                         "how much the classes move with the training sample")
    ap.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    shifts = SHIFTS if args.shift == "all" else (args.shift,)
    results = {}
    for shift in shifts:
        r = run_shift(shift, args.split, args.n_train, args.n_test, args.params, args.workers, args.seed,
                      args.train_draw)
        results[shift] = {"n_train": args.n_train, **r}
    md = markdown(results, args.split)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"split": args.split, "results": results}, indent=1))
        args.out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
