"""--channel: pick a channel of a multi-channel file; refuse one a single-image file lacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stm_defects.io.scans import ScanError, read_scan

SXM = Path(__file__).resolve().parents[2] / "shared/data/real-stm/pynxtools-spm/STM_nanonis_generic_4_5.sxm"
needs_sxm = pytest.mark.skipif(not SXM.is_file(), reason=f"real Nanonis scan not found at {SXM} (../shared absent)")


@needs_sxm
def test_nanonis_channel_by_name():
    z = read_scan(SXM)
    assert z.channel == "Z" and z.unit == "nm" and z.meta["channels"] == ["Z", "Current"]
    current = read_scan(SXM, channel="current")              # case-insensitive
    assert current.channel == "Current" and current.unit == "a.u."   # not a height: no nm
    assert not np.allclose(current.height, z.height)
    with pytest.raises(ScanError, match=r"no channel 'Phase' in this file \(channels: Z, Current\)"):
        read_scan(SXM, channel="Phase")


def test_single_image_files_refuse_another_channel(tmp_path):
    p = tmp_path / "scan.npy"
    np.save(p, np.random.default_rng(0).random((64, 64)))
    assert read_scan(p).channel == read_scan(p, channel=read_scan(p).channel.upper()).channel
    with pytest.raises(ScanError, match="hold one image here"):
        read_scan(p, channel="Current")


def test_predict_records_the_channel_and_refuses_a_missing_one(tmp_path):
    import json

    from typer.testing import CliRunner

    from stm_defects.cli import app
    from tiny import with_fitted_classes

    models = with_fitted_classes(tmp_path / "models")
    scans = tmp_path / "scans"
    scans.mkdir()
    yy, xx = np.mgrid[:96, :96]
    np.save(scans / "flat.npy", (0.01 * xx + 0.02 * yy).astype(np.float32))      # nothing to find
    run = CliRunner().invoke
    ok = run(app, ["predict", str(scans), "--models", str(models), "--out", str(tmp_path / "a"),
                   "--channel", "IMAGE", "--pixel-nm", "0.1"])
    assert ok.exit_code == 0, ok.output
    doc = json.loads((tmp_path / "a" / "flat.json").read_text())
    assert doc["options"]["channel"] == "IMAGE" and doc["channel"] == "image"
    bad = run(app, ["predict", str(scans), "--models", str(models), "--out", str(tmp_path / "b"),
                    "--channel", "Current", "--pixel-nm", "0.1"])
    assert bad.exit_code == 1 and "hold one image here" in bad.output
