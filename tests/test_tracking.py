"""MLflow tracking: registering a model with lineage tags, promotion aliases, and the MLflow UI
(the exact command `stm ui` runs) serving the registry over its REST API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from stm_defects.cli import app
from tiny import tiny_models

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store holding stm-kmeans v1 (a tiny K-means) with the `production` alias."""
    from sklearn.cluster import KMeans

    from stm_defects.config import resolve
    from stm_defects.io import safe_models
    from stm_defects.mlops.tracking import Tracker, promote

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("STM_PIPELINE_RUN", "tracking-test")
        mp.chdir(root)
        params = resolve(yaml.safe_load((REPO / "params.yaml").read_text()))
        model = KMeans(n_clusters=2, n_init=1, random_state=0).fit(
            np.random.default_rng(0).normal(size=(20, 3)))
        path = safe_models.save(root / "kmeans" / "kmeans.npz", model, "kmeans")
        with Tracker(params, "kmeans") as tr:
            version = tr.register("kmeans", path, {"ae1_version": "1"})
            parent = tr.parent_id
        assert version == 1
        promote({"kmeans": version}, "Production")
        yield {"uri": uri, "root": root, "version": version, "parent": parent}


def test_register_tags_lineage_and_promotion(store, monkeypatch):
    import mlflow

    from stm_defects.io.safe_models import file_sha256
    from stm_defects.mlops.tracking import list_models

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    mv = mlflow.MlflowClient(store["uri"]).get_model_version("stm-kmeans", "1")
    for tag in ("git_commit", "params_hash", "sha256", "file", "pipeline_run_id", "run_id", "profile",
                "ae1_version"):
        assert tag in mv.tags, tag
    assert mv.tags["sha256"] == file_sha256(store["root"] / "kmeans" / "kmeans.npz")
    assert mv.tags["file"] == "kmeans.npz" and mv.source.endswith("/registry/kmeans")
    assert mv.tags["pipeline_run_id"] == store["parent"]
    assert mv.tags["stage"] == "Production"
    rows = list_models()
    assert [(r["model"], r["version"], r["stage"], r["aliases"]) for r in rows] == \
        [("stm-kmeans", 1, "Production", ["production"])]


def test_stm_ui_runs_mlflow_ui_on_localhost(store, monkeypatch):
    import mlflow

    calls = []

    class FakeServer:
        pid = 2 ** 22 + 12345                 # no such process group: the final stop finds none

        def __init__(self, cmd, **kwargs):
            calls.append((cmd, kwargs))

        def wait(self):
            return 0

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setattr(subprocess, "Popen", FakeServer)
    result = CliRunner().invoke(app, ["ui", "--port", "5123"])
    assert result.exit_code == 0, result.output
    assert [c for c, _ in calls] == [[sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store["uri"],
                                      "--host", "127.0.0.1", "--port", "5123", "--workers", "1"]]
    assert calls[0][1]["start_new_session"]          # its own group: a signal stops every worker
    assert "http://127.0.0.1:5123" in result.output
    exp = mlflow.MlflowClient(store["uri"]).get_experiment_by_name("stm-defects")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"   # the training view


def test_stm_ui_refuses_a_port_in_use(store, monkeypatch):
    import socket

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["ui", "--port", str(port)])
    assert result.exit_code == 1
    assert f"port {port} on 127.0.0.1 is in use" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_tracker_logs_stage_params_used_values_and_parent_metrics(store, monkeypatch):
    import mlflow

    from stm_defects.config import resolve
    from stm_defects.mlops.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setenv("STM_PIPELINE_RUN", "tracking-test")
    monkeypatch.chdir(store["root"])
    params = resolve(yaml.safe_load((REPO / "params.yaml").read_text()))
    with Tracker(params, "helpers") as tr:
        tr.stage_params(["kmeans"])
        tr.params_used({"ae1.latent": 16})
        tr.parent_metrics({"f1": 0.5, "nan": float("nan"), "flag": True}, prefix="test_")
        tr.metrics({"loss": 0.25, "inf": float("inf"), "name": "x"}, prefix="s_")
    assert tr.parent_id == store["parent"]        # the same pipeline execution: one parent run
    client = mlflow.MlflowClient(store["uri"])
    run = client.get_run(tr.run_id)
    assert run.data.params["kmeans.k"] == str(params.kmeans.k)
    assert not any(k.startswith("ae1.") for k in run.data.params)   # only the sections it reads
    assert run.data.tags["used.ae1.latent"] == "16"
    assert run.data.tags["kind"] == "stage" and run.data.tags["mlflow.parentRunId"] == store["parent"]
    assert run.data.metrics == {"s_loss": 0.25}
    parent = client.get_run(store["parent"])
    assert parent.data.metrics["test_f1"] == 0.5
    assert "test_nan" not in parent.data.metrics and "test_flag" not in parent.data.metrics
    assert parent.data.params["kmeans.k"] == str(params.kmeans.k)  # every resolved value on the parent

    off = Tracker(params, "off", enabled=False)
    with off:
        off.stage_params(["kmeans"])
        off.params_used({"a": 1})
        off.parent_metrics({"f1": 1.0})
        assert off.register("kmeans", "kmeans.npz") is None
    assert off.run_id is None


