"""Hyper-parameter search with Optuna: AE1's latent size and the GMM's k x covariance type.

* :func:`tune_ae1_latent` -- AE1's latent size over a set of sizes (the report's 16-256): each
  trial trains a fresh AE1 for a few epochs on a seeded subsample of the training patches and
  reports the validation loss per epoch, so a ``MedianPruner`` can stop hopeless trials.
* :func:`tune_gmm` -- number of components x covariance type of the defect GMM, minimising the
  BIC on MinMax-scaled latents (the same fit as :class:`cluster.GMMSelector`, so the tuned
  combination reproduces exactly in the ``gmm`` stage).
* :func:`write_best` / :func:`read_best` / :func:`apply_best` / :func:`load_tuned` -- the
  ``tuned.json`` file the training stages read, and how it overrides ``params.yaml``.
* :func:`tune_stage` -- the ``stm tune`` stage: runs the studies whose inputs are given, writes
  ``tuned.json``, ``metrics.json``, per-study ``trials_*.csv`` and Optuna's plots.

Studies live in an SQLite database outside DVC (default ``<repo>/mlruns/optuna.db``, local
state like the MLflow store). A study's name ends with a fingerprint of everything that changes
its trials (data, search space, seed, model and training settings), so ``load_if_exists`` resumes
only an identical study: a re-run with the same inputs finds its trials done and only re-reads
them; changed data or params start a new study. The trial budget counts distinct trials: a
sampled configuration that an earlier trial already evaluated is answered from that trial (its
value and intermediate values copied, tagged ``duplicate_of``) and does not use up the budget.
Every trial's sampler is ``TPESampler(seed=f(seed, trial number))``, so the sequence of trials
depends only on the seed and the trials before it: a fresh run, and a run resumed after an
interruption, give the same trials.

MLflow never appears here: pass ``log_trial(params, metrics, step_metrics, *, name, tags)``
(``tracking_tune.trial_logger(tracker)`` makes one that opens a nested run per trial).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import fresh_dir, read_json, write_csv, write_json
from .stages import StageError

log = logging.getLogger(__name__)

__all__ = [
    "COVARIANCE_TYPES",
    "TuningError",
    "apply_best",
    "default_storage",
    "load_tuned",
    "median_pruner",
    "pruning_callback",
    "read_best",
    "tune_ae1_latent",
    "tune_gmm",
    "tune_stage",
    "write_best",
]

COVARIANCE_TYPES = ("spherical", "diag", "tied", "full")
LogTrial = Callable[..., None]      # log_trial(params, metrics, step_metrics, *, name=None, tags=None)
BEST_FILE = "tuned.json"
_BEST_KEYS = {"ae1": ("latent",), "gmm": ("k", "covariance_type")}


class TuningError(StageError):
    """A study cannot produce a result, or a tuned-values file is malformed."""


# ------------------------------------------------------------------------------------ storage
def default_storage() -> str:
    """``STM_OPTUNA_STORAGE`` if set, else ``sqlite:///<repo>/mlruns/optuna.db`` (outside DVC)."""
    if os.environ.get("STM_OPTUNA_STORAGE"):
        return os.environ["STM_OPTUNA_STORAGE"]
    from .tracking import repo_root  # no MLflow import: repo_root is plain pathlib

    folder = repo_root() / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def _fingerprint(payload: Mapping, *arrays: np.ndarray) -> str:
    h = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:12]


def _describe(obj) -> dict:
    """Class name and plain settings of a pruner (part of a study's fingerprint)."""
    plain = (int, float, str, bool, type(None))
    return {"class": type(obj).__name__,
            **{k: v for k, v in sorted(vars(obj).items()) if isinstance(v, plain)}}


def _trial_seed(seed: int, number: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(number)]).generate_state(1)[0])


def _open_study(storage: str | None, name: str, pruner=None):
    import optuna

    return optuna.create_study(storage=storage or default_storage(), study_name=name,
                               direction="minimize", pruner=pruner or optuna.pruners.NopPruner(),
                               load_if_exists=True)


