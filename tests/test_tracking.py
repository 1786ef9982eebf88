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
        with Tracker(params, "kmeans") as tr:
            version = tr.register("kmeans", model, "0" * 64, {"ae1_version": "1"})
            parent = tr.parent_id
        assert version == 1
        promote({"kmeans": version}, "Production")
        yield {"uri": uri, "root": root, "version": version, "parent": parent}


def test_register_tags_lineage_and_promotion(store, monkeypatch):
    import mlflow

    from stm_defects.mlops.tracking import list_models

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    mv = mlflow.MlflowClient(store["uri"]).get_model_version("stm-kmeans", "1")
    for tag in ("git_commit", "params_hash", "sha256", "pipeline_run_id", "run_id", "profile", "ae1_version"):
        assert tag in mv.tags, tag
    assert mv.tags["pipeline_run_id"] == store["parent"]
    assert mv.tags["stage"] == "Production"
    rows = list_models()
    assert [(r["model"], r["version"], r["stage"], r["aliases"]) for r in rows] == \
        [("stm-kmeans", 1, "Production", ["production"])]


def test_stm_ui_runs_mlflow_ui_on_localhost(store, monkeypatch):
    calls = []

    def fake_call(cmd, *a, **k):
        calls.append(cmd)
        return 0

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setattr(subprocess, "call", fake_call)
    result = CliRunner().invoke(app, ["ui", "--port", "5123"])
    assert result.exit_code == 0, result.output
    assert calls == [[sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store["uri"],
                      "--host", "127.0.0.1", "--port", "5123", "--workers", "1"]]
    assert "http://127.0.0.1:5123" in result.output


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
