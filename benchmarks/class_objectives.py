"""Can the class knobs be tuned without labels?  Label-free objectives against the true ARI.

    python benchmarks/class_objectives.py --split dev --draws 0 1 2 --out reports/class_objectives

The default method's classes (`improved.classify`) have knobs that change which classes a user
gets: the patch size, the smoothing, the number of principal components, the covariance, and
whether the main features are the canonical patches or the patches averaged over their flips.
To tune them on a user's own scans (with Optuna, as `tune_ae1` tunes AE1's latent size), an
objective is needed that needs no labels and that rises where the true classes are found
better. This script measures three candidates against the truth, on the Si(001) shifts of
`benchmarks/si001_shift.py` (same scans, same training draws, same matching):

- ``split_ari``: fit the classes on two disjoint halves of the training *scans*, label every
  training defect with both, and take the ARI between the two labellings (mean of 3 splits):
  do independent scans give the same classes?
- ``split_mi``: the same pair of labellings, their mutual information (nats): how much class
  information is reproduced (more classes may score more, if they are reproducible);
- ``jitter``: the share of training defects that keep their class when their centre is moved
  by 0.15 nm in a random direction (a detector's typical centring error): classes should not
  hang on where within a defect its centre fell.

For each shift and training draw, every variant is fitted on the training scans (detection is
the same for all), scored on the test scans against the generator's classes, and the script
reports each objective's Spearman rank correlation with the true ARI over the variants and the
true ARI of the variant each objective would pick. An objective fit for tuning would pick
variants at least as good as the reference (canonical patches, the earlier default) on every
shift and draw.

Detection takes nothing from the variants, so each scan is detected once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from si001_shift import MATCH_NM, SHIFTS, SPLIT_SEED, TRAIN_DRAW, TRAIN_OFFSET, _config, _prepared  # noqa: E402

OBJECTIVES = ("split_ari", "split_mi", "jitter")
JITTER_NM = 0.15
REFERENCE = "canonical patches"   # the variant the summary compares with

# name -> `ClassifyConfig` overrides of the default (`features: symmetric`, flip-averaged
# patches). The knob variants change one knob of the earlier default, canonical patches, as
# they were measured when that was the default (README, "Tuning the class knobs without labels").
CANONICAL = {"features": "canonical"}
VARIANTS = {
    REFERENCE: CANONICAL,
    "patch 1.7 nm": {**CANONICAL, "patch": 17},
    "patch 3.3 nm": {**CANONICAL, "patch": 33},
    "smooth 0.05 nm": {**CANONICAL, "smooth": 0.5},
    "smooth 0.2 nm": {**CANONICAL, "smooth": 2.0},
    "4 components": {**CANONICAL, "n_pca": 4},
    "10 components": {**CANONICAL, "n_pca": 10},
    "diagonal covariance": {**CANONICAL, "covariance": "diag"},
    "default (flip-averaged patches)": {},
}


def detect_scan(args) -> dict:
    """Detection of one scan, and what the classes need: residual, lattice, centres, units;
    for a test scan also the true class of each detection (-1: no true defect matched)."""
    from stm_defects.analysis.scores import match_points
    from stm_defects.improved.method import _centres, _detect, _unit, patch_step, working_scale

    shift, seed, split, with_truth = args
    cfg = _config(None)
    s, img, scale = _prepared(shift, seed, split, cfg)
    px = s.pixel_nm / scale
    k = working_scale(img.shape, px, cfg.improved)
    res = _detect(img, k, None, cfg.improved)
    c = _centres(res)
    out = {"residual": res.residual, "lattice": res.lattice, "centres": c, "unit": _unit(res),
           "step": patch_step(px, k, cfg.improved), "working_nm": px / k}
    if with_truth:
        pred = ((c[:, ::-1] + 0.5) / k - 0.5) / scale           # (x, y) on the generator's grid
        true = [(d["x"], d["y"]) for d in s.defects]
        truth = np.full(len(c), -1, np.int64)
        for i, j in match_points(pred, true, MATCH_NM / s.pixel_nm):
            truth[i] = s.defects[j]["class_id"]
        out["truth"] = truth
    return out


def _patches(d: dict, ccfg, centres=None) -> np.ndarray:
    from stm_defects.improved.classify import canonical_patches

    c = d["centres"] if centres is None else centres
    if len(c) == 0:
        return np.zeros((0, ccfg.patch, ccfg.patch), np.float32)
    return canonical_patches(d["residual"], d["lattice"], c, ccfg, d["unit"], d["step"])[0]


def score_variants(args) -> list[dict]:
    """Every variant on one (shift, draw): the true ARI / purity on the test scans and the
    label-free objectives on the training scans."""
    from sklearn.metrics import adjusted_rand_score, mutual_info_score

    from stm_defects.analysis.scores import class_scores
    from stm_defects.improved.classify import classify_patches, fit_classes

    shift, draw, train, test, seed, names = args
    base = _config(None).improved.classify
    rows = []
    for name in names:
        ccfg = dataclasses.replace(base, **VARIANTS[name])
        per_scan = [_patches(d, ccfg) for d in train]
        allp = np.concatenate(per_scan)
        state = fit_classes(allp, ccfg, seed)
        pred = np.concatenate([classify_patches(state, _patches(d, ccfg))["label"] for d in test])
        truth = np.concatenate([d["truth"] for d in test])
        m = truth >= 0
        cs = class_scores(truth[m].tolist(), pred[m].tolist())
        rng = np.random.default_rng([seed, draw])
        aris, mis = [], []
        for r in range(3):
            perm = rng.permutation(len(train))
            halves = perm[: len(train) // 2], perm[len(train) // 2:]
            labels = []
            for h, half in enumerate(halves):
                st = fit_classes(np.concatenate([per_scan[i] for i in half]), ccfg, seed + 1 + 2 * r + h)
                labels.append(classify_patches(st, allp)["nearest"])
            aris.append(adjusted_rand_score(*labels))
            mis.append(mutual_info_score(*labels))
        moved = []
        for d in train:
            ang = rng.uniform(0.0, 2 * np.pi, len(d["centres"]))
            shift_px = JITTER_NM / d["working_nm"]
            moved.append(_patches(d, ccfg, d["centres"] + shift_px * np.stack([np.sin(ang), np.cos(ang)], 1)))
        same = classify_patches(state, np.concatenate(moved))["nearest"] == classify_patches(state, allp)["nearest"]
        rows.append({"shift": shift, "draw": draw, "variant": name, "ari": cs["ari"], "purity": cs["purity"],
                     "n_classes": int(state["n_classes"]), "split_ari": float(np.mean(aris)),
                     "split_mi": float(np.mean(mis)), "jitter": float(np.mean(same))})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per (shift, draw): each objective's Spearman correlation with the true ARI over the
    variants (NaN for fewer than 3), and the true ARI of the variant it picks, beside the
    `REFERENCE` variant's (NaN when it was not run) and the best."""
    from scipy.stats import spearmanr

    out = []
    for key in sorted({(r["shift"], r["draw"]) for r in rows}):
        sel = [r for r in rows if (r["shift"], r["draw"]) == key]
        ari = np.array([r["ari"] for r in sel])
        ref = [r["ari"] for r in sel if r["variant"] == REFERENCE]
        row = {"shift": key[0], "draw": key[1], "reference_ari": ref[0] if ref else float("nan"),
               "best_ari": float(ari.max())}
        for o in OBJECTIVES:
            v = np.array([r[o] for r in sel])
            row[f"{o}_rho"] = float(spearmanr(v, ari).statistic) if len(sel) >= 3 else float("nan")
            row[f"{o}_pick"] = sel[int(v.argmax())]["variant"]
            row[f"{o}_pick_ari"] = float(ari[int(v.argmax())])
        out.append(row)
    return out


