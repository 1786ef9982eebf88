"""`stm predict` gives the same JSON from any folder: the prediction config travels with the
registered model version, not with the params.yaml of the folder one runs in.

The tiny pipeline (6 + 2 scans of 128 px, one epoch, minimal grids) runs once for the module
through `mlops.run.run_stage` in a temporary project with its own MLflow and Optuna stores; the
set is promoted with `stm promote --run latest`, then `stm predict` runs from several folders.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stm_defects.cli import app
from tiny import tiny_raw

REPO = Path(__file__).resolve().parents[1]
SIZE = 128
STAGES = ("synth", "validate", "prepare", "tune_ae1", "train_ae1", "kmeans", "defects", "train_ae2", "gmm",
          "fit_improved")
MODEL_KEYS = {"ae1", "kmeans", "ae2", "gmm", "improved"}
ENV_VARS = ("STM_PROJECT", "STM_REPO_ROOT")
runner = CliRunner()


def tiny_params(path: Path, **changes) -> Path:
    """The repo's params.yaml shrunk to seconds of CPU (as tests/test_pipeline_e2e.py's), plus a
    tiny latent-size study; `changes` maps section -> {key: value} updates."""
    raw = tiny_raw(SIZE)
    for section, values in changes.items():
        target = raw[section]
        for key, value in values.items():
            *inner, last = key.split(".")
            for k in inner:
                target = target[k]
            target[last] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def stm(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args):
    result = stm(*args)
    assert result.exit_code == 0, f"stm {' '.join(map(str, args))} failed:\n{result.output}\n{result.exception!r}"
    return result


def no_env(mp: pytest.MonkeyPatch, *names: str) -> None:
    """Unset `names` for the test and restore them after, even when the code under test sets them
    (the CLI's `--project` writes STM_PROJECT into os.environ)."""
    for name in names:
        mp.setenv(name, "placeholder")       # records the original value (or its absence)
        mp.delenv(name)


def _fast_tsne():
    from sklearn.manifold import TSNE

    return functools.partial(TSNE, method="exact", max_iter=250)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A trained, promoted project: (root, a scan of it). Stores live beside it, in tmp."""
    import sklearn.manifold

    from stm_defects.config import load_params
    from stm_defects.mlops.run import run_stage

    base = tmp_path_factory.mktemp("anywhere")
    root = base / "project"
    root.mkdir()
    tiny_params(root / "params.yaml")
    shutil.copyfile(REPO / "dvc.yaml", root / "dvc.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base}/mlflow.db")
        mp.setenv("STM_OPTUNA_STORAGE", f"sqlite:///{base}/optuna.db")
        mp.setenv("STM_PIPELINE_RUN", "predict-anywhere")
        mp.setenv("MPLBACKEND", "Agg")
        no_env(mp, *ENV_VARS)
        mp.setattr(sklearn.manifold, "TSNE", _fast_tsne())
        params = load_params(root / "params.yaml")
        for name in STAGES:
            run_stage(name, params, root, show_progress=False)
        result = ok("promote", "--run", "latest")
        assert result.stdout.startswith("Production:")
        scan = root / "data/raw/synthetic/default/default_000.gwy"
        assert scan.is_file()
        yield root, scan


@pytest.fixture
def other(tmp_path):
    """A folder with its own params.yaml whose prediction values differ from the project's."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    tiny_params(folder / "params.yaml", preprocess={"align_rows": False}, improved={"anomaly.threshold": 3})
    return folder


def read(folder: Path, scan: Path) -> dict:
    return json.loads((folder / f"{scan.stem}.json").read_text())


def test_same_json_from_the_project_and_from_another_folder(project, other, tmp_path, monkeypatch):
    root, scan = project
    no_env(monkeypatch, *ENV_VARS)

    monkeypatch.chdir(root)
    ok("predict", scan, "--out", tmp_path / "A")
    monkeypatch.chdir(other)
    ok("--project", root, "predict", scan, "--out", tmp_path / "B")
    a, b = read(tmp_path / "A", scan), read(tmp_path / "B", scan)
    assert a == b

    # the folder is a project of its own now: its params.yaml is still not what predicts
    monkeypatch.delenv("STM_PROJECT")
    shutil.copyfile(REPO / "dvc.yaml", other / "dvc.yaml")
    from stm_defects.project import find_project

    assert find_project() == other.resolve()
    ok("predict", scan, "--out", tmp_path / "D")
    assert read(tmp_path / "D", scan) == a

    assert a["defects"], "the tiny models find defects on a synthetic scan"
    assert a["image"] == str(scan) and a["shape"] == [SIZE, SIZE]
    # the config: where it came from, and every value
    assert set(a["config"]) == {"source", "values"}
    improved = a["models"]["improved"]
    assert a["config"]["source"] == f"registry stm-improved v{improved['version']} (Production)"
    values = a["config"]["values"]
    assert values["method"] == "improved"
    assert values["preprocess"]["align_rows"] is True                 # the project's, not the folder's
    project = yaml.safe_load((root / "params.yaml").read_text())
    assert values["improved"]["anomaly"]["threshold"] == project["improved"]["anomaly"]["threshold"] != 3  # not the folder's
    assert values["paper"]["mask"]["threshold"] == "p90"
    # the models: names and versions of the promoted set
    assert set(a["models"]) == MODEL_KEYS
    for key, info in a["models"].items():
        assert info == {"name": f"stm-{key}", "version": info["version"], "stage": "Production"}
        assert isinstance(info["version"], int) and info["version"] >= 1
    assert set(a["software"]) == {"stm-defects"} and a["software"]["stm-defects"]


def test_params_override_is_recorded(project, other, tmp_path, monkeypatch):
    root, scan = project
    no_env(monkeypatch, *ENV_VARS)
    monkeypatch.chdir(root)
    ok("predict", scan, "--out", tmp_path / "A")
    result = ok("predict", scan, "--params", other / "params.yaml", "--out", tmp_path / "C")
    assert "override" in result.stdout
    a, c = read(tmp_path / "A", scan), read(tmp_path / "C", scan)
    assert c["config"]["source"] == f"override {(other / 'params.yaml').resolve()}"
    assert c["config"]["models"] == a["config"]["source"]          # which models it overrode
    assert c["config"]["values"]["preprocess"]["align_rows"] is False
    assert c["config"]["values"]["improved"]["anomaly"]["threshold"] == 3
    assert c["models"] == a["models"] and c["software"] == a["software"]
    # the other values do change the result: so the equal JSONs above are not vacuous
    assert c["defects"] != a["defects"]
    print(f"defects: {len(a['defects'])} with the model's config, {len(c['defects'])} with the override")


def test_predict_outside_any_project_is_one_line_and_creates_nothing(project, tmp_path, monkeypatch):
    _, scan = project
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    monkeypatch.chdir(nowhere)
    no_env(monkeypatch, *ENV_VARS, "MLFLOW_TRACKING_URI")
    result = stm("predict", scan)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "no stm-defects project" in errors[0] and "--project" in errors[0], errors[0]
    assert not (nowhere / "mlruns").exists()
    assert list(nowhere.iterdir()) == [], "nothing is written in the folder"
