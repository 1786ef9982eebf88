"""Hyper-parameter search with Optuna: AE1's latent size (the report's 16-256).

* :func:`tune_ae1_latent` -- each trial trains a fresh AE1 for a few epochs on a seeded subsample
  of the training patches and reports the validation loss per epoch, so Optuna's
  ``MedianPruner`` can stop hopeless trials. The search space is finite, so Optuna's
  ``GridSampler`` (seeded) visits each latent size at most once.
* :func:`write_best` / :func:`read_best` / :func:`apply_best` / :func:`load_tuned` -- the
  ``tuned.json`` file the ``train_ae1`` stage reads, and how it overrides ``params.yaml``.
* :func:`tune_stage` -- the ``tune_ae1`` stage: writes ``tuned.json``, ``metrics.json``,
  ``trials_ae1.csv``, Optuna's plots and the latent-size comparison (``latent_sizes_ae1.png``:
  the same held-out patches reconstructed by every latent size tried, and the loss curves; the
  study tunes AE1 only, ``latent_sizes.md`` says so for AE2).

The GMM needs no study: the ``gmm`` stage's :class:`models.cluster.GMMSelector` fits the whole
k x covariance grid and keeps the lowest BIC.

Studies live in an SQLite database outside DVC (default ``<project>/mlruns/optuna.db``, local
state like the MLflow store). A study's name ends with a fingerprint of everything that changes
its trials (data, search space, seed, model and training settings), so ``load_if_exists`` resumes
only an identical study: a re-run with the same inputs finds its trials done and only re-reads
them. MLflow never appears here: pass ``log_trial(params, metrics, step_metrics, *, name, tags)``
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

from stm_defects.errors import StageError
from stm_defects.io.files import fresh_dir, read_json, write_csv, write_json

log = logging.getLogger(__name__)

__all__ = [
    "TuningError",
    "apply_best",
    "default_storage",
    "load_tuned",
    "pruning_callback",
    "read_best",
    "tune_ae1_latent",
    "tune_stage",
    "write_best",
]

LogTrial = Callable[..., None]      # log_trial(params, metrics, step_metrics, *, name=None, tags=None)
BEST_FILE = "tuned.json"
N_SHOWN = 8                         # held-out patches every trial reconstructs (the latent-size picture)
_BEST_KEYS = {"ae1": ("latent",)}


class TuningError(StageError):
    """A study cannot produce a result, or a tuned-values file is malformed."""


# ------------------------------------------------------------------------------------ storage
def default_storage() -> str:
    """``STM_OPTUNA_STORAGE`` if set, else ``sqlite:///<project>/mlruns/optuna.db`` (outside DVC)."""
    if os.environ.get("STM_OPTUNA_STORAGE"):
        return os.environ["STM_OPTUNA_STORAGE"]
    from stm_defects.project import project_root

    folder = project_root() / "mlruns"
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


def _open_study(storage: str | None, name: str, sampler, pruner=None):
    import optuna

    return optuna.create_study(storage=storage or default_storage(), study_name=name,
                               direction="minimize", sampler=sampler,
                               pruner=pruner or optuna.pruners.NopPruner(), load_if_exists=True)


def _log_callback(log_trial: LogTrial | None, extra_tags: Mapping | None = None):
    """An Optuna callback calling `log_trial` once per finished trial."""
    if log_trial is None:
        return None

    def callback(study, trial) -> None:
        attrs = trial.user_attrs
        metrics = {k: v for k, v in attrs.items() if isinstance(v, (int, float))}
        if trial.value is not None:
            metrics["value"] = trial.value
        steps = {"val_loss": dict(trial.intermediate_values)} if trial.intermediate_values else {}
        if isinstance(attrs.get("train_loss"), list):
            steps["train_loss"] = dict(enumerate(attrs["train_loss"]))
        tags = {"study": study.study_name, "trial": trial.number, "state": trial.state.name,
                **(extra_tags or {})}
        log_trial(dict(trial.params), metrics, steps,
                  name=f"{study.study_name.rsplit('-', 1)[0]} trial {trial.number}", tags=tags)

    return callback


