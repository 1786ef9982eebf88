"""`stm predict` on many small scans: throughput per --workers, flat memory, resuming, the same
bytes from one process and from a pool; and the registry model set's cold vs warm load.

    python benchmarks/bench_batch.py --models models                       # 10,000 scans of 32x32
    python benchmarks/bench_batch.py --models models --n 2000 --workers 1 2 4
    python benchmarks/bench_batch.py --models models --only cache          # the model cache only

A check, not a timed test: it prints markdown tables and exits 1 when a property fails.

Batch: ``--n`` synthetic scans (``--size`` px, float32 .npy, 100 per folder; ``--kind bumps``:
noise and a few Gaussian bumps, ``--kind si001``: the embedded Si(001) generator) are predicted by a fresh `stm predict --models MODELS --pixel-nm 0.1`
process per row. Reported: wall time, scans/s, and the peak resident memory of the `stm predict`
process itself (``ru_maxrss`` from `os.wait4`; worker processes have their own, flat by
construction). Memory is measured at n/10 and at n scans with the first --workers value: the
difference is what the batch holds per scan (paths and output names; no rows), and the check
fails above ``--max-bytes-per-scan``. Then the same command again: every scan is skipped. And
the first ``--same`` scans predicted with --workers 1 and with the largest --workers value into
two folders give the same files byte for byte.

Cache: the model files of MODELS are registered in a temporary MLflow store and promoted; a fresh
process loads the Production set with an empty cache (cold: MLflow, download, verify, fill the
cache), then fresh processes load it again (warm: SQLite read-only and the cache, no MLflow). Both
time `load_registered_files` after importing what prediction imports anyway (scikit-learn, scipy,
scikit-image: `stm_defects.analysis.predict`; their time is shown apart; the autoencoders are
verified, and built only by the `paper` method) and say whether
MLflow was imported. The check fails when the warm load takes more than ``--warm-limit`` s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STM = [sys.executable, "-m", "stm_defects.cli"]


def make_scans(folder: Path, n: int, size: int, seed: int = 0, kind: str = "bumps") -> Path:
    """``n`` scans of ``size`` x ``size`` in folders of 100: ``bumps``, noise, a tilt and 0-3
    bumps (no lattice, few defects: little work per scan); ``si001``, the embedded data's
    Si(001) generator (`data.synth`, lattice, steps and defects) at 0.1 nm/px, in nm."""
    import numpy as np

    if kind == "si001":
        import dataclasses

        from stm_defects.config import load_params
        from stm_defects.data.synth import synth_scan

        synth = dataclasses.replace(load_params(Path(__file__).resolve().parents[1] / "params.yaml").synth,
                                    size=size, pixel_nm=0.1)
        for i in range(n):
            f = folder / f"batch{i // 100:03d}" / f"scan{i:05d}.npy"
            f.parent.mkdir(parents=True, exist_ok=True)
            np.save(f, synth_scan(synth, 7000 + seed * 100_000 + i).height.astype(np.float32))
        return folder
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        img = rng.normal(0, 0.05, (size, size)).astype(np.float32) + 0.002 * xx
        for _ in range(int(rng.integers(0, 4))):
            cy, cx = rng.uniform(4, size - 4, 2)
            img += np.float32(rng.uniform(0.3, 1.0)) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0)
        f = folder / f"batch{i // 100:03d}" / f"scan{i:05d}.npy"
        f.parent.mkdir(parents=True, exist_ok=True)
        np.save(f, img)
    return folder


def run_stm(args: list, env: dict | None = None) -> dict:
    """Run `stm ARGS` as a fresh process: wall seconds, its peak RSS (MiB), exit code, output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([*STM, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    # read the pipes while it runs (a full pipe would block it), then reap it with its rusage
    import threading

    out: dict = {}
    readers = [threading.Thread(target=lambda k, s: out.__setitem__(k, s.read()), args=(k, s))
               for k, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": time.perf_counter() - t0, "rss_mib": usage.ru_maxrss / 1024, "rc": proc.returncode,
            "stdout": out["stdout"], "stderr": out["stderr"]}


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def bench_batch(args, work: Path) -> bool:
    good = True
    scans = make_scans(work / "scans", args.n, args.size, kind=args.kind)
    folders = sorted(scans.iterdir())
    small = folders[: max(1, len(folders) // 10)]        # a tenth of the folders, given one by one
    n_small = sum(1 for d in small for _ in d.glob("*.npy"))
    common = ["--models", args.models, "--pixel-nm", 0.1]
    rows = []
    first = args.workers[0]
    for n, src in ((n_small, small), (args.n, [scans])):
        out = work / f"out-{n}-w{first}"
        r = run_stm(["predict", *src, "--out", out, "--workers", first, *common])
        if r["rc"] != 0:
            print(r["stderr"][-3000:], file=sys.stderr)
            return False
        rows.append((n, first, r))
    for w in args.workers[1:]:
        out = work / f"out-{args.n}-w{w}"
        r = run_stm(["predict", scans, "--out", out, "--workers", w, *common])
        good &= r["rc"] == 0
        rows.append((args.n, w, r))
    print(f"\n### `stm predict` on {args.n} scans of {args.size}x{args.size} (models {args.models})\n")
    print("| scans | --workers | wall (s) | scans/s | peak RSS of `stm predict` (MiB) |")
    print("|---:|---:|---:|---:|---:|")
    for n, w, r in rows:
        print(f"| {n} | {w} | {r['seconds']:.1f} | {n / r['seconds']:.1f} | {r['rss_mib']:.0f} |")
    (n0, _, r0), (n1, _, r1) = rows[0], rows[1]
    if n1 > n0:
        per_scan = (r1["rss_mib"] - r0["rss_mib"]) * 2**20 / (n1 - n0)
        flat = per_scan <= args.max_bytes_per_scan
        good &= flat
        print(f"\nmemory: {per_scan:.0f} bytes per scan between {n0} and {n1} scans "
              f"({'flat' if flat else 'GROWS'}; limit {args.max_bytes_per_scan})")
    else:
        print(f"\nmemory: not measured ({args.n} scans are too few to split into a tenth and the whole)")
    if len(rows) > 2:
        serial = rows[1][2]["seconds"]
        for _, w, r in rows[2:]:
            print(f"--workers {w}: {r['seconds'] / serial:.2f}x the wall time of --workers {first}")

    out = work / f"out-{args.n}-w{first}"
    with open(out / "summary.csv") as fh:
        n_rows = sum(1 for _ in fh) - 1
    again = run_stm(["predict", scans, "--out", out, "--workers", first, *common])
    skipped = f"skipped {args.n} scan(s)" in again["stdout"]
    good &= skipped and again["rc"] == 0 and n_rows == args.n
    print(f"summary.csv rows: {n_rows}; second run: {again['seconds']:.1f} s, "
          f"{'all skipped' if skipped else 'NOT all skipped: ' + again['stdout'][-300:]}")

    same = work / "same"
    make_scans(same, args.same, 4 * args.size, seed=1, kind=args.kind)
    one, many = work / "same-w1", work / f"same-w{max(args.workers)}"
    r1 = run_stm(["predict", same, "--out", one, "--workers", 1, *common])
    r2 = run_stm(["predict", same, "--out", many, "--workers", max(args.workers), *common])
    a, b = files_of(one), files_of(many)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    good &= not differ and r1["rc"] == r2["rc"] == 0
    n_defects = sum(len(json.loads(v)["defects"]) for k, v in a.items() if k.endswith(".json"))
    print(f"same bytes, {args.same} scans of {4 * args.size}x{4 * args.size} ({n_defects} defects), --workers 1 "
          f"vs {max(args.workers)}: {'yes' if not differ else 'NO: ' + ', '.join(differ[:5])} "
          f"({len(a)} files)")
    return good


# ------------------------------------------------------------------------------------- cache
LOAD = """
import json, sys, time
t0 = time.perf_counter()
import stm_defects.analysis.predict, sklearn.mixture, sklearn.cluster   # what prediction imports anyway
t = time.perf_counter()
from stm_defects.mlops.tracking import load_registered_files
models, files = load_registered_files("Production")
print(json.dumps({"seconds": time.perf_counter() - t, "imports": t - t0, "mlflow": "mlflow" in sys.modules,
                  "set": {k: v["version"] for k, v in models.versions.items()}}))
"""


def register(models: Path, store: Path) -> None:
    """Register the five model files of ``models`` in a new store at ``store`` and promote them."""
    import yaml

    from stm_defects.config import resolve
    from stm_defects.mlops.tracking import Tracker, promote

    params = resolve(yaml.safe_load((REPO / "params.yaml").read_text()))
    config = json.loads((models / "improved" / "config.json").read_text())
    calibration = (models / "calibration.json").read_text() if (models / "calibration.json").is_file() else "{}"
    files = {"ae1": "ae1/model.pt", "kmeans": "kmeans/kmeans.npz", "ae2": "ae2/model.pt", "gmm": "gmm/gmm.npz",
             "improved": "improved/state.npz"}
    tags = {"gmm": {"calibration": calibration}, "improved": {"config": config}}
    cwd = os.getcwd()
    os.chdir(store)
    try:
        with Tracker(params, "all") as tr:
            versions = {k: tr.register(k, models / f, tags.get(k)) for k, f in files.items()}
        promote(versions, "Production", force=True)
    finally:
        os.chdir(cwd)


def bench_cache(args, work: Path) -> bool:
    store, cache = work / "store", work / "cache"
    store.mkdir()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "STM_MODEL_CACHE": str(cache),
           "STM_PIPELINE_RUN": "bench-cache"}
    os.environ.update(env)
    register(Path(args.models).resolve(), store)

    def load() -> dict:
        run = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, cwd=store,
                             env={**os.environ, **env}, timeout=600)
        if run.returncode:
            raise SystemExit(run.stderr[-3000:])
        return json.loads(run.stdout.strip().splitlines()[-1])

    shutil.rmtree(cache, ignore_errors=True)
    cold = [load()]
    warm = [load() for _ in range(args.repeat)]
    for _ in range(args.repeat - 1):
        shutil.rmtree(cache, ignore_errors=True)
        cold.append(load())
        warm.append(load())
    c = statistics.median(r["seconds"] for r in cold)
    w = statistics.median(r["seconds"] for r in warm)
    imports = statistics.median(r["imports"] for r in cold + warm)
    print(f"\n### Loading the registry's Production set (`load_registered_files` in a fresh process, after "
          f"the imports prediction needs anyway: {imports:.1f} s; median of {args.repeat})\n")
    print("| load | seconds | MLflow imported |")
    print("|---|---:|---|")
    print(f"| cold (empty cache) | {c:.2f} | {cold[0]['mlflow']} |")
    print(f"| warm (cached) | {w:.2f} | {warm[0]['mlflow']} |")
    ok = w <= args.warm_limit and not any(r["mlflow"] for r in warm) and all(
        r["set"] == cold[0]["set"] for r in cold + warm)
    print(f"\nwarm load {'within' if w <= args.warm_limit else 'OVER'} {args.warm_limit} s")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="models", help="a models folder (`make run`'s models/)")
    ap.add_argument("--n", type=int, default=10_000, help="scans in the batch")
    ap.add_argument("--size", type=int, default=32, help="scan side in px")
    ap.add_argument("--kind", choices=("bumps", "si001"), default="bumps",
                    help="bumps: noise and a few bumps; si001: synthetic Si(001) scans with lattice, steps "
                         "and defects, as users predict")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--workers values to time")
    ap.add_argument("--same", type=int, default=40, help="scans of the byte-for-byte comparison")
    ap.add_argument("--max-bytes-per-scan", type=float, default=2048)
    ap.add_argument("--repeat", type=int, default=3, help="cold and warm loads to take the median of")
    ap.add_argument("--warm-limit", type=float, default=1.0, help="seconds a warm load may take")
    ap.add_argument("--only", choices=("batch", "cache"), default=None)
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = ap.parse_args()
    if not (Path(args.models) / "ae1" / "model.pt").is_file():
        raise SystemExit(f"{args.models}: not a models folder; run `make run` first or give --models")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-batch-"))
    work.mkdir(parents=True, exist_ok=True)
    good = True
    try:
        if args.only in (None, "batch"):
            good &= bench_batch(args, work)
        if args.only in (None, "cache"):
            good &= bench_cache(args, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(0 if good else 1)


if __name__ == "__main__":
    main()
