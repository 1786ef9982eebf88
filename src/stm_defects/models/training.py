"""Training and inference for the patch autoencoders.

Library code only: no file paths, no printing and no global state. Progress is
reported through an optional ``on_epoch(epoch, train_loss, val_loss, lr)``
callback; randomness (train/val split, shuffling, augmentation, dropout) comes
from local ``torch.Generator`` objects derived from the ``seed`` argument, so
the global torch RNG, thread settings and backend flags are never touched.
Weight initialisation is seeded separately (``build_autoencoder(..., seed=)``).

Epochs are numbered from 0 (``History.best_epoch`` indexes ``History.val_loss``).

Data-parallel training: inside an open ``torch.distributed`` process group of more than one
rank (e.g. a program launched by ``torchrun`` that entered ``distributed.process_group()``),
``fit_autoencoder`` trains under ``DistributedDataParallel`` and reproduces the single-process
run up to float rounding: same global batches, each rank a contiguous shard of them; BatchNorm
statistics and dropout masks over the global batch; train and val losses summed over ranks;
the same early-stopping decisions on every rank. See ``models.distributed``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from stm_defects.models import distributed as ddp
from stm_defects.models.autoencoder import set_dropout_generator
from stm_defects.models.configs import TrainConfig

__all__ = [
    "History",
    "TrainConfig",
    "bf16_supported",
    "d4_augment",
    "encode",
    "encode_and_reconstruct",
    "evaluate_mse",
    "fit_autoencoder",
    "reconstruct",
    "resolve_device",
]

OnEpoch = Callable[[int, float, float, float], None]
ShouldStop = Callable[[int, float], bool]


@dataclass
class History:
    """Per-epoch record of a fit (index = epoch, from 0)."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = math.inf
    seconds: float = 0.0
    patches_per_s: float = 0.0
    stop_reason: str = "completed"  # "completed" | "early_stopping" | "should_stop" | "non_finite_loss"

    @property
    def epochs_run(self) -> int:
        return len(self.train_loss)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` if available else ``cpu``; anything else -> ``torch.device(name)``."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is used on ``device`` (CPU always; CUDA if the GPU supports it)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _as_patches(patches: np.ndarray) -> np.ndarray:
    arr = np.asarray(patches)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1] != 1 or arr.shape[2] != arr.shape[3]:
        raise ValueError(f"patches must have shape (N, 1, s, s), got {np.shape(patches)}")
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return arr


def _seeds(seed: int, n: int) -> list[int]:
    """Independent 63-bit seeds derived from one integer seed."""
    state = np.random.SeedSequence(int(seed)).generate_state(n, dtype=np.uint64)
    return [int(s) & 0x7FFF_FFFF_FFFF_FFFF for s in state]


def _batch(
    arr: np.ndarray, idx: torch.Tensor | slice, device: torch.device, channels_last: bool
) -> torch.Tensor:
    if isinstance(idx, torch.Tensor):
        idx = idx.numpy()
    xb = torch.from_numpy(np.ascontiguousarray(arr[idx]))
    if device.type == "cuda":
        xb = xb.pin_memory().to(device, non_blocking=True)
    else:
        xb = xb.to(device)
    if channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    return xb


def d4_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply an independent random element of the dihedral group D4 to each patch.

    ``x`` is (N, C, s, s); each sample is flipped (left-right) with probability
    1/2 and then rotated by k * 90 degrees, k uniform in {0, 1, 2, 3}.
    ``generator`` is a CPU generator (the choices are drawn on the CPU).
    """
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"d4_augment expects (N, C, s, s), got {tuple(x.shape)}")
    ids = torch.randint(0, 8, (x.shape[0],), generator=generator)
    return _d4_apply(x, ids)


def _d4_apply(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Apply D4 element ``ids[i]`` (0-3: rotate k*90; 4-7: flip, then rotate) to patch ``i``."""
    out = torch.empty_like(x)
    for t in range(8):
        sel = torch.nonzero(ids == t).squeeze(1)
        if sel.numel() == 0:
            continue
        sel = sel.to(x.device)
        v = x.index_select(0, sel)
        if t >= 4:
            v = v.flip(-1)
        if t % 4:
            v = torch.rot90(v, t % 4, dims=(-2, -1))
        out.index_copy_(0, sel, v)
    return out


def _is_channels_last(model: nn.Module) -> bool:
    """Whether the model's conv weights are already in NHWC (channels_last) layout."""
    for p in model.parameters():
        if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


@torch.no_grad()
def _sse_on(
    model: nn.Module,
    arr: np.ndarray,
    idx: torch.Tensor,
    batch_size: int,
    device: torch.device,
    bf16: bool,
    channels_last: bool,
) -> torch.Tensor:
    """Sum of squared reconstruction errors over ``arr[idx]`` (a float64 scalar on ``device``)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(idx), batch_size):
        xb = _batch(arr, idx[start : start + batch_size], device, channels_last)
        with _autocast(device, bf16):
            out = model(xb)
        total += F.mse_loss(out.float(), xb, reduction="sum").double()
    return total


def _mse_on(
    model: nn.Module,
    arr: np.ndarray,
    idx: torch.Tensor,
    batch_size: int,
    device: torch.device,
    bf16: bool,
    channels_last: bool,
) -> float:
    total = _sse_on(model, arr, idx, batch_size, device, bf16, channels_last)
    per_patch = arr.shape[1] * arr.shape[2] * arr.shape[3]
    return float(total) / (len(idx) * per_patch)


def _sharded_step(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    arr: np.ndarray,
    rows: torch.Tensor,
    shard: ddp.BatchShard,
    device: torch.device,
    use_cl: bool,
    use_bf16: bool,
    g_aug: torch.Generator | None,
) -> torch.Tensor:
    """One DDP optimiser step on this rank's shard of the global batch ``arr[rows]``.

    The loss is the shard's sum of squared errors over the global batch's pixel count, times the
    world size: DDP's gradient average divides that out again, so the update is the single-process
    update on the whole batch, whatever the shard sizes. Returns the shard's SSE per patch-pixel
    count (float64, to be summed over ranks).
    """
    m, world = len(rows), dist.get_world_size()
    lo, hi = ddp.shard_bounds(m, dist.get_rank(), world)
    shard.size, shard.lo, shard.hi = m, lo, hi
    xb = _batch(arr, rows[lo:hi], device, use_cl)
    if g_aug is not None:
        ids = torch.randint(0, 8, (m,), generator=g_aug)  # the whole batch's draws, as on one process
        xb = _d4_apply(xb, ids[lo:hi])
        if use_cl:
            xb = xb.contiguous(memory_format=torch.channels_last)
    with _autocast(device, use_bf16):
        out = net(xb)
    per_patch = arr.shape[1] * arr.shape[2] * arr.shape[3]
    sse = F.mse_loss(out.float(), xb, reduction="sum")
    loss = sse * (world / (m * per_patch))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return sse.detach().double() / per_patch


def fit_autoencoder(
    model: nn.Module,
    patches: np.ndarray,
    cfg: TrainConfig,
    seed: int,
    on_epoch: OnEpoch | None = None,
    should_stop: ShouldStop | None = None,
) -> History:
    """Train ``model`` to reconstruct ``patches`` (MSE, Adam).

    The patches are split into train/val with ``cfg.val_fraction`` (if 0, the
    train loss is monitored instead of a val loss). After each epoch
    ``on_epoch(epoch, train_loss, val_loss, lr)`` is called, then
    ``should_stop(epoch, val_loss)``; a true result ends training (e.g. an
    Optuna pruner). ``ReduceLROnPlateau`` and early stopping monitor the val
    loss; the weights of the best epoch are restored at the end in every case.

    The model is moved to the resolved device and left there, in eval mode.
    Results are deterministic for a given ``seed`` (and initial weights) on CPU.

    Under an open process group of more than one rank this is one rank of a data-parallel fit
    (module docstring; ``models.distributed``): call it on every rank with the same patches,
    config, seed and initial weights. A bare ``cuda`` device becomes ``cuda:LOCAL_RANK``. Every
    rank returns the same ``History`` and ends with the same weights; ``on_epoch`` runs on every
    rank (guard side effects with ``distributed.is_main_process()``), and rank 0's ``should_stop``
    answer is the one all ranks follow.
    """
    arr = _as_patches(patches)
    n = len(arr)
    n_val = round(n * cfg.val_fraction)
    n_train = n - n_val
    if n_train < 1:
        raise ValueError(f"no training patches left (n={n}, val_fraction={cfg.val_fraction})")

    device = resolve_device(cfg.device)
    distributed = ddp.is_distributed()
    if distributed:
        device = ddp.local_device(device)
        if device.type != "cuda" and dist.get_backend() == "nccl":
            raise ValueError(f"device {device} cannot train in an nccl process group: use gloo on CPU")
    use_bf16 = bool(cfg.bf16) and bf16_supported(device)
    use_cl = bool(cfg.channels_last)
    seed_split, seed_shuffle, seed_aug, seed_drop = _seeds(seed, 4)

    g_split = torch.Generator().manual_seed(seed_split)
    perm = torch.randperm(n, generator=g_split)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    g_shuffle = torch.Generator().manual_seed(seed_shuffle)
    g_aug = torch.Generator().manual_seed(seed_aug)
    g_drop = torch.Generator(device=device).manual_seed(seed_drop)

    model.to(device)
    convert_cl = use_cl and not _is_channels_last(model)
    if convert_cl:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.min_lr
    )

    hist = History()
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs = 0
    train_seconds = 0.0
    t_start = time.perf_counter()
    set_dropout_generator(model, g_drop)
    per_patch = arr.shape[1] * arr.shape[2] * arr.shape[3]
    layers = contextlib.ExitStack()  # distributed: global-batch BatchNorm/dropout until the end
    try:
        shard = layers.enter_context(ddp.global_batch_layers(model)) if distributed else None
        net = ddp.ddp_wrap(model, device) if distributed else model
        for epoch in range(cfg.epochs):
            lr_now = float(opt.param_groups[0]["lr"])
            model.train()
            t0 = time.perf_counter()
            order = train_idx[torch.randperm(n_train, generator=g_shuffle)]
            total = torch.zeros((), dtype=torch.float64, device=device)
            for start in range(0, n_train, cfg.batch_size):
                if distributed:
                    total += _sharded_step(net, opt, arr, order[start : start + cfg.batch_size], shard,
                                           device, use_cl, use_bf16, g_aug if cfg.augment == "d4" else None)
                    continue
                xb = _batch(arr, order[start : start + cfg.batch_size], device, use_cl)
                if cfg.augment == "d4":
                    xb = d4_augment(xb, g_aug)
                    if use_cl:
                        xb = xb.contiguous(memory_format=torch.channels_last)
                with _autocast(device, use_bf16):
                    out = model(xb)
                loss = F.mse_loss(out.float(), xb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach().double() * xb.shape[0]
            if distributed:
                dist.all_reduce(total)      # sum of the shards' SSE / pixels = sum of per-patch MSE
            train_loss = float(total) / n_train
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds += time.perf_counter() - t0

            model.eval()
            val_bs = max(cfg.batch_size, 1024)
            if n_val > 0 and distributed:
                lo, hi = ddp.shard_bounds(n_val, dist.get_rank(), dist.get_world_size())
                sse = _sse_on(model, arr, val_idx[lo:hi], val_bs, device, use_bf16, use_cl)
                dist.all_reduce(sse)
                val_loss = float(sse) / (n_val * per_patch)
            elif n_val > 0:
                val_loss = _mse_on(model, arr, val_idx, val_bs, device, use_bf16, use_cl)
            else:
                val_loss = train_loss
            hist.train_loss.append(train_loss)
            hist.val_loss.append(val_loss)
            hist.lr.append(lr_now)
            sched.step(val_loss)

            if val_loss < hist.best_val_loss:  # NaN never improves
                hist.best_val_loss = val_loss
                hist.best_epoch = epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                bad_epochs = 0
            else:
                bad_epochs += 1

            if on_epoch is not None:
                on_epoch(epoch, train_loss, val_loss, lr_now)
            stop = should_stop is not None and should_stop(epoch, val_loss)
            if distributed:
                stop = ddp.broadcast_flag(stop, device)     # rank 0 decides for all
            if stop:
                hist.stop_reason = "should_stop"
                break
            if cfg.early_stopping_patience > 0 and bad_epochs >= cfg.early_stopping_patience:
                hist.stop_reason = "early_stopping"
                break
            if not math.isfinite(train_loss):
                hist.stop_reason = "non_finite_loss"
                break
    finally:
        layers.close()
        set_dropout_generator(model, None)
        if best_state is not None:
            model.load_state_dict(best_state)
        if convert_cl:
            model.to(memory_format=torch.contiguous_format)
        model.eval()

    hist.seconds = time.perf_counter() - t_start
    hist.patches_per_s = n_train * hist.epochs_run / train_seconds if train_seconds > 0 else 0.0
    return hist


@contextlib.contextmanager
def _prepared_for_inference(model: nn.Module, device: torch.device, channels_last: bool):
    """Move ``model`` to ``device`` in eval mode (optionally NHWC); restore mode and format after."""
    was_training = model.training
    model.to(device)
    convert = channels_last and not _is_channels_last(model)
    if convert:
        model.to(memory_format=torch.channels_last)
    model.eval()
    try:
        yield model
    finally:
        if convert:
            model.to(memory_format=torch.contiguous_format)
        model.train(was_training)


def _infer(
    model: nn.Module,
    patches: np.ndarray,
    batch_size: int,
    device: str | torch.device,
    bf16: bool,
    channels_last: bool,
    want_latent: bool,
    want_recon: bool,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    arr = _as_patches(patches)
    dev = resolve_device(device)
    use_bf16 = bool(bf16) and bf16_supported(dev)
    n, s = len(arr), arr.shape[-1]
    latent_dim = getattr(getattr(model, "cfg", None), "latent", None)
    lat = np.empty((n, latent_dim), np.float32) if want_latent and latent_dim else None
    rec = np.empty((n, 1, s, s), np.float32) if want_recon else None
    with _prepared_for_inference(model, dev, channels_last), torch.no_grad():
        for start in range(0, n, batch_size):
            xb = _batch(arr, slice(start, start + batch_size), dev, channels_last)
            with _autocast(dev, use_bf16):
                z = model.encode(xb)
                r = model.decode(z) if want_recon else None
            if want_latent:
                zc = z.float().cpu().numpy()
                if lat is None:
                    lat = np.empty((n, zc.shape[1]), np.float32)
                lat[start : start + len(zc)] = zc
            if want_recon:
                rec[start : start + len(xb)] = r.float().cpu().numpy()
    return lat, rec


def encode(
    model: nn.Module,
    patches: np.ndarray,
    batch_size: int = 1024,
    device: str | torch.device = "auto",
    bf16: bool = False,
    channels_last: bool = True,
) -> np.ndarray:
    """Latent codes (N, latent) float32, computed in eval mode without grad.

    ``bf16=True`` runs under bf16 autocast. It is off by default: the latents
    then differ from fp32 by about 1% (relative), and on CPUs without native
    bf16 it is also much slower. The model is moved to the resolved device;
    its train/eval mode and memory format are restored afterwards.
    """
    lat, _ = _infer(model, patches, batch_size, device, bf16, channels_last, True, False)
    return lat


def reconstruct(
    model: nn.Module,
    patches: np.ndarray,
    batch_size: int = 1024,
    device: str | torch.device = "auto",
    bf16: bool = False,
    channels_last: bool = True,
) -> np.ndarray:
    """Reconstructions (N, 1, s, s) float32 (see :func:`encode` for the options)."""
    _, rec = _infer(model, patches, batch_size, device, bf16, channels_last, False, True)
    return rec


def encode_and_reconstruct(
    model: nn.Module,
    patches: np.ndarray,
    batch_size: int = 1024,
    device: str | torch.device = "auto",
    bf16: bool = False,
    channels_last: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Latents and reconstructions from a single encoder pass."""
    lat, rec = _infer(model, patches, batch_size, device, bf16, channels_last, True, True)
    return lat, rec


def evaluate_mse(
    model: nn.Module,
    patches: np.ndarray,
    batch_size: int = 1024,
    device: str | torch.device = "auto",
    bf16: bool = False,
    channels_last: bool = True,
) -> float:
    """Mean squared reconstruction error over all pixels (fp32 unless ``bf16``)."""
    arr = _as_patches(patches)
    if len(arr) == 0:
        return math.nan
    dev = resolve_device(device)
    use_bf16 = bool(bf16) and bf16_supported(dev)
    with _prepared_for_inference(model, dev, channels_last):
        return _mse_on(model, arr, torch.arange(len(arr)), batch_size, dev, use_bf16, channels_last)
