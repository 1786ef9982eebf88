"""Optuna studies (tuning.py) and the tuned-values file the training stages read."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

from stm_defects.mlops import tuning
from stm_defects.config import TuneParams, load_params
from stm_defects.models import AEConfig
from stm_defects.models.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_AE = AEConfig(widths=(4, 8), kernels=(3, 3), encoder_norm=(True, False), latent=8, dropout=0.0, patch=16)
TINY_TRAIN = TrainConfig(epochs=5, batch_size=100, device="cpu", early_stopping_patience=0)


@pytest.fixture(autouse=True)
def quiet_optuna():
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    """One SQLite file for the module (creating one costs ~2 s); each test names its own studies."""
    return f"sqlite:///{tmp_path_factory.mktemp('optuna') / 'optuna.db'}"


def tiny_patches(n: int = 220, seed: int = 0) -> np.ndarray:
    """Smooth random blobs in [0, 1] (learnable, unlike white noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16]
    cx, cy = rng.uniform(3, 13, (2, n, 1, 1))
    r = rng.uniform(2, 5, (n, 1, 1))
    img = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))
    return (0.8 * img + 0.1 * rng.random((n, 16, 16)))[:, None].astype(np.float32)


def blobs(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0, 0, 0], [10, 10, 0, 0], [0, 10, 10, 5]], float)
    return np.concatenate([c + rng.normal(0, 0.5, (150, 4)) for c in centres])


# ------------------------------------------------------------------------------------- AE1
def test_ae1_study_returns_a_latent_from_the_set_and_is_deterministic(db):
    kw = {"latents": (4, 8, 16), "n_trials": 2, "epochs": 1, "seed": 3, "storage": db}
    patches = tiny_patches()
    r = tuning.tune_ae1_latent(patches, TINY_AE, TINY_TRAIN, study_name="det-a", **kw)
    assert r["best_latent"] in (4, 8, 16)
    distinct = [t for t in r["trials"] if t["duplicate_of"] is None]
    assert len(distinct) == 2 and len({t["latent"] for t in distinct}) == 2
    assert all(t["n_params"] > 0 and t["steps"] == 1 for t in distinct)
    assert r["best_value"] == min(t["value"] for t in distinct if t["state"] == "COMPLETE")

    # same seed, a fresh study: the same trials and values
    again = tuning.tune_ae1_latent(patches, TINY_AE, TINY_TRAIN, study_name="det-b", **kw)
    key = [(t["latent"], t["value"]) for t in again["trials"]]
    assert key == [(t["latent"], t["value"]) for t in r["trials"]]


def test_ae1_tolerance_prefers_the_smaller_latent(db):
    kw = {"latents": (4, 16), "n_trials": 2, "epochs": 1, "seed": 0, "storage": db, "study_name": "tolerance"}
    exact = tuning.tune_ae1_latent(tiny_patches(), TINY_AE, TINY_TRAIN, **kw)
    loose = tuning.tune_ae1_latent(tiny_patches(), TINY_AE, TINY_TRAIN, tolerance=10.0, **kw)
    assert loose["best_latent"] == 4
    assert loose["min_loss_latent"] == exact["best_latent"] == exact["min_loss_latent"]


