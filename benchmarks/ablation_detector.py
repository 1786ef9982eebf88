"""What each part of the default detector adds: the full method against itself with one part off.

    python benchmarks/ablation_detector.py --models models --out reports/ablation_detector

For each variant (params.yaml with a few `improved` values changed) this runs the two benchmarks
whose figures the README's detector sections quote, on their `dev` data only:

- the 56 real WSe2 scans (`benchmarks/wse2_dev.py --calibration name`: each field from its
  name, people's boxes, detection P/R/F1 with 95% bootstrap intervals over scans);
- the lattice-family dev split (`benchmarks/generalisation.py --split dev`: six synthetic
  lattices, P/R/F1 and false detections per 100 nm² on defect-free scans).

Detection only (the classes are a separate question: `benchmarks/si001_shift.py`). Writes
``<out>.json`` and ``<out>.md``. About a minute per variant on 2 cores with ``--n 100``.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# name -> (what is off, the `improved.anomaly` values that turn it off)
VARIANTS: dict[str, tuple[str, dict]] = {
    "default": ("nothing", {}),
    "no streak filter": ("the scan-line streak filter (`streak_filter`)", {"streak_filter": False}),
    "no line gate": ("the row/column noise gate (`line_noise`)", {"line_noise": 0}),
    "no halo grouping": ("a charged defect's ring as part of its core (`halo_distance`)", {"halo_distance": 0.0}),
    "no step wall rule": ("no search within a lattice period of a step (`step_lattice_periods`)",
                          {"step_lattice_periods": 0.0}),
    "no lattice floor": ("the noise floor from the removed lattice (`lattice_floor`)", {"lattice_floor": 0.0}),
    "fixed z = 7": ("the data-set thresholds: scan-wide z 7, no line gate, floor or streak filter",
                    {"threshold": 7.0, "line_noise": 0, "lattice_floor": 0.0, "streak_filter": False}),
}


def _params(base: dict, anomaly: dict, path: Path) -> Path:
    p = copy.deepcopy(base)
    p["improved"]["anomaly"].update(anomaly)
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


def _run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="models", help="trained models (`make run`); paths are relative to "
                                                        "the directory the command is run from")
    ap.add_argument("--n", type=int, default=100, help="lattice-family dev scans per family")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS), help="variant names (default: all)")
    ap.add_argument("--out", default="reports/ablation_detector")
    args = ap.parse_args()
    models = str(Path(args.models).resolve())
    out = Path(args.out).resolve()
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (what, anomaly) in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            params = _params(base, anomaly, Path(tmp) / "params.yaml")
            line = _run([sys.executable, "benchmarks/wse2_dev.py", "--models", models,
                         "--params", str(params), "--calibration", "name"])
            m = re.search(r"F1 ([\d.]+) \[([\d.]+),([\d.]+)\] P ([\d.]+) R ([\d.]+)", line)
            if m is None:
                sys.exit(f"unexpected output of wse2_dev.py: {line!r}")
            wse2 = dict(zip(("f1", "lo", "hi", "precision", "recall"), map(float, m.groups())))
            gen_out = Path(tmp) / "gen"
            _run([sys.executable, "benchmarks/generalisation.py", "--split", "dev", "--n", str(args.n),
                  "--workers", str(args.workers), "--params", str(params), "--out", str(gen_out)])
            gen = json.loads(gen_out.with_suffix(".json").read_text())["summary"]
            rows[name] = {"off": what, "anomaly": anomaly, "wse2_dev": wse2,
                          "lattice_dev": gen}
            a = gen["all"]
            print(f"{name}: WSe2 F1 {wse2['f1']:.3f}  lattice dev F1 {a['f1']:.3f}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=float) + "\n")
    fams = [k for k in next(iter(rows.values()))["lattice_dev"] if k != "all"]
    head = ("| variant | off | WSe2 dev F1 [95%] | P | R | lattice dev F1 [95%] | P | R | false / 100 nm² | "
            + " | ".join(fams) + " |")
    lines = [head, "|" + "---|" * (9 + len(fams))]
    for name, r in rows.items():
        w, a = r["wse2_dev"], r["lattice_dev"]["all"]
        lines.append(f"| {name} | {r['off']} | {w['f1']:.3f} [{w['lo']:.2f}, {w['hi']:.2f}] | {w['precision']:.2f} | "
                     f"{w['recall']:.2f} | {a['f1']:.3f} [{a['f1_ci'][0]:.2f}, {a['f1_ci'][1]:.2f}] | "
                     f"{a['precision']:.2f} | {a['recall']:.2f} | {a['fp_per_100nm2_defect_free']:.2f} | "
                     + " | ".join(f"{r['lattice_dev'][f]['f1']:.2f}" for f in fams) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