def _finished(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def _distinct(study) -> list:
    return [t for t in _finished(study) if "duplicate_of" not in t.user_attrs]


def _answer_duplicate(trial) -> float | None:
    """If an earlier finished trial had these params, copy its result into `trial`.

    Returns the value to return (COMPLETE original), raises ``TrialPruned`` (PRUNED original),
    or returns None when the params are new.
    """
    import optuna
    from optuna.trial import TrialState

    for old in _distinct(trial.study):
        if old.number != trial.number and old.params == trial.params:
            trial.set_user_attr("duplicate_of", old.number)
            for key, value in old.user_attrs.items():
                if key != "duplicate_of":
                    trial.set_user_attr(key, value)
            for step, value in sorted(old.intermediate_values.items()):
                trial.report(value, step)
            if old.state == TrialState.PRUNED:
                raise optuna.TrialPruned(f"same params as pruned trial {old.number}")
            return float(old.value)
    return None


def _run_distinct(study, objective, n_trials: int, space: Sequence[Mapping], seed: int, startup: int,
                  callbacks: Sequence[Callable] = ()) -> None:
    """Optimise until the study holds `n_trials` distinct finished trials (or covers `space`).

    `space` lists every configuration (both searches are over finite sets). Trials already in the
    study count, so an interrupted study resumes and a finished one is only re-read. Each trial
    gets a TPE sampler seeded from (seed, trial number). When the sampler proposes a
    configuration already evaluated (TPE concentrates fast on small spaces), the trial is answered
    from the earlier one and a seeded-random unexplored configuration is queued next, so every
    duplicate is followed by progress.
    """
    import optuna
    from optuna.trial import TrialState

    target = min(int(n_trials), len(space))
    attempts, max_attempts = 0, 3 * target + 10
    while len(_distinct(study)) < target and attempts < max_attempts:
        trials = study.get_trials(deepcopy=False)
        number = len(trials)
        last = trials[-1] if trials else None
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if last is not None and "duplicate_of" in last.user_attrs and not waiting:
            seen = [t.params for t in _distinct(study)]
            fresh = [c for c in space if dict(c) not in seen]
            if fresh:
                pick = np.random.default_rng(_trial_seed(seed, number)).integers(len(fresh))
                study.enqueue_trial(dict(fresh[int(pick)]))
        study.sampler = optuna.samplers.TPESampler(seed=_trial_seed(seed, number),
                                                   n_startup_trials=startup)
        study.optimize(objective, n_trials=1, callbacks=list(callbacks), gc_after_trial=False)
        attempts += 1
    if len(_distinct(study)) < target:
        log.warning("%s: only %d distinct trials after %d attempts (wanted %d)", study.study_name,
                    len(_distinct(study)), attempts, target)


def _log_callback(log_trial: LogTrial | None, extra_tags: Mapping | None = None):
    """An Optuna callback calling `log_trial` once per finished trial."""
    if log_trial is None:
        return None

    def callback(study, trial) -> None:
        attrs = trial.user_attrs
        metrics = {k: v for k, v in attrs.items() if isinstance(v, (int, float)) and k != "duplicate_of"}
        if trial.value is not None:
            metrics["value"] = trial.value
        steps = {"val_loss": dict(trial.intermediate_values)} if trial.intermediate_values else {}
        if isinstance(attrs.get("train_loss"), list):
            steps["train_loss"] = dict(enumerate(attrs["train_loss"]))
        tags = {"study": study.study_name, "trial": trial.number, "state": trial.state.name,
                **(extra_tags or {})}
        if "duplicate_of" in attrs:
            tags["duplicate_of"] = attrs["duplicate_of"]
        log_trial(dict(trial.params), metrics, steps,
                  name=f"{study.study_name.rsplit('-', 1)[0]} trial {trial.number}", tags=tags)

    return callback


def _trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, **t.params,
                     "value": t.value, "duplicate_of": t.user_attrs.get("duplicate_of"),
                     **{k: v for k, v in t.user_attrs.items()
                        if k != "duplicate_of" and isinstance(v, (int, float, str))},
                     "steps": len(t.intermediate_values),
                     "seconds": round(t.duration.total_seconds(), 3) if t.duration else None})
    keys = list(dict.fromkeys(k for row in rows for k in row))      # same columns in every row (CSV)
    return [{k: row.get(k) for k in keys} for row in rows]