class PruneFromSecondTrial(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return trial.number >= 1


def test_pruner_stops_training_through_should_stop(db):
    r = tuning.tune_ae1_latent(tiny_patches(), TINY_AE, TINY_TRAIN, latents=(4, 8), n_trials=2, epochs=3,
                               seed=0, storage=db, study_name="pruned", pruner=PruneFromSecondTrial())
    first, second = r["trials"][:2]
    assert first["state"] == "COMPLETE" and first["steps"] == 3
    assert second["state"] == "PRUNED" and second["steps"] == 1 and second["epochs_run"] == 1
    assert r["best_latent"] == first["latent"]


def test_pruning_callback_asks_the_median_pruner():
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    good = study.ask()
    for step in range(3):
        good.report(0.1, step)
    study.tell(good, 0.1)
    bad = study.ask()
    should_stop = tuning.pruning_callback(bad, last_epoch=2)
    assert should_stop(0, 10.0) is True
    assert bad.storage.get_trial(bad._trial_id).intermediate_values == {0: 10.0}
    assert should_stop(2, 10.0) is False         # never pruned at the last epoch


def test_median_pruner_ignores_duplicate_trials():
    study = optuna.create_study(pruner=tuning.median_pruner(n_startup_trials=2, n_warmup_steps=1))

    def finished(value: float, duplicate_of: int | None = None) -> None:
        t = study.ask()
        if duplicate_of is not None:
            t.set_user_attr("duplicate_of", duplicate_of)
        for step in range(3):
            t.report(value, step)
        study.tell(t, value)

    def pruned_at(step: int, value: float) -> bool:
        t = study.ask()
        for s in range(step + 1):
            t.report(value, s)
        decision = t.should_prune()
        study.tell(t, state=optuna.trial.TrialState.FAIL)
        return decision

    finished(0.1)
    finished(0.1, duplicate_of=0)
    assert not pruned_at(1, 10.0)       # one distinct trial only: still starting up
    finished(0.2)
    assert not pruned_at(0, 10.0)       # warm-up step
    assert pruned_at(1, 10.0) and not pruned_at(1, 0.12)


# ------------------------------------------------------------------------------------- GMM
def test_gmm_study_finds_three_blobs(db):
    r = tuning.tune_gmm(blobs(), k_range=(1, 5), covariance_types=("full", "diag"), n_trials=12, seed=0,
                        storage=db, study_name="blobs")
    assert r["k"] == 3 and r["covariance_type"] in ("full", "diag")
    distinct = [t for t in r["trials"] if t["duplicate_of"] is None]
    assert len(distinct) == 10          # the whole 5 x 2 space, each combination once
    assert r["best_value"] == min(t["value"] for t in distinct)
    assert all(t["value"] == distinct[[d["number"] for d in distinct].index(t["duplicate_of"])]["value"]
               for t in r["trials"] if t["duplicate_of"] is not None)

    # the same study again: resumed from the database, nothing new is run
    again = tuning.tune_gmm(blobs(), k_range=(1, 5), covariance_types=("full", "diag"), n_trials=12, seed=0,
                            storage=db, study_name="blobs")
    assert again["study_name"] == r["study_name"] and len(again["trials"]) == len(r["trials"])
    # other data (or another search space): another study in the same database
    other = tuning.tune_gmm(blobs(seed=1), k_range=(1, 5), covariance_types=("full", "diag"), n_trials=2,
                            seed=0, storage=db, study_name="blobs")
    assert other["study_name"] != r["study_name"] and len(other["trials"]) >= 2


def test_gmm_rejects_unknown_covariance(db):
    with pytest.raises(tuning.TuningError, match="covariance"):
        tuning.tune_gmm(blobs(), covariance_types=("round",), storage=db)


# ---------------------------------------------------------------------------- best values
def test_best_values_round_trip(tmp_path):
    best = {"gmm": {"k": 5, "covariance_type": "tied"}, "ae1": {"latent": 64}}
    tuning.write_best(tmp_path / "tuned.json", best)
    assert tuning.read_best(tmp_path / "tuned.json") == best
    tuning.write_best(tmp_path / "ae1.json", {"ae1": {"latent": 16}})
    merged = tuning.read_best(tmp_path / "tuned.json", tmp_path / "ae1.json")
    assert merged == {"ae1": {"latent": 16}, "gmm": {"k": 5, "covariance_type": "tied"}}


@pytest.mark.parametrize("bad", [
    {"ae1": {"latent": 0}}, {"ae1": {"latent": 32, "lr": 1}}, {"gmm": {"k": 3, "covariance_type": "x"}},
    {"kmeans": {"k": 3}}, [1, 2],
])
def test_bad_best_values_are_refused(tmp_path, bad):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(tuning.TuningError):
        tuning.read_best(path)
    with pytest.raises(tuning.TuningError, match="not found"):
        tuning.read_best(tmp_path / "missing.json")


def test_apply_best_overrides_only_the_tuned_values():
    params = load_params(ROOT / "params.yaml")
    tuned = tuning.apply_best(params, {"ae1": {"latent": 128}, "gmm": {"k": 7, "covariance_type": "diag"}})
    assert tuned.ae1.latent == 128 and tuned.ae1.widths == params.ae1.widths
    assert tuned.gmm.k_range == (7, 7) and tuned.gmm.covariance_types == ("diag",)
    assert tuned.gmm.max_samples == params.gmm.max_samples
    assert tuned.ae2 == params.ae2 and tuned.ae1_train == params.ae1_train
    assert tuned.digest() != params.digest()
    only_gmm = tuning.apply_best(params, {"gmm": {"k": 4, "covariance_type": "full"}})
    assert only_gmm.ae1 == params.ae1


def test_load_tuned_honours_the_switch(tmp_path):
    params = load_params(ROOT / "params.yaml")
    tuning.write_best(tmp_path / "tuned.json", {"ae1": {"latent": 16}})
    assert tuning.load_tuned(params, tmp_path / "tuned.json").ae1.latent == 16
    assert tuning.load_tuned(params, None) is params
    off = dataclasses.replace(params, tune=SimpleNamespace(use_tuned=False))
    assert tuning.load_tuned(off, tmp_path / "tuned.json") is off


# ------------------------------------------------------------------------------- stage + logs
class FakeMlflow:
    def __init__(self):
        self.runs, self.current = [], None

    def start_run(self, run_name=None, nested=False, parent_run_id=None, tags=None):
        import contextlib

        self.current = {"name": run_name, "nested": nested, "parent": parent_run_id, "tags": tags,
                        "params": {}, "metrics": {}, "steps": {}}
        self.runs.append(self.current)
        return contextlib.nullcontext()

    def log_params(self, params):
        self.current["params"].update(params)

    def log_metrics(self, metrics, step=None):
        if step is None:
            self.current["metrics"].update(metrics)
        else:
            for k, v in metrics.items():
                self.current["steps"].setdefault(k, {})[step] = v


class FakeTracker:
    def __init__(self):
        self.enabled, self.stage, self.run_id, self.mlflow = True, "tune", "stage-run", FakeMlflow()
        self.logged = {"params": [], "metrics": {}, "artifacts": [], "tags": {}}

    def params_of(self, *sections):
        self.logged["params"] += sections

    def metrics(self, metrics, prefix="", step=None):
        self.logged["metrics"].update({prefix + k: v for k, v in metrics.items()})

    def tags(self, tags):
        self.logged["tags"].update(tags)

    def artifacts(self, *paths, folder=None):
        self.logged["artifacts"] += [Path(p).name for p in paths]


def test_tune_stage_writes_tuned_values_plots_and_nested_trial_runs(tmp_path, db):
    params = load_params(ROOT / "params.yaml")
    params = dataclasses.replace(
        params, ae1=TINY_AE, ae1_train=TINY_TRAIN,
        tune=TuneParams(ae1_trials=2, ae1_latents=(4, 8), ae1_epochs=2, gmm_trials=6),
        gmm=dataclasses.replace(params.gmm, k_range=(2, 4), covariance_types=("full", "diag")))
    np.savez(tmp_path / "train.npz", patches=tiny_patches())
    np.savez(tmp_path / "defects.npz", latents=blobs())
    tracker = FakeTracker()
    m = tuning.tune_stage(params, tmp_path / "train.npz", tmp_path / "defects.npz", tmp_path / "out",
                          tracker=tracker, storage=db)
    out = tmp_path / "out"
    best = tuning.read_best(out / "tuned.json")
    assert best == {"ae1": {"latent": m["ae1_latent"]}, "gmm": {"k": 3, "covariance_type": m["gmm_covariance_type"]}}
    for name in ("history_ae1.png", "intermediate_ae1.png", "importance_ae1.png", "history_gmm.png",
                 "importance_gmm.png", "trials_ae1.csv", "trials_gmm.csv", "metrics.json"):
        assert (out / name).is_file(), name
        assert name in tracker.logged["artifacts"]
    runs = tracker.mlflow.runs
    assert len(runs) >= 2 + 6 and all(r["nested"] and r["parent"] == "stage-run" for r in runs)
    ae1_runs = [r for r in runs if r["tags"]["search"] == "ae1.latent"]
    assert set(ae1_runs[0]["params"]) == {"latent"} and "n_params" in ae1_runs[0]["metrics"]
    assert sorted(ae1_runs[0]["steps"]["val_loss"]) == [0, 1]
    assert tracker.logged["tags"]["tuned.gmm.k"] == 3
    assert tracker.logged["metrics"]["tune_gmm_k"] == 3


def test_tune_stage_needs_an_input(tmp_path):
    with pytest.raises(tuning.TuningError, match="nothing to tune"):
        tuning.tune_stage(load_params(ROOT / "params.yaml"), None, None, tmp_path / "out")


@pytest.mark.slow
def test_trials_are_nested_mlflow_runs_of_the_stage_run(tmp_path, db, monkeypatch):
    """Against a real (throwaway) MLflow store: stage run -> one child run per trial."""
    from stm_defects.mlops.tracking import Tracker, connect, temporary_store

    monkeypatch.setenv("STM_PIPELINE_RUN", "tune-test")
    params = load_params(ROOT / "params.yaml")
    params = dataclasses.replace(params, tune=TuneParams(gmm_trials=4), gmm=dataclasses.replace(
        params.gmm, k_range=(2, 4), covariance_types=("full",)))
    np.savez(tmp_path / "defects.npz", latents=blobs())
    with temporary_store():
        with Tracker(params, "tune_gmm") as tr:
            tuning.tune_stage(params, None, tmp_path / "defects.npz", tmp_path / "out", tracker=tr, storage=db)
        mlflow = connect(params.tracking.experiment)
        children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{tr.run_id}'",
                                      output_format="list")
        assert {c.data.tags["kind"] for c in children} == {"trial"}
        assert len([c for c in children if "duplicate_of" not in c.data.tags]) == 3   # the 3 x 1 space
        assert {c.data.params["covariance_type"] for c in children} == {"full"}
        assert all("value" in c.data.metrics for c in children)
        stage = mlflow.get_run(tr.run_id)
        assert stage.data.tags["tuned.gmm.k"] == "3" and "tune_gmm_bic" in stage.data.metrics
        arts = {a.path for a in mlflow.MlflowClient().list_artifacts(tr.run_id, "tune")}
        assert {"tune/tuned.json", "tune/history_gmm.png"} <= arts
