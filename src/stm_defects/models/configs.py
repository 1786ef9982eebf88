"""The autoencoders' and their training's settings (`AEConfig`, `TrainConfig`): plain dataclasses,
without torch, so that reading params.yaml (`config.section_types`) does not import it.
`models.autoencoder` and `models.training` use and re-export them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Self

__all__ = ["AEConfig", "TrainConfig"]

_AUGMENTS = ("none", "d4")


class _FromDict:
    """``from_dict`` / ``to_dict`` of a config dataclass: a mapping of its own keys, checked."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """Build from a mapping; unknown keys raise ``ValueError``."""
        if not isinstance(d, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict expects a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} key(s): {', '.join(map(repr, unknown))}; "
                f"allowed keys: {', '.join(sorted(known))}"
            )
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AEConfig(_FromDict):
    """Architecture of a :class:`ConvAutoencoder`.

    widths: encoder conv widths; the decoder mirrors them (reversed, the last
        conv maps to 1 channel).
    kernels: kernel size of each encoder conv (odd); the decoder conv of the
        same width uses the same kernel, the final 1-channel conv uses 3x3.
    encoder_norm: whether BN+ReLU follows each encoder conv (paper AE1: the
        last encoder conv has neither).
    latent: latent dimension.
    hidden: optional dense layer between flatten and latent, mirrored in the
        decoder (paper AE2: 256).
    dropout: dropout rate (encoder after the last pooling, decoder after the
        first conv block).
    patch: input side length; must be divisible by 2 ** len(widths).
    """

    widths: tuple[int, ...] = (16, 32, 64)
    kernels: tuple[int, ...] = (3, 3, 3)
    encoder_norm: tuple[bool, ...] = (True, True, False)
    latent: int = 32
    hidden: int | None = None
    dropout: float = 0.25
    patch: int = 32

    def __post_init__(self) -> None:
        # normalise sequences (e.g. lists from YAML/JSON/checkpoints) to tuples
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "kernels", tuple(int(k) for k in self.kernels))
        object.__setattr__(self, "encoder_norm", tuple(bool(b) for b in self.encoder_norm))
        n = len(self.widths)
        if n == 0:
            raise ValueError("widths must not be empty")
        if len(self.kernels) != n or len(self.encoder_norm) != n:
            raise ValueError(
                f"widths, kernels and encoder_norm must have the same length, got "
                f"{n}, {len(self.kernels)}, {len(self.encoder_norm)}"
            )
        if any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be positive, got {self.widths}")
        if any(k < 1 or k % 2 == 0 for k in self.kernels):
            raise ValueError(f"kernels must be odd positive integers, got {self.kernels}")
        if self.latent < 1:
            raise ValueError(f"latent must be positive, got {self.latent}")
        if self.hidden is not None and int(self.hidden) < 1:
            raise ValueError(f"hidden must be positive or None, got {self.hidden}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.patch < 1 or self.patch % (2**n) != 0:
            raise ValueError(f"patch ({self.patch}) must be divisible by 2**len(widths) = {2**n}")

    @property
    def bottleneck(self) -> int:
        """Side length of the feature map before flattening."""
        return self.patch // 2 ** len(self.widths)

    @property
    def flat_features(self) -> int:
        return self.widths[-1] * self.bottleneck**2


@dataclass(frozen=True)
class TrainConfig(_FromDict):
    """Training hyper-parameters.

    early_stopping_patience: stop after this many epochs without a val-loss
        improvement (0 disables); the best weights are always restored at the end.
    lr_patience / lr_factor / min_lr: ``ReduceLROnPlateau`` on the val loss.
    device: ``"auto"`` (CUDA if available, else CPU) or any torch device string.
    bf16: bf16 autocast (CPU; CUDA only when the GPU supports bf16). Off by
        default: it does not change the reconstruction MSE measurably, but on
        CPUs without native bf16 (AVX2-only, like the development machine) it
        is 7-16x *slower* than fp32 (benchmarks/bench_autoencoder.py). Worth
        enabling on GPUs and on CPUs with AVX512-BF16/AMX.
    channels_last: NHWC memory format for model and batches; on CPU (oneDNN)
        this alone gives a ~1.7-6x training speed-up over NCHW fp32.
    augment: ``"none"`` or ``"d4"`` (random rotation by k*90 degrees and
        flip, drawn independently for each patch of each batch).
    """

    epochs: int = 12
    batch_size: int = 256
    lr: float = 1e-3
    val_fraction: float = 0.1
    early_stopping_patience: int = 4
    lr_patience: int = 2
    lr_factor: float = 0.5
    min_lr: float = 1e-5
    device: str = "auto"
    bf16: bool = False
    channels_last: bool = True
    augment: str = "none"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.early_stopping_patience < 0 or self.lr_patience < 0:
            raise ValueError("patience values must be >= 0")
        if not 0.0 < self.lr_factor < 1.0:
            raise ValueError(f"lr_factor must be in (0, 1), got {self.lr_factor}")
        if self.min_lr < 0:
            raise ValueError(f"min_lr must be >= 0, got {self.min_lr}")
        if self.augment not in _AUGMENTS:
            raise ValueError(f"augment must be one of {_AUGMENTS}, got {self.augment!r}")
