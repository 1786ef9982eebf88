"""The field of an uncalibrated file read from its name (`io.scans.name_field`, `--field-from-name`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stm_defects.cli import app
from stm_defects.io.scans import ScanError, name_field, read_scan

runner = CliRunner()


@pytest.mark.parametrize("name, field", [
    ("WSe2-SL445_211118_-1.4V_100x100_Z_030.jpg", (100.0, 100.0)),   # the WSe2 exports' naming
    ("a_1.5x1.5um.png", (1500.0, 1500.0)),
    ("x_20 x 20 nm.png", (20.0, 20.0)),
    ("run7-10X20.tif", (10.0, 20.0)),
    ("b_50nm.tif", (50.0, 50.0)),
    ("Ge001_c(4x2)_12nm.png", (12.0, 12.0)),     # a reconstruction in brackets is not a field
    ("noname.jpg", None),
    ("scan_-1.4V_Z_030.jpg", None),                # bias, channel and counter are not fields
    ("a_100x100_50x50.jpg", None),                 # two different fields: ambiguous
    ("SL445x2.png", None),                         # glued to a word
])
def test_name_field(name, field):
    assert name_field(name) == field


def _png(path: Path, shape=(200, 200)) -> Path:
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random(shape) * 255).astype(np.uint8)).save(path)
    return path


def test_read_scan_takes_the_field_from_the_name_only_when_asked(tmp_path):
    f = _png(tmp_path / "WSe2_-1.4V_20x20_Z_001.png")
    assert read_scan(f).pixel_nm is None
    s = read_scan(f, field_from_name=True)
    assert s.pixel_nm == pytest.approx(0.1) and s.meta["pixel_nm_source"] == "file name"
    assert s.meta["field_nm_from_name"] == [20.0, 20.0]
    # a calibration the user gives wins over the name
    assert read_scan(f, scan_nm=40.0, field_from_name=True).pixel_nm == pytest.approx(0.2)


def test_a_name_that_states_the_pixel_count_is_not_a_field(tmp_path):
    f = _png(tmp_path / "scan_200x200.png")
    assert read_scan(f, field_from_name=True).pixel_nm is None


def test_a_name_whose_field_has_another_aspect_ratio_is_not_a_field(tmp_path):
    f = _png(tmp_path / "scan_20x40.png")                  # a square image
    assert read_scan(f, field_from_name=True).pixel_nm is None
    g = _png(tmp_path / "scan_20x10.png", (100, 200))      # 200 px wide, 100 px high
    assert read_scan(g, field_from_name=True).pixel_nm == pytest.approx(0.1)


def test_an_implausible_field_in_a_name_is_one_line(tmp_path):
    f = _png(tmp_path / "scan_9e9x9e9.png")      # not a number the pattern takes: pixel units
    assert read_scan(f, field_from_name=True).pixel_nm is None
    g = _png(tmp_path / "scan_0.001x0.001nm.png")
    with pytest.raises(ScanError, match="file name"):
        read_scan(g, field_from_name=True)


def test_cli_field_from_name(tmp_path):
    f = _png(tmp_path / "WSe2_30x30_Z.png", (300, 300))
    plain = runner.invoke(app, ["info", str(f)])
    assert "pixel size unknown" in plain.output
    named = runner.invoke(app, ["info", str(f), "--field-from-name"])
    assert named.exit_code == 0 and "0.1 nm/px (from the file name)" in named.output
    both = runner.invoke(app, ["info", str(f), "--field-from-name", "--scan-nm", "30"])
    assert both.exit_code == 1 and "Traceback" not in both.output and "not both" in both.output


def test_predict_warning_suggests_the_name_field(tmp_path):
    from stm_defects.cli import uncalibrated_hint

    assert "--field-from-name" in uncalibrated_hint(["WSe2_100x100_Z_030.jpg"])
    assert "--field-from-name" not in uncalibrated_hint(["scan001.jpg"])
    assert "--field-from-name" not in uncalibrated_hint(["WSe2_100x100_Z_030.jpg"], field_from_name=True)