# ------------------------------------------------------------------------------------- AE1
def pruning_callback(trial, last_epoch: int | None = None) -> Callable[[int, float], bool]:
    """`should_stop(epoch, val_loss)` for `fit_autoencoder`: report to `trial`, ask its pruner.

    At `last_epoch` the loss is reported but the pruner is not asked: stopping then saves nothing
    and would throw away a finished result.
    """

    def should_stop(epoch: int, val_loss: float) -> bool:
        trial.report(float(val_loss), step=int(epoch))
        if last_epoch is not None and epoch >= last_epoch:
            return False
        return bool(trial.should_prune())

    return should_stop


def median_pruner(n_startup_trials: int = 2, n_warmup_steps: int = 1):
    """Optuna's median rule over *distinct* trials (duplicates answered from an earlier trial do
    not count): prune when the trial's best value so far is worse than the median of the
    distinct completed trials at the same step, once `n_startup_trials` of them exist."""
    import optuna
    from optuna.trial import TrialState

    class DistinctMedianPruner(optuna.pruners.BasePruner):
        def __init__(self, n_startup_trials: int, n_warmup_steps: int):
            self.n_startup_trials, self.n_warmup_steps = int(n_startup_trials), int(n_warmup_steps)

        def prune(self, study, trial) -> bool:
            step = trial.last_step
            if step is None or step < self.n_warmup_steps:
                return False
            done = [t.intermediate_values[step]
                    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if "duplicate_of" not in t.user_attrs and step in t.intermediate_values]
            if len(done) < max(self.n_startup_trials, 1):
                return False
            best = min((v for s, v in trial.intermediate_values.items() if s <= step), default=math.nan)
            if math.isnan(best):
                return True
            return best > float(np.nanmedian(done))

    return DistinctMedianPruner(n_startup_trials, n_warmup_steps)


def tune_ae1_latent(patches: np.ndarray, base_ae_cfg, train_cfg, latents: Sequence[int] = (16, 32, 64, 128, 256),
                    n_trials: int = 4, epochs: int = 3, seed: int = 0, storage: str | None = None,
                    study_name: str = "ae1-latent", log_trial: LogTrial | None = None, *,
                    max_patches: int | None = 3000, batch_size: int | None = None, tolerance: float = 0.0,
                    pruner=None, startup_trials: int = 2) -> dict:
    """Search AE1's latent size; objective: best validation MSE after `epochs` epochs.

    Each trial builds ``base_ae_cfg`` with the trial's latent (weights seeded by `seed`, the same
    for every trial) and trains it with ``train_cfg`` (``epochs`` and, when given, `batch_size`
    replaced: a smaller batch gives a short run more optimiser steps) on a seeded subsample of at
    most `max_patches` patches. The validation loss of every epoch goes to
    ``trial.report``; `pruner` (default :func:`median_pruner`: Optuna's median rule after 2
    distinct completed trials, from the second epoch) stops trials whose loss is worse than the
    median of earlier trials at the same epoch; the last epoch is never pruned.
    Each trial records the model's parameter count (``n_params``).

    `tolerance` trades loss for size as the report did (it kept 32): the chosen latent is the
    smallest one whose best loss is within ``(1 + tolerance)`` of the lowest loss (0: the lowest).

    Returns ``{"best_latent", "best_value", "min_loss_latent", "min_value", "study_name",
    "trials": [...]}``.
    """
    import optuna

    from .models import build_autoencoder, count_parameters
    from .training import fit_autoencoder

    latents = sorted({int(v) for v in latents})
    if not latents:
        raise TuningError("no latent sizes to search")
    arr = np.asarray(patches, dtype=np.float32)
    if max_patches is not None and len(arr) > max_patches:
        idx = np.sort(np.random.default_rng(seed).choice(len(arr), int(max_patches), replace=False))
        arr = arr[idx]
    tcfg = dataclasses.replace(train_cfg, epochs=int(epochs),
                               batch_size=int(batch_size or train_cfg.batch_size))
    if pruner is None:
        pruner = median_pruner(n_startup_trials=2, n_warmup_steps=1)
    base = dataclasses.asdict(base_ae_cfg)
    base.pop("latent", None)
    name = f"{study_name}-" + _fingerprint(
        {"latents": latents, "seed": seed, "ae": base, "train": dataclasses.asdict(tcfg),
         "pruner": _describe(pruner), "startup": startup_trials}, arr)
    study = _open_study(storage, name, pruner)

    def objective(trial) -> float:
        latent = int(trial.suggest_categorical("latent", latents))
        cached = _answer_duplicate(trial)
        if cached is not None:
            return cached
        model = build_autoencoder(dataclasses.replace(base_ae_cfg, latent=latent), seed=seed)
        trial.set_user_attr("n_params", int(count_parameters(model)))
        train_losses: list[float] = []
        hist = fit_autoencoder(model, arr, tcfg, seed=seed,
                               on_epoch=lambda e, t, v, lr: train_losses.append(float(t)),
                               should_stop=pruning_callback(trial, last_epoch=tcfg.epochs - 1))
        trial.set_user_attr("train_loss", train_losses)
        trial.set_user_attr("epochs_run", hist.epochs_run)
        trial.set_user_attr("patches_per_s", round(float(hist.patches_per_s), 1))
        if hist.stop_reason == "should_stop":
            raise optuna.TrialPruned(f"latent {latent} pruned after epoch {hist.epochs_run - 1}")
        return float(hist.best_val_loss)

    callback = _log_callback(log_trial, {"search": "ae1.latent"})
    _run_distinct(study, objective, n_trials, [{"latent": v} for v in latents], seed, startup_trials,
                  [callback] if callback else [])
    complete = [t for t in _distinct(study) if t.value is not None and math.isfinite(t.value)
                and t.state.name == "COMPLETE"]
    if not complete:
        raise TuningError(f"study {name}: no AE1 trial completed (all pruned or failed)")
    best = min(complete, key=lambda t: (t.value, t.params["latent"]))
    limit = best.value * (1.0 + float(tolerance)) if best.value >= 0 else best.value
    chosen = min((t for t in complete if t.value <= limit), key=lambda t: t.params["latent"])
    return {"best_latent": int(chosen.params["latent"]), "best_value": float(chosen.value),
            "min_loss_latent": int(best.params["latent"]), "min_value": float(best.value),
            "tolerance": float(tolerance), "n_patches": len(arr), "study_name": name,
            "study": study, "trials": _trial_rows(study)}


