"""`stm predict --engine ray`: a local two-worker Ray Data run writes the same files, byte for
byte, as the serial run (JSONs, pictures, summary.csv and failures.csv), and the options are
checked up front with one line.

Skipped when Ray is not installed (`pip install 'stm-defects[ray]'`). The Ray run starts a local
Ray of two CPUs: 30-50 s on two loaded cores, most of it Ray's and the actors' start-up.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stm_defects.cli import app
from tiny import tiny_models

SIDE = 64
HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed: pip install 'stm-defects[ray]' "
                                                   "(ray[data]==2.60.0, in the dev extra)")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_torch_thread) -> Path:
    d = tmp_path_factory.mktemp("ray") / "models"
    tiny_models(d)
    return d


@pytest.fixture()
def scans(tmp_path) -> Path:
    """Three 64x64 scans in two folders (two named alike) and one that cannot be read."""
    rng = np.random.default_rng(0)
    for rel in ("a/s0.npy", "a/s1.npy", "b/s0.npy"):
        (tmp_path / "scans" / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "scans" / rel, rng.normal(size=(SIDE, SIDE)))
    (tmp_path / "scans" / "b" / "broken.npy").write_bytes(b"")
    return tmp_path / "scans"


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


@needs_ray
def test_ray_writes_the_same_files_as_the_serial_run(models, scans, tmp_path):
    serial, ray = tmp_path / "serial", tmp_path / "ray"
    first = invoke("predict", scans, "--models", models, "--out", serial)
    second = invoke("predict", scans, "--models", models, "--out", ray, "--engine", "ray", "--workers", 2)
    for result in (first, second):
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert "3 of 4 scan(s) predicted" in result.stdout, result.output
        assert f"{scans / 'b' / 'broken.npy'}: read failed: empty file" in result.stderr, result.stderr
        assert "Traceback" not in result.output
    a, b = tree(serial), tree(ray)
    assert sorted(a) == sorted(b)
    assert {"a/s0.json", "a/s1.json", "b/s0.json", "summary.csv", "failures.csv"} <= set(a)
    assert [name for name in a if a[name] != b[name]] == []
    # and the next run, on either engine, finds everything up to date
    again = invoke("predict", scans, "--models", models, "--out", ray, "--engine", "ray", "--workers", 2)
    assert "skipped 3 scan(s)" in again.stdout and "0 of 4 scan(s) predicted" in again.stdout, again.output


def test_engine_options_are_checked_first(models, scans, tmp_path):
    out = tmp_path / "out"
    result = invoke("predict", scans, "--models", models, "--out", out, "--engine", "spark")
    assert result.exit_code == 1 and result.stderr.strip() == "error: --engine spark: use one of local, ray"
    result = invoke("predict", scans, "--models", models, "--out", out, "--ray-address", "auto")
    assert result.exit_code == 1 and result.stderr.strip() == "error: --ray-address needs --engine ray"
    assert not out.exists()


def test_without_ray_the_engine_is_one_line(models, scans, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    result = invoke("predict", scans, "--models", models, "--out", tmp_path / "out", "--engine", "ray")
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --engine ray needs Ray Data") and "stm-defects[ray]" in line, line
