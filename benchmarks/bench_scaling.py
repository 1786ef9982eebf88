"""Time and peak memory per scan against scan size, for both methods.

    python benchmarks/bench_scaling.py --models models                       # 512^2 .. 2048^2
    python benchmarks/bench_scaling.py --models models --sizes 512 1024 2048 4096
    python benchmarks/bench_scaling.py --models models --methods improved    # default profile only

Each (profile, size) runs in a fresh Python process, so its peak resident memory (``ru_maxrss``,
imports and models included) belongs to that case alone. The process synthesises Si(001) scans
at 0.1 nm/px (`data.synth`; the default method's working pixel size, so nothing is resampled
away), then times what `stm predict` does between reading a file and writing its pictures:
`analysis.dispatch.preprocess_scan` + `analysis.dispatch.analyse`. The time is the median over
``--repeats`` scans of that size (fewer for the big ones), after one warm-up scan. The paper
method (the models of the folder, with the default profile's prediction settings but the report's
pipeline) runs its autoencoders on the GPU when one is present. Prints a markdown table; the
README quotes it. "µs/px" is the time per pixel, and "vs smallest" is that figure over the
smallest size's: 1.0 is a cost linear in the pixel count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import dataclasses, json, resource, statistics, sys, time
import torch
from stm_defects.analysis.dispatch import analyse, image_pixel_nm, preprocess_scan
from stm_defects.config import load_params, predict_config
from stm_defects.data.synth import synth_scan
from stm_defects.io.model_files import load_models
from stm_defects.io.scans import Scan

models_dir, params_path, method, size, repeats = sys.argv[1:6]
size, repeats = int(size), int(repeats)
params = load_params(params_path)
cfg = dataclasses.replace(predict_config(params), method=method)
models = load_models(models_dir)
synth = dataclasses.replace(params.synth, size=size, pixel_nm=0.1)
times = []
for i in range(repeats + 1):
    s = synth_scan(synth, 9000 + i)
    scan = Scan(height=s.height, pixel_nm=s.pixel_nm, unit="nm", channel="Z", direction="forward",
                path="bench", format="synthetic")
    t0 = time.perf_counter()
    img, scale = preprocess_scan(scan, cfg.preprocess)
    analyse(img, models, cfg, image_pixel_nm(scan, scale))
    if i:
        times.append(time.perf_counter() - t0)
    del s, scan, img
print(json.dumps({"seconds": statistics.median(times), "n": len(times),
                  "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "device": "cuda" if torch.cuda.is_available() else "cpu",
                  "threads": torch.get_num_threads()}))
"""


def run_case(models: str, params: str, profile: str, size: int, repeats: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, models, params, profile, str(size), str(repeats)],
                          capture_output=True, text=True, env=dict(os.environ, MPLBACKEND="Agg"))
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="models")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--methods", nargs="+", default=["improved", "paper"],
                    help="improved: the default profile's method; paper: the report's pipeline")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=20, help="scans timed at the smallest size")
    args = ap.parse_args()

    rows = []
    for profile in args.methods:
        base = None
        for size in args.sizes:
            # about the same total work per size: fewer repeats for bigger scans, at least 1
            reps = max(1, round(args.repeats * (min(args.sizes) / size) ** 2))
            r = run_case(args.models, args.params, profile, size, reps)
            print(f"{profile} {size}: {r}", file=sys.stderr, flush=True)
            if "error" in r:
                rows.append(f"| {profile} | {size}x{size} | failed: {r['error']} | | | | |")
                continue
            us = r["seconds"] / size ** 2 * 1e6
            base = base or us
            rows.append(f"| {profile} | {size}x{size} | {r['seconds']:.3f} (n={r['n']}) | {us:.2f} | "
                        f"{us / base:.2f} | {r['peak_bytes'] / 2**20:.0f} MiB | {r['device']}, {r['threads']} threads |")
    print("| method | scan | s/scan (median) | µs/px | vs smallest | peak RSS | device |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
