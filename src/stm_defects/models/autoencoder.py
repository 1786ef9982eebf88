"""Convolutional autoencoders for STM defect patches (report, Appendix A).

One configurable module, :class:`ConvAutoencoder`, expresses both networks of
the report (AE1, Table 1 and AE2, Table 2) and smaller "slim" variants of them.

Architecture, for ``AEConfig(widths=(w1, ..., wn), kernels=(k1, ..., kn))``::

    encoder:  [Conv(w_i, k_i, 'same') (+BN+ReLU if encoder_norm[i]) -> MaxPool2]  i = 1..n
              -> Dropout -> Flatten (w_n * (s/2^n)^2)
              [-> Dense hidden] -> Dense latent
    decoder:  Dense latent -> [Dense hidden ->] Dense (w_n * (s/2^n)^2) -> Reshape
              -> UpSample2 -> Conv(w_{n-1}, k_{n-1}) BN ReLU Dropout
              -> UpSample2 -> Conv(w_{n-2}, k_{n-2}) BN ReLU
              ...
              -> UpSample2 -> Conv(1, 3) -> sigmoid

The dense layers have no activation (as in the tables of the report).
Dropout appears once in the encoder (after the last pooling) and once in the
decoder (after the first decoder conv block), as in both tables.

Parameter count of ``ae1_paper``: the report (Keras) lists 3,488,289. Keras
counts 4 parameters per BatchNorm channel (gamma, beta, moving mean, moving
variance); torch counts gamma and beta as parameters and keeps the moving
statistics as buffers. With 768 BN channels (128 + 256 + 256 + 128) this gives
3,488,289 - 2 * 768 = 3,486,753 trainable torch parameters, plus 1,536
running-statistics buffer entries: the same network.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stm_defects.models.configs import AEConfig

__all__ = [
    "CHECKPOINT_VERSION",
    "AEConfig",
    "ConvAutoencoder",
    "SeededDropout",
    "build_autoencoder",
    "count_parameters",
    "keras_parameter_count",
    "load_checkpoint",
    "save_checkpoint",
    "set_dropout_generator",
]

CHECKPOINT_VERSION = 1


class SeededDropout(nn.Dropout):
    """``nn.Dropout`` that can draw its masks from a private ``torch.Generator``.

    With ``generator`` unset it behaves exactly like ``nn.Dropout`` (global
    RNG). The training loop attaches a local generator for the duration of a
    fit, so training is reproducible without touching global RNG state (and is
    safe when several fits run in threads, e.g. parallel Optuna trials).
    """

    generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.generator
        if g is None or not self.training or self.p == 0.0:
            return super().forward(x)
        keep = 1.0 - self.p
        mask = torch.empty(x.shape, dtype=torch.float32, device=x.device).bernoulli_(keep, generator=g)
        return x * mask.div_(keep).to(x.dtype)


def set_dropout_generator(model: nn.Module, generator: torch.Generator | None) -> None:
    """Attach (or with ``None`` detach) a private RNG to every :class:`SeededDropout`."""
    for m in model.modules():
        if isinstance(m, SeededDropout):
            m.generator = generator


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, padding=k // 2)


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder for (N, 1, s, s) patches in [0, 1]."""

    def __init__(self, cfg: AEConfig) -> None:
        super().__init__()
        if not isinstance(cfg, AEConfig):
            raise TypeError(f"cfg must be an AEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        w, k = cfg.widths, cfg.kernels
        n = len(w)

        enc: list[nn.Module] = []
        cin = 1
        for i in range(n):
            enc.append(_conv(cin, w[i], k[i]))
            if cfg.encoder_norm[i]:
                enc += [nn.BatchNorm2d(w[i]), nn.ReLU(inplace=True)]
            enc.append(nn.MaxPool2d(2))
            cin = w[i]
        enc += [SeededDropout(cfg.dropout), nn.Flatten()]
        if cfg.hidden is not None:
            enc += [nn.Linear(cfg.flat_features, cfg.hidden), nn.Linear(cfg.hidden, cfg.latent)]
        else:
            enc.append(nn.Linear(cfg.flat_features, cfg.latent))
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = []
        if cfg.hidden is not None:
            dec += [nn.Linear(cfg.latent, cfg.hidden), nn.Linear(cfg.hidden, cfg.flat_features)]
        else:
            dec.append(nn.Linear(cfg.latent, cfg.flat_features))
        dec.append(nn.Unflatten(1, (w[-1], cfg.bottleneck, cfg.bottleneck)))
        cin = w[-1]
        for j, i in enumerate(range(n - 2, -1, -1)):
            dec += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                _conv(cin, w[i], k[i]),
                nn.BatchNorm2d(w[i]),
                nn.ReLU(inplace=True),
            ]
            if j == 0:
                dec.append(SeededDropout(cfg.dropout))
            cin = w[i]
        dec += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(cin, 1, 3), nn.Sigmoid()]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, s, s) -> (N, latent)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, latent) -> (N, 1, s, s) in [0, 1]."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def keras_parameter_count(model: nn.Module) -> int:
    """Parameter count as Keras reports it (BN running mean/var included)."""
    n = count_parameters(model, trainable_only=False)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            n += m.running_mean.numel() + m.running_var.numel()
    return n