@pytest.fixture(scope="module")
def full_store(tmp_path_factory):
    """A store with one version of each of the five models in Production; stm-improved v1 has
    no prediction config (as registered by an older version), v2 has one."""
    from stm_defects.config import predict_config, resolve
    from stm_defects.io import safe_models
    from stm_defects.mlops.tracking import Tracker, promote

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("STM_PIPELINE_RUN", "registry-test")
        mp.chdir(root)
        params = resolve(yaml.safe_load((REPO / "params.yaml").read_text()))
        config = predict_config(params).to_dict()
        files = tiny_models(root / "models")
        files["improved"] = safe_models.save(root / "v1" / "state.npz", {"state": 1}, "improved")
        v2 = safe_models.save(root / "v2" / "state.npz", {"state": 2}, "improved")
        with Tracker(params, "all") as tr:
            versions = {
                "ae1": tr.register("ae1", files["ae1"]),
                "kmeans": tr.register("kmeans", files["kmeans"]),
                "ae2": tr.register("ae2", files["ae2"]),
                "gmm": tr.register("gmm", files["gmm"], {"calibration": json.dumps({"error_threshold": 0.1})}),
                "improved": tr.register("improved", files["improved"], {"class_names": json.dumps({"0": "dimer"})}),
            }
            with_config = tr.register("improved", v2, {"config": config, "class_names": json.dumps({"0": "dimer"})})
        promote(versions, "Production", force=True)
        yield {"uri": uri, "root": root, "versions": versions, "with_config": with_config, "config": config}


def test_load_registered_needs_the_prediction_config(full_store, monkeypatch):
    from stm_defects.mlops.tracking import TrackingError, load_registered, production_method, promote

    monkeypatch.setenv("MLFLOW_TRACKING_URI", full_store["uri"])
    monkeypatch.chdir(full_store["root"])
    assert full_store["versions"] == {"ae1": 1, "kmeans": 1, "ae2": 1, "gmm": 1, "improved": 1}
    with pytest.raises(TrackingError, match="carries no prediction config"):
        load_registered("Production")
    with pytest.raises(TrackingError, match="Production or Staging"):
        load_registered("Archived")
    with pytest.raises(TrackingError, match="Staging"):
        load_registered("Staging")                  # nothing in Staging

    promote({"improved": full_store["with_config"]}, "Production", force=True)
    models = load_registered("Production")
    assert models.config == full_store["config"]
    assert production_method() == full_store["config"]["method"]
    assert models.versions["improved"]["version"] == full_store["with_config"] == 2
    assert models.improved == {"state": 2}
    assert models.calibration == {"error_threshold": 0.1}
    assert models.class_names == {"-1": "unknown", "0": "dimer"}
    assert models.autoencoder("ae1").cfg.latent == 2 and not models.ae1.training


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


@pytest.mark.slow  # 25-50 s on two loaded cores: the server takes most of it to start
def test_mlflow_ui_serves_the_registry(store, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store["uri"],
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # no background job consumers (7 extra processes): only the UI and REST API are under test
    env = dict(os.environ, MLFLOW_TRACKING_URI=store["uri"], MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    # its own session: the server's workers are terminated with it, as one process group
    with open(tmp_path / "ui.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"mlflow ui exited with {proc.returncode}:\n"
                            + (tmp_path / "ui.log").read_text()[-3000:])
            try:
                status, _ = _get(f"{base}/health", timeout=2)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        assert status == 200, "MLflow UI not healthy after 60 s:\n" + (tmp_path / "ui.log").read_text()[-3000:]

        status, body = _get(f"{base}/api/2.0/mlflow/registered-models/search?max_results=10")
        assert status == 200
        models = {m["name"]: m for m in json.loads(body).get("registered_models", [])}
        assert "stm-kmeans" in models, body
        aliases = {a["alias"]: a["version"] for a in models["stm-kmeans"].get("aliases", [])}
        assert aliases == {"production": str(store["version"])}

        status, page = _get(f"{base}/")
        assert status == 200 and b"<html" in page.lower()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        try:        # anything of the group that outlived its leader
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_class_names_are_checked_listed_and_removed(full_store, monkeypatch):
    """`stm name-class`: only ids of the classifier's classes, names of 1-64 printable
    characters; --remove and --list."""
    from stm_defects.mlops.tracking import TrackingError, edit_class_names, load_registered, number_of_classes

    monkeypatch.setenv("MLFLOW_TRACKING_URI", full_store["uri"])
    monkeypatch.setenv("STM_MODEL_CACHE", "off")
    monkeypatch.chdir(full_store["root"])
    v, names, n = edit_class_names({0: "adatom"}, key="gmm")
    assert n >= 2 and names == {"0": "adatom"}
    with pytest.raises(TrackingError, match=f"no class 99: its classes are 0 to {n - 1}"):
        edit_class_names({99: "nothing"}, key="gmm")
    with pytest.raises(TrackingError, match="no class -1"):
        edit_class_names({-1: "noise"}, key="gmm")
    with pytest.raises(TrackingError, match="printable"):
        edit_class_names({1: "  "}, key="gmm")
    assert number_of_classes({"version": 1, "classes": None}, "improved") == 0     # no fitted classes
    assert number_of_classes({"classes": {"n_classes": 4}}, "improved") == 4
    edit_class_names({1: "vacancy"}, key="gmm")
    assert edit_class_names({}, key="gmm")[1] == {"0": "adatom", "1": "vacancy"}
    assert edit_class_names({0: None}, key="gmm")[1] == {"1": "vacancy"}
    assert load_registered("Production").versions["gmm"]["version"] == v


def test_name_class_arguments_are_checked_before_the_registry(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stm_defects.cli import app

    monkeypatch.chdir(tmp_path)
    for args in (["name-class", "3"], ["name-class", "3", "vac", "--remove"], ["name-class"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and "--list" in result.output, result.output
    result = CliRunner().invoke(app, ["name-class", "3", "vac", "--classifier", "kmeans"])
    assert result.exit_code == 1 and "improved or gmm" in result.output
