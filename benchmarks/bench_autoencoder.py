"""Throughput (and optionally accuracy) of the patch autoencoders: fp32 vs bf16.

Examples::

    python benchmarks/bench_autoencoder.py --profile slim --n 4096
    python benchmarks/bench_autoencoder.py --profile paper --n 256 --batch 64
    python benchmarks/bench_autoencoder.py --profile slim --accuracy --n 3000 --epochs 6

Variants: ``fp32`` (NCHW), ``fp32+cl`` (channels_last), ``bf16+cl`` (bf16
autocast + channels_last). Training throughput is measured through
``fit_autoencoder`` (Adam, MSE, one epoch, no validation), inference through
``encode_and_reconstruct``. Patches come from the project's synthetic Si(001)
scans when available, otherwise from a simple built-in lattice generator.

``--accuracy`` trains the same model (same seed, same data) once in fp32 and
once in bf16 and reports the fp32-evaluated validation MSE of both, plus the
latent differences between bf16 and fp32 inference of the fp32 model.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np
import torch

from stm_defects.models import build_autoencoder, count_parameters, keras_parameter_count
from stm_defects.models.training import (
    TrainConfig,
    bf16_supported,
    encode,
    encode_and_reconstruct,
    evaluate_mse,
    fit_autoencoder,
    resolve_device,
)

VARIANTS = {
    "fp32": {"bf16": False, "channels_last": False},
    "fp32+cl": {"bf16": False, "channels_last": True},
    "bf16+cl": {"bf16": True, "channels_last": True},
}


def lattice_patches(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Fallback data: noisy Gaussian-atom lattices with occasional point defects, in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        a = rng.uniform(4.0, 7.0)
        th = rng.uniform(0, np.pi)
        c, s = np.cos(th), np.sin(th)
        u = (c * xx + s * yy) / a + rng.uniform()
        v = (-s * xx + c * yy) / a + rng.uniform()
        img = np.cos(2 * np.pi * u) + np.cos(2 * np.pi * v)
        if rng.uniform() < 0.5:
            cy, cx = rng.uniform(8, size - 8, 2)
            r2 = (yy - cy) ** 2 + (xx - cx) ** 2
            img += rng.choice([-3.0, 3.0]) * np.exp(-r2 / (2 * rng.uniform(1.5, 3.0) ** 2))
        img += rng.normal(0, rng.uniform(0.1, 0.6), img.shape)
        img -= img.min()
        out[i, 0] = img / max(float(img.max()), 1e-6)
    return out


def synth_patches(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, str]:
    """Windows from the project's synthetic scans (preprocessed), else the lattice fallback."""
    try:
        from stm_defects.data.synth import SynthConfig, synth_scan
        from stm_defects.image.preprocess import preprocess
        from stm_defects.image.windows import extract_windows
    except ImportError:  # pragma: no cover - fallback when the pipeline modules are absent
        return lattice_patches(n, size, seed), "lattice fallback"
    chunks, have, k = [], 0, 0
    while have < n:
        scan = synth_scan(SynthConfig(), seed=seed + k)
        img, _ = preprocess(scan.height, scan.pixel_nm)
        w, _ = extract_windows(img, size, size // 2)
        chunks.append(w)
        have += len(w)
        k += 1
    arr = np.concatenate(chunks)
    idx = np.random.default_rng(seed).permutation(len(arr))[:n]
    return np.ascontiguousarray(arr[idx], dtype=np.float32), f"synthetic Si(001), {k} scans"


def bench_variant(
    profile: str, x: np.ndarray, batch: int, device: str, bf16: bool, channels_last: bool, repeats: int
) -> tuple[float, float]:
    cfg = TrainConfig(
        epochs=1,
        batch_size=batch,
        val_fraction=0.0,
        early_stopping_patience=0,
        device=device,
        bf16=bf16,
        channels_last=channels_last,
    )
    model = build_autoencoder(profile, seed=0)
    # warm-up: oneDNN/cuDNN primitive creation for these shapes
    fit_autoencoder(model, x[: 2 * batch], cfg, seed=0)
    train = max(fit_autoencoder(model, x, cfg, seed=r).patches_per_s for r in range(repeats))
    encode_and_reconstruct(model, x[:batch], batch, device, bf16, channels_last)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        encode_and_reconstruct(model, x, max(batch, 256), device, bf16, channels_last)
        if resolve_device(device).type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return train, len(x) / best


def accuracy(profile: str, x: np.ndarray, batch: int, device: str, epochs: int, seed: int) -> None:
    print(f"\naccuracy: widths {profile.widths}, n={len(x)}, epochs={epochs}, batch={batch}, seed={seed}")
    n_val = len(x) // 5
    x_train, x_val = x[n_val:], x[:n_val]
    models = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        model = build_autoencoder(profile, seed=seed)
        cfg = TrainConfig(
            epochs=epochs,
            batch_size=batch,
            val_fraction=0.1,
            early_stopping_patience=0,
            device=device,
            bf16=bf16,
        )
        h = fit_autoencoder(model, x_train, cfg, seed=seed)
        mse32 = evaluate_mse(model, x_val, device=device)
        mse16 = evaluate_mse(model, x_val, device=device, bf16=True)
        models[name] = model
        print(
            f"  train {name}: {h.seconds:7.1f} s ({h.patches_per_s:7.0f} patches/s)  "
            f"final train loss {h.train_loss[-1]:.5f}  held-out MSE fp32-eval {mse32:.5f}  "
            f"bf16-eval {mse16:.5f}"
        )
    m = models["fp32"]
    z32 = encode(m, x_val, device=device)
    z16 = encode(m, x_val, device=device, bf16=True)
    diff = z16 - z32
    rel = np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(z32, axis=1), 1e-12)
    scale = float(z32.std())
    d32 = ((z32[:, None] - z32[None]) ** 2).sum(-1)
    d16 = ((z16[:, None] - z16[None]) ** 2).sum(-1)
    np.fill_diagonal(d32, np.inf)
    np.fill_diagonal(d16, np.inf)
    nn_agree = float((d32.argmin(1) == d16.argmin(1)).mean())
    print(
        f"  latents of the fp32 model, bf16 vs fp32 inference: max |dz| {np.abs(diff).max():.4f} "
        f"(latent std {scale:.3f}), mean relative L2 {rel.mean():.4f}, max relative L2 {rel.max():.4f}, "
        f"nearest-neighbour agreement {nn_agree:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="slim", help="slim|paper|ae2_slim|ae2_paper (from params.yaml)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--n", type=int, default=4096, help="number of patches")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset of " + ",".join(VARIANTS) + " (empty: skip throughput)",
    )
    ap.add_argument("--accuracy", action="store_true", help="also compare bf16 vs fp32 training accuracy")
    ap.add_argument("--epochs", type=int, default=6, help="epochs for --accuracy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from stm_defects.config import load_params

    # slim = params.yaml's default widths, paper = its `profiles.paper` (the report's); ae2_* for AE2
    which = "ae2" if args.profile.startswith("ae2") else "ae1"
    label = args.profile
    profile = getattr(load_params(args.params, "paper" if "paper" in args.profile else None), which)
    device = resolve_device(args.device)
    model = build_autoencoder(profile)
    x, source = synth_patches(args.n, seed=args.seed)
    print(
        f"device: {device}"
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f" ({platform.processor() or platform.machine()})"
        )
        + f", torch {torch.__version__}, {torch.get_num_threads()} threads, python {sys.version.split()[0]}"
    )
    print(
        f"profile: {label}, {count_parameters(model):,} trainable params "
        f"({keras_parameter_count(model):,} Keras-style), n={len(x)} patches ({source}), batch={args.batch}"
    )
    if not bf16_supported(device):
        print("note: bf16 autocast not supported on this device; bf16 rows run in fp32")
    print(f"{'variant':<10} {'train patches/s':>16} {'infer patches/s':>16}")
    for name in [v for v in args.variants.split(",") if v]:
        train, infer = bench_variant(
            profile, x, args.batch, str(device), repeats=args.repeats, **VARIANTS[name]
        )
        print(f"{name:<10} {train:>16.0f} {infer:>16.0f}", flush=True)
    if args.accuracy:
        accuracy(profile, x, args.batch, str(device), args.epochs, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
