"""`stm predict` at scale: a process pool gives the same bytes as one process, outputs mirror the
input tree, a second run skips what is up to date, summary.csv is rebuilt from the JSONs of this
run's models and settings only (with fixed columns), a scan that kills its worker fails alone,
and the registry's model set loads warm from a local cache without importing MLflow.

Tiny model folders (tests/tiny.py) with an improved-analysis state fitted on random 25x25
patches, so that synthetic 96x96 scans (0.1 nm/px) give classified defects in milliseconds. The
pool tests start real worker processes (forked from `analysis.pool_server`'s fork server, or
spawned): 20-40 s on two loaded cores.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from tiny import tiny_registry, with_fitted_classes

# The package is imported inside the tests: the pool test's worker processes import this module
# (for its work function) and should not pay for torch.

REPO = Path(__file__).resolve().parents[1]
SIDE = 96
PIXEL_NM = 0.1


def invoke(*args):
    from typer.testing import CliRunner

    from stm_defects.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_torch_thread) -> Path:
    return with_fitted_classes(tmp_path_factory.mktemp("workers") / "models")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> list[np.ndarray]:
    from stm_defects.config import load_params
    from stm_defects.data.synth import synth_scan

    cfg = dataclasses.replace(load_params(REPO / "params.yaml").synth, size=SIDE)
    return [synth_scan(cfg, 100 + i).height.astype(np.float32) for i in range(4)]


@pytest.fixture()
def scans(tmp_path, synthetic) -> Path:
    """day1/{scan000,scan001}.npy and day2/{scan000,scan001}.npy: the same names in two folders."""
    d = tmp_path / "scans"
    for i, height in enumerate(synthetic):
        f = d / f"day{1 + i // 2}" / f"scan{i % 2:03d}.npy"
        f.parent.mkdir(parents=True, exist_ok=True)
        np.save(f, height)
    return d


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


# ------------------------------------------------------------------------------------- names
def test_output_names_mirror_the_input_tree(tmp_path):
    from stm_defects.analysis.batch import common_root, output_names
    from stm_defects.errors import StageError

    for rel in ("day1/scan001.sxm", "day2/scan001.gwy", "one/a.sxm", "one/a.gwy", "single.npy"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    day1, day2 = tmp_path / "day1", tmp_path / "day2"
    files = [day1 / "scan001.sxm", day2 / "scan001.gwy"]
    assert common_root([day1, day2]) == tmp_path
    assert output_names(files, common_root([day1, day2])) == ["day1/scan001", "day2/scan001"]
    assert output_names(files, common_root(files)) == ["day1/scan001", "day2/scan001"]
    assert output_names([day1 / "scan001.sxm"], common_root([day1])) == ["scan001"]       # a folder
    single = tmp_path / "single.npy"
    assert output_names([single], common_root([single])) == ["single"]                    # a file
    one = [tmp_path / "one/a.sxm", tmp_path / "one/a.gwy"]
    assert output_names(one, common_root([tmp_path / "one"])) == ["a.sxm", "a.gwy"]      # suffix kept
    (tmp_path / "one/a.sxm.npy").write_bytes(b"")
    with pytest.raises(StageError, match="would write the same outputs"):
        output_names([*one, tmp_path / "one/a.sxm.npy"], tmp_path / "one")


# ------------------------------------------------------------------------------------- pool
def test_workers_write_the_same_bytes_as_one_process(models, scans, tmp_path):
    (scans / "day2" / "broken.npy").write_bytes(b"not a scan")
    a, b = tmp_path / "serial", tmp_path / "pool"
    first = invoke("predict", scans, "--models", models, "--out", a, "--pixel-nm", PIXEL_NM)
    second = invoke("predict", scans, "--models", models, "--out", b, "--pixel-nm", PIXEL_NM, "--workers", 2)
    for result in (first, second):
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert "4 of 5 scan(s) predicted" in result.stdout, result.output
        assert f"{scans / 'day2' / 'broken.npy'}: read failed:" in result.stderr, result.stderr
    files_a, files_b = tree(a), tree(b)
    assert sorted(files_a) == sorted(files_b)
    assert {"day1/scan000.json", "day2/scan000.json", "day1/scan001_overlay.png", "summary.csv",
            "failures.csv"} <= set(files_a)
    with_defects = sum(bool(json.loads(files_a[f"day{d}/scan00{i}.json"])["defects"]) for d in (1, 2) for i in (0, 1))
    # per scan: JSON and three pictures, plus a crop strip when it has defects; the run's
    # summary.csv, defects.csv, failures.csv, config_used.yaml and report.html
    assert len(files_a) == 4 * 4 + with_defects + 5
    different = [name for name in files_a if files_a[name] != files_b[name]]
    assert not different, different
    doc = json.loads(files_a["day2/scan001.json"])
    assert doc["image"] == str(scans / "day2" / "scan001.npy")
    assert sum(len(json.loads(files_a[f"day{d}/scan00{i}.json"])["defects"]) for d in (1, 2) for i in (0, 1)) > 0


class LightTask(NamedTuple):
    """`analysis.batch.Task`'s fields, without importing the package in the workers."""
    index: int
    path: str
    name: str


