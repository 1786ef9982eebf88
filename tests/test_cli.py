"""The `stm` command line on bad input: one clear line per bad file, exit code 1, no traceback.

Commands run in-process through Typer's CliRunner (stdout and stderr are kept apart:
`result.stdout`, `result.stderr`; `result.output` holds both).
"""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from stm_defects.cli import app

runner = CliRunner()
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"

MATRIX_DATA = "default_2011Mar10-162902_STM-STM_Spectroscopy--1_3.Z_mtrx"
REAL_FOLDERS = ["pynxtools-spm", "spiepy", "spym-rhk", "srsml24-schofield"]
PIXEL = re.compile(r" ([0-9.eE+-]+) nm/px ")


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result) -> None:
    """Exit code 1 through typer.Exit (not an escaped exception), and no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output


# --------------------------------------------------------------------------------- bad files
def _unknown_ext(d):
    p = d / "scan.xyz"
    p.write_text("x y z\n1 2 3\n")
    return p


def _empty(d):
    p = d / "empty.npy"
    p.write_bytes(b"")
    return p


def _truncated_dat(d):
    # SPIEPy .dat: header rows, cols (2 x uint32), then rows*cols float64; here 100 of 4096 values
    p = d / "truncated.dat"
    p.write_bytes(struct.pack("<II", 64, 64) + np.zeros(100, "<f8").tobytes())
    return p


def _all_nan(d):
    p = d / "all_nan.npy"
    np.save(p, np.full((64, 64), np.nan))
    return p


def _constant(d):
    p = d / "constant.npy"
    np.save(p, np.full((64, 64), 3.0))
    return p


BAD_FILES = {
    "unknown-extension": (_unknown_ext, "unsupported file type .xyz"),
    "empty": (_empty, "empty file"),
    "truncated-dat": (_truncated_dat, "truncated"),
    "all-nan": (_all_nan, "NaN"),
    "constant": (_constant, "constant image"),
}


def _matrix_without_parameter_file(d, real_stm_dir):
    src = real_stm_dir / "srsml24-schofield" / MATRIX_DATA
    if not src.is_file():
        pytest.skip(f"{src} not in the shared folder")
    p = d / MATRIX_DATA
    shutil.copyfile(src, p)
    return p


def _message_lines(result, path) -> list[str]:
    """Lines naming the file, with the `FAILED `/`error: ` prefixes and indentation removed."""
    out = []
    for line in result.output.splitlines():
        if str(path) in line:
            out.append(re.sub(r"^(FAILED |error: )", "", line.strip()))
    return out


def check_bad_file(result, path, reason: str) -> None:
    assert_clean_failure(result)
    lines = _message_lines(result, path)
    assert lines, result.output
    # every mention of the file is the same one-line message, holding both file and reason
    assert len(set(lines)) == 1, result.output
    assert reason.lower() in lines[0].lower(), result.output
    assert lines[0].startswith(str(path)), result.output
    assert result.stdout.strip() == "", "nothing may be listed as read: " + result.stdout


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_info_bad_file(tmp_path, case):
    make, reason = BAD_FILES[case]
    path = make(tmp_path)
    check_bad_file(invoke("info", path), path, reason)


def test_info_matrix_without_parameter_file(tmp_path, real_stm_dir):
    path = _matrix_without_parameter_file(tmp_path, real_stm_dir)
    result = invoke("info", path)
    check_bad_file(result, path, "parameter file")
    assert "_0001.mtrx" in result.output        # names the file that is missing


def test_info_single_bad_file_is_exactly_one_line(tmp_path):
    path = _empty(tmp_path)
    result = invoke("info", path)
    assert_clean_failure(result)
    assert len([ln for ln in result.output.splitlines() if ln.strip()]) == 1, result.output


def test_info_missing_path_and_empty_folder(tmp_path):
    missing = tmp_path / "nope.npy"
    check_bad_file(invoke("info", missing), missing, "not found")
    (tmp_path / "empty_dir").mkdir()
    result = invoke("info", tmp_path / "empty_dir")
    assert_clean_failure(result)
    assert "no scans found" in result.output


def test_info_mixed_folder_lists_good_and_names_each_bad(tmp_path, real_stm_dir):
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    good = [folder / "good_a.npy", folder / "good_b.npy"]
    for g in good:
        np.save(g, rng.normal(size=(48, 64)))
    bad = [make(folder) for make, _ in BAD_FILES.values()]
    bad = [b for b in bad if b.suffix != ".xyz"]     # folder search only picks scan extensions
    bad.append(_matrix_without_parameter_file(folder, real_stm_dir))
    (folder / "notes.txt").write_text("not a scan: ignored by the folder search")

    result = invoke("info", folder)
    assert_clean_failure(result)
    # the good files are listed on stdout, one line each, with their shape
    listed = result.stdout.strip().splitlines()
    assert len(listed) == len(good), result.stdout
    for g in good:
        assert any(line.startswith(f"{g}: npy 48x64") for line in listed), result.stdout
    # a final list names each bad file once, after a count
    err = result.stderr.splitlines()
    head = [i for i, line in enumerate(err) if re.match(rf"{len(bad)} of {len(bad) + len(good)} file", line)]
    assert head, result.stderr
    final = err[head[-1] + 1:]
    assert len(final) == len(bad), result.stderr
    for b in bad:
        assert sum(line.strip().startswith(f"{b}: ") for line in final) == 1, result.stderr
    assert "notes.txt" not in result.output


# ------------------------------------------------------------------------------- real files
@pytest.mark.parametrize("folder", REAL_FOLDERS)
def test_info_real_sample_folder(real_stm_dir, folder):
    d = real_stm_dir / folder
    if not d.is_dir():
        pytest.skip(f"{d} not in the shared folder")
    result = invoke("info", d)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    n_files = len([p for p in d.iterdir() if p.suffix.lower() in (".sxm", ".sm4", ".dat", ".z_mtrx")])
    assert len(lines) == n_files, result.stdout
    for line in lines:
        assert "Traceback" not in line
        m = PIXEL.search(line)
        if m:
            assert 1e-3 <= float(m.group(1)) <= 2.0, line       # nm per pixel
        else:
            # SPIEPy .dat stores no scan size: the only format allowed to have none
            assert " spiepy " in line and "pixel size unknown" in line, line


def test_info_real_folders_are_all_covered(real_stm_dir):
    present = sorted(p.name for p in real_stm_dir.iterdir() if p.is_dir())
    assert set(present) <= set(REAL_FOLDERS), f"add {set(present) - set(REAL_FOLDERS)} to REAL_FOLDERS"


# ------------------------------------------------------------------------------------- help
def _command_names() -> list[str]:
    return sorted(typer.main.get_command(app).commands)


COMMANDS = {"info", "train", "classes", "predict", "promote", "models", "ui", "name-class", "results", "evaluate",
            "create-config"}
# Pipeline stages run through `python -m stm_defects.mlops.run STAGE`, not the CLI.
STAGE_COMMANDS = {"synth", "validate", "prepare", "tune", "train-ae", "kmeans", "defects", "gmm",
                  "fit-improved"}


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for name in _command_names():
        assert name in result.output
    assert set(_command_names()) == COMMANDS
    assert not STAGE_COMMANDS & set(_command_names())
    assert "--project" in result.output


@pytest.mark.parametrize("name", _command_names())
def test_command_help(name):
    result = invoke(name, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    assert "Traceback" not in result.output


def test_bad_params_file_is_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\nkmeans: {k_rnage: [2, 4]}\n")
    (tmp_path / "scans").mkdir()
    result = invoke("train", tmp_path / "scans", "--out", tmp_path / "out", "--params", params)
    assert_clean_failure(result)
    assert "k_rnage" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()        # nothing ran


def test_unknown_profile_is_one_line(tmp_path):
    (tmp_path / "scans").mkdir()
    result = invoke("train", tmp_path / "scans", "--out", tmp_path / "out", "--params",
                    PARAMS, "--profile", "gpu-huge")
    assert_clean_failure(result)
    assert "gpu-huge" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_outside_any_project_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("STM_PROJECT", raising=False)
    monkeypatch.delenv("STM_REPO_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    for args in (["results"], ["ui", "--port", "5999"]):
        result = invoke(*args)
        assert_clean_failure(result)
        assert "no stm-defects project" in result.output and "--project" in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "mlruns").exists()      # no store is created where it was run


def test_project_option_selects_the_project(tmp_path, monkeypatch):
    monkeypatch.setenv("STM_PROJECT", str(tmp_path / "elsewhere"))   # restored after the test
    monkeypatch.chdir(tmp_path)
    project = tmp_path / "proj"
    (project / "reports").mkdir(parents=True)
    (project / "reports" / "evaluation.json").write_text('{"test": {"f1": 0.875, "ari": 0.5}}')
    result = invoke("--project", project, "results")
    assert result.exit_code == 0, result.output
    assert f"results (in {project.resolve()})" in result.stdout
    assert "F1 0.875" in result.stdout and "ARI 0.500" in result.stdout


def test_missing_inputs_are_one_line(tmp_path):
    np.save(tmp_path / "scan.npy", np.random.default_rng(0).normal(size=(64, 64)))
    result = invoke("predict", tmp_path / "scan.npy", "--models", tmp_path / "no_models",
                    "--out", tmp_path / "out")
    assert_clean_failure(result)
    assert "no_models" in result.output


def test_help_groups_every_command_with_a_one_line_summary():
    from stm_defects.cli import HELP_PANELS, app

    grouped = {name for cmds in HELP_PANELS.values() for name in cmds}
    assert grouped == COMMANDS
    for info in app.registered_commands:
        assert info.rich_help_panel in HELP_PANELS and len(info.short_help) <= 90
    out = invoke("--help").output
    for panel in HELP_PANELS:
        assert panel in out