# ------------------------------------------------------------------------------------- GMM
def tune_gmm(latents: np.ndarray, k_range: tuple[int, int] = (2, 12),
             covariance_types: Sequence[str] = COVARIANCE_TYPES, n_trials: int = 12, seed: int = 0,
             storage: str | None = None, study_name: str = "gmm", log_trial: LogTrial | None = None, *,
             n_init: int = 1, reg_covar: float = 1e-6, max_iter: int = 200,
             startup_trials: int = 6) -> dict:
    """Search the GMM's number of components k (int) x covariance type, minimising the BIC.

    The latents are MinMax-scaled and each trial fits ``GaussianMixture(k, covariance_type,
    random_state=seed, n_init, reg_covar, max_iter)`` as :class:`cluster.GMMSelector` does, so
    the tuned combination gives the same model in the ``gmm`` stage. k above the number of
    samples is cut off.

    Returns ``{"k", "covariance_type", "best_value" (BIC), "study_name", "trials": [...]}``.
    """
    from sklearn.mixture import GaussianMixture
    from sklearn.preprocessing import MinMaxScaler

    X = np.asarray(latents, dtype=float)
    if X.ndim != 2 or len(X) < 2:
        raise TuningError(f"need a 2-D array of at least 2 latents, got shape {X.shape}")
    bad = sorted(set(covariance_types) - set(COVARIANCE_TYPES))
    if bad or not covariance_types:
        raise TuningError(f"unknown covariance type(s) {bad}; use {COVARIANCE_TYPES}")
    k_lo, k_hi = int(k_range[0]), min(int(k_range[1]), len(X))
    if k_lo < 1 or k_hi < k_lo:
        raise TuningError(f"empty k range {tuple(k_range)} for {len(X)} samples")
    covs = list(dict.fromkeys(covariance_types))
    Xs = MinMaxScaler().fit_transform(X)
    name = f"{study_name}-" + _fingerprint(
        {"k": [k_lo, k_hi], "cov": covs, "seed": seed, "n_init": n_init, "reg_covar": reg_covar,
         "max_iter": max_iter, "startup": startup_trials}, X)
    study = _open_study(storage, name)

    def objective(trial) -> float:
        k = trial.suggest_int("k", k_lo, k_hi)
        cov = trial.suggest_categorical("covariance_type", covs)
        cached = _answer_duplicate(trial)
        if cached is not None:
            return cached
        gm = GaussianMixture(n_components=k, covariance_type=cov, random_state=seed, n_init=n_init,
                             reg_covar=reg_covar, max_iter=max_iter).fit(Xs)
        trial.set_user_attr("aic", float(gm.aic(Xs)))
        trial.set_user_attr("converged", int(bool(gm.converged_)))
        trial.set_user_attr("n_parameters", int(gm._n_parameters()))
        return float(gm.bic(Xs))

    callback = _log_callback(log_trial, {"search": "gmm"})
    space = [{"k": k, "covariance_type": c} for k in range(k_lo, k_hi + 1) for c in covs]
    _run_distinct(study, objective, n_trials, space, seed, startup_trials,
                  [callback] if callback else [])
    complete = [t for t in _distinct(study) if t.state.name == "COMPLETE" and t.value is not None
                and math.isfinite(t.value)]
    if not complete:
        raise TuningError(f"study {name}: no GMM trial completed")
    best = min(complete, key=lambda t: (t.value, t.params["k"]))
    return {"k": int(best.params["k"]), "covariance_type": str(best.params["covariance_type"]),
            "best_value": float(best.value), "n_latents": len(X), "study_name": name,
            "study": study, "trials": _trial_rows(study)}