def _work_or_die(task: LightTask):
    """A pool work function for the test below: kills its worker process on the task named die."""
    if task.name == "die":
        os._exit(3)
    return {"index": task.index, "pid": os.getpid()}


def _init_nothing(spec, job, threads) -> None:
    pass


def test_a_scan_that_kills_its_worker_fails_alone():
    from stm_defects.analysis.batch import WORKER_DIED, run_pool
    from stm_defects.analysis.predict import Failure

    tasks = [LightTask(i, f"/scans/{n}.npy", n) for i, n in enumerate(["a", "b", "die", "c", "d", "e"])]
    got: dict[str, object] = {}
    run_pool(tasks, None, None, 2, lambda task, result: got.setdefault(task.name, result),
             work=_work_or_die, initializer=_init_nothing)
    assert sorted(got) == ["a", "b", "c", "d", "die", "e"]
    died = got.pop("die")
    assert isinstance(died, Failure) and died.stage == "analyse" and died.reason == WORKER_DIED
    assert died.line() == f"/scans/die.npy: analyse failed: {WORKER_DIED}"
    assert all(isinstance(r, dict) for r in got.values())


def _what_the_worker_has(task: LightTask):
    """A pool work function: whether the worker had the prediction modules before any work."""
    return {"index": task.index, "ppid": os.getppid(), "preloaded": "stm_defects.analysis.predict" in sys.modules}


def test_workers_fork_from_a_server_that_imported_their_modules():
    from stm_defects.analysis.batch import run_pool
    from stm_defects.analysis.pool_server import pool_start_method, start_pool_server

    if pool_start_method() != "forkserver":
        pytest.skip("this platform spawns pool workers")
    tasks = [LightTask(i, f"/scans/{i}.npy", f"s{i}") for i in range(4)]
    spawned: list[dict] = []
    run_pool(tasks, None, None, 2, lambda task, r: spawned.append(r), work=_what_the_worker_has,
             initializer=_init_nothing, start_method="spawn")
    assert len(spawned) == 4 and not any(r["preloaded"] for r in spawned)   # a spawned worker imports anew
    start_pool_server()
    forked: list[dict] = []
    run_pool(tasks, None, None, 2, lambda task, r: forked.append(r), work=_what_the_worker_has,
             initializer=_init_nothing)
    assert len(forked) == 4 and all(r["preloaded"] for r in forked)
    assert all(r["ppid"] != os.getpid() for r in forked)    # forked by the server, not this process


