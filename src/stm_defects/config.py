"""params.yaml -> frozen dataclasses.

Every number that changes a result lives in ``params.yaml``. This module turns it into frozen
dataclasses, rejecting unknown keys (a typo must fail loudly, not be ignored) and applying the
selected ``profile`` (``default`` or ``paper``) over the base values.

Library configs (`PreprocessConfig`, `SynthConfig`, `AEConfig`, `TrainConfig`, `MapsConfig`,
`MaskConfig`, `ImprovedConfig`, ...) live beside the code they configure; the sections below
belong to the stages. Dataclass defaults equal params.yaml's values (a test holds them equal), so
a library function called without a config behaves as the pipeline does.

`predict_config(params)` gathers the sections that change a prediction; a registered model
version stores exactly that (`analysis.dispatch.PredictConfig`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stm_defects.errors import ConfigError
from stm_defects.schema import build, check_value, deep_merge


@dataclass(frozen=True)
class DataParams:
    n_scans: int = 48            # default-distribution synthetic scans (split train/test/predict)
    n_hard: int = 12             # scans of the hard split (evaluation only)


@dataclass(frozen=True)
class ValidateParams:
    min_passed: int = 3              # the stage fails when fewer scans pass (train, test, predict need one each)
    min_size: int = 64               # px, both sides
    min_finite_fraction: float = 0.99
    min_dynamic_range: float = 1e-4  # nm (or a.u.) peak-to-peak after levelling
    max_pixel_nm: float = 1.0        # coarser scans cannot resolve atoms
    min_pixel_nm: float = 0.005


@dataclass(frozen=True)
class ScanCalibration:
    """The pixel size of training scans whose files carry none (PNG, JPEG, TIFF, npy, SPIEPy
    .dat); a given value also overrides a file's own. `stm train --pixel-nm/--scan-nm` sets it,
    `--field-from-name` has each such file's field read from its name."""
    pixel_nm: float | None = None    # nm per pixel
    scan_nm: float | None = None     # scan width in nm (pixel size = this / image width)
    field_from_name: bool = False    # "..._100x100_..." / "..._50nm" in a file name: its field in nm

    def __post_init__(self) -> None:
        from stm_defects.io.scans import calibration_error

        why = calibration_error(self.pixel_nm, self.scan_nm)
        if why:
            raise ConfigError(f"scan_calibration: {why}")

    def read_kwargs(self) -> dict:
        """Keywords of `io.scans.read_scan` (and `analysis.dispatch.load_image`)."""
        return {"pixel_nm": self.pixel_nm, "scan_nm": self.scan_nm, "field_from_name": self.field_from_name}


@dataclass(frozen=True)
class PrepareParams:
    fractions: tuple[float, float, float] = (0.806, 0.167, 0.027)  # train/test/predict, the report's 1450/300/50
    patch: int = 32                  # px, the autoencoders' window side
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
class GMMParams:
    k_range: tuple[int, int] = (2, 12)
    covariance_types: tuple[str, ...] = ("spherical", "diag", "tied", "full")
    max_samples: int = 5000          # seeded subsample for the grid
    n_init: int = 1


@dataclass(frozen=True)
class SelectClusterersParams:
    max_samples: int = 2000          # seeded subsample of each latent set (CPU budget)
    eps_quantiles: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95)   # DBSCAN eps: k-distance quantiles
    min_samples: tuple[int, ...] = (3, 5, 10, 20)                   # DBSCAN and HDBSCAN
    min_cluster_size: tuple[int, ...] = (10, 25, 50, 100)           # HDBSCAN
    max_cluster_cv: float = 0.5      # a grid whose n_clusters varies more than this is unstable
    max_noise: float = 0.2           # ... or whose median noise fraction is above this
    truth_radius: float = 8.0        # px: a defect patch takes the class of a true defect this close
    tsne_samples: int = 800          # per latent set: the 2-D and 3-D t-SNE views (~4 s each on a core)
    tsne_perplexity: float = 30.0
    tsne_max_iter: int = 500         # optimisation steps (the first 250: early exaggeration)
    tsne_neighbors: int = 10         # k of the trustworthiness that compares the 2-D and 3-D views


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
    use_tuned: bool = True                  # train_ae1 takes ae1.latent from tuning/ae1/tuned.json
    ae1_trials: int | None = None           # distinct latent sizes trained (None: all)
    ae1_latents: tuple[int, ...] = (16, 32, 64, 128, 256)
    ae1_epochs: int = 3
    ae1_max_patches: int = 3000
    ae1_batch_size: int | None = 64         # None: ae1_train.batch_size
    ae1_tolerance: float = 0.1