# ---------------------------------------------------------------------------- best values
def _check_best(best: Any, where: str) -> dict:
    if not isinstance(best, Mapping):
        raise TuningError(f"{where}: expected a JSON object, got {type(best).__name__}")
    unknown = sorted(set(best) - set(_BEST_KEYS))
    if unknown:
        raise TuningError(f"{where}: unknown section(s) {unknown}; allowed: {sorted(_BEST_KEYS)}")
    out: dict = {}
    for section, values in best.items():
        if not isinstance(values, Mapping) or set(values) != set(_BEST_KEYS[section]):
            raise TuningError(f"{where}: {section} must have exactly {list(_BEST_KEYS[section])}")
        out[section] = dict(values)
    if "ae1" in out:
        latent = out["ae1"]["latent"]
        if isinstance(latent, bool) or not isinstance(latent, int) or latent < 1:
            raise TuningError(f"{where}: ae1.latent must be a positive integer, got {latent!r}")
    if "gmm" in out:
        k, cov = out["gmm"]["k"], out["gmm"]["covariance_type"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise TuningError(f"{where}: gmm.k must be a positive integer, got {k!r}")
        if cov not in COVARIANCE_TYPES:
            raise TuningError(f"{where}: gmm.covariance_type must be one of {COVARIANCE_TYPES}, got {cov!r}")
    return out


def write_best(path: str | Path, best: Mapping) -> dict:
    """Write ``{"ae1": {"latent"}, "gmm": {"k", "covariance_type"}}`` (either section optional).

    Only the chosen values go in (no losses, timings or names), so the file, a DVC dependency of
    the training stages, changes only when a choice changes.
    """
    best = _check_best(best, str(path))
    write_json(path, {k: best[k] for k in sorted(best)})
    return best


def read_best(*paths: str | Path) -> dict:
    """Read and merge tuned-values files (later files win per section)."""
    merged: dict = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise TuningError(f"{path}: tuned values not found (run `stm tune` / the tune stages first)")
        try:
            data = read_json(path)
        except json.JSONDecodeError as err:
            raise TuningError(f"{path}: not valid JSON ({err})") from None
        merged.update(_check_best(data, str(path)))
    return merged


def apply_best(params, best: Mapping):
    """`params` with the tuned values: ``ae1.latent``; the GMM grid narrowed to the tuned
    ``(k, k)`` and ``(covariance_type,)``. Sections absent from `best` are left alone."""
    best = _check_best(best, "tuned values")
    if "ae1" in best:
        params = dataclasses.replace(params, ae1=dataclasses.replace(params.ae1, latent=best["ae1"]["latent"]))
    if "gmm" in best:
        k, cov = best["gmm"]["k"], best["gmm"]["covariance_type"]
        params = dataclasses.replace(params, gmm=dataclasses.replace(
            params.gmm, k_range=(k, k), covariance_types=(cov,)))
    return params


def load_tuned(params, *paths: str | Path | None):
    """`apply_best(params, read_best(*paths))` when ``params.tune.use_tuned`` (default true) and a
    path is given; `params` unchanged otherwise."""
    paths = [p for p in paths if p is not None]
    if not paths or not getattr(params.tune, "use_tuned", True):
        return params
    return apply_best(params, read_best(*paths))


# ------------------------------------------------------------------------------------ plots
def _distinct_copy(study):
    """An in-memory study holding the distinct trials only (plots, importances)."""
    import optuna

    copy = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))
    copy.add_trials(_distinct(study))
    return copy


