"""Distributed training of the autoencoder stages: the entry point `torchrun` launches.

    torchrun --standalone --nproc_per_node 2 -m stm_defects.mlops.torchrun train_ae1 [--no-track]

Each process trains its shard of every global batch (`models.training.fit_autoencoder` switches
to DistributedDataParallel when a process group of more than one rank is open); rank 0 alone logs
to MLflow and writes the stage's outputs (`mlops.stages.autoencoders.fit`). This module is apart
from the stages themselves so that the stages' own import closure, and so their DVC code deps,
stay small: a change to the detector does not retrain the autoencoders.
"""

from __future__ import annotations

import logging
import sys

TRAIN_STAGES = ("train_ae1", "train_ae2")


def main(argv: list[str] | None = None) -> int:
    """`[torchrun ...] python -m stm_defects.mlops.torchrun STAGE [--no-track]`.

    Opens the process group (nccl when the stage trains on CUDA, else gloo; one GPU per process
    from LOCAL_RANK), then rank 0 runs `mlops.run.main` (tracked unless --no-track, model files,
    the summary line) and every other rank runs the stage untracked, quietly, writing nothing.
    A single process (no torchrun) is plain `mlops.run.main`.
    """
    import argparse

    from stm_defects.config import load_params
    from stm_defects.errors import ConfigError, StageError
    from stm_defects.mlops import run
    from stm_defects.models import distributed
    from stm_defects.project import params_path, project_root

    ap = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m stm_defects.mlops.torchrun",
                                 description="Train AE1 or AE2 with one process per device (DDP).")
    ap.add_argument("stage", choices=TRAIN_STAGES)
    ap.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    args = ap.parse_args(argv)
    try:
        root = project_root()
        params = load_params(params_path(root))
    except (ConfigError, StageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    device = getattr(params, args.stage.replace("train_", "") + "_train").device
    with distributed.process_group(device):
        if distributed.is_main_process():
            return run.main([args.stage] + (["--no-track"] if args.no_track else []))
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr)
        run.run_stage(args.stage, params, root, track=False, show_progress=False)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