def build_autoencoder(cfg: AEConfig | Mapping[str, Any], seed: int | None = None) -> ConvAutoencoder:
    """Build from a config or a mapping (see :meth:`AEConfig.from_dict`).

    The report's full-width models are the `profiles.paper` section of params.yaml
    (`config.load_params(profile="paper").ae1`).

    If ``seed`` is given, weight initialisation is reproducible; the global
    torch RNG state is left untouched (``torch.random.fork_rng``).
    """
    if isinstance(cfg, Mapping):
        cfg = AEConfig.from_dict(cfg)
    elif not isinstance(cfg, AEConfig):
        raise TypeError(f"cannot build an autoencoder from {type(cfg).__name__}")
    if seed is None:
        return ConvAutoencoder(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConvAutoencoder(cfg)


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel -> .module; torch.compile -> ._orig_mod
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


_RESERVED = ("state_dict", "config", "version")


def save_checkpoint(path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None) -> None:
    """Save a self-describing checkpoint.

    The file holds ``{"state_dict", "config": asdict(cfg), "version": 1, **extra}``.
    ``extra`` must contain only plain Python/tensor values (it is read back with
    ``torch.load(weights_only=True)``) and may not use the reserved keys.
    """
    m = _unwrap(model)
    if not isinstance(m, ConvAutoencoder):
        raise TypeError(f"expected a ConvAutoencoder, got {type(m).__name__}")
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra uses reserved checkpoint key(s): {clash}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in m.state_dict().items()}
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(m.cfg).items()}
    payload = {"state_dict": state, "config": cfg, "version": CHECKPOINT_VERSION, **extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(
    path: str | Path | bytes, map_location: str | torch.device = "cpu"
) -> tuple[ConvAutoencoder, dict[str, Any]]:
    """Rebuild a model from a checkpoint file alone (a path, or the file's bytes).

    Returns ``(model, extra)``; the model is in eval mode on ``map_location``
    and ``extra`` holds every non-reserved key plus ``"version"`` and
    ``"config"``.
    """
    source = io.BytesIO(path) if isinstance(path, bytes) else Path(path)
    payload = torch.load(source, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or "state_dict" not in payload or "config" not in payload:
        raise ValueError("not an stm_defects autoencoder checkpoint")
    version = payload.get("version")
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"unsupported checkpoint version {version!r} (expected {CHECKPOINT_VERSION})")
    cfg = AEConfig.from_dict(payload["config"])
    model = ConvAutoencoder(cfg)
    model.load_state_dict(payload["state_dict"])
    model.to(map_location)
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, meta
