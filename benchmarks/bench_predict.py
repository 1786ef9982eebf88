"""Prediction time per 512x512 scan, for both methods, with a per-step breakdown.

    python benchmarks/bench_predict.py --models models --params params.yaml --n 5

Uses the trained models of a `make run` (or `stm train`) and synthetic 512x512 scans. Prints
markdown tables; the README quotes them. Reading the file and writing the pictures are not
included (a few ms each).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="models")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--n", type=int, default=5, help="scans to time (after one warm-up)")
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()

    from stm_defects.config import load_params, predict_config
    from stm_defects.data.synth import synth_scan
    from stm_defects.image.preprocess import preprocess
    from stm_defects.improved.method import improved_analyse
    from stm_defects.io.model_files import load_models
    from stm_defects.paper.masks import defect_mask, defect_regions
    from stm_defects.paper.method import classify_regions, mask_config, stage1_maps

    params = load_params(args.params, args.profile)
    pcfg = predict_config(params)
    models = load_models(args.models)
    cfg = params.synth.__class__(**{**params.synth.__dict__, "size": args.size})
    scans = [synth_scan(cfg, 1000 + i) for i in range(args.n + 1)]
    steps = {"preprocess": [], "stage 1 maps": [], "mask + regions": [], "AE2 + GMM": [], "total": []}
    for i, s in enumerate(scans):
        t0 = time.perf_counter()
        img, _ = preprocess(s.height, s.pixel_nm, params.preprocess)
        t1 = time.perf_counter()
        cmap, emap = stage1_maps(img, models, pcfg.paper)
        t2 = time.perf_counter()
        mask = defect_mask(emap, cmap, mask_config(params.mask, models.calibration))
        regions = defect_regions(mask, emap)
        t3 = time.perf_counter()
        classify_regions(img, mask, regions, models, pcfg.paper)
        t4 = time.perf_counter()
        if i == 0:
            continue  # warm-up
        for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            steps[k].append(v)
    improved = []
    for i, s in enumerate(scans):
        t0 = time.perf_counter()
        img, _ = preprocess(s.height, s.pixel_nm, params.preprocess)
        improved_analyse(img, models.improved, params.improved)
        if i:
            improved.append(time.perf_counter() - t0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {dev}, torch threads {torch.get_num_threads()}, profile {params.profile}, "
          f"{args.size}x{args.size}, char stride {params.maps.char_stride}, {args.n} scans")
    print("| step | median s | min s |")
    print("|---|---|---|")
    print("| improved (default profile): preprocess + analysis | "
          f"{statistics.median(improved):.3f} | {min(improved):.3f} |")
    for k, v in steps.items():
        print(f"| paper method: {k} | {statistics.median(v):.3f} | {min(v):.3f} |")


if __name__ == "__main__":
    main()
