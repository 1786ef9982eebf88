"""`stm predict --direction all`: every scan direction a file holds, in one run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stm_defects.cli import app
from stm_defects.io.scans import directions_in, read_scan

REAL = Path(__file__).resolve().parents[2] / "shared/data/real-stm"
SXM = REAL / "pynxtools-spm/STM_nanonis_generic_4_5.sxm"
needs_sxm = pytest.mark.skipif(not SXM.is_file(), reason=f"real Nanonis scan not found at {SXM} (../shared absent)")


def test_one_image_files_hold_one_direction(tmp_path):
    p = tmp_path / "scan.npy"
    np.save(p, np.random.default_rng(0).random((64, 64)))
    assert directions_in(p) == ["forward"]
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy")
    assert directions_in(bad) == []


@needs_sxm
def test_nanonis_and_matrix_directions():
    assert directions_in(SXM) == ["forward", "backward"]
    assert not np.allclose(read_scan(SXM, direction="forward").height, read_scan(SXM, direction="backward").height)
    mtrx = sorted((REAL / "srsml24-schofield").glob("*.Z_mtrx"))
    if mtrx:
        found = directions_in(mtrx[0])
        assert set(found) == {"forward/up", "backward/up", "forward/down", "backward/down"}
        assert all(read_scan(mtrx[0], direction=d).direction == d for d in found)


@needs_sxm
def test_predict_every_direction(tmp_path):
    from tiny import with_fitted_classes

    models = with_fitted_classes(tmp_path / "models")
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(SXM, scans / SXM.name)
    yy, xx = np.mgrid[:96, :96]
    np.save(scans / "flat.npy", (0.01 * xx + 0.02 * yy).astype(np.float32))
    (scans / "broken.sxm").write_bytes(b"not a Nanonis file")
    out = tmp_path / "out"
    args = ["predict", str(scans), "--models", str(models), "--out", str(out), "--direction", "all"]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 1, run.output          # broken.sxm fails with its own reason, and is listed
    assert "broken.sxm" in run.output and "Traceback" not in run.output
    assert "unknown direction" not in run.output and "Nanonis" in run.output, run.output
    stem = SXM.stem
    for d in ("forward", "backward"):
        doc = json.loads((out / f"{stem}_{d}.json").read_text())
        assert doc["direction"] == d and doc["options"]["direction"] == "all"
    assert (out / "flat_forward.json").is_file() and not (out / "flat_backward.json").exists()
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((Path(r["scan"]).name, r["direction"]) for r in rows) == [
        (SXM.name, "backward"), (SXM.name, "forward"), ("flat.npy", "forward")]
    again = CliRunner().invoke(app, args)          # all three up to date: skipped
    assert "skipped 3 scan(s)" in again.output, again.output
