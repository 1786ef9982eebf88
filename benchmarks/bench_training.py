"""Training throughput of `fit_autoencoder`: one process vs DistributedDataParallel (DDP).

Examples::

    python benchmarks/bench_training.py                                  # CPU: 1 proc, 2 procs (gloo)
    python benchmarks/bench_training.py --device cpu --threads 16 --procs 2 4
    python benchmarks/bench_training.py --device cuda --n 65536          # 1 GPU; DDP (nccl) over >= 2 GPUs
    python benchmarks/bench_training.py --device cuda --profile paper --n 16384
    python benchmarks/bench_training.py --device cuda --shared-gpu       # + 2 ranks on one GPU (gloo)

Each row runs in freshly spawned processes (one per rank, ``torch.multiprocessing``, a file
rendezvous; no torchrun needed): a one-epoch warm-up fit on a subset, then a timed fit of
``--epochs`` epochs on ``--n`` smooth-blob patches (32x32) from a fresh model with the same seed.
``patches/s`` is `History.patches_per_s` of rank 0: training patches per second of training
(validation excluded), counted over the global batch, so rows compare directly.

CPU rows split ``--threads`` between the ranks (1 x T threads vs N x T/N), so they compare the
same cores. CUDA rows: one process on one GPU, and DDP with nccl over N GPUs when there are at
least two. With one GPU, ``--shared-gpu`` adds 2 ranks on that GPU over gloo: not a speed-up
(they share the device), a check that the DDP code path runs on CUDA and follows the same loss
curve. ``curve vs 1 proc`` is the largest relative difference of the per-epoch train loss from
the one-process row of the same device (DDP reproduces one process up to rounding; see
`stm_defects.models.distributed`).

Prints a markdown table (and writes it with the raw numbers to ``--json`` when given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROFILES = {   # params.yaml's AE1 (default profile) and the report's AE1 (paper profile)
    "slim": {"widths": [16, 32, 64], "kernels": [3, 3, 3], "encoder_norm": [True, True, False], "latent": 32},
    "paper": {"widths": [128, 256, 512], "kernels": [3, 3, 3], "encoder_norm": [True, True, False], "latent": 32},
}
SEED = 0


def blob_patches(n: int, s: int = 32, seed: int = SEED) -> np.ndarray:
    """Smooth random blobs plus noise in [0, 1], (n, 1, s, s) float32 (learnable, unlike noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    out = np.empty((n, 1, s, s), np.float32)
    for lo in range(0, n, 4096):
        m = min(4096, n - lo)
        c = rng.uniform(6, s - 6, size=(m, 2, 1, 1)).astype(np.float32)
        w = rng.uniform(2, 6, size=(m, 1, 1)).astype(np.float32)
        img = np.exp(-((yy - c[:, 0]) ** 2 + (xx - c[:, 1]) ** 2) / (2 * w**2))
        img += 0.05 * rng.standard_normal(img.shape).astype(np.float32)
        img -= img.min(axis=(1, 2), keepdims=True)
        out[lo : lo + m, 0] = img / np.ptp(img, axis=(1, 2), keepdims=True)
    return out


def _worker(rank: int, world: int, spec: dict, work: str) -> None:
    """One rank of one row: optional process group, warm-up fit, timed fit; rank 0 writes the result."""
    import torch.distributed as dist

    from stm_defects.models import build_autoencoder
    from stm_defects.models.training import TrainConfig, fit_autoencoder

    torch.set_num_threads(spec["threads"])
    device = "cpu" if spec["device"] == "cpu" else "cuda:0" if spec["shared_gpu"] else f"cuda:{rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if world > 1:
        dist.init_process_group(spec["backend"], init_method=f"file://{work}/rdzv-{spec['row']}",
                                rank=rank, world_size=world)
    try:
        patches = np.load(Path(work) / "patches.npy", mmap_mode="r")
        cfg = TrainConfig(epochs=spec["epochs"], batch_size=spec["batch"], lr=1e-3, val_fraction=0.1,
                          early_stopping_patience=0, device=device, bf16=spec["bf16"])
        warm = TrainConfig(**{**cfg.to_dict(), "epochs": 1})
        fit_autoencoder(build_autoencoder(spec["ae"], seed=SEED),
                        np.asarray(patches[: min(len(patches), 8 * spec["batch"])]), warm, seed=SEED)
        hist = fit_autoencoder(build_autoencoder(spec["ae"], seed=SEED), patches, cfg, seed=SEED)
        if rank == 0:
            (Path(work) / f"row{spec['row']}.json").write_text(json.dumps(hist.to_dict()))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _rows(args) -> list[dict]:
    """The rows to run: (device, ranks, threads per rank, backend)."""
    rows = []
    if args.device in ("cpu", "all"):
        total = args.threads or torch.get_num_threads()
        for p in sorted(set([1, *args.procs])):
            if p == 1 or total // p >= 1:
                rows.append({"device": "cpu", "ranks": p, "threads": max(total // p, 1),
                             "backend": "gloo" if p > 1 else "-", "shared_gpu": False})
    if args.device in ("cuda", "all"):
        if not torch.cuda.is_available():
            print("note: no CUDA device; CUDA rows skipped", file=sys.stderr)
            return rows
        gpus = torch.cuda.device_count()
        rows.append({"device": "cuda", "ranks": 1, "threads": 1, "backend": "-", "shared_gpu": False})
        for p in sorted(set(args.procs)):
            if 1 < p <= gpus:
                rows.append({"device": "cuda", "ranks": p, "threads": 1, "backend": "nccl", "shared_gpu": False})
        if gpus < 2:
            print(f"note: {gpus} GPU: DDP over GPUs (nccl) needs >= 2; skipped", file=sys.stderr)
        if args.shared_gpu:
            rows.append({"device": "cuda", "ranks": 2, "threads": 1, "backend": "gloo", "shared_gpu": True})
    return rows


def main(argv: list[str] | None = None) -> int:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda", "all"), default="cpu")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="slim")
    ap.add_argument("--n", type=int, default=4096, help="patches (10%% are held out for validation)")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs (after a 1-epoch warm-up)")
    ap.add_argument("--batch", type=int, default=256, help="global batch size")
    ap.add_argument("--procs", type=int, nargs="+", default=[2], help="DDP world sizes to run")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads in all (0: torch's default)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--shared-gpu", action="store_true", help="also 2 ranks on one GPU over gloo (a check)")
    ap.add_argument("--json", type=Path, help="also write the table and the raw numbers here")
    args = ap.parse_args(argv)

    rows = _rows(args)
    with tempfile.TemporaryDirectory() as work:
        np.save(Path(work) / "patches.npy", blob_patches(args.n))
        for i, row in enumerate(rows):
            spec = {**row, "row": i, "ae": PROFILES[args.profile], "epochs": args.epochs, "batch": args.batch,
                    "bf16": args.bf16}
            t0 = time.perf_counter()
            mp.start_processes(_worker, args=(row["ranks"], spec, work), nprocs=row["ranks"],
                               start_method="spawn", join=True)
            row["wall_s"] = time.perf_counter() - t0
            row["history"] = json.loads((Path(work) / f"row{i}.json").read_text())
            print(f"done: {row['device']} x{row['ranks']}: {row['history']['patches_per_s']:.0f} patches/s",
                  file=sys.stderr)

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-"
    lines = [f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, GPU {gpu}; profile {args.profile} {PROFILES[args.profile]['widths']}, "
             f"{args.n} patches, batch {args.batch}, {args.epochs} timed epochs, bf16 {args.bf16}", "",
             "| device | ranks x threads | backend | patches/s | s/epoch (train) | final train loss "
             "| curve vs 1 proc |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        h = row["history"]
        ref = next(r for r in rows if r["device"] == row["device"] and r["ranks"] == 1)["history"]
        dev = row["device"] + (" (1 GPU, shared)" if row["shared_gpu"] else "")
        diff = float(np.max(np.abs(np.array(h["train_loss"]) / np.array(ref["train_loss"]) - 1)))
        n_train = args.n - round(args.n * 0.1)
        lines.append(f"| {dev} | {row['ranks']} x {row['threads']} | {row['backend']} "
                     f"| {h['patches_per_s']:,.0f} | {n_train / max(h['patches_per_s'], 1e-9):.2f} "
                     f"| {h['train_loss'][-1]:.5f} | {diff:.1e} |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"table": table, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
