"""A consistent registry: model sets promoted as one unit, every member lineage-checked, unique
pipeline keys, killed runs marked FAILED and never promotable.

Each test has its own SQLite MLflow store in tmp. Pipeline runs are simulated with tiny models
(`tiny.tiny_models`) registered stage by stage through `Tracker`, as `mlops.run.run_stage` does;
the last test kills a real `stm train` in a subprocess and trains again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stm_defects.cli import app
from tiny import tiny_models, tiny_raw

REPO = Path(__file__).resolve().parents[1]
STAGE_OF = {"ae1": "train_ae1", "kmeans": "kmeans", "ae2": "train_ae2", "gmm": "gmm", "improved": "fit_improved"}
runner = CliRunner()


def stm(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], result.output
    return lines[0]


def _environment(mp, root: Path) -> dict:
    """A store in `root` as cwd (no project: the default experiment), the repo's params, a client."""
    import mlflow

    from stm_defects.config import predict_config, resolve

    uri = f"sqlite:///{root}/mlflow.db"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("STM_PIPELINE_RUN", "STM_PROJECT", "STM_REPO_ROOT"):
        mp.delenv(name, raising=False)
    mp.chdir(root)
    params = resolve(yaml.safe_load((REPO / "params.yaml").read_text()))
    return {"root": root, "uri": uri, "params": params, "config": predict_config(params).to_dict(),
            "client": mlflow.MlflowClient(uri)}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh, empty store."""
    return _environment(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One store for the tests that only read it or add to it: complete pipeline runs `a` and `c`
    (sets 1 and 2), then `b`, which stopped after registering its GMM (no set)."""
    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        env = _environment(mp, root)
        env.update(a=fake_pipeline(env, "train-a", seed=0), c=fake_pipeline(env, "train-c", seed=1),
                   b=fake_pipeline(env, "train-b", seed=2, stop_after="gmm"))
    return env


