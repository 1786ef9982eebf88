"""`stm info --pixel-nm/--scan-nm` and `stm evaluate` against box truth, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from stm_defects.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _png(path: Path) -> Path:
    from PIL import Image

    arr = (np.random.default_rng(0).random((64, 80)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def test_info_takes_a_calibration(tmp_path):
    f = _png(tmp_path / "a.png")
    assert "pixel size unknown" in invoke("info", f).output
    out = invoke("info", f, "--scan-nm", 40).output
    assert "0.5 nm/px (from --scan-nm)" in out
    assert "0.02 nm/px (from --pixel-nm)" in invoke("info", f, "--pixel-nm", 0.02).output


def test_bad_calibration_is_one_line(tmp_path):
    f = _png(tmp_path / "a.png")
    for args in (("--pixel-nm", -1), ("--pixel-nm", 0.1, "--scan-nm", 10)):
        r = invoke("info", f, *args)
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert "--pixel-nm/--scan-nm" in r.output


def test_evaluate_scores_predictions_against_boxes(tmp_path):
    preds, truth = tmp_path / "pred", tmp_path / "truth"
    preds.mkdir(), truth.mkdir()
    boxes = [{"x": 10, "y": 10, "w": 6, "h": 6, "class": 0, "class_name": "A"},
             {"x": 40, "y": 30, "w": 10, "h": 8, "class": 1, "class_name": "B"}]
    (truth / "s.json").write_text(json.dumps({"image": "s.jpg", "shape": [64, 80], "scan_nm": [8, 6.4],
                                              "pixel_nm": 0.1, "defects": boxes}))
    found = [{"id": 0, "x": 11.5, "y": 9.0, "class": 3}, {"id": 1, "x": 70, "y": 50, "class": 3}]
    (preds / "day1").mkdir()                     # predictions of a folder tree lie in sub-folders
    (preds / "day1" / "s.json").write_text(json.dumps({"image": "/data/day1/s.jpg", "shape": [64, 80],
                                                       "defects": found}))
    (preds / "summary.json").write_text("[]")    # other JSONs in the folder are ignored
    r = invoke("evaluate", preds, "--truth", truth)
    assert r.exit_code == 0, r.output
    res = json.loads((preds / "evaluation.json").read_text())
    assert (res["overall"]["tp"], res["overall"]["fp"], res["overall"]["fn"]) == (1, 1, 1)
    assert (preds / "evaluation.md").is_file() and "| all |" in r.output


def test_evaluate_without_matching_images_is_one_line(tmp_path):
    preds, truth = tmp_path / "pred", tmp_path / "truth"
    preds.mkdir(), truth.mkdir()
    (truth / "s.json").write_text(json.dumps({"image": "s.jpg", "shape": [64, 80], "scan_nm": [8, 6.4],
                                              "pixel_nm": 0.1, "defects": []}))
    r = invoke("evaluate", preds, "--truth", truth)
    assert r.exit_code == 1 and "Traceback" not in r.output and "no prediction" in r.output
    r = invoke("evaluate", preds, "--truth", tmp_path / "nowhere")
    assert r.exit_code == 1 and "Traceback" not in r.output
