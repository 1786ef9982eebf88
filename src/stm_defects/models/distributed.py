"""Data-parallel training: ranks, the process group, and the global-batch layers DDP needs.

`training.fit_autoencoder` trains under ``DistributedDataParallel`` whenever a process group of
more than one rank is initialised (``torch.distributed``), so a program launched by ``torchrun``
only has to open the group (:func:`process_group`) before it trains. Each rank then takes a
contiguous shard of every global batch of the single-process run, and the run stays *the same
run* as on one process, up to float rounding:

* the split, the shuffle order and the augmentation draws come from the same seeded generators on
  every rank, so all ranks agree on each global batch (:func:`shard_bounds` picks the rank's rows);
* the loss of a rank is its sum of squared errors divided by the *global* batch's pixel count
  (times the world size, which DDP's gradient average divides out again), so shards of unequal
  size (the last batch) weigh exactly as in one process;
* BatchNorm layers normalise with the statistics of the whole global batch (:class:`GlobalBatchNorm`,
  a SyncBatchNorm that also runs on CPU/gloo), and update their running statistics from them;
* dropout masks are drawn for the whole global batch from the same generator, and each rank keeps
  its rows (:class:`ShardedDropout`).

Both layer swaps are done in place for the duration of a fit by :func:`global_batch_layers`
(the module's class is switched, as ``torch.nn.utils.parametrize`` does), so parameter names,
``state_dict`` keys and the tensors themselves stay those of the caller's model.

Rank-0 rule: only the main process (:func:`is_main_process`) logs to MLflow and writes files;
every rank trains, and all ranks end with the same weights and the same ``History``.

How close is "up to float rounding": the train-loss curve matches one process to ~1e-7 with
NCHW and ~1e-4 after a few epochs with channels_last (oneDNN's NHWC kernels round differently
per batch size). The val loss can differ by ~0.1-0.3%: the bias of a conv feeding a BatchNorm
gets a zero-but-for-rounding gradient that Adam turns into full-size random steps, and those move
the BN running means. One process shows the same spread when only its thread count or memory
layout changes (tests/test_ddp.py). DDP runs are therefore not bit-identical to one process.

Speed (benchmarks/bench_training.py): for the slim models DDP pays one all-gather per BatchNorm
forward, one all-reduce per BatchNorm backward and DDP's gradient all-reduce per step; on one
16-core CPU host 2 x 8 threads trained slower than 1 x 16 threads. It pays off across GPUs or
nodes, not across the cores of one CPU.

Backends: ``nccl`` for CUDA devices (one GPU per process, chosen by ``LOCAL_RANK``), ``gloo`` on
CPU (:func:`backend_for`). The environment variables read here (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``) are torchrun's contract; nothing else in the library reads the environment.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from stm_defects.models.autoencoder import SeededDropout

__all__ = [
    "BatchShard",
    "GlobalBatchNorm",
    "ShardedDropout",
    "available",
    "backend_for",
    "broadcast_flag",
    "ddp_wrap",
    "global_batch_layers",
    "is_distributed",
    "is_main_process",
    "local_device",
    "process_group",
    "rank",
    "shard_bounds",
    "world_size",
]


# ------------------------------------------------------------------------------------ ranks
def available() -> bool:
    """Whether this torch build has ``torch.distributed`` with the gloo backend (CPU)."""
    return dist.is_available() and dist.is_gloo_available()


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank: the group's when one is open, else torchrun's ``RANK`` (or 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of ranks: the group's when one is open, else torchrun's ``WORLD_SIZE`` (or 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (also true in a plain single-process run): the one process that logs and writes.

    Before the group is opened it answers from torchrun's ``RANK``, so a guard placed before
    :func:`process_group` already keeps the other ranks from writing.
    """
    return rank() == 0


