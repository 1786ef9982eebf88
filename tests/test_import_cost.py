"""The default method predicts without importing torch (2-3 s of every command otherwise) or
scikit-learn (0.6 s): the paper method's autoencoders and estimators are verified when the models
load and built only when a method asks for them, and the default method's mixtures are scored by
`models.mixture`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tiny import tiny_models

_PREDICT = """
import sys
from typer.testing import CliRunner
from stm_defects.cli import app
r = CliRunner().invoke(app, ["predict", sys.argv[1], "--models", sys.argv[2], "--out", sys.argv[3]] + sys.argv[4:])
assert r.exit_code == 0, r.output
print("torch after predict:", "torch" in sys.modules)
print("sklearn after predict:", "sklearn" in sys.modules)
from stm_defects.io.model_files import load_models
models = load_models(sys.argv[2])
models.autoencoder("ae1")
print("torch after building ae1:", "torch" in sys.modules)
models.estimator("kmeans")
print("sklearn after building kmeans:", "sklearn" in sys.modules)
"""


def _run(tmp_path, *extra):
    d = tmp_path / "models"
    if not d.exists():
        tiny_models(d)
    np.save(tmp_path / "scan.npy", np.random.default_rng(0).normal(size=(96, 96)))
    got = subprocess.run([sys.executable, "-c", _PREDICT, str(tmp_path / "scan.npy"), str(d),
                          str(tmp_path / "out"), *extra], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    return got.stdout


def test_a_default_method_prediction_does_not_import_torch(tmp_path):
    out = _run(tmp_path)
    assert "torch after predict: False" in out, out
    assert "torch after building ae1: True" in out, out       # the check can see torch
    assert "sklearn after predict: False" in out, out
    assert "sklearn after building kmeans: True" in out, out
    assert (tmp_path / "out" / "scan.json").is_file()


def test_nor_with_a_params_file(tmp_path):
    """Reading a params.yaml builds every section, the autoencoders' settings too (plain
    dataclasses in `models.configs`)."""
    out = _run(tmp_path, "--params", str(Path(__file__).resolve().parents[1] / "params.yaml"))
    assert "torch after predict: False" in out, out


_WORKER = """
import importlib, os, sys
from stm_defects.analysis.pool_server import WORKER_MODULES
for name in WORKER_MODULES:
    importlib.import_module(name)
from stm_defects.analysis.batch import ModelSpec, limit_threads
from stm_defects.io.model_files import load_models
models = ModelSpec.from_folder(sys.argv[1], load_models(sys.argv[1])).load()   # what a worker loads
limit_threads(1)
print("torch in a worker:", "torch" in sys.modules, "OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS"))
print("sklearn in a worker:", "sklearn" in sys.modules)
import torch
print("torch threads:", torch.get_num_threads(), type(models.autoencoder("ae2")).__name__)
"""


def test_a_worker_loads_the_models_without_torch_and_passes_on_its_thread_limit(tmp_path):
    tiny_models(tmp_path / "models")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    got = subprocess.run([sys.executable, "-c", _WORKER, str(tmp_path / "models")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert got.returncode == 0, got.stderr[-2000:]
    assert "torch in a worker: False OMP_NUM_THREADS 1" in got.stdout, got.stdout
    assert "sklearn in a worker: False" in got.stdout, got.stdout
    assert "torch threads: 1 ConvAutoencoder" in got.stdout, got.stdout


def test_a_bad_estimator_file_is_refused_when_the_models_load_not_when_first_used(tmp_path):
    """The paper method's K-means is built on first use, but every check of the safe reader runs
    when the models load: a file of the wrong kind (with a matching manifest) is refused there."""
    import pytest

    from stm_defects.io import safe_models
    from stm_defects.io.model_files import load_models

    d = tmp_path / "models"
    tiny_models(d)
    (d / "kmeans" / "kmeans.npz").write_bytes((d / "gmm" / "gmm.npz").read_bytes())
    safe_models.write_manifest(d / "kmeans", "kmeans.npz")
    with pytest.raises(safe_models.ModelFileError, match="kmeans.npz: not a kmeans model"):
        load_models(d)