def importances(study, seed: int = 0) -> dict[str, float]:
    """fANOVA importances of the distinct completed trials ({} when not computable)."""
    import optuna

    copy = _distinct_copy(study)
    done = [t for t in copy.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(done) < 2:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(
                copy, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
    except (ValueError, RuntimeError) as err:
        log.info("%s: importances not computable (%s)", study.study_name, err)
        return {}
    return {k: round(float(v), 4) for k, v in imp.items()}


def save_study_plots(study, out_dir: str | Path, tag: str, seed: int = 0,
                     intermediate: bool = False, importance: Mapping | None = None) -> list[Path]:
    """Optuna's optimisation history (and importance, and per-epoch values when `intermediate`)
    as ``history_<tag>.png``, ``importance_<tag>.png``, ``intermediate_<tag>.png``.

    The importance plot is skipped when fewer than 2 distinct trials completed; with a single
    searched parameter it is trivially 1.0 but still drawn, as the issue asks for it.
    `importance` (from :func:`importances`) saves computing it again. History and per-epoch
    plots show every trial with its number (as in the logs, ``trials_<tag>.csv`` and MLflow;
    duplicates repeat their original's value); importances use the distinct trials only.
    """
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm

    out, copy, written = Path(out_dir), _distinct_copy(study), []
    jobs = [("history", lambda: ovm.plot_optimization_history(study))]
    if importance is None:
        importance = importances(study, seed)
    if importance:
        jobs.append(("importance", lambda: ovm.plot_param_importances(
            copy, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))))
    if intermediate and any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        jobs.append(("intermediate", lambda: ovm.plot_intermediate_values(study)))
    for kind, draw in jobs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")             # ExperimentalWarning of the matplotlib backend
            try:
                ax = draw()
            except (ValueError, RuntimeError) as err:
                log.info("%s: no %s plot (%s)", study.study_name, kind, err)
                continue
        fig = ax.figure if hasattr(ax, "figure") else np.ravel(ax)[0].figure
        fig.set_size_inches(7.5 if kind == "intermediate" else 6.4, 4.2)
        fig.tight_layout()
        path = out / f"{kind}_{tag}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------ stage
def _gmm_latents(params, defect_patches_path: Path, ae2_path: str | Path | None) -> np.ndarray:
    """AE2 latents of the defect patches (or a stored ``latents`` array), subsampled as the gmm
    stage does (seeded by ``params.seed``, at most ``gmm.max_samples``)."""
    data = np.load(defect_patches_path)
    if "latents" in data.files:
        latents = data["latents"]
    else:
        if ae2_path is None:
            raise TuningError(f"{defect_patches_path} holds patches, not latents: give the AE2 checkpoint")
        from .stages import load_autoencoder
        from .training import encode

        latents = encode(load_autoencoder(ae2_path), data["patches"])
    cap = params.gmm.max_samples
    if len(latents) > cap:
        rng = np.random.default_rng(params.seed)
        latents = latents[np.sort(rng.choice(len(latents), cap, replace=False))]
    return np.asarray(latents)


def tune_stage(params, patches_path: str | Path | None, defect_patches_path: str | Path | None,
               out_dir: str | Path, tracker=None, *, ae2_path: str | Path | None = None,
               storage: str | None = None) -> dict:
    """Run the studies whose inputs are given and write `<out_dir>/tuned.json` + plots.

    * `patches_path` (the training patches npz): AE1 latent study (``params.tune.ae1_*``).
    * `defect_patches_path` (+ `ae2_path` to encode them; or an npz with ``latents``): GMM study
      over ``params.gmm.k_range`` x ``params.gmm.covariance_types`` (``params.tune.gmm_trials``).

    Writes ``tuned.json`` (the chosen values only), ``metrics.json``, ``trials_<study>.csv`` and
    ``history_/importance_<study>.png`` (+ ``intermediate_ae1.png``). Each trial is a nested MLflow
    run of `tracker`'s stage run; the plots and files are artifacts of the stage run.
    """
    from .tracking_tune import trial_logger

    if patches_path is None and defect_patches_path is None:
        raise TuningError("nothing to tune: give the training patches (AE1) and/or the defect patches (GMM)")
    tp = params.tune
    out = fresh_dir(out_dir)
    log_trial = trial_logger(tracker)
    best: dict = {}
    metrics: dict = {}
    files: list[Path] = []
    if patches_path is not None:
        t0 = time.perf_counter()
        patches = np.load(patches_path)["patches"]
        if len(patches) < 20:
            raise TuningError(f"{patches_path}: only {len(patches)} patches, too few to tune AE1")
        r = tune_ae1_latent(patches, params.ae1, params.ae1_train, latents=tp.ae1_latents,
                            n_trials=tp.ae1_trials, epochs=tp.ae1_epochs, seed=params.seed,
                            storage=storage, study_name="ae1-latent", log_trial=log_trial,
                            max_patches=getattr(tp, "ae1_max_patches", 3000),
                            batch_size=getattr(tp, "ae1_batch_size", 64),
                            tolerance=getattr(tp, "ae1_tolerance", 0.1))
        best["ae1"] = {"latent": r["best_latent"]}
        states = [row["state"] for row in r["trials"] if row["duplicate_of"] is None]
        imp = importances(r["study"], params.seed)
        metrics |= {"ae1_latent": r["best_latent"], "ae1_val_loss": r["best_value"],
                    "ae1_min_loss_latent": r["min_loss_latent"], "ae1_min_val_loss": r["min_value"],
                    "ae1_trials_complete": states.count("COMPLETE"),
                    "ae1_trials_pruned": states.count("PRUNED"), "ae1_n_patches": r["n_patches"],
                    "ae1_study": r["study_name"], "ae1_importance": imp,
                    "ae1_seconds": round(time.perf_counter() - t0, 2)}
        write_csv(out / "trials_ae1.csv", r["trials"])
        files += [out / "trials_ae1.csv",
                  *save_study_plots(r["study"], out, "ae1", params.seed, intermediate=True, importance=imp)]
    if defect_patches_path is not None:
        t0 = time.perf_counter()
        latents = _gmm_latents(params, Path(defect_patches_path), ae2_path)
        r = tune_gmm(latents, params.gmm.k_range, params.gmm.covariance_types, n_trials=tp.gmm_trials,
                     seed=params.seed, storage=storage, study_name="gmm", log_trial=log_trial,
                     n_init=params.gmm.n_init)
        best["gmm"] = {"k": r["k"], "covariance_type": r["covariance_type"]}
        imp = importances(r["study"], params.seed)
        states = [row["state"] for row in r["trials"] if row["duplicate_of"] is None]
        metrics |= {"gmm_k": r["k"], "gmm_covariance_type": r["covariance_type"], "gmm_bic": r["best_value"],
                    "gmm_trials_complete": states.count("COMPLETE"), "gmm_n_latents": r["n_latents"],
                    "gmm_study": r["study_name"], "gmm_importance": imp,
                    "gmm_seconds": round(time.perf_counter() - t0, 2)}
        write_csv(out / "trials_gmm.csv", r["trials"])
        files += [out / "trials_gmm.csv", *save_study_plots(r["study"], out, "gmm", params.seed, importance=imp)]
    write_best(out / BEST_FILE, best)
    write_json(out / "metrics.json", metrics)
    if tracker is not None:
        tracker.params_of("seed", "tune")
        flat = {k: v for k, v in metrics.items() if not isinstance(v, (dict, str))}
        flat |= {f"{k}_{p}": v for k in ("ae1_importance", "gmm_importance")
                 for p, v in metrics.get(k, {}).items()}
        tracker.metrics(flat, prefix="tune_")
        tracker.tags({f"tuned.{s}.{k}": v for s, vals in best.items() for k, v in vals.items()}
                     | {k: metrics[k] for k in ("ae1_study", "gmm_study") if k in metrics})
        tracker.artifacts(out / BEST_FILE, out / "metrics.json", *files, folder="tune")
    return metrics
