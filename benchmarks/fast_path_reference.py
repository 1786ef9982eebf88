"""Write the reference detections that tests/test_fast_path.py holds the fast path to.

    PYTHONPATH=<source tree of the reference commit>/src python benchmarks/fast_path_reference.py \
        --state models/improved/state.npz --out tests/data/fast_path_reference.json

Runs the default (improved) analysis, with the project's params.yaml, on a few fixed synthetic
scans (the embedded Si(001) generator and three lattice families) and records each defect's
(x, y, class). Run it with the code you want to compare against (the version before a speed
change); the test then checks that the current code finds >= 99% of the same defects within
1 px, with the same classes. The improved state (classes) used is copied beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def reference_scans():
    """(name, raw height, pixel nm) of the fixed scans; also used by the test."""
    from stm_defects.config import load_params
    from stm_defects.data.lattices import lattice_scan
    from stm_defects.data.synth import synth_scan

    params = load_params(ROOT / "params.yaml")
    out = [(f"si001_synth_{seed}", *_hp(synth_scan(params.synth, seed))) for seed in (5001, 5002, 5003)]
    for j, fam in enumerate(("wse2_hex", "si111_7x7", "ge001_c4x2")):
        s = lattice_scan(fam, size=384, pixel_nm=0.05, seed=600 + j, n_steps=1)
        out.append((fam, *_hp(s)))
    return out


def _hp(scan):
    return scan.height, scan.pixel_nm


def detections(height, pixel_nm, state, params) -> list[list]:
    from stm_defects.image.preprocess import preprocess
    from stm_defects.improved.method import improved_analyse

    img, _ = preprocess(height, pixel_nm, params.preprocess)
    res = improved_analyse(img, state, params.improved, pixel_nm)
    return [[round(r["x"], 3), round(r["y"], 3), r["class"]] for r in res.regions]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", required=True, help="improved state.npz of a trained models folder")
    ap.add_argument("--out", default=str(ROOT / "tests/data/fast_path_reference.json"))
    args = ap.parse_args()

    from stm_defects.config import load_params
    from stm_defects.io import safe_models

    params = load_params(ROOT / "params.yaml")
    state = safe_models.load(args.state, "improved")
    out = Path(args.out)
    shutil.copyfile(args.state, out.with_name("fast_path_state.npz"))
    # the commit of the working tree this runs in; the code may come from PYTHONPATH (see above)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"commit": commit, "scans": {}}
    for name, height, pixel_nm in reference_scans():
        result["scans"][name] = detections(height, pixel_nm, state, params)
        print(name, len(result["scans"][name]), "defects")
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in result["scans"].items()]
    out.write_text(f'{{"commit": {json.dumps(commit)}, "scans": {{\n' + ",\n".join(lines) + "\n}}\n")


if __name__ == "__main__":
    main()