#: History keys, metrics and trial columns that measure wall-clock time (the training history's
#: and each trial's): logged to MLflow, never written into a stage's outputs (DVC outs must be
#: deterministic; these differ on every run). The AE stages use the same list.
TIMING = ("seconds", "patches_per_s")


def _trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, **t.params,
                     "value": t.value,
                     **{k: v for k, v in t.user_attrs.items() if isinstance(v, (int, float, str))},
                     "steps": len(t.intermediate_values),
                     "seconds": round(t.duration.total_seconds(), 3) if t.duration else None})
    keys = list(dict.fromkeys(k for row in rows for k in row))      # same columns in every row (CSV)
    return [{k: row.get(k) for k in keys} for row in rows]


# ------------------------------------------------------------------------------------- AE1
def tuning_sets(patches: np.ndarray, max_patches: int | None, seed: int,
                n_shown: int = N_SHOWN) -> tuple[np.ndarray, np.ndarray]:
    """(training patches, shown patches) of a latent study; both (n, 1, s, s) float32.

    The training set is the seeded subsample of at most `max_patches` (the same draw as without
    shown patches, so a study's trials do not change). The `n_shown` shown patches, which every
    trial reconstructs for the latent-size picture, are held out: drawn from the patches left
    out of the subsample, or, when every patch is used, taken out of the training set (at most a
    tenth of it). Among a seeded handful of candidates they are picked evenly over their
    contrast (standard deviation), so the row runs from flat terrace to the most structured patch.
    """
    arr = np.asarray(patches, dtype=np.float32)
    n = len(arr)
    if max_patches is not None and n > max_patches:
        train_idx = np.sort(np.random.default_rng(seed).choice(n, int(max_patches), replace=False))
        pool = np.setdiff1d(np.arange(n), train_idx)
    else:
        train_idx, pool = None, np.arange(n)
        n_shown = min(n_shown, n // 10)
    n_shown = min(int(n_shown), len(pool))
    if n_shown <= 0:
        return (arr if train_idx is None else arr[train_idx]), arr[:0]
    rng = np.random.default_rng([seed, 1])                 # apart from the subsample's stream
    cand = rng.choice(pool, min(len(pool), 20 * n_shown), replace=False)
    cand = cand[np.argsort(arr[cand].std(axis=(1, 2, 3)), kind="stable")]
    shown_idx = cand[np.linspace(0, len(cand) - 1, n_shown).round().astype(int)]
    train = arr[train_idx] if train_idx is not None else np.delete(arr, shown_idx, axis=0)
    return train, arr[shown_idx]


def latent_rows(study, shown: np.ndarray) -> list[dict]:
    """One row per trial that trained a latent size (sorted by latent), for `plots.latent_sizes`:
    ``latent``, ``state``, ``train_loss`` / ``val_loss`` (per epoch), ``rec`` (its reconstruction
    of `shown`, (n, 1, s, s), None when the trial kept none) and ``mse`` (on `shown`)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if "latent" not in t.params or not t.intermediate_values:
            continue
        rec = t.user_attrs.get("shown_rec")
        rec = np.asarray(rec, np.float32)[:, None] if rec is not None and len(shown) else None
        if rec is not None and rec.shape != shown.shape:
            rec = None                              # kept for other shown patches: not comparable
        rows.append({"latent": int(t.params["latent"]), "state": t.state.name, "rec": rec,
                     "mse": t.user_attrs.get("shown_mse") if rec is not None else None,
                     "train_loss": list(t.user_attrs.get("train_loss", [])),
                     "val_loss": [t.intermediate_values[k] for k in sorted(t.intermediate_values)]})
    return sorted(rows, key=lambda r: r["latent"])


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


def tune_ae1_latent(patches: np.ndarray, base_ae_cfg, train_cfg, latents: Sequence[int] = (16, 32, 64, 128, 256),
                    n_trials: int | None = None, epochs: int = 3, seed: int = 0, storage: str | None = None,
                    study_name: str = "ae1-latent", log_trial: LogTrial | None = None, *,
                    max_patches: int | None = 3000, batch_size: int | None = None, tolerance: float = 0.0,
                    pruner=None, n_shown: int = N_SHOWN) -> dict:
    """Search AE1's latent size; objective: best validation MSE after `epochs` epochs.

    Each trial builds ``base_ae_cfg`` with the trial's latent (weights seeded by `seed`, the same
    for every trial) and trains it with ``train_cfg`` (``epochs`` and, when given, `batch_size`
    replaced: a smaller batch gives a short run more optimiser steps) on a seeded subsample of at
    most `max_patches` patches. ``GridSampler(seed=seed)`` visits `n_trials` distinct latent
    sizes (None: all) in a seeded order. Every trial also reconstructs the same `n_shown`
    held-out patches (:func:`tuning_sets`) and keeps them in the study (``shown_rec``, rounded to
    4 decimals, and their MSE ``shown_mse``), so a resumed study can still draw the latent-size
    picture. The validation loss of every epoch goes to
    ``trial.report``; `pruner` (default Optuna's ``MedianPruner(n_startup_trials=2,
    n_warmup_steps=1)``) stops trials worse than the median of earlier trials at the same epoch;
    the last epoch is never pruned. Each trial records the model's parameter count (``n_params``).

    `tolerance` trades loss for size as the report did (it kept 32): the chosen latent is the
    smallest one whose best loss is within ``(1 + tolerance)`` of the lowest loss (0: the lowest).

    Returns ``{"best_latent", "best_value", "min_loss_latent", "min_value", "study_name",
    "study", "trials": [...], "shown": the held-out patches (n_shown, 1, s, s)}``.
    """
    import optuna

    from stm_defects.models import build_autoencoder, count_parameters
    from stm_defects.models.training import fit_autoencoder, reconstruct

    latents = sorted({int(v) for v in latents})
    if not latents:
        raise TuningError("no latent sizes to search")
    arr, shown = tuning_sets(patches, max_patches, seed, n_shown)
    tcfg = dataclasses.replace(train_cfg, epochs=int(epochs),
                               batch_size=int(batch_size or train_cfg.batch_size))
    if pruner is None:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    base = dataclasses.asdict(base_ae_cfg)
    base.pop("latent", None)
    n_trials = len(latents) if n_trials is None else min(int(n_trials), len(latents))
    name = f"{study_name}-" + _fingerprint(
        {"latents": latents, "seed": seed, "ae": base, "train": dataclasses.asdict(tcfg),
         "pruner": _describe(pruner), "n_trials": n_trials, "keeps": "shown_rec"}, arr, shown)
    sampler = optuna.samplers.GridSampler({"latent": latents}, seed=seed)
    study = _open_study(storage, name, sampler, pruner)

    def objective(trial) -> float:
        latent = int(trial.suggest_categorical("latent", latents))
        model = build_autoencoder(dataclasses.replace(base_ae_cfg, latent=latent), seed=seed)
        trial.set_user_attr("n_params", int(count_parameters(model)))
        train_losses: list[float] = []
        hist = fit_autoencoder(model, arr, tcfg, seed=seed,
                               on_epoch=lambda e, t, v, lr: train_losses.append(float(t)),
                               should_stop=pruning_callback(trial, last_epoch=tcfg.epochs - 1))
        trial.set_user_attr("train_loss", train_losses)
        trial.set_user_attr("epochs_run", hist.epochs_run)
        trial.set_user_attr("patches_per_s", round(float(hist.patches_per_s), 1))
        if len(shown):                          # before a prune: a pruned size is drawn as well
            rec = reconstruct(model, shown, device=tcfg.device)                  # (n, 1, s, s)
            trial.set_user_attr("shown_rec", np.round(rec[:, 0], 4).tolist())
            trial.set_user_attr("shown_mse", float(np.mean((rec - shown) ** 2)))
        if hist.stop_reason == "should_stop":
            raise optuna.TrialPruned(f"latent {latent} pruned after epoch {hist.epochs_run - 1}")
        return float(hist.best_val_loss)

    from optuna.trial import TrialState

    callback = _log_callback(log_trial, {"search": "ae1.latent"})
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    if done < n_trials:                     # a resumed study runs only what is missing
        study.optimize(objective, n_trials=n_trials - done, callbacks=[callback] if callback else [],
                       gc_after_trial=False)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
    if not complete:
        raise TuningError(f"study {name}: no AE1 trial completed (all pruned or failed)")
    best = min(complete, key=lambda t: (t.value, t.params["latent"]))
    limit = best.value * (1.0 + float(tolerance)) if best.value >= 0 else best.value
    chosen = min((t for t in complete if t.value <= limit), key=lambda t: t.params["latent"])
    return {"best_latent": int(chosen.params["latent"]), "best_value": float(chosen.value),
            "min_loss_latent": int(best.params["latent"]), "min_value": float(best.value),
            "tolerance": float(tolerance), "n_patches": len(arr), "study_name": name,
            "study": study, "trials": _trial_rows(study), "shown": shown}


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
    return out


def write_best(path: str | Path, best: Mapping) -> dict:
    """Write ``{"ae1": {"latent"}}``.

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
    """`params` with the tuned values (``ae1.latent``). Sections absent from `best` are left alone."""
    best = _check_best(best, "tuned values")
    if "ae1" in best:
        ae1 = dataclasses.replace(params.ae1, latent=best["ae1"]["latent"])
        params = params.replace(ae1=ae1) if hasattr(params, "replace") else dataclasses.replace(params, ae1=ae1)
    return params


