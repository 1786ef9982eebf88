"""One bad scan never ends a batch: `stm predict`, `info`, `classes` and `evaluate` list it on one
line (file, stage, reason) and go on; `stm predict` always writes summary.csv and failures.csv;
the exit code is 1 when anything failed; `--verbose` adds the traceback. Bad parameter values
and unusable output paths are refused up front with one line.

Tiny model folders (tests/tiny.py) and 64x64 noise scans keep every run well under a second.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from stm_defects.cli import app
from tiny import tiny_models

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
SIDE = 64
BUG = "synthetic bug in the analysis"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result) -> None:
    """Exit code 1 through typer.Exit (not an escaped exception), and no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_torch_thread) -> Path:
    d = tmp_path_factory.mktemp("isolation") / "models"
    tiny_models(d)
    return d


@pytest.fixture()
def scans(tmp_path) -> Path:
    """A folder of three good 64x64 scans: good_a, good_b and boom (which `buggy` breaks)."""
    d = tmp_path / "scans"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in ("good_a", "good_b", "boom"):
        np.save(d / f"{name}.npy", rng.normal(size=(SIDE, SIDE)))
    return d


@pytest.fixture()
def buggy(monkeypatch):
    """The analysis raises an unexpected error on boom.npy (and only there)."""
    import stm_defects.analysis.predict as predict

    real = predict.analyse_scan

    def analyse_scan(scan, models, cfg):
        if Path(scan.path).name == "boom.npy":
            raise RuntimeError(BUG)
        return real(scan, models, cfg)

    monkeypatch.setattr(predict, "analyse_scan", analyse_scan)


# ----------------------------------------------------------------------------- stm predict
def test_an_unexpected_error_is_one_line_and_the_batch_goes_on(models, scans, buggy, tmp_path):
    out = tmp_path / "out"
    result = invoke("predict", scans, "--models", models, "--out", out)
    assert_clean_failure(result)
    lines = [ln.strip() for ln in result.stderr.splitlines() if "boom.npy" in ln]
    assert lines == [f"{scans / 'boom.npy'}: analyse failed: RuntimeError: {BUG}"], result.stderr
    assert f"1 of 3 file(s) failed (listed in {out / 'failures.csv'})" in result.stderr
    assert "--verbose" in result.stderr                     # how to see the traceback
    assert [r["scan"] for r in read_csv(out / "summary.csv")] == [str(scans / "good_a.npy"),
                                                                  str(scans / "good_b.npy")]
    assert read_csv(out / "failures.csv") == [
        {"scan": str(scans / "boom.npy"), "stage": "analyse", "reason": f"RuntimeError: {BUG}"}]
    assert (out / "good_a.json").is_file() and (out / "good_b.json").is_file()
    assert not list(out.glob("boom*"))


def test_verbose_shows_the_traceback(models, scans, buggy, tmp_path):
    out = tmp_path / "out"
    result = invoke("--verbose", "predict", scans, "--models", models, "--out", out)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" in result.stderr and f"RuntimeError: {BUG}" in result.stderr, result.stderr
    assert len(read_csv(out / "summary.csv")) == 2 and len(read_csv(out / "failures.csv")) == 1


