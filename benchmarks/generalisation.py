"""Detection on lattice families the default method was never tuned on, with a dev/test protocol.

    python benchmarks/generalisation.py --split test --n 100 --workers 2 --out reports/generalisation_test

Scans come from `data.lattices` (six surface lattices, generic defects, steps and acquisition
artefacts), a generator independent of the Si(001) training data. Every scan draws its own
conditions from its seed: pixel size log-uniform in 0.02-0.3 nm/px, 256 or 384 px, SNR 1.5-6,
0-2 steps, any lattice rotation. The `dev` split (seeds 0..n-1) is the one to look at while
changing the detector; the `test` split (seeds 1,000,000 + i) is for reporting only: no knob is
ever chosen on it.

A detection matches a true defect when its centre lies within the defect's radius + 2 px +
0.3 nm, one-to-one (`analysis.scores.match_points`). Reported per family and overall:
pooled precision, recall and F1 with 95% percentile-bootstrap intervals over scans
(`analysis.boxes.pooled_counts`), plus false detections per 100 nm^2 on the defect-free
scans of each family (one in ten scans has no defect). Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

SPLIT_SEED = {"dev": 0, "test": 1_000_000}


def conditions(family: str, seed: int) -> dict:
    """The scan conditions of one seed (deterministic)."""
    rng = np.random.default_rng([seed, sum(map(ord, family))])
    return {
        "pixel_nm": float(np.exp(rng.uniform(np.log(0.02), np.log(0.3)))),
        "size": int(rng.choice([256, 384])),
        "snr": float(rng.uniform(1.5, 6.0)),
        "n_steps": int(rng.integers(0, 3)),
        "n_defects": 0 if seed % 10 == 9 else (3, 12),
    }


def one_scan(args: tuple[str, int, str | None]) -> dict:
    family, seed, params = args
    from stm_defects.analysis.dispatch import PredictConfig, analyse
    from stm_defects.analysis.scores import match_points
    from stm_defects.data.lattices import lattice_scan
    from stm_defects.image.preprocess import preprocess
    from stm_defects.results import Models

    c = conditions(family, seed)
    px = c["pixel_nm"]
    if params:
        from stm_defects.config import load_params, predict_config

        cfg = predict_config(load_params(params))
    else:
        cfg = PredictConfig()
    s = lattice_scan(family, size=c["size"], pixel_nm=px, n_defects=c["n_defects"], snr=c["snr"],
                     seed=seed, n_steps=c["n_steps"])
    img, scale = preprocess(s.height, px, cfg.preprocess)
    res = analyse(img, Models(), cfg, px / scale)
    p = np.array([[r["x"] / scale, r["y"] / scale] for r in res.regions]).reshape(-1, 2)
    t = np.array([[d["x"], d["y"]] for d in s.defects]).reshape(-1, 2)
    radius = [d["radius_px"] + 2.0 + 0.3 / px for d in s.defects]
    tp = len(match_points(p, t, radius))
    return {"family": family, "seed": seed, **c, "n_defects": len(t), "area_nm2": (c["size"] * px) ** 2,
            "tp": tp, "fp": len(p) - tp, "fn": len(t) - tp}


def summarise(rows: list[dict], n_boot: int = 1000) -> dict:
    from stm_defects.analysis.boxes import pooled_counts

    out = {}
    for fam in sorted({r["family"] for r in rows}) + ["all"]:
        sel = [r for r in rows if fam in ("all", r["family"])]
        s = pooled_counts(sel, n_boot, np.random.default_rng(0))
        empty = [r for r in sel if r["n_defects"] == 0]
        area = sum(r["area_nm2"] for r in empty)
        s["fp_per_100nm2_defect_free"] = 100.0 * sum(r["fp"] for r in empty) / area if area else math.nan
        out[fam] = s
    return out


def markdown(summary: dict, split: str, n: int) -> str:
    def ci(s, k):
        lo, hi = s[f"{k}_ci"]
        return f"{s[k]:.2f} [{lo:.2f}, {hi:.2f}]"

    lines = [f"Split `{split}`, {n} scans per family (95% bootstrap intervals over scans).", "",
             "| family | scans | defects | precision | recall | F1 | false / 100 nm² (defect-free) |",
             "|---|---|---|---|---|---|---|"]
    for fam, s in summary.items():
        lines.append(f"| {fam} | {s['n_scans']} | {s['n_true']} | {ci(s, 'precision')} | {ci(s, 'recall')} | "
                     f"{ci(s, 'f1')} | {s['fp_per_100nm2_defect_free']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from stm_defects.data.lattices import LATTICES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=sorted(SPLIT_SEED), default="dev")
    ap.add_argument("--n", type=int, default=100, help="scans per family")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.md")
    ap.add_argument("--params", default=None, help="a params.yaml whose prediction config to use "
                                                    "(default: the library defaults, equal to the project's)")
    args = ap.parse_args()
    jobs = [(f, SPLIT_SEED[args.split] + i, args.params) for f in LATTICES for i in range(args.n)]
    from tqdm import tqdm

    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(tqdm(pool.map(one_scan, jobs, chunksize=4), total=len(jobs), unit="scan"))
    summary = summarise(rows)
    md = markdown(summary, args.split, args.n)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"split": args.split, "n": args.n, "summary": summary,
                                                             "scans": rows}, indent=1))
        args.out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