@pytest.fixture
def reg(registry, monkeypatch):
    """`registry`, with its store as the current one."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    for name in ("STM_PIPELINE_RUN", "STM_PROJECT", "STM_REPO_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(registry["root"])
    return registry


def fake_pipeline(store, name: str, seed: int, stop_after: str | None = None) -> dict:
    """A pipeline run of tiny models (seeded, so each run's files differ): one stage run per model,
    registered with the lineage tags the real stages write, each stage ending as `run_stage` ends
    (the set is registered once complete). `stop_after`: the last model registered before the run
    stops, as a training killed between two stages does."""
    from stm_defects.mlops.tracking import CHAIN, Tracker, new_pipeline_key

    files = tiny_models(store["root"] / f"models-{name}", seed=seed)
    key = new_pipeline_key(name)
    versions, sets = {}, []
    for model, stage in STAGE_OF.items():
        extra = {f"{up}_version": versions[up] for up in CHAIN.get(model, ())}
        if model == "gmm":
            extra["calibration"] = json.dumps({"error_threshold": 0.1})
        if model == "improved":
            extra["config"] = store["config"]
        with Tracker(store["params"], stage, pipeline=key) as tr:
            versions[model] = tr.register(model, files[model], extra)
            sets.append(tr.register_set_if_complete())
        if model == stop_after:
            break
    return {"versions": versions, "parent": tr.parent_id, "key": tr.pipeline_key, "files": files,
            "set": sets[-1], "sets": sets}


@contextlib.contextmanager
def warnings_of(logger: str):
    """The warnings `logger` emits inside the block (a handler of its own: the CLI's logging set-up
    replaces the root handlers that pytest's caplog relies on)."""
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger(logger).addHandler(handler)
    try:
        yield said
    finally:
        logging.getLogger(logger).removeHandler(handler)


def dead_pid() -> int:
    """The pid of a process that has ended (and been waited for)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------ partial registration
def test_a_run_stopped_before_its_set_cannot_be_promoted_or_loaded(reg):
    from stm_defects.mlops.tracking import (
        TrackingError,
        load_registered,
        pipeline_set,
        promote,
        registered_versions,
    )

    a, b, c = reg["a"], reg["b"], reg["c"]
    assert a["sets"] == [None, None, None, None, a["set"]]    # registered at the very end, not before
    assert b["set"] is None and set(b["versions"]) == {"ae1", "kmeans", "ae2", "gmm"}
    assert "model_set" not in reg["client"].get_run(b["parent"]).data.tags

    with pytest.raises(TrackingError, match="has no model set: it stopped before") as err:
        pipeline_set(b["parent"])
    assert "cannot be promoted" in str(err.value) and "\n" not in str(err.value)
    # the mix: the GMM of the stopped run with the improved model of another run
    mixed = {**b["versions"], "improved": c["versions"]["improved"]}
    with pytest.raises(TrackingError, match=rf"stm-improved v{c['versions']['improved']} is not from "
                                            rf"pipeline run {b['parent']}"):
        promote(mixed, "Staging")
    promote(pipeline_set(c["parent"]), "Staging")
    with pytest.raises(TrackingError, match=rf"stm-gmm v{b['versions']['gmm']} was built on stm-ae1 "
                                            rf"v{b['versions']['ae1']}, not v{c['versions']['ae1']}"):
        promote({"gmm": b["versions"]["gmm"]}, "Staging")     # one model joining Staging's set: checked too
    assert registered_versions("Staging") == {**c["versions"], "set": c["set"]}
    models = load_registered("Staging")
    assert {k: v["version"] for k, v in models.versions.items()} == c["versions"]

    # `latest` is the newest complete set, and it says that a newer run has none
    with warnings_of("stm_defects.mlops.tracking") as said:
        latest = pipeline_set("latest")
    assert latest != mixed and all(latest[k] != v for k, v in b["versions"].items())
    assert any(b["parent"] in line and "has no model set" in line for line in said), said
    one_line_error(stm("promote", "--run", b["parent"]), b["parent"], "has no model set")


# ---------------------------------------------------------------------- atomic promotion
def test_a_polling_reader_never_sees_a_mixed_production_set(reg):
    from stm_defects.mlops.tracking import load_registered, pipeline_set, promote, registered_versions

    a, c = reg["a"], reg["c"]
    sets = [{**a["versions"], "set": a["set"]}, {**c["versions"], "set": c["set"]}]
    promote(pipeline_set(a["parent"]), "Production")
    seen, errors, stop = [], [], threading.Event()

    def reader():                                 # `stm predict` resolves its models this way
        while not stop.is_set():
            try:
                seen.append(registered_versions("Production"))
            except Exception as err:  # noqa: BLE001 - reported by the assertion below
                errors.append(repr(err))
            time.sleep(0.002)

    thread = threading.Thread(target=reader)
    thread.start()
    switches, start = 0, time.monotonic()
    try:                                          # >= 2 s and >= 6 promotions (at most 20 s)
        while (time.monotonic() - start < 2.0 or switches < 6) and time.monotonic() - start < 20:
            run = (c, a)[switches % 2]
            assert promote(pipeline_set(run["parent"]), "Production")["set"] == run["set"]
            switches += 1
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors[:3]
    assert switches >= 6 and len(seen) >= 10, (switches, len(seen))
    mixed = [s for s in seen if s not in sets]
    assert not mixed, mixed[:3]
    print(f"{len(seen)} reads during {switches} promotions, none mixed")
    assert {s["set"] for s in seen} == {a["set"], c["set"]}     # both sets were seen: not vacuous
    final = sets[0 if switches % 2 == 0 else 1]
    client = reg["client"]
    for key, name in (("ae1", "stm-ae1"), ("gmm", "stm-gmm"), ("improved", "stm-improved")):
        assert int(client.get_registered_model(name).aliases["production"]) == final[key]   # mirrored
    models = load_registered("Production")
    assert {k: v["version"] for k, v in models.versions.items()} == {k: final[k] for k in a["versions"]}


# ------------------------------------------------------------------------------ lineage
def test_an_improved_from_another_pipeline_run_is_refused(reg):
    from stm_defects.mlops.tracking import TrackingError, check_set, pipeline_set, promote

    a, c, client = reg["a"], reg["c"], reg["client"]
    improved = c["versions"]["improved"]
    mixed = {**a["versions"], "improved": improved}
    assert check_set(client, mixed) == [
        f"stm-improved v{improved} is not from pipeline run {a['parent']} (it was registered by pipeline run "
        f"{c['parent']} and no stage of {a['parent']} read it)"]
    assert check_set(client, a["versions"]) == []
    with pytest.raises(TrackingError, match=f"refusing an inconsistent set: stm-improved v{improved} is not from"):
        promote(mixed, "Staging")
    promote(pipeline_set(a["parent"]), "Production")
    with pytest.raises(TrackingError, match=f"stm-improved v{improved} is not from"):
        promote({"improved": improved}, "Production")                  # one model joining a set
    forced = promote(mixed, "Staging", force=True)
    mv = client.get_model_version("stm-set", str(forced["set"]))
    assert f"stm-improved v{improved}" in mv.tags["forced"] and mv.tags["origin"] == "manual"
    with pytest.raises(TrackingError, match="was built with --force"):
        promote({"set": forced["set"]}, "Production")


def test_a_model_reused_unchanged_belongs_to_the_run_that_read_it(store):
    """As in an incremental `dvc repro`: only the GMM is retrained; the others are read from disk
    (`Tracker.use`), and the last stage that reads them all completes the set."""
    from stm_defects.mlops.tracking import Tracker, new_pipeline_key, pipeline_set

    a = fake_pipeline(store, "make-run-a", seed=0)
    gmm = tiny_models(store["root"] / "models-e", seed=2)["gmm"]
    key = new_pipeline_key("make-run-e")
    upstream = {k: a["files"][k].parent for k in ("ae1", "kmeans", "ae2")}   # model folders, as deps name them
    with Tracker(store["params"], "gmm", pipeline=key) as tr:
        assert tr.use(upstream) == {"ae1": 1, "kmeans": 1, "ae2": 1}
        tr.register("gmm", gmm, {"ae1_version": 1, "kmeans_version": 1, "ae2_version": 1})
        assert tr.register_set_if_complete() is None          # improved not accounted for yet
    with Tracker(store["params"], "evaluate", pipeline=key) as tr:
        tr.use({**upstream, "gmm": gmm.parent, "improved": a["files"]["improved"].parent})
        assert tr.register_set_if_complete() == 2
    assert pipeline_set(tr.parent_id) == {**a["versions"], "gmm": 2}
    assert pipeline_set("latest") == {**a["versions"], "gmm": 2}


# ----------------------------------------------------------------------------- pipeline keys
def test_trainings_started_in_the_same_second_get_their_own_pipeline_run(reg, monkeypatch):
    from stm_defects.mlops import tracking
    from stm_defects.mlops.tracking import Tracker, is_unique_key, new_pipeline_key

    monkeypatch.setenv("STM_PIPELINE_RUN", "train-own-20261201-120000")     # what `stm train` sets
    monkeypatch.setattr(tracking, "_process_keys", {})
    with Tracker(reg["params"], "validate") as first:
        pass
    with Tracker(reg["params"], "prepare") as same_process:
        pass
    monkeypatch.setattr(tracking, "_process_keys", {})                     # another process
    with Tracker(reg["params"], "validate") as other:
        pass
    assert same_process.parent_id == first.parent_id                    # one training: one parent
    assert other.parent_id != first.parent_id and other.pipeline_key != first.pipeline_key
    for tr in (first, other):
        assert tr.pipeline_key.startswith("train-own-20261201-120000-") and is_unique_key(tr.pipeline_key)

    # a unique key (as `make run` exports it) is shared by the stage processes of one execution
    monkeypatch.setenv("STM_PIPELINE_RUN", new_pipeline_key("make-run-20261201-120000"))
    parents = set()
    for stage in ("validate", "prepare"):
        monkeypatch.setattr(tracking, "_process_keys", {})                 # one process per DVC stage
        with Tracker(reg["params"], stage) as tr:
            parents.add(tr.parent_id)
        assert tr.pipeline_key == os.environ["STM_PIPELINE_RUN"]
    assert len(parents) == 1


# ------------------------------------------------------------------------------- killed runs
def test_a_killed_running_run_is_marked_failed_on_the_next_start(reg):
    from stm_defects.mlops.tracking import Tracker, TrackingError, new_pipeline_key, pipeline_set

    client, params = reg["client"], reg["params"]
    key = new_pipeline_key("train-killed")
    with Tracker(params, "train_ae1", pipeline=key) as tr:
        pass
    parent, exp = tr.parent_id, client.get_run(tr.parent_id).info.experiment_id
    pid, host = str(dead_pid()), socket.gethostname()
    # as a kill during stage kmeans leaves them: parent and stage RUNNING, tagged with the dead process
    client.update_run(parent, status="RUNNING")
    for tag, value in (("pid", pid), ("pid_started", ""), ("current_stage", "kmeans")):
        client.set_tag(parent, tag, value)
    stage = client.create_run(exp, run_name="kmeans", tags={
        "mlflow.parentRunId": parent, "kind": "stage", "stage": "kmeans", "host": host, "pid": pid})
    alive = client.create_run(exp, tags={"kind": "stage", "host": host, "pid": str(os.getpid())})
    elsewhere = client.create_run(exp, tags={"kind": "stage", "host": host + "-other", "pid": pid})

    with Tracker(params, "validate", pipeline=new_pipeline_key("train-next")):
        pass
    for run_id in (parent, stage.info.run_id):
        run = client.get_run(run_id)
        assert run.info.status == "FAILED", run_id
        assert run.data.tags["failure"].startswith(f"killed: process {pid} on {host} ended during stage kmeans")
    assert client.get_run(parent).data.tags["pipeline_state"] == "failed"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"        # its process still runs
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"    # cannot tell: left alone
    with pytest.raises(TrackingError, match=r"did not complete \(killed: process"):
        pipeline_set(parent)
    with Tracker(params, "train_ae1", pipeline=key) as again:                # a failed run is not joined
        pass
    assert again.parent_id != parent and again.pipeline_key != key


# --------------------------------------------------------------------- kill and resume a training
def tiny_scans(folder: Path, params_file: Path, n: int = 4) -> Path:
    """`n` synthetic scans as .gwy files, straight from the generator (no stage run)."""
    from stm_defects.config import load_params
    from stm_defects.data.synth import synth_scan
    from stm_defects.io.scans import save_gwy

    params = load_params(params_file)
    folder.mkdir(parents=True)
    for i in range(n):
        s = synth_scan(params.synth, params.seed * 10_000_019 + i)
        save_gwy(folder / f"scan_{i:03d}.gwy", s.height, s.pixel_nm, unit="nm")
    return folder


def inside_kmeans(client) -> bool:
    """Whether a pipeline run is RUNNING its kmeans stage (a stage lasting seconds: a kill now lands in it)."""
    versions = client.search_model_versions("name = 'stm-ae1'")
    if not versions:
        return False
    run = client.get_run(versions[0].tags["pipeline_run_id"])
    return run.info.status == "RUNNING" and run.data.tags.get("current_stage") == "kmeans"


def test_a_killed_training_is_never_promoted_and_a_rerun_is(store, monkeypatch):
    """`stm train` killed (SIGKILL) during the stage after its first model was registered: the run is
    marked FAILED, `stm promote` refuses it in one line, and a rerun in the same second registers a
    set that can be promoted."""
    import functools

    import sklearn.manifold

    from stm_defects.mlops.tracking import connect, pipeline_set

    root, client = store["root"], store["client"]
    raw = tiny_raw(128)                           # and one latent size, k and covariance: ~20 s a training
    raw["tune"].update(ae1_latents=[8])
    raw["kmeans"].update(k_range=[3, 3])
    raw["gmm"].update(k_range=[2, 2], covariance_types=["diag"])
    raw["defect_patches"]["max_patches"] = 500
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    scans = tiny_scans(root / "own", params_file)
    env = {**os.environ, "STM_OPTUNA_STORAGE": f"sqlite:///{root}/optuna.db", "MPLBACKEND": "Agg",
           "STM_PIPELINE_RUN": "train-own-20261201-120000"}
    monkeypatch.setenv("STM_OPTUNA_STORAGE", env["STM_OPTUNA_STORAGE"])
    connect(store["params"].tracking.experiment)            # the store exists before two processes use it
    cmd = [sys.executable, "-c", "from stm_defects.cli import app; app()", "train", str(scans),
           "--out", str(root / "runs"), "--params", str(params_file)]
    with open(root / "train.log", "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not inside_kmeans(client):          # stm-ae1 is registered, the next stage is running
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("stm train ended or stalled before its kmeans stage:\n"
                            + (root / "train.log").read_text()[-3000:])
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    killed = client.search_model_versions("name = 'stm-ae1'")[0].tags["pipeline_run_id"]
    assert client.get_run(killed).info.status == "RUNNING"                   # as the kill left it
    assert not client.search_model_versions("name = 'stm-improved'")

    one_line_error(stm("promote", "--run", killed), killed, "did not complete (killed: process",
                   "cannot be promoted")
    run = client.get_run(killed)
    assert run.info.status == "FAILED" and run.data.tags["pipeline_state"] == "failed"
    one_line_error(stm("promote", "--run", "latest"), "no model set is registered yet", killed)

    monkeypatch.setenv("STM_PIPELINE_RUN", env["STM_PIPELINE_RUN"])         # the same second
    monkeypatch.setattr(sklearn.manifold, "TSNE", functools.partial(sklearn.manifold.TSNE, method="exact",
                                                                    max_iter=250))
    result = stm("train", scans, "--out", root / "runs", "--params", params_file)
    assert result.exit_code == 0, result.output
    result = stm("promote", "--run", "latest")
    assert result.exit_code == 0, result.output
    latest = pipeline_set("latest")
    rerun = client.get_model_version("stm-improved", str(latest["improved"])).tags["pipeline_run_id"]
    assert rerun != killed
    for key, name in (("ae1", "stm-ae1"), ("kmeans", "stm-kmeans"), ("ae2", "stm-ae2"), ("gmm", "stm-gmm")):
        assert client.get_model_version(name, str(latest[key])).tags["pipeline_run_id"] == rerun, key
    one_line_error(stm("promote", "--run", killed), "did not complete (killed: process")