@dataclass(frozen=True)
class Params:
    seed: int
    profile: str
    data: DataParams
    synth: Any
    synth_hard: Any
    preprocess: Any
    validate: ValidateParams
    scan_calibration: ScanCalibration
    prepare: PrepareParams
    ae1: Any
    ae1_train: Any
    kmeans: KMeansParams
    maps: Any
    mask: Any
    defect_patches: Any
    ae2: Any
    ae2_train: Any
    gmm: GMMParams
    select_clusterers: SelectClusterersParams
    evaluate: Any
    detector: DetectorParams
    improved: Any
    tracking: TrackingParams
    tune: TuneParams

    def section_dict(self, name: str) -> dict:
        return dataclasses.asdict(getattr(self, name))

    def digest(self) -> str:
        """A short hash of every resolved value (used as a lineage tag)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def flat(self, *sections: str) -> dict[str, str]:
        """`section.key.subkey` -> value strings of `sections` (all when none given), for MLflow."""
        out: dict[str, str] = {}

        def walk(prefix: str, value) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}", v)
            else:
                out[prefix] = str(value)[:500]

        for name in sections or [f.name for f in dataclasses.fields(self)]:
            value = getattr(self, name)
            walk(name, dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
        return out


PREDICT_SECTIONS = ("preprocess", "prepare", "maps", "mask", "defect_patches", "detector", "improved")


def predict_config(params: Params):
    """The `PredictConfig` of these params: every value that changes a prediction."""
    from stm_defects.analysis.dispatch import PredictConfig
    from stm_defects.paper.method import PaperConfig

    return PredictConfig(method=params.detector.method, preprocess=params.preprocess,
                         paper=PaperConfig(patch=params.prepare.patch, maps=params.maps, mask=params.mask,
                                           defect_patches=params.defect_patches),
                         improved=params.improved)


def section_types() -> dict[str, type]:
    """params.yaml section -> the dataclass it is built into."""
    # Imported here so that `stm --help` does not pay for torch.
    from stm_defects.analysis.evaluation import EvaluateConfig
    from stm_defects.data.synth import SynthConfig
    from stm_defects.image.preprocess import PreprocessConfig
    from stm_defects.improved.method import ImprovedConfig
    from stm_defects.models.configs import AEConfig, TrainConfig
    from stm_defects.paper.masks import MaskConfig
    from stm_defects.paper.method import DefectPatchConfig, MapsConfig

    return {
        "data": DataParams, "synth": SynthConfig, "synth_hard": SynthConfig,
        "preprocess": PreprocessConfig, "validate": ValidateParams,
        "scan_calibration": ScanCalibration, "prepare": PrepareParams,
        "ae1": AEConfig, "ae1_train": TrainConfig, "kmeans": KMeansParams, "maps": MapsConfig,
        "mask": MaskConfig, "defect_patches": DefectPatchConfig, "ae2": AEConfig,
        "ae2_train": TrainConfig, "gmm": GMMParams,
        "select_clusterers": SelectClusterersParams, "evaluate": EvaluateConfig,
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
    types = section_types()
    top = {"seed", "profile", *types}
    unknown = sorted(set(merged) - top)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; allowed: {sorted(top)}")
    kwargs = {"seed": check_value(merged.get("seed", 0), int, f"{where}:seed"), "profile": name}
    for key, cls in types.items():
        kwargs[key] = build(cls, merged.get(key), f"{where}:{key}")
    return Params(**kwargs)


def load_raw(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def load_params(path: str | Path = "params.yaml", profile: str | None = None) -> Params:
    return resolve(load_raw(path), str(path), profile)


class ScopedParams:
    """A read-only view of `Params` that lets a stage read only the sections it declares.

    Reading any other section raises, so a stage's DVC `params:` list (generated from the same
    declaration) cannot miss a section the stage uses.
    """

    def __init__(self, params: Params, sections: tuple[str, ...], stage: str):
        self._params, self._sections, self._stage = params, frozenset(sections) | {"profile"}, stage

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._sections:
            raise ConfigError(f"stage {self._stage} reads params section {name!r} but does not declare it "
                              f"(declared: {sorted(self._sections)}); add it in mlops/dag.py")
        return getattr(self._params, name)

    def replace(self, **changes) -> ScopedParams:
        for name in changes:
            getattr(self, name)                    # must be declared
        return ScopedParams(dataclasses.replace(self._params, **changes), tuple(self._sections), self._stage)

    def digest(self) -> str:
        blob = json.dumps({s: dataclasses.asdict(getattr(self._params, s)) if dataclasses.is_dataclass(
            getattr(self._params, s)) else getattr(self._params, s) for s in sorted(self._sections)},
            sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]