def test_a_worker_with_other_code_fails_its_scans_with_one_line(tmp_path):
    from stm_defects.analysis.batch import CODE_DIFFERS, Job, Task, predict_task
    from stm_defects.analysis.dispatch import PredictConfig
    from stm_defects.analysis.predict import read_options

    cfg = PredictConfig()
    job = Job(cfg, str(tmp_path), {}, read_options(), None, "0" * 64, {**cfg.to_dict(), "method": "other"})
    got = predict_task(None, job, Task(0, "scan.npy", "scan"))
    assert got.line() == f"scan.npy: analyse failed: {CODE_DIFFERS}" and got.expected
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- resuming
def test_a_second_run_skips_what_is_up_to_date(models, scans, tmp_path):
    out = tmp_path / "out"
    ok("predict", scans, "--models", models, "--out", out, "--pixel-nm", PIXEL_NM)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    again = ok("predict", scans, "--models", models, "--out", out, "--pixel-nm", PIXEL_NM)
    assert "skipped 4 scan(s) already predicted" in again.stdout and "0 of 4 scan(s) predicted" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json")} == stamps
    assert len(read_csv(out / "summary.csv")) == 4

    # a changed input file, and other read options, are predicted again
    changed = scans / "day1" / "scan001.npy"
    np.save(changed, np.load(changed)[::-1].copy())
    again = ok("predict", scans, "--models", models, "--out", out, "--pixel-nm", PIXEL_NM)
    assert "skipped 3 scan(s)" in again.stdout and "1 of 4 scan(s) predicted" in again.stdout, again.stdout
    other = ok("predict", scans, "--models", models, "--out", out, "--pixel-nm", 2 * PIXEL_NM)
    assert "4 of 4 scan(s) predicted" in other.stdout and "skipped" not in other.stdout
    forced = ok("predict", scans, "--models", models, "--out", out, "--pixel-nm", 2 * PIXEL_NM, "--force")
    assert "4 of 4 scan(s) predicted" in forced.stdout and "skipped" not in forced.stdout