def backend_for(device: torch.device) -> str:
    """``nccl`` for a CUDA device, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_device(device: torch.device) -> torch.device:
    """``device`` pinned to this process's GPU: a bare ``cuda`` becomes ``cuda:LOCAL_RANK``.

    Under an open group a bare ``cuda`` would put every rank on GPU 0; CPU and explicit indices
    are returned unchanged.
    """
    device = torch.device(device)
    if device.type != "cuda" or device.index is not None:
        return device
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", torch.cuda.current_device())


@contextlib.contextmanager
def process_group(device: str | torch.device = "auto", timeout_s: float = 1800.0) -> Iterator[bool]:
    """Open the default process group when launched by torchrun with ``WORLD_SIZE > 1``.

    The backend follows the training device (:func:`backend_for`; ``"auto"`` is CUDA when there
    is one); on CUDA this process's GPU is selected from ``LOCAL_RANK``. Rendezvous uses torchrun's
    ``MASTER_ADDR``/``MASTER_PORT`` (``env://``). Yields whether a group was opened; a plain
    single-process run (or one with a group already open) passes through untouched. The group is
    destroyed on exit.
    """
    if world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        yield False
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    from stm_defects.models.training import resolve_device  # training imports this module

    dev = local_device(resolve_device(device))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend_for(dev), timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield True
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ collectives
def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (decisions that must not diverge, e.g. a pruner's)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a batch of ``n`` that rank ``rank`` of ``world`` takes (contiguous,
    sizes differ by at most one; a rank may get none when ``n < world``)."""
    return n * rank // world, n * (rank + 1) // world


# ---------------------------------------------------------------------- global-batch layers
@dataclass
class BatchShard:
    """The global batch being trained on and this rank's rows of it (``[lo, hi)`` of ``size``)."""

    size: int = 0
    lo: int = 0
    hi: int = 0


class ShardedDropout(SeededDropout):
    """:class:`SeededDropout` whose mask is drawn for the whole global batch; the rank keeps its rows.

    With the same generator on every rank this reproduces the single-process masks exactly.
    Only installed by :func:`global_batch_layers` (which sets ``shard``).
    """

    shard: BatchShard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.generator
        if g is None or not self.training or self.p == 0.0:
            return super().forward(x)
        keep = 1.0 - self.p
        s = self.shard
        full = torch.empty((s.size, *x.shape[1:]), dtype=torch.float32, device=x.device)
        mask = full.bernoulli_(keep, generator=g)[s.lo : s.hi]
        return x * mask.div_(keep).to(x.dtype)


def _global_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-channel (mean, biased variance) over the global batch of all ranks, float64, and the
    global count. Each rank's (count, mean, M2) is gathered and combined exactly (Chan et al.),
    one all-gather; empty shards contribute nothing."""
    c = x.shape[1]
    n = x.numel() // max(c, 1)
    if n > 0:       # the kernel BatchNorm's own forward uses (var_mean is ~10x slower on CPU)
        mean, var = torch.batch_norm_update_stats(x.float(), None, None, 0.0)
    else:
        var = mean = torch.zeros(c, device=x.device)
    mine = torch.cat([torch.full((1,), float(n), dtype=torch.float64, device=x.device),
                      mean.double(), var.double() * n])
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    g = torch.stack(parts)                                # (world, 1 + 2C): count, mean, M2
    counts, means, m2 = g[:, :1], g[:, 1 : c + 1], g[:, c + 1 :]
    total = float(counts.sum())
    gmean = (counts * means).sum(0) / total
    gm2 = m2.sum(0) + (counts * (means - gmean) ** 2).sum(0)
    return gmean, gm2 / total, total


class _GlobalBatchNormFn(torch.autograd.Function):
    """y = BN(x) with given global statistics; the backward adds the global-statistics terms.

    Forward is the fused eval-mode kernel fed with the global mean/variance. Backward: the local
    sums of dy and dy * xhat come from the fused native backward, are summed over ranks (one
    all-reduce), and give grad_input = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) over
    the global batch. grad_weight / grad_bias stay the local sums: DDP averages them, as it does
    for every parameter (the loss is scaled by the world size to match, see `training`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, count, eps):
        mean32, var32 = mean.float(), var.float()
        invstd = torch.rsqrt(var + eps).float()
        ctx.save_for_backward(x, weight, mean32, invstd)
        ctx.count, ctx.eps = count, eps
        return F.batch_norm(x, mean32, var32, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        shape = [1, c] + [1] * (x.ndim - 2)
        if x.numel() > 0:
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                dy, x, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True])
        else:       # an empty shard (a last batch smaller than the world): the kernel divides by 0
            sum_dy_xhat = sum_dy = torch.zeros(c, dtype=mean.dtype, device=x.device)
        sums = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums)
        mean_dy, mean_dy_xhat = sums[:c] / ctx.count, sums[c:] / ctx.count
        a = invstd if weight is None else weight * invstd
        b = a * invstd * mean_dy_xhat                     # grad_in = a*dy - b*x + (b*mean - a*mean_dy)
        grad_in = dy * a.view(shape)
        grad_in.addcmul_(x, b.view(shape), value=-1.0)
        grad_in.add_((b * mean - a * mean_dy).view(shape))
        grad_in = grad_in.to(x.dtype)                     # bf16 under autocast
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        return (grad_in, sum_dy_xhat if need_w else None, sum_dy if need_b else None,
                None, None, None, None)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks (a SyncBatchNorm that runs on CPU/gloo too).

    In training, each rank's per-channel count, mean and M2 are gathered and combined (float64);
    every rank normalises its shard with the global mean and biased variance and updates the
    running statistics with the unbiased variance, as ``nn.BatchNorm`` does on one process. The
    gradient is that of the global-batch BatchNorm (:class:`_GlobalBatchNormFn`). In eval mode it
    is the plain layer (running statistics). Installed on BatchNorm1d/2d/3d by
    :func:`global_batch_layers`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.running_mean is None):
            return super().forward(x)
        self._check_input_dim(x)
        with torch.no_grad():
            mean, var, count = _global_stats(x)
            if self.training and self.track_running_stats:
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (count / (count - 1.0)) if count > 1 else var
                self.running_mean.mul_(1.0 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1.0 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return _GlobalBatchNormFn.apply(x, self.weight, self.bias, mean, var, count, self.eps)


_GLOBAL_BN: dict[type, type] = {}


def _global_bn_class(cls: type) -> type:
    """A subclass of ``cls`` (BatchNorm1d/2d/3d, for its input check) with the global forward."""
    if cls not in _GLOBAL_BN:
        _GLOBAL_BN[cls] = type(f"Global{cls.__name__}", (GlobalBatchNorm, cls), {})
    return _GLOBAL_BN[cls]


@contextlib.contextmanager
def global_batch_layers(model: nn.Module) -> Iterator[BatchShard]:
    """Switch ``model``'s BatchNorm and SeededDropout layers to their global-batch versions.

    Yields the :class:`BatchShard` the training loop updates before each forward. The classes are
    restored on exit; parameters, buffers and ``state_dict`` keys never change. Needs an open
    process group (the BatchNorm all-reduce). Other layers that mix samples (plain ``nn.Dropout``
    drawing from the global RNG, other norms over the batch) are not made global.
    """
    shard = BatchShard()
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for m in model.modules():
            cls = type(m)
            if cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
                m.__class__ = _global_bn_class(cls)
                swapped.append((m, cls))
            elif cls is SeededDropout:
                m.__class__ = ShardedDropout
                m.shard = shard
                swapped.append((m, cls))
        yield shard
    finally:
        for m, cls in swapped:
            m.__class__ = cls
            m.__dict__.pop("shard", None)


def ddp_wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (already on ``device``; one device per process)."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        # A weight with size-1 dims (a conv with one input channel) is both NCHW- and NHWC-contiguous,
        # with different strides. CUDA's conv backward returns its gradient with the NCHW strides
        # while DDP's bucket view copies the parameter's, which makes DDP warn ("Grad strides do not
        # match bucket view strides") and copy on every step (seen on an H200, torch 2.11). Give such
        # parameters the NCHW strides first; values and memory-format checks are unchanged.
        for p in model.parameters():
            if p.is_contiguous() and p.stride() != _contiguous_strides(p.shape):
                p.data = p.data.clone(memory_format=torch.contiguous_format)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=device if ids else None)



def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    """Row-major strides of ``shape`` (what ``clone(memory_format=torch.contiguous_format)`` gives)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