def test_a_folder_in_place_of_an_output_json_fails_that_scan_only(models, scans, tmp_path):
    out = tmp_path / "out"
    (out / "good_b.json").mkdir(parents=True)
    result = invoke("predict", scans, "--models", models, "--out", out)
    assert_clean_failure(result)
    assert f"{scans / 'good_b.npy'}: write failed: {out / 'good_b.json'}: Is a directory" in result.stderr
    assert "--verbose" not in result.stderr                 # a disk problem: the line says it all
    (row,) = read_csv(out / "failures.csv")
    assert (row["scan"], row["stage"]) == (str(scans / "good_b.npy"), "write")
    assert sorted(r["scan"] for r in read_csv(out / "summary.csv")) == [str(scans / "boom.npy"),
                                                                        str(scans / "good_a.npy")]
    assert (out / "good_b.json").is_dir()                   # left as it was
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_unreadable_and_oversized_scans_are_read_failures(models, scans, tmp_path):
    (scans / "empty.npy").write_bytes(b"")
    np.save(scans / "huge.npy", np.random.default_rng(1).normal(size=(SIDE, 2 * SIDE)))
    out = tmp_path / "out"
    result = invoke("predict", scans, "--models", models, "--out", out, "--max-pixels", SIDE * SIDE)
    assert_clean_failure(result)
    failed = {Path(r["scan"]).name: r for r in read_csv(out / "failures.csv")}
    assert set(failed) == {"empty.npy", "huge.npy"}
    assert all(r["stage"] == "read" for r in failed.values())
    huge = failed["huge.npy"]["reason"]
    assert f"{SIDE}x{2 * SIDE} px" in huge and str(SIDE * SIDE) in huge and "GiB of memory" in huge, huge
    assert len(read_csv(out / "summary.csv")) == 3


def test_a_batch_where_everything_fails_still_writes_both_tables(models, tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    out = tmp_path / "out"
    result = invoke("predict", tmp_path / "empty.npy", "--models", models, "--out", out)
    assert_clean_failure(result)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"error: {tmp_path / 'empty.npy'}: read failed: empty file"), result.stderr
    assert read_csv(out / "summary.csv") == []
    assert (out / "summary.csv").read_text().startswith("scan,n_defects")
    assert [r["stage"] for r in read_csv(out / "failures.csv")] == ["read"]


