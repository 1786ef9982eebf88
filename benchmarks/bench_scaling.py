"""Time and peak memory per scan against scan size, for both methods.

    python benchmarks/bench_scaling.py --models models                       # 512^2 .. 2048^2
    python benchmarks/bench_scaling.py --models models --sizes 512 1024 2048 4096
    python benchmarks/bench_scaling.py --models models --methods improved    # default profile only

Each (profile, size) runs in a fresh Python process, so its peak resident memory (``VmHWM``,
imports and models included) belongs to that case alone. The scans are Si(001) at 0.1 nm/px
(`data.synth`; the default method's working pixel size, so nothing is resampled away),
synthesised beforehand by this script and saved as .npy files: the generator's own peak (about
2 GB at 4096^2) is not the prediction's. The process loads each file, then times what `stm
predict` does between reading a file and writing its pictures:
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
import tempfile
from pathlib import Path

CHILD = r"""
import dataclasses, json, resource, statistics, sys, time
import torch
from stm_defects.analysis.dispatch import analyse, image_pixel_nm, preprocess_scan
from stm_defects.analysis.heap import keep_freed_memory
from stm_defects.config import load_params, predict_config
import numpy as np
from stm_defects.io.model_files import load_models
from stm_defects.io.scans import Scan

def peak_bytes():
    # VmHWM: this process's own peak (ru_maxrss also counts the parent's peak at fork time)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


models_dir, params_path, method = sys.argv[1:4]
files = sys.argv[4:]
keep_freed_memory()   # as `stm predict` does
params = load_params(params_path)
cfg = dataclasses.replace(predict_config(params), method=method)
models = load_models(models_dir)
times = []
for i, f in enumerate(files):
    scan = Scan(height=np.load(f), pixel_nm=0.1, unit="nm", channel="Z", direction="forward",
                path=f, format="synthetic")
    t0 = time.perf_counter()
    img, scale = preprocess_scan(scan, cfg.preprocess)
    analyse(img, models, cfg, image_pixel_nm(scan, scale))
    if i:
        times.append(time.perf_counter() - t0)
    del scan, img
print(json.dumps({"seconds": statistics.median(times), "n": len(times),
                  "peak_bytes": peak_bytes(),
                  "device": "cuda" if torch.cuda.is_available() else "cpu",
                  "threads": torch.get_num_threads()}))
"""


def make_scans(params: str, size: int, n: int, folder: Path) -> list[str]:
    """Synthesise ``n`` Si(001) scans of ``size`` px at 0.1 nm/px into ``folder`` (.npy, nm)."""
    import dataclasses

    import numpy as np

    from stm_defects.config import load_params
    from stm_defects.data.synth import synth_scan

    synth = dataclasses.replace(load_params(params).synth, size=size, pixel_nm=0.1)
    out = []
    for i in range(n):
        f = folder / f"si001_{size}_{i}.npy"
        np.save(f, synth_scan(synth, 9000 + i).height)
        out.append(str(f))
    return out


def run_case(models: str, params: str, profile: str, files: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, models, params, profile, *files],
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
    scans = tempfile.TemporaryDirectory(prefix="bench_scaling_")
    files = {}
    for size in args.sizes:
        # about the same total work per size: fewer repeats for bigger scans, at least 1 (+ warm-up)
        reps = max(1, round(args.repeats * (min(args.sizes) / size) ** 2))
        files[size] = make_scans(args.params, size, reps + 1, Path(scans.name))
    for profile in args.methods:
        base = None
        for size in args.sizes:
            r = run_case(args.models, args.params, profile, files[size])
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
