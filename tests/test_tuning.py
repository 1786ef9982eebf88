"""The AE1 latent study (mlops/tuning.py) and the tuned-values file the training stage reads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

from stm_defects.config import ScopedParams, TuneParams, load_params
from stm_defects.mlops import tuning
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


# ------------------------------------------------------------------------------------- AE1
def test_ae1_study_returns_a_latent_from_the_set_and_is_deterministic(db):
    kw = {"latents": (4, 8, 16), "n_trials": 2, "epochs": 1, "seed": 3, "storage": db}
    patches = tiny_patches()
    r = tuning.tune_ae1_latent(patches, TINY_AE, TINY_TRAIN, study_name="det-a", **kw)
    assert r["best_latent"] in (4, 8, 16)
    trials = r["trials"]
    assert len(trials) == 2 and len({t["latent"] for t in trials}) == 2
    assert all(t["n_params"] > 0 and t["steps"] == 1 for t in trials)
    assert r["best_value"] == min(t["value"] for t in trials if t["state"] == "COMPLETE")

    # same seed, a fresh study: the same trials and values
    again = tuning.tune_ae1_latent(patches, TINY_AE, TINY_TRAIN, study_name="det-b", **kw)
    key = [(t["latent"], t["value"]) for t in again["trials"]]
    assert key == [(t["latent"], t["value"]) for t in r["trials"]]


def test_grid_study_visits_distinct_latents_and_resumes_without_training(db, monkeypatch):
    from stm_defects.models import training

    calls = []
    real_fit = training.fit_autoencoder

    def counting_fit(model, *args, **kwargs):
        calls.append(model.cfg.latent)
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(training, "fit_autoencoder", counting_fit)
    kw = {"latents": (16, 4, 8, 8), "epochs": 1, "seed": 5, "storage": db, "study_name": "grid"}
    patches = tiny_patches(seed=2)
    r = tuning.tune_ae1_latent(patches, TINY_AE, TINY_TRAIN, n_trials=None, **kw)
    # None: every distinct latent of the grid, each exactly once
    assert sorted(calls) == [4, 8, 16]
    assert sorted(t["latent"] for t in r["trials"]) == [4, 8, 16]
    assert [t["number"] for t in r["trials"]] == [0, 1, 2]

    # the same inputs again (more trials asked than the grid holds): the study is resumed from
    # the database and nothing is trained
    calls.clear()
    again = tuning.tune_ae1_latent(patches, TINY_AE, TINY_TRAIN, n_trials=10, **kw)
    assert calls == []
    assert again["study_name"] == r["study_name"]
    assert again["trials"] == r["trials"]
    assert (again["best_latent"], again["best_value"]) == (r["best_latent"], r["best_value"])

    # other data: another study in the same database, trained again
    other = tuning.tune_ae1_latent(tiny_patches(seed=3), TINY_AE, TINY_TRAIN, n_trials=1, **kw)
    assert other["study_name"] != r["study_name"] and len(calls) == 1


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


def _ids(patches: np.ndarray) -> set[int]:
    """The ids written into the first pixel of each patch (value * 1000)."""
    return set(np.round(patches[:, 0, 0, 0] * 1000).astype(int).tolist())


def test_shown_patches_are_held_out_and_leave_the_training_draw_unchanged():
    patches = tiny_patches(n=400)
    patches[:, 0, 0, 0] = np.arange(400) / 1000          # a unique id per patch
    train, shown = tuning.tuning_sets(patches, max_patches=300, seed=7, n_shown=6)
    same_draw = np.sort(np.random.default_rng(7).choice(400, 300, replace=False))
    assert np.array_equal(train, patches[same_draw])    # the study's training set does not change
    assert shown.shape == (6, 1, 16, 16) and not _ids(shown) & _ids(train)
    contrast = shown.std(axis=(1, 2, 3))
    assert np.all(np.diff(contrast) >= 0)                # flat to structured
    again = tuning.tuning_sets(patches, max_patches=300, seed=7, n_shown=6)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, shown)))


def test_with_every_patch_in_use_the_shown_ones_leave_the_training_set():
    patches = tiny_patches(n=50)
    patches[:, 0, 0, 0] = np.arange(50) / 1000
    train, shown = tuning.tuning_sets(patches, max_patches=None, seed=0, n_shown=8)
    assert len(shown) == 5 and len(train) == 45          # at most a tenth held out
    assert not _ids(shown) & _ids(train) and _ids(shown) | _ids(train) == set(range(50))
    assert len(tuning.tuning_sets(patches[:9], None, 0)[1]) == 0               # too few: none shown


def test_every_trial_keeps_its_reconstruction_of_the_same_patches(db, tmp_path):
    """Also a pruned trial, and a resumed study still has them (the picture needs no retraining)."""
    from stm_defects.mlops import plots

    kw = {"latents": (4, 8), "n_trials": 2, "epochs": 3, "seed": 0, "storage": db, "study_name": "shown",
          "pruner": PruneFromSecondTrial(), "max_patches": 150, "n_shown": 4}
    r = tuning.tune_ae1_latent(tiny_patches(), TINY_AE, TINY_TRAIN, **kw)
    rows = tuning.latent_rows(r["study"], r["shown"])
    assert [row["latent"] for row in rows] == sorted(t["latent"] for t in r["trials"])
    assert {row["state"] for row in rows} == {"COMPLETE", "PRUNED"}
    for row in rows:
        assert row["rec"].shape == r["shown"].shape == (4, 1, 16, 16)
        assert row["mse"] == pytest.approx(float(np.mean((row["rec"] - r["shown"]) ** 2)), abs=1e-4)
        assert len(row["val_loss"]) == len(row["train_loss"]) >= 1
    again = tuning.tune_ae1_latent(tiny_patches(), TINY_AE, TINY_TRAIN, **kw)
    resumed = tuning.latent_rows(again["study"], again["shown"])
    assert all(np.array_equal(a["rec"], b["rec"]) for a, b in zip(rows, resumed))
    plots.latent_sizes(r["shown"], rows, tmp_path / "sizes.png", "test")
    assert (tmp_path / "sizes.png").stat().st_size > 0


def test_no_latents_is_an_error(db):
    with pytest.raises(tuning.TuningError, match="no latent"):
        tuning.tune_ae1_latent(tiny_patches(), TINY_AE, TINY_TRAIN, latents=(), storage=db)


# ---------------------------------------------------------------------------- best values
def test_best_values_round_trip(tmp_path):
    best = {"ae1": {"latent": 64}}
    tuning.write_best(tmp_path / "tuned.json", best)
    assert tuning.read_best(tmp_path / "tuned.json") == best
    tuning.write_best(tmp_path / "ae1.json", {"ae1": {"latent": 16}})
    merged = tuning.read_best(tmp_path / "tuned.json", tmp_path / "ae1.json")
    assert merged == {"ae1": {"latent": 16}}        # later files win


@pytest.mark.parametrize("bad", [
    {"ae1": {"latent": 0}}, {"ae1": {"latent": 32, "lr": 1}}, {"ae1": {"latent": True}},
    {"gmm": {"k": 3, "covariance_type": "full"}},   # the GMM is no longer tuned
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
    tuned = tuning.apply_best(params, {"ae1": {"latent": 128}})
    assert tuned.ae1.latent == 128 and tuned.ae1.widths == params.ae1.widths
    assert tuned.ae2 == params.ae2 and tuned.ae1_train == params.ae1_train and tuned.gmm == params.gmm
    assert tuned.digest() != params.digest()
    assert tuning.apply_best(params, {}) == params


def test_apply_best_to_scoped_params():
    params = load_params(ROOT / "params.yaml")
    scoped = ScopedParams(params, ("ae1", "ae1_train", "tune"), "train_ae1")
    tuned = tuning.apply_best(scoped, {"ae1": {"latent": 16}})
    assert isinstance(tuned, ScopedParams) and tuned.ae1.latent == 16
    assert tuned.ae1.widths == params.ae1.widths


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
        self.enabled, self.stage, self.run_id, self.mlflow = True, "tune_ae1", "stage-run", FakeMlflow()
        self.logged = {"metrics": {}, "artifacts": [], "tags": {}}

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
        tune=TuneParams(ae1_trials=2, ae1_latents=(4, 8), ae1_epochs=2))
    np.savez(tmp_path / "train.npz", patches=tiny_patches())
    tracker = FakeTracker()
    m = tuning.tune_stage(params, tmp_path / "train.npz", tmp_path / "out", tracker=tracker, storage=db)
    out = tmp_path / "out"
    best = tuning.read_best(out / "tuned.json")
    assert best == {"ae1": {"latent": m["ae1_latent"]}} and m["ae1_latent"] in (4, 8)
    assert m["ae1_trials_complete"] + m["ae1_trials_pruned"] == 2
    assert json.loads((out / "metrics.json").read_text())["ae1_latent"] == m["ae1_latent"]
    for name in ("history_ae1.png", "intermediate_ae1.png", "importance_ae1.png", "trials_ae1.csv",
                 "metrics.json", "tuned.json", "latent_sizes_ae1.png", "latent_sizes.md"):
        assert (out / name).is_file(), name
        assert name in tracker.logged["artifacts"]
    runs = tracker.mlflow.runs
    assert len(runs) == 2 and all(r["nested"] and r["parent"] == "stage-run" for r in runs)
    assert all(r["tags"]["search"] == "ae1.latent" and r["tags"]["kind"] == "trial" for r in runs)
    assert set(runs[0]["params"]) == {"latent"} and "n_params" in runs[0]["metrics"]
    assert sorted(runs[0]["steps"]["val_loss"]) == [0, 1]
    assert tracker.logged["tags"]["tuned.ae1.latent"] == m["ae1_latent"]
    assert tracker.logged["metrics"]["tune_ae1_latent"] == m["ae1_latent"]
    assert all("shown_mse" in r["metrics"] for r in runs)              # each trial's held-out MSE
    text = (out / "latent_sizes.md").read_text()
    assert all(f"| {latent} |" in text for latent in (4, 8)) and "AE2: no picture" in text
    # wall-clock figures reach MLflow but not the stage's outputs, which are the same on every run
    assert tracker.logged["metrics"]["tune_ae1_seconds"] > 0
    assert "ae1_seconds" not in json.loads((out / "metrics.json").read_text())
    header = (out / "trials_ae1.csv").read_text().splitlines()[0].split(",")
    assert "value" in header and not set(tuning.TIMING) & set(header)


def test_tune_stage_needs_enough_patches(tmp_path, db):
    np.savez(tmp_path / "train.npz", patches=tiny_patches(n=5))
    with pytest.raises(tuning.TuningError, match="too few"):
        tuning.tune_stage(load_params(ROOT / "params.yaml"), tmp_path / "train.npz", tmp_path / "out", storage=db)


def test_stage_adapter_reads_only_its_declared_sections(tmp_path, db, monkeypatch):
    from stm_defects.mlops.dag import stage as dag_stage

    monkeypatch.setenv("STM_OPTUNA_STORAGE", db)
    st = dag_stage("tune_ae1")
    assert st.entry == "stm_defects.mlops.tuning:stage"
    params = load_params(ROOT / "params.yaml")
    params = dataclasses.replace(params, ae1=TINY_AE, ae1_train=TINY_TRAIN,
                                 tune=TuneParams(ae1_trials=1, ae1_latents=(4, 8), ae1_epochs=1))
    np.savez(tmp_path / "train.npz", patches=tiny_patches())
    m = tuning.stage(ScopedParams(params, st.params, st.name), {"patches": tmp_path / "train.npz"},
                     {"tuning": tmp_path / "tuning"}, None, None)
    assert tuning.read_best(tmp_path / "tuning" / "tuned.json") == {"ae1": {"latent": m["ae1_latent"]}}
    assert m["ae1_study"].startswith("ae1-latent-")


@pytest.mark.slow
def test_trials_are_nested_mlflow_runs_of_the_stage_run(tmp_path, db, monkeypatch):
    """Against a real (throwaway) MLflow store: stage run -> one child run per trial."""
    from stm_defects.mlops.tracking import Tracker, connect, temporary_store

    monkeypatch.setenv("STM_PIPELINE_RUN", "tune-test")
    params = load_params(ROOT / "params.yaml")
    params = dataclasses.replace(params, ae1=TINY_AE, ae1_train=TINY_TRAIN,
                                 tune=TuneParams(ae1_latents=(4, 8, 16), ae1_epochs=1))
    np.savez(tmp_path / "train.npz", patches=tiny_patches())
    with temporary_store():
        with Tracker(params, "tune_ae1") as tr:
            tuning.tune_stage(params, tmp_path / "train.npz", tmp_path / "out", tracker=tr, storage=db)
        mlflow = connect(params.tracking.experiment)
        children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{tr.run_id}'",
                                      output_format="list")
        assert {c.data.tags["kind"] for c in children} == {"trial"}
        assert sorted(c.data.params["latent"] for c in children) == ["16", "4", "8"]   # the whole grid, once
        assert all("value" in c.data.metrics for c in children if c.data.tags["state"] == "COMPLETE")
        stage = mlflow.get_run(tr.run_id)
        assert stage.data.tags["tuned.ae1.latent"] in ("4", "8", "16") and "tune_ae1_latent" in stage.data.metrics
        arts = {a.path for a in mlflow.MlflowClient().list_artifacts(tr.run_id, "tune")}
        assert {"tune/tuned.json", "tune/history_ae1.png", "tune/latent_sizes_ae1.png"} <= arts
