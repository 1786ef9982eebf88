"""Outputs are written whole and one run at a time: every file `stm predict` writes goes through a
temporary file and a rename, a writer that raises leaves no partial file, and a second
`stm predict` into an --out folder that a run holds is refused with one clear line.

The concurrency test starts the second `stm predict` as a real process while the first (in this
process) is half-way through its batch.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stm_defects.cli import app
from stm_defects.errors import StageError
from stm_defects.io.files import LOCK_NAME, atomic_file, output_lock, save_png, write_csv, write_json
from tiny import tiny_models

runner = CliRunner()
SIDE = 64


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_torch_thread) -> Path:
    d = tmp_path_factory.mktemp("locked") / "models"
    tiny_models(d)
    return d


@pytest.fixture()
def scans(tmp_path) -> Path:
    d = tmp_path / "scans"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(d / f"scan_{i}.npy", rng.normal(size=(SIDE, SIDE)))
    return d


def strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def assert_valid_outputs(out: Path, stems: list[str]) -> None:
    """Each scan's JSON parses (strictly), its three PNGs decode, summary.csv lists them all."""
    for stem in stems:
        doc = strict_json(out / f"{stem}.json")
        assert doc["shape"] == [SIDE, SIDE] and isinstance(doc["defects"], list)
        for suffix in ("overlay", "classes", "character"):
            with Image.open(out / f"{stem}_{suffix}.png") as im:
                im.load()
    with open(out / "summary.csv", newline="") as fh:
        assert sorted(Path(r["scan"]).stem for r in csv.DictReader(fh)) == sorted(stems)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------- locking
def test_a_second_predict_into_the_same_out_is_refused_while_the_first_runs(models, scans, tmp_path,
                                                                             monkeypatch):
    import stm_defects.analysis.predict as predict

    out = tmp_path / "out"
    second = {}
    real = predict.analyse_scan

    def analyse_scan(scan, models_, cfg):
        if not second:        # half-way through the first run: start a second one into the same folder
            second["run"] = subprocess.run(
                [sys.executable, "-m", "stm_defects.cli", "predict", str(scans), "--models", str(models),
                 "--out", str(out)], capture_output=True, text=True, timeout=120)
        return real(scan, models_, cfg)

    monkeypatch.setattr(predict, "analyse_scan", analyse_scan)
    first = invoke("predict", scans, "--models", models, "--out", out)
    assert first.exit_code == 0, first.output

    run = second["run"]
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, run.stderr
    assert errors[0].startswith(f"error: {out} is in use by another `stm predict` (pid {os.getpid()}, started ")
    assert errors[0].endswith("); wait for it to finish, or give another --out"), errors[0]
    assert_valid_outputs(out, [f"scan_{i}" for i in range(3)])


def test_the_lock_is_refused_in_process_and_released_after_the_run(models, scans, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out):
        result = invoke("predict", scans, "--models", models, "--out", out)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert "Traceback" not in result.output
        assert f"{out} is in use by another `stm predict` (pid {os.getpid()}" in result.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]     # nothing was written
    result = invoke("predict", scans, "--models", models, "--out", out)     # released: runs
    assert result.exit_code == 0, result.output
    assert_valid_outputs(out, [f"scan_{i}" for i in range(3)])
    with output_lock(out):          # and released again at the end of that run
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code = ("import os, signal, sys\n"
            "from stm_defects.io.files import output_lock\n"
            "with output_lock(sys.argv[1]):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    run = subprocess.run([sys.executable, "-c", code, str(out)], timeout=60)
    assert run.returncode == -signal.SIGKILL
    assert "pid" in (out / LOCK_NAME).read_text()       # it did hold the lock
    with output_lock(out):
        pass


def test_a_held_lock_names_its_holder(tmp_path):
    with output_lock(tmp_path, "stm predict"):
        with pytest.raises(StageError, match=rf"in use by another `stm predict` \(pid {os.getpid()}, started "):
            with output_lock(tmp_path, "stm predict"):
                pass


# ------------------------------------------------------------------------------ atomic writes
def test_every_file_predict_writes_is_renamed_into_place(models, scans, tmp_path, monkeypatch):
    out = tmp_path / "out"
    renamed = []
    real_replace = os.replace

    def replace(src, dst):
        renamed.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    result = invoke("predict", scans, "--models", models, "--out", out)
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    assert written == sorted(renamed), (written, renamed)
    assert {"summary.csv", "defects.csv", "failures.csv", "config_used.yaml", "report.html"} <= set(written)
    strips = sum(name.endswith("_defects.png") for name in written)     # scans with defects
    assert len(written) == 5 + 4 * 3 + strips


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_failing_csv_writer_leaves_the_old_file(tmp_path):
    path = tmp_path / "table.csv"
    write_csv(path, [{"a": 1, "b": 2}])
    with pytest.raises(ValueError):                       # a row with a column outside the header
        write_csv(path, [{"a": 3, "b": 4}, {"a": 5, "c": 6}], ["a", "b"])
    assert path.read_text().splitlines() == ["a,b", "1,2"]
    assert _leftovers(tmp_path) == ["table.csv"]
    with pytest.raises(ValueError):
        write_csv(tmp_path / "new.csv", [{"a": 5, "c": 6}], ["a"])
    assert _leftovers(tmp_path) == ["table.csv"]           # no partial new file either


def test_a_failing_png_writer_leaves_no_partial_picture(tmp_path, monkeypatch):
    path = tmp_path / "pic.png"
    save_png(path, np.zeros((8, 8), np.uint8))
    before = path.read_bytes()

    def broken_save(self, fp, format=None, **params):
        fp.write(b"\x89PNG half a picture")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        save_png(path, np.ones((8, 8), np.uint8))
    with pytest.raises(OSError, match="No space left"):
        save_png(tmp_path / "new.png", np.ones((8, 8), np.uint8))
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == ["pic.png"]


def test_atomic_file_keeps_the_old_content_when_the_body_raises(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as fh:
            fh.write(b"new but unfinished")
            raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old" and _leftovers(tmp_path) == ["data.bin"]
    with atomic_file(path, "w") as fh:
        fh.write("new")
    assert path.read_text() == "new" and _leftovers(tmp_path) == ["data.bin"]


def test_a_summary_that_cannot_be_written_is_one_line(models, scans, tmp_path):
    out = tmp_path / "out"
    (out / "summary.csv").mkdir(parents=True)
    result = invoke("predict", scans, "--models", models, "--out", out)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == f"error: {out / 'summary.csv'}: Is a directory"
    write_json(out / "probe.json", {})          # the folder itself is fine