def load_tuned(params, *paths: str | Path | None):
    """`apply_best(params, read_best(*paths))` when ``params.tune.use_tuned`` (default true) and a
    path is given; `params` unchanged otherwise."""
    paths = [p for p in paths if p is not None]
    if not paths or not params.tune.use_tuned:
        return params
    return apply_best(params, read_best(*paths))


# ------------------------------------------------------------------------------------ plots
def importances(study, seed: int = 0) -> dict[str, float]:
    """fANOVA importances of the distinct completed trials ({} when not computable)."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(done) < 2:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
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
    plots show every trial with its number (as in the logs, ``trials_<tag>.csv`` and MLflow).
    """
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm

    out, written = Path(out_dir), []
    jobs = [("history", lambda: ovm.plot_optimization_history(study))]
    if importance is None:
        importance = importances(study, seed)
    if importance:
        jobs.append(("importance", lambda: ovm.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))))
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
def tune_stage(params, patches_path: str | Path, out_dir: str | Path, tracker=None, *,
               storage: str | None = None) -> dict:
    """The AE1 latent study on the training patches npz; writes `<out_dir>/tuned.json` + plots.

    Writes ``tuned.json`` (the chosen values only), ``metrics.json``, ``trials_ae1.csv``,
    ``history_/importance_/intermediate_ae1.png``, ``latent_sizes_ae1.png`` (one row of
    reconstructions of the same held-out patches per latent size tried, beside every trial's
    loss curves) and ``latent_sizes.md`` (the picture's table; AE2 has no study). Each trial is a
    nested MLflow run of `tracker`'s stage run, the study's parent run; the plots and files are
    artifacts of that run (folder ``tune``).
    """
    from stm_defects.mlops import plots
    from stm_defects.mlops.tracking_tune import trial_logger

    tp = params.tune
    out = fresh_dir(out_dir)
    t0 = time.perf_counter()
    patches = np.load(patches_path)["patches"]
    if len(patches) < 20:
        raise TuningError(f"{patches_path}: only {len(patches)} patches, too few to tune AE1")
    r = tune_ae1_latent(patches, params.ae1, params.ae1_train, latents=tp.ae1_latents,
                        n_trials=tp.ae1_trials, epochs=tp.ae1_epochs, seed=params.seed,
                        storage=storage, study_name="ae1-latent", log_trial=trial_logger(tracker),
                        max_patches=tp.ae1_max_patches, batch_size=tp.ae1_batch_size,
                        tolerance=tp.ae1_tolerance)
    best = {"ae1": {"latent": r["best_latent"]}}
    states = [row["state"] for row in r["trials"]]
    imp = importances(r["study"], params.seed)
    metrics = {"ae1_latent": r["best_latent"], "ae1_val_loss": r["best_value"],
               "ae1_min_loss_latent": r["min_loss_latent"], "ae1_min_val_loss": r["min_value"],
               "ae1_trials_complete": states.count("COMPLETE"),
               "ae1_trials_pruned": states.count("PRUNED"), "ae1_n_patches": r["n_patches"],
               "ae1_study": r["study_name"], "ae1_importance": imp}
    # wall-clock figures go to MLflow only: the stage's outputs are the same on every run
    seconds = round(time.perf_counter() - t0, 2)
    write_csv(out / "trials_ae1.csv", [{k: v for k, v in row.items() if k not in TIMING}
                                       for row in r["trials"]])
    files = [out / "trials_ae1.csv",
             *save_study_plots(r["study"], out, "ae1", params.seed, intermediate=True, importance=imp)]
    rows = latent_rows(r["study"], r["shown"])
    if rows and len(r["shown"]):
        files.append(out / "latent_sizes_ae1.png")
        plots.latent_sizes(r["shown"], rows, files[-1],
                           f"AE1 latent sizes tried by the study ({r['n_patches']} training patches, "
                           f"{tp.ae1_epochs} epochs each; chosen: {r['best_latent']})")
    (out / "latent_sizes.md").write_text(latent_sizes_markdown(rows, r, len(r["shown"])))
    files.append(out / "latent_sizes.md")
    write_best(out / BEST_FILE, best)
    write_json(out / "metrics.json", metrics)
    if tracker is not None:
        flat = {k: v for k, v in metrics.items() if not isinstance(v, (dict, str))}
        flat |= {f"ae1_importance_{p}": v for p, v in imp.items()} | {"ae1_seconds": seconds}
        tracker.metrics(flat, prefix="tune_")
        tracker.tags({"tuned.ae1.latent": r["best_latent"], "ae1_study": r["study_name"]})
        tracker.artifacts(out / BEST_FILE, out / "metrics.json", *files, folder="tune")
    return metrics


