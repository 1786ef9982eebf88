"""Ablation: the report's pipeline vs the improved analysis on synthetic test + hard scans.

    python benchmarks/ablation.py --models /tmp/t/models --params /tmp/t/params.yaml \
        --n 12 --size 512 --out reports/ablation

Generates N train (for the improved method's classes), N test (default distribution) and N
hard scans with `synth.synth_scan`, runs both methods on the preprocessed scans and writes
`ablation.md` and `ablation.json` to --out: F1 / precision / recall (test, hard), step-edge
false positives per scan, ARI / NMI / purity (test), agreement of classes between each test
scan and its np.rot90 copy, seconds per scan (analysis only, preprocessing excluded).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def rot_point(x: float, y: float, w: int) -> tuple[float, float]:
    """(x, y) of a point of an (H, W) image in np.rot90 of it: new[i, j] = old[j, W-1-i]."""
    return y, (w - 1) - x


def rotation_agreement(a_regions, b_regions, w: int, radius: float) -> tuple[int, int]:
    from stm_defects.evaluate import match_points

    pa = [rot_point(r["x"], r["y"], w) for r in a_regions]
    pb = [(r["x"], r["y"]) for r in b_regions]
    m = match_points(pa, pb, radius)
    same = sum(a_regions[i]["class"] == b_regions[j]["class"] for i, j in m)
    return same, len(m)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="paper models folder (stages.load_models); omit to skip")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--n", type=int, default=12, help="scans per split")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import dataclasses

    from threadpoolctl import threadpool_limits

    from stm_defects.config import load_params
    from stm_defects.evaluate import aggregate, evaluate_scan
    from stm_defects.improved import ImprovedConfig, fit_improved, improved_analyse
    from stm_defects.preprocess import preprocess
    from stm_defects.synth import HARD, SynthConfig, synth_scan

    params = load_params(args.params)
    radius, step_r = params.evaluate.match_radius, params.evaluate.step_radius
    default = SynthConfig(size=args.size)
    hard = dataclasses.replace(HARD, size=args.size)
    base = 100_000 + 10_000 * args.seed

    def scans(cfg, offset):
        return [synth_scan(cfg, base + offset + i) for i in range(args.n)]

    def prep(h):
        return preprocess(h, 0.1, params.preprocess)[0]

    data = {"test": scans(default, 1000), "hard": scans(hard, 2000)}
    train = [prep(s.height) for s in scans(default, 0)]
    imgs = {k: [prep(s.height) for s in v] for k, v in data.items()}
    rot = [prep(np.rot90(s.height)) for s in data["test"]]

    methods = {}
    if args.models:
        from stm_defects.pipeline import analyse
        from stm_defects.stages import load_models

        models = load_models(args.models)
        methods["paper"] = lambda img: analyse(img, models, params)
    cfg = ImprovedConfig()
    t0 = time.perf_counter()
    with threadpool_limits(1):
        state = fit_improved(train, cfg, seed=args.seed)
    fit_s = time.perf_counter() - t0
    methods["improved"] = lambda img: improved_analyse(img, state, cfg)

    results = {"args": vars(args), "improved_fit_s": fit_s,
               "improved_classes": {k: v for k, v in (state["classes"] or {}).items()
                                    if k in ("k", "n_classes", "selection")}}
    for name, fn in methods.items():
        row = {}
        times = []
        for split in ("test", "hard"):
            per = []
            for s, img in zip(data[split], imgs[split]):
                t = time.perf_counter()
                a = fn(img)
                times.append(time.perf_counter() - t)
                per.append(evaluate_scan(
                    [(r["x"], r["y"]) for r in a.regions], [(d["x"], d["y"]) for d in s.defects],
                    pred_labels=[-1 if r["class"] is None else r["class"] for r in a.regions],
                    true_labels=[d["class_id"] for d in s.defects], step_mask=s.step_mask,
                    radius=radius, step_radius=step_r))
            row[split] = {k: v for k, v in aggregate(per).items() if not isinstance(v, (list, dict))}
        same = total = 0
        for img, img_r in zip(imgs["test"], rot):
            a, b = fn(img), fn(img_r)
            s_, t_ = rotation_agreement(a.regions, b.regions, img.shape[1], radius)
            same, total = same + s_, total + t_
        row["rotation_agreement"] = same / total if total else float("nan")
        row["rotation_matched"] = total
        row["seconds_per_scan"] = float(np.median(times))
        results[name] = row

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(results, indent=2, default=float))
    cols = [("F1 test", "test", "f1"), ("P test", "test", "precision"), ("R test", "test", "recall"),
            ("F1 hard", "hard", "f1"), ("P hard", "hard", "precision"), ("R hard", "hard", "recall"),
            ("step FP/scan test", "test", "step_edge_fp_mean"),
            ("step FP/scan hard", "hard", "step_edge_fp_mean"),
            ("ARI test", "test", "ari"), ("NMI test", "test", "nmi"), ("purity test", "test", "purity"),
            ("ARI hard", "hard", "ari"), ("purity hard", "hard", "purity")]
    lines = ["| method | " + " | ".join(c[0] for c in cols) + " | rot90 agreement | s/scan |",
             "|---" * (len(cols) + 3) + "|"]
    for name in methods:
        r = results[name]
        vals = [f"{r[s][k]:.3f}" for _, s, k in cols]
        lines.append(f"| {name} | " + " | ".join(vals)
                     + f" | {r['rotation_agreement']:.3f} ({r['rotation_matched']}) | {r['seconds_per_scan']:.2f} |")
    text = (f"N = {args.n} scans per split, {args.size}x{args.size}, 0.1 nm/px, seed {args.seed}\n\n"
            + "\n".join(lines) + f"\n\nimproved: fit {fit_s:.1f} s on {args.n} train scans, "
            f"classes k={results['improved_classes'].get('k')} -> {results['improved_classes'].get('n_classes')}\n")
    (out / "ablation.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
