"""`stm create-config` writes the commented defaults; `stm predict` leaves the settings it used and
a defects.csv with one row per defect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from stm_defects.cli import app
from stm_defects.config import load_params
from stm_defects.project import params_path

runner = CliRunner()


def test_create_config_writes_the_defaults_and_never_overwrites(tmp_path):
    out = tmp_path / "my.yaml"
    r = runner.invoke(app, ["create-config", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert text.startswith("# stm-defects configuration") and "# Every number that changes a result" in text
    assert load_params(out) == load_params(params_path())
    again = runner.invoke(app, ["create-config", str(out)])
    assert again.exit_code == 1 and "exists; give --force" in again.output and "Traceback" not in again.output
    assert runner.invoke(app, ["create-config", str(out), "--force"]).exit_code == 0


def test_a_mistake_in_the_config_is_one_line_naming_the_key(tmp_path):
    out = tmp_path / "my.yaml"
    runner.invoke(app, ["create-config", str(out)])
    out.write_text(out.read_text().replace("  threshold: 5.0", "  threshold: high", 1))
    np.save(tmp_path / "s.npy", np.zeros((64, 64), np.float32))
    r = runner.invoke(app, ["predict", str(tmp_path / "s.npy"), "--models", str(tmp_path / "none"),
                            "--params", str(out), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "threshold" in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_predict_leaves_the_settings_it_used(tmp_path):
    from tiny import with_fitted_classes

    models = with_fitted_classes(tmp_path / "models")
    yy, xx = np.mgrid[:96, :96]
    np.save(tmp_path / "flat.npy", (0.01 * xx + 0.02 * yy).astype(np.float32))
    out = tmp_path / "out"
    r = runner.invoke(app, ["predict", str(tmp_path / "flat.npy"), "--models", str(models), "--out", str(out),
                            "--pixel-nm", "0.1"])
    assert r.exit_code == 0, r.output
    used = yaml.safe_load((out / "config_used.yaml").read_text())
    assert used["options"]["pixel_nm"] == 0.1 and used["prediction_config"]["method"] == "improved"
    assert Path(used["models"]["improved"]).name == "improved"
    assert used["prediction_config"]["improved"]["anomaly"]["threshold"] == 5.0


def test_defects_csv_has_one_row_per_defect_of_the_jsons(tmp_path):
    import csv
    import json

    from tiny import with_fitted_classes

    models = with_fitted_classes(tmp_path / "models")
    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:128, :128]
    for i in range(2):
        z = 0.01 * rng.normal(size=(128, 128))
        for cy, cx in rng.integers(20, 108, size=(4, 2)):
            z += 0.3 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
        np.save(scans / f"s{i}.npy", z.astype(np.float32))
    out = tmp_path / "out"
    r = runner.invoke(app, ["predict", str(scans), "--models", str(models), "--out", str(out), "--pixel-nm", "0.1"])
    assert r.exit_code == 0, r.output
    with open(out / "defects.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    docs = {p.stem: json.loads(p.read_text()) for p in out.glob("s*.json")}
    assert len(rows) == sum(len(d["defects"]) for d in docs.values()) > 0
    for row in rows:
        d = docs[row["output"]]["defects"][int(row["id"])]
        assert float(row["x_px"]) == pytest.approx(d["x"], rel=1e-5)
        assert float(row["x_nm"]) == pytest.approx(d["x"] * 0.1, rel=1e-5)
        assert row["class"] == ("" if d["class"] is None else str(d["class"]))
        assert int(row["bbox_x1"]) == d["bbox"][2]
