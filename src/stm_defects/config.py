"""params.yaml -> frozen dataclasses.

Every number that changes a result lives in ``params.yaml``. This module turns it into frozen
dataclasses, rejecting unknown keys (a typo must fail loudly, not be ignored) and applying the
selected ``profile`` (``default`` or ``paper``) over the base values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad params file: unknown key, wrong type, unknown profile."""


def build(cls, data: dict | None, where: str):
    """Build dataclass ``cls`` from ``data``; unknown keys raise, lists become tuples."""
    data = dict(data or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints.get(key)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = build(hint, value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field missing
        raise ConfigError(f"{where}: {err}") from None


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in (over or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Sections owned by the stage code. Library configs (PreprocessConfig, SynthConfig, AEConfig,
# TrainConfig, MaskConfig) live beside the code they configure.


@dataclass(frozen=True)
class DataParams:
    n_scans: int = 48            # default-distribution synthetic scans (split train/test/predict)
    n_hard: int = 12             # scans of the hard split (evaluation only)


@dataclass(frozen=True)
class ValidateParams:
    min_passed: int = 10             # the stage fails when fewer scans pass
    min_size: int = 64               # px, both sides
    min_finite_fraction: float = 0.99
    min_dynamic_range: float = 1e-4  # nm (or a.u.) peak-to-peak after levelling
    max_pixel_nm: float = 1.0        # coarser scans cannot resolve atoms
    min_pixel_nm: float = 0.005


@dataclass(frozen=True)
class PrepareParams:
    fractions: tuple[float, float, float] = (0.806, 0.167, 0.027)  # train/test/predict, the report's 1450/300/50
    patch: int = 32
    stride: int = 32                 # non-overlapping training patches


@dataclass(frozen=True)
class KMeansParams:
    k: int = 6                       # the report's choice
    k_select: str = "fixed"          # fixed | silhouette | elbow
    k_range: tuple[int, int] = (2, 12)
    minibatch_threshold: int = 20000
    sweep_sample: int = 5000
    target_max_fraction: float = 0.05  # clusters rarer than this on the training patches join the mask


@dataclass(frozen=True)
class MapsParams:
    char_stride: int = 4
    error_stride: int = 16
    error_sigma: float = 2.0
    dense: bool = False              # share the encoder's conv trunk across windows (src/stm_defects/dense.py)


@dataclass(frozen=True)
class DefectPatchParams:
    stride: int = 4                  # grid of patch centres inside the mask
    max_patches: int = 20000         # seeded subsample cap for AE2 training


@dataclass(frozen=True)
class GMMParams:
    k_range: tuple[int, int] = (2, 12)
    covariance_types: tuple[str, ...] = ("spherical", "diag", "tied", "full")
    max_samples: int = 5000          # seeded subsample for the grid
    n_init: int = 1


@dataclass(frozen=True)
class EvaluateParams:
    match_radius: float = 6.0        # px
    step_radius: int = 3             # px around a step edge for step-edge false positives


@dataclass(frozen=True)
class DetectorParams:
    method: str = "improved"         # improved (default profile) | paper (the report's pipeline)

    def __post_init__(self):
        if self.method not in ("improved", "paper"):
            raise ConfigError(f"detector.method must be 'improved' or 'paper', not {self.method!r}")


@dataclass(frozen=True)
class TrackingParams:
    experiment: str = "stm-defects"
    register: bool = True


@dataclass(frozen=True)
class TuneParams:
    use_tuned: bool = True                  # train_ae1 / gmm read tuning/*/tuned.json
    ae1_trials: int = 4
    ae1_latents: tuple[int, ...] = (16, 32, 64, 128, 256)
    ae1_epochs: int = 3
    ae1_max_patches: int = 3000
    ae1_batch_size: int | None = 64         # None: ae1_train.batch_size
    ae1_tolerance: float = 0.1
    gmm_trials: int = 16


@dataclass(frozen=True)
class Params:
    seed: int
    profile: str
    data: DataParams
    synth: Any
    synth_hard: Any
    preprocess: Any
    validate: ValidateParams
    prepare: PrepareParams
    ae1: Any
    ae1_train: Any
    kmeans: KMeansParams
    maps: MapsParams
    mask: Any
    defect_patches: DefectPatchParams
    ae2: Any
    ae2_train: Any
    gmm: GMMParams
    evaluate: EvaluateParams
    detector: DetectorParams = field(default_factory=DetectorParams)
    improved: Any = None
    tracking: TrackingParams = field(default_factory=TrackingParams)
    tune: TuneParams = field(default_factory=TuneParams)

    def section_dict(self, name: str) -> dict:
        return dataclasses.asdict(getattr(self, name))

    def digest(self) -> str:
        """A short hash of every resolved value (used as a lineage tag)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _section_types() -> dict[str, type]:
    # Imported here so that `stm --help` does not pay for torch.
    from .improved import ImprovedConfig
    from .masks import MaskConfig
    from .models import AEConfig
    from .preprocess import PreprocessConfig
    from .synth import SynthConfig
    from .training import TrainConfig

    return {
        "data": DataParams, "synth": SynthConfig, "synth_hard": SynthConfig,
        "preprocess": PreprocessConfig, "validate": ValidateParams, "prepare": PrepareParams,
        "ae1": AEConfig, "ae1_train": TrainConfig, "kmeans": KMeansParams, "maps": MapsParams,
        "mask": MaskConfig, "defect_patches": DefectPatchParams, "ae2": AEConfig,
        "ae2_train": TrainConfig, "gmm": GMMParams, "evaluate": EvaluateParams,
        "tracking": TrackingParams, "tune": TuneParams, "detector": DetectorParams,
        "improved": ImprovedConfig,
    }


def resolve(raw: dict, where: str = "params.yaml", profile: str | None = None) -> Params:
    """Apply the chosen profile's overrides and build every section."""
    raw = dict(raw)
    profiles = raw.pop("profiles", {}) or {}
    name = profile or raw.get("profile", "default")
    if name != "default" and name not in profiles:
        raise ConfigError(f"{where}: unknown profile {name!r}; defined: {['default', *profiles]}")
    merged = deep_merge(raw, profiles.get(name, {}))
    merged["profile"] = name
    types = _section_types()
    top = {"seed", "profile", *types}
    unknown = sorted(set(merged) - top)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; allowed: {sorted(top)}")
    kwargs = {"seed": int(merged.get("seed", 0)), "profile": name}
    for key, cls in types.items():
        kwargs[key] = build(cls, merged.get(key), f"{where}:{key}")
    return Params(**kwargs)


def load_params(path: str | Path = "params.yaml", profile: str | None = None) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    return resolve(raw, str(path), profile)