def latent_sizes_markdown(rows: list[dict], result: dict, n_shown: int) -> str:
    """What ``latent_sizes_ae1.png`` shows, as a table per latent size, and why there is no AE2 one."""
    lines = ["# Latent sizes tried by the Optuna study\n",
             (f"`latent_sizes_ae1.png`: the same {n_shown} held-out patches (top row, not in the "
              f"{result['n_patches']} training patches, ordered from flat to structured) reconstructed by "
              "the AE1 of every latent size the study trained (one row each), and each trial's loss per epoch "
              "(solid: validation, dashed: train). A pruned trial stopped early; its row shows the model at "
              f"that point. Chosen latent: **{result['best_latent']}** (lowest validation loss at latent "
              f"{result['min_loss_latent']}; the smallest latent within the tolerance of it wins).\n"),
             "| latent | state | epochs | best validation MSE | MSE on the shown patches |",
             "|---|---|---|---|---|"]
    for row in rows:
        best = min(row["val_loss"]) if row["val_loss"] else float("nan")
        mse = "-" if row["mse"] is None else f"{row['mse']:.5f}"
        lines.append(f"| {row['latent']} | {row['state'].lower()} | {len(row['val_loss'])} | {best:.5f} "
                     f"| {mse} |")
    lines += ["", ("AE2: no picture. The study tunes only AE1's latent size; AE2's latent is fixed in "
                   "params.yaml (`ae2.latent`), so there is one AE2 model and its reconstructions are "
                   "`models/ae2/reconstructions.png`.")]
    return "\n".join(lines) + "\n"


def stage(params, deps, outs, tracker, progress) -> dict:
    """The `tune_ae1` stage (see `mlops.dag`)."""
    return tune_stage(params, deps["patches"], outs["tuning"], tracker)