def markdown(rows: list[dict], summary: list[dict], split: str) -> str:
    lines = [f"Split `{split}`: true ARI / purity on the test scans, label-free objectives on the training scans.", "",
             "| shift | draw | variant | ARI | purity | classes | split ARI | split MI | jitter |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shift']} | {r['draw']} | {r['variant']} | {r['ari']:.3f} | {r['purity']:.3f} | "
                     f"{r['n_classes']} | {r['split_ari']:.3f} | {r['split_mi']:.3f} | {r['jitter']:.3f} |")
    lines += ["", f"| shift | draw | ARI of {REFERENCE} | best ARI | " + " | ".join(
        f"{o}: rho, pick's ARI" for o in OBJECTIVES) + " |", "|---|---|---|---|" + "---|" * len(OBJECTIVES)]
    for s in summary:
        lines.append(f"| {s['shift']} | {s['draw']} | {s['reference_ari']:.3f} | {s['best_ari']:.3f} | " + " | ".join(
            f"{s[o + '_rho']:+.2f}, {s[o + '_pick_ari']:.3f}" for o in OBJECTIVES) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=sorted(SPLIT_SEED), default="dev")
    ap.add_argument("--shift", choices=(*SHIFTS, "all"), default="all")
    ap.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-train", type=int, default=24)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="the variants to fit (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    shifts = SHIFTS if args.shift == "all" else (args.shift,)
    base = SPLIT_SEED[args.split]
    rows = []
    with ProcessPoolExecutor(args.workers) as pool:
        for shift in shifts:
            test = list(tqdm(pool.map(detect_scan, [(shift, base + i, args.split, True) for i in range(args.n_test)]),
                             total=args.n_test, unit="scan", desc=f"{shift} test"))
            trains = {}
            for draw in args.draws:     # every draw detected before the (longer) fits start
                first = base + TRAIN_OFFSET + draw * TRAIN_DRAW
                trains[draw] = list(tqdm(pool.map(detect_scan, [(shift, first + i, args.split, False)
                                                                for i in range(args.n_train)]),
                                         total=args.n_train, unit="scan", desc=f"{shift} train draw {draw}"))
            jobs = [pool.submit(score_variants, (shift, draw, train, test, args.seed, args.variants))
                    for draw, train in trains.items()]
            del trains
            for job in tqdm(jobs, unit="draw", desc=f"{shift} variants"):
                rows.extend(job.result())
    summary = summarise(rows)
    md = markdown(rows, summary, args.split)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
        Path(f"{args.out}.md").write_text(md)


if __name__ == "__main__":
    main()
