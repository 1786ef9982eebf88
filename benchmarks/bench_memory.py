"""Peak memory of `stm predict` (default profile) per scan size, and a same-results check.

    python benchmarks/bench_memory.py --models models            # 1024^2 and 2048^2
    python benchmarks/bench_memory.py --models models --big      # ... and 4096^2 (minutes)
    python benchmarks/bench_memory.py --models models --results-out before.json
    python benchmarks/bench_memory.py --models models --results-compare before.json

Memory: each size is one synthetic Si(001) scan (`data.synth`, 0.1 nm/px, the analysis' working
pixel size, so nothing is resampled away) written as a .gwy file, then predicted by a fresh
`stm predict --models MODELS` process; the peak resident memory of that process (``ru_maxrss``
from `os.wait4`) is what is reported. "Base" is the same command on a 128x128 scan (imports and
models), and bytes per pixel are (peak - base) / pixels. Prints a markdown table.

Same results: ``--results-out FILE`` writes the detections of a fixed set of scans (synthetic
default and hard splits at 512x512, and two scans of every lattice family of `data.lattices`
at 0.05 and at 0.12 nm/px) as JSON; ``--results-compare FILE`` computes them again and compares
with FILE: the same defects in the same order, positions within 1e-3 px, the same boxes, areas
and classes, scores and probabilities within float tolerance. Exit code 1 on any difference.
Run it with ``--results-out`` before a change and ``--results-compare`` after it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE_SIZE = 128
POS_TOL = 1e-3      # px
REL_TOL = 1e-5      # scores and probabilities


def _stm_command() -> list[str]:
    exe = Path(sys.executable).with_name("stm")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "stm_defects.cli"]


_WRITE_SCAN = """
import dataclasses, sys
from stm_defects.data.synth import SynthConfig, synth_scan
from stm_defects.io.scans import save_gwy
path, size, pixel_nm, seed = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
scan = synth_scan(dataclasses.replace(SynthConfig(), size=size, pixel_nm=pixel_nm), seed)
save_gwy(path, scan.height, scan.pixel_nm)
"""


def _write_scan(folder: Path, size: int, pixel_nm: float, seed: int) -> Path:
    """The synthetic scan as a .gwy file, written by a separate process: the generator peaks at
    about 2 GB for 4096^2, and a child's ``ru_maxrss`` also counts its parent's peak (Linux
    carries it across fork and exec), so this process stays small."""
    path = folder / f"synth_{size}.gwy"
    subprocess.run([sys.executable, "-c", _WRITE_SCAN, str(path), str(size), str(pixel_nm), str(seed)], check=True)
    return path


def peak_rss(path: Path, models: str, out: Path) -> tuple[int, float, int]:
    """(peak RSS in bytes, wall seconds, exit code) of one `stm predict` process."""
    env = dict(os.environ, MPLBACKEND="Agg")
    t0 = time.perf_counter()
    proc = subprocess.Popen([*_stm_command(), "predict", str(path), "--models", models, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.stderr.close()
    if proc.returncode:
        print(err[-2000:], file=sys.stderr)
    return usage.ru_maxrss * 1024, time.perf_counter() - t0, proc.returncode


def memory_table(models: str, sizes: list[int], pixel_nm: float, seed: int) -> int:
    rows, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        tmp = Path(tmp)
        base, _, rc = peak_rss(_write_scan(tmp, BASE_SIZE, pixel_nm, seed), models, tmp / "out_base")
        failed += rc != 0
        for n in sizes:
            path = _write_scan(tmp, n, pixel_nm, seed)
            peak, wall, rc = peak_rss(path, models, tmp / f"out_{n}")
            failed += rc != 0
            path.unlink()
            shutil.rmtree(tmp / f"out_{n}", ignore_errors=True)
            rows.append((n, peak, wall, rc))
            print(f"{n}x{n}: peak {peak / 2**20:.0f} MiB, {wall:.0f} s", file=sys.stderr, flush=True)
    print(f"`stm predict`, default profile, synthetic scans at {pixel_nm} nm/px; base ({BASE_SIZE}x{BASE_SIZE} "
          f"scan: imports and models) {base / 2**20:.0f} MiB")
    print()
    print("| scan | pixels | peak RSS | bytes/pixel over base | time |")
    print("|---|---|---|---|---|")
    for n, peak, wall, rc in rows:
        note = "" if rc == 0 else f" (exit {rc})"
        print(f"| {n}x{n} | {n * n / 1e6:.1f} M | {peak / 2**20:.0f} MiB ({peak / 1e9:.2f} GB) | "
              f"{(peak - base) / (n * n):.0f} | {wall:.0f} s{note} |")
    return 1 if failed else 0


# --------------------------------------------------------------------------- same results
def _check_scans():
    """(name, height, pixel_nm) of the fixed scan set of the same-results check."""
    from stm_defects.data.lattices import LATTICES, lattice_scan
    from stm_defects.data.synth import HARD, SynthConfig, synth_scan

    for i in range(4):
        s = synth_scan(SynthConfig(), 500 + i)
        yield f"synth_default_{i}", s.height, s.pixel_nm
        s = synth_scan(HARD, 600 + i)
        yield f"synth_hard_{i}", s.height, s.pixel_nm
    for family in LATTICES:
        for px in (0.05, 0.12):
            for seed in (1, 2):
                s = lattice_scan(family, size=384, pixel_nm=px, seed=seed, n_steps=seed - 1)
                yield f"{family}_{px}nm_{seed}", s.height, s.pixel_nm


def detections(models_dir: str) -> dict:
    from stm_defects.analysis.dispatch import PredictConfig, analyse
    from stm_defects.image.preprocess import preprocess
    from stm_defects.io.model_files import load_models

    models = load_models(models_dir)
    cfg = PredictConfig.from_dict(models.config) if models.config else PredictConfig()
    out = {}
    for name, height, px in _check_scans():
        img, scale = preprocess(height, px, cfg.preprocess)
        result = analyse(img, models, cfg, None if px is None else px / scale)
        out[name] = [{k: r.get(k) for k in ("id", "x", "y", "bbox", "area_px", "score", "class", "probability")}
                     for r in result.regions]
    return out


def _close(a, b, tol) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def compare(ref: dict, new: dict) -> list[str]:
    """Differences between two `detections` results, one line each (empty: the same)."""
    problems = []
    for name in sorted(set(ref) | set(new)):
        a, b = ref.get(name), new.get(name)
        if a is None or b is None:
            problems.append(f"{name}: only in {'the reference' if b is None else 'the new run'}")
            continue
        if len(a) != len(b):
            problems.append(f"{name}: {len(a)} defects before, {len(b)} now")
            continue
        for r, s in zip(a, b):
            what = []
            if abs(r["x"] - s["x"]) > POS_TOL or abs(r["y"] - s["y"]) > POS_TOL:
                what.append(f"position ({r['x']:.4f}, {r['y']:.4f}) -> ({s['x']:.4f}, {s['y']:.4f})")
            for k in ("bbox", "area_px", "class"):
                if r[k] != s[k]:
                    what.append(f"{k} {r[k]} -> {s[k]}")
            for k in ("score", "probability"):
                if not _close(r[k], s[k], REL_TOL):
                    what.append(f"{k} {r[k]} -> {s[k]}")
            if what:
                problems.append(f"{name} defect {r['id']}: " + "; ".join(what))
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="models", help="models folder (as `stm predict --models`)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--big", action="store_true", help="add 4096x4096 (several minutes)")
    ap.add_argument("--pixel-nm", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--results-out", metavar="FILE", help="write the detections of the check set and stop")
    ap.add_argument("--results-compare", metavar="FILE", help="compare the check set's detections with FILE and stop")
    args = ap.parse_args()

    if args.results_out or args.results_compare:
        new = detections(args.models)
        n_scans, n_defects = len(new), sum(map(len, new.values()))
        if args.results_out:
            Path(args.results_out).write_text(json.dumps(new, indent=1))
            print(f"wrote {n_defects} defects of {n_scans} scans to {args.results_out}")
        if args.results_compare:
            ref = json.loads(Path(args.results_compare).read_text())
            problems = compare(ref, new)
            exact = ref == json.loads(json.dumps(new))
            for line in problems:
                print(line)
            print(f"{n_scans} scans, {n_defects} defects: "
                  + ("the same" + (" (bit for bit)" if exact else " within tolerance") if not problems
                     else f"{len(problems)} differences"))
            return 1 if problems else 0
        return 0
    sizes = list(args.sizes) + ([4096] if args.big and 4096 not in args.sizes else [])
    return memory_table(args.models, sizes, args.pixel_nm, args.seed)


if __name__ == "__main__":
    sys.exit(main())
