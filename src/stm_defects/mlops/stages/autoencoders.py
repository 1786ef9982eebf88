"""AE1 (general patches) and AE2 (defect patches) training stages.

Each stage is `fn(params, deps, outs, tracker, progress) -> metrics` (see `mlops.dag`).

Data-parallel training: the same two stages run under torchrun, one process per GPU (or CPU
process), with `mlops.torchrun` as the entry point:

    torchrun --nproc_per_node 2 -m stm_defects.mlops.torchrun train_ae1 [--no-track]

Every rank trains (`fit_autoencoder` under DistributedDataParallel, `models.distributed`); rank 0
alone runs the stage as `python -m stm_defects.mlops.run` does (MLflow run, model files,
registry), the other ranks run it untracked and write nothing (`fit` returns before its first
write).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from stm_defects.errors import StageError
from stm_defects.io import safe_models
from stm_defects.io.files import fresh_dir, write_csv, write_json
from stm_defects.mlops.lineage import lineage_tags
from stm_defects.mlops.tuning import TIMING

log = logging.getLogger("stm_defects")


def _epoch_logger(name: str):
    def on_epoch(epoch, train_loss, val_loss, lr):
        log.info("%s epoch %3d  train %.5f  val %.5f  lr %.1e", name, epoch + 1, train_loss, val_loss, lr)
    return on_epoch


def fit(params, which: str, patches_path: Path, out_dir: Path, tracker, upstream: dict | None = None) -> dict:
    """Train `which` ("ae1" or "ae2") on the patches npz; write the checkpoint, history and plots.

    `upstream` maps model keys to the files this model was built on (AE2: the AE1 checkpoint the
    defect patches came from), for the registry's lineage tags.

    In a data-parallel run (torchrun, see the module docstring) only rank 0 writes files and logs;
    the other ranks train alongside and return the same metrics.
    """
    from stm_defects.mlops import plots
    from stm_defects.models import build_autoencoder, save_checkpoint
    from stm_defects.models.autoencoder import count_parameters
    from stm_defects.models.distributed import is_main_process
    from stm_defects.models.training import fit_autoencoder, reconstruct

    main = is_main_process()                 # rank-0 rule: the other ranks only train
    out = fresh_dir(out_dir) if main else None
    patches = np.load(patches_path)["patches"]
    if len(patches) < 10:
        raise StageError(f"{patches_path}: only {len(patches)} patches, too few to train {which}")
    cfg, tcfg = getattr(params, which), getattr(params, f"{which}_train")
    seed = params.seed + (0 if which == "ae1" else 1)
    model = build_autoencoder(cfg, seed=seed)
    hist = fit_autoencoder(model, patches, tcfg, seed=seed,
                           on_epoch=_epoch_logger(which.upper()) if main else None)
    # wall-clock figures go to MLflow only: the stage's files stay the same bytes run after run
    h = {k: v for k, v in hist.to_dict().items() if k not in TIMING}
    metrics = {
        "n_patches": len(patches), "n_params": count_parameters(model),
        "epochs_run": hist.epochs_run, "best_epoch": hist.best_epoch,
        "final_train_loss": h["train_loss"][-1], "final_val_loss": h["val_loss"][-1],
        "best_val_loss": hist.best_val_loss, "patches_per_s": hist.patches_per_s,
        "seconds": hist.seconds,
    }
    if not main:
        return metrics
    save_checkpoint(out / "model.pt", model, extra={"which": which, "history": h})
    write_json(out / "history.json", h)
    write_csv(out / "history.csv", [{"epoch": i, "train_loss": t, "val_loss": v, "lr": lr}
                                    for i, (t, v, lr) in enumerate(zip(h["train_loss"], h["val_loss"], h["lr"]))])
    plots.history(h, out / "loss.png", f"{which.upper()} loss")
    idx = np.random.default_rng(params.seed).choice(len(patches), size=min(8, len(patches)), replace=False)
    plots.reconstructions(patches[idx], reconstruct(model, patches[idx]), out / "reconstructions.png")
    write_json(out / "metrics.json", {k: v for k, v in metrics.items() if k not in TIMING})
    tracker.history(h, prefix=f"{which}_")
    tracker.metrics(metrics, prefix=f"{which}_")
    tracker.artifacts(out / "loss.png", out / "reconstructions.png", out / "history.csv")
    safe_models.write_manifest(out, "model.pt")                # last: the folder is complete
    tracker.register(which, out / "model.pt",
                     lineage_tags(tracker, upstream or {}, data=patches_path))
    return metrics


def train_ae1(params, deps, outs, tracker, progress) -> dict:
    """AE1 on the training patches, with the latent size tuned by `tune_ae1` (when tune.use_tuned)."""
    from stm_defects.mlops.tuning import load_tuned

    used = load_tuned(params, deps["tuned"])
    tracker.params_used({"ae1.latent": used.ae1.latent})
    return fit(used, "ae1", deps["patches"], outs["model"], tracker)


def train_ae2(params, deps, outs, tracker, progress) -> dict:
    """AE2 on the defect patches (lineage: the AE1 behind the defect mask)."""
    return fit(params, "ae2", deps["patches"], outs["model"], tracker, upstream={"ae1": deps["ae1"]})