def test_the_summary_leaves_out_jsons_of_other_models(models, scans, tmp_path):
    out = tmp_path / "out"
    ok("predict", scans / "day1", "--models", models, "--out", out)
    other = with_fitted_classes(tmp_path / "other-models", seed=1)
    result = ok("predict", scans / "day2", "--models", other, "--out", out)   # same names, other models
    assert "2 of 2 scan(s) predicted" in result.stdout
    assert not [ln for ln in result.stderr.splitlines() if "made by other models" in ln]  # overwritten
    result = ok("predict", scans / "day1" / "scan000.npy", "--models", models, "--out", out)
    lines = [ln for ln in result.stderr.splitlines() if "made by other models" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: 1 prediction JSON(s)"), result.stderr
    assert [r["scan"] for r in read_csv(out / "summary.csv")] == [str(scans / "day1" / "scan000.npy")]


def test_a_failed_scans_old_json_is_left_out(models, scans, tmp_path):
    out = tmp_path / "out"
    ok("predict", scans, "--models", models, "--out", out)
    (scans / "day2" / "scan000.npy").write_bytes(b"")            # now unreadable
    result = invoke("predict", scans, "--models", models, "--out", out)
    assert result.exit_code == 1, result.output
    assert "skipped 3 scan(s)" in result.stdout
    assert [ln for ln in result.stderr.splitlines() if ln.startswith("warning: 1 older JSON(s)")], result.stderr
    assert sorted(r["output"] for r in read_csv(out / "summary.csv")) == [
        "day1/scan000", "day1/scan001", "day2/scan001"]
    assert read_csv(out / "failures.csv")[0]["scan"] == str(scans / "day2" / "scan000.npy")


# ----------------------------------------------------------------------------------- summary
def test_the_summary_has_a_fixed_column_per_class_and_densities(models, scans, tmp_path):
    out = tmp_path / "out"
    ok("predict", scans, "--models", models, "--out", out, "--pixel-nm", PIXEL_NM)
    with open(out / "summary.csv", newline="") as fh:
        header = next(csv.reader(fh))
    from stm_defects.io.model_files import load_models

    n_classes = load_models(models).improved["classes"]["n_classes"]       # the fitted state's classes
    assert n_classes >= 2
    classes = [f"class_{c}" for c in range(n_classes)] + ["unknown", "unclassified"]
    assert header[:2 + len(classes)] == ["scan", "n_defects", *classes]
    assert {"area_nm2", "defects_per_100nm2", "defects_per_cm2", "class_0_per_100nm2", "unknown_per_cm2",
            "output", "pixel_nm", "bias_V", "setpoint", "setpoint_unit", "date", "direction",
            "model_ae1", "model_improved"} <= set(header)
    rows = read_csv(out / "summary.csv")
    assert [r["output"] for r in rows] == ["day1/scan000", "day1/scan001", "day2/scan000", "day2/scan001"]
    area = SIDE * SIDE * PIXEL_NM ** 2
    for row in rows:
        doc = json.loads((out / f"{row['output']}.json").read_text())
        n = len(doc["defects"])
        assert int(row["n_defects"]) == n == sum(int(row[c]) for c in classes)
        assert float(row["area_nm2"]) == pytest.approx(area)
        assert float(row["defects_per_100nm2"]) == pytest.approx(100 * n / area, rel=1e-5)
        assert float(row["defects_per_cm2"]) == pytest.approx(1e14 * n / area, rel=1e-5)
        assert float(row["pixel_nm"]) == PIXEL_NM and row["bias_V"] == "" and row["direction"] == "forward"
        assert row["model_ae1"] == str(models / "ae1")


# ----------------------------------------------------------------------------- model cache
@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite store with a tiny model set registered and in Production, and an empty cache."""
    with tiny_registry(tmp_path_factory.mktemp("cached-registry"), "cache-test") as reg:
        pass
    return {"uri": reg["uri"], "root": reg["root"]}


WARM = """
import json, sys, time
import torch
t = time.perf_counter()
from stm_defects.mlops.tracking import load_registered_files
models, files = load_registered_files("Production")
print(json.dumps({"seconds": time.perf_counter() - t, "mlflow": "mlflow" in sys.modules,
                  "versions": models.versions, "class_names": models.class_names, "files": sorted(files)}))
"""


def test_the_registry_set_loads_warm_from_the_cache_without_mlflow(registry, tmp_path, monkeypatch):
    from stm_defects.mlops.tracking import load_registered_files

    cache = tmp_path / "cache"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    monkeypatch.setenv("STM_MODEL_CACHE", str(cache))
    monkeypatch.chdir(registry["root"])
    cold, files = load_registered_files("Production")
    cached = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert cached == sorted(name for name, _ in files.values()) and len(cached) == 5
    run = subprocess.run([sys.executable, "-c", WARM], capture_output=True, text=True, timeout=300,
                         env={**os.environ}, cwd=registry["root"])
    assert run.returncode == 0, run.stderr
    warm = json.loads(run.stdout.strip().splitlines()[-1])
    assert warm["mlflow"] is False                       # the warm path never imported MLflow
    assert warm["versions"] == cold.versions and warm["class_names"] == cold.class_names
    assert warm["files"] == sorted(files)
    print(f"warm load of the registry set: {warm['seconds']:.2f} s")

    # a wrong cache entry is ignored (and replaced by the cold load that follows)
    entry = next(p for p in cache.rglob("kmeans.npz"))
    entry.write_bytes(b"PK not the registered bytes")
    again, _ = load_registered_files("Production")
    assert again.versions == cold.versions
    assert entry.read_bytes() == files["kmeans"][1]

    # predicting from the registry works through the cache, and records the set's versions
    scan = tmp_path / "scan.npy"
    np.save(scan, np.random.default_rng(0).normal(size=(64, 64)))
    ok("predict", scan, "--out", tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert doc["models"] == json.loads(json.dumps(cold.versions))