def test_a_clean_batch_writes_an_empty_failure_list(models, scans, tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "failures.csv").write_text("scan,stage,reason\nold.npy,read,from an earlier run\n")
    result = invoke("predict", scans, "--models", models, "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "failures.csv").read_text() == "scan,stage,reason\n"
    assert len(read_csv(out / "summary.csv")) == 3


# ---------------------------------------------------------------------------- output paths
def test_an_existing_file_as_out_is_one_line(models, scans, tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("mine")
    result = invoke("predict", scans, "--models", models, "--out", out)
    assert_clean_failure(result)
    assert result.stderr.strip() == f"error: --out {out}: is a file, not a folder; give a folder for the outputs"
    assert out.read_text() == "mine"


def test_an_out_that_cannot_be_created_is_one_line(models, scans, tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "out"
    result = invoke("predict", scans, "--models", models, "--out", out)
    assert_clean_failure(result)
    assert result.stderr.strip() == f"error: --out {out}: cannot write there (Not a directory)"


def test_an_unwritable_out_folder_is_one_line(models, scans, tmp_path, monkeypatch):
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:      # root writes anywhere: refuse the write probe as the kernel would
        def touch(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "touch", touch)
    try:
        result = invoke("predict", scans, "--models", models, "--out", out)
    finally:
        out.chmod(0o755)
    assert_clean_failure(result)
    assert result.stderr.strip() == f"error: --out {out}: cannot write there (Permission denied)"
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------ bad params
def _params(tmp_path: Path, section: str, key: str, value) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    target = raw
    for k in section.split(".") if section else []:
        target = target[k]
    target[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


BAD_PARAMS = {
    "number-as-word": ("improved.anomaly", "threshold", "high", "improved.anomaly.threshold: expected a number"),
    "negative-pixel-size": ("preprocess", "target_pixel_nm", -1, "target_pixel_nm must be a positive number"),
    "bad-mask-threshold": ("mask", "threshold", "high", "invalid threshold spec 'high'"),
    "flag-as-number": ("preprocess", "align_rows", 3, "preprocess.align_rows: expected true or false"),
    "list-too-short": ("preprocess", "clip_percentiles", [1.0], "preprocess.clip_percentiles: expected a list of 2"),
    "seed-as-word": ("", "seed", "abc", "seed: expected a whole number"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_bad_parameter_values_are_one_line_before_anything_runs(models, scans, tmp_path, case):
    section, key, value, needle = BAD_PARAMS[case]
    params = _params(tmp_path, section, key, value)
    out = tmp_path / "out"
    result = invoke("predict", scans, "--models", models, "--out", out, "--params", params)
    assert_clean_failure(result)
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert needle in result.output and str(params) in result.output, result.output
    assert not out.exists()                                 # nothing ran


def test_a_bad_value_in_a_models_stored_config_is_one_line(tmp_path, scans):
    d = tmp_path / "models"
    tiny_models(d, config={"method": "improved", "improved": {"anomaly": {"threshold": "high"}}})
    result = invoke("predict", scans, "--models", d, "--out", tmp_path / "out")
    assert_clean_failure(result)
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "improved.anomaly.threshold: expected a number, not 'high'" in result.output


# ------------------------------------------------------------------- the other batch commands
def test_info_lists_an_unexpected_read_error_and_goes_on(scans, monkeypatch):
    import stm_defects.io.scans as io_scans

    real = io_scans.read_scan

    def read_scan(path, **kwargs):
        if Path(path).name == "boom.npy":
            raise RuntimeError(BUG)
        return real(path, **kwargs)

    monkeypatch.setattr(io_scans, "read_scan", read_scan)
    result = invoke("info", scans)
    assert_clean_failure(result)
    assert len(result.stdout.strip().splitlines()) == 2, result.stdout
    assert f"  {scans / 'boom.npy'}: read failed: RuntimeError: {BUG}" in result.stderr.splitlines()


def test_classes_skips_and_lists_a_bad_scan(models, scans, tmp_path):
    (scans / "empty.npy").write_bytes(b"")
    out = tmp_path / "gallery.png"
    result = invoke("classes", scans, "--models", models, "--out", out)
    assert_clean_failure(result)
    assert f"gallery of 3 scan(s) -> {out}" in result.stdout
    assert [ln for ln in result.stderr.splitlines()
            if ln.startswith(f"  {scans / 'empty.npy'}: read failed: empty file")], result.stderr
    from PIL import Image

    with Image.open(out) as im:
        im.verify()


def test_classes_isolates_an_analysis_error(models, scans, tmp_path, monkeypatch):
    import stm_defects.analysis.gallery as gallery

    real = gallery.defect_examples
    calls = []

    def defect_examples(img, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError(BUG)
        return real(img, *args, **kwargs)

    monkeypatch.setattr(gallery, "defect_examples", defect_examples)
    result = invoke("classes", scans, "--models", models, "--out", tmp_path / "g.png")
    assert_clean_failure(result)
    assert "gallery of 2 scan(s)" in result.stdout
    assert [ln for ln in result.stderr.splitlines() if "analyse failed" in ln], result.stderr
    assert (tmp_path / "g.png").is_file()


def test_evaluate_lists_an_unreadable_prediction_and_still_scores(tmp_path):
    preds, truth = tmp_path / "pred", tmp_path / "truth"
    preds.mkdir(), truth.mkdir()
    (truth / "s.json").write_text(json.dumps({"image": "s.jpg", "shape": [64, 80], "scan_nm": [8, 6.4],
                                              "pixel_nm": 0.1, "defects": [
                                                  {"x": 10, "y": 10, "w": 6, "h": 6, "class": 0}]}))
    (preds / "s.json").write_text(json.dumps({"image": "/data/s.jpg", "shape": [64, 80],
                                              "defects": [{"id": 0, "x": 11, "y": 9, "class": 3}]}))
    (preds / "torn.json").write_text('{"image": "t.jpg", "defe')
    result = invoke("evaluate", preds, "--truth", truth)
    assert_clean_failure(result)
    assert (preds / "evaluation.json").is_file() and (preds / "evaluation.md").is_file()
    lines = [ln for ln in result.stderr.splitlines() if "torn.json" in ln]
    assert len(lines) == 1 and "read failed: JSONDecodeError" in lines[0], result.stderr
