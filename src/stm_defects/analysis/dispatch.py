"""One preprocessed image -> `Analysis`, by the configured method; the config a prediction needs.

`PredictConfig` gathers every setting that changes a prediction (preprocessing, the method and
its sections). A registered model version stores it (`to_dict`), and `stm predict` rebuilds it
from there (`from_dict`), so results follow the model version, not the folder one runs in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from stm_defects.image.preprocess import PreprocessConfig, ResampleError, mask_on, preprocess
from stm_defects.improved.method import ImprovedConfig, improved_analyse
from stm_defects.io.files import jsonable
from stm_defects.io.scans import Scan, ScanError, read_scan
from stm_defects.paper import method as paper
from stm_defects.results import Analysis, Models
from stm_defects.schema import ConfigError, build

METHODS = ("improved", "paper")

# Settings added after models were first registered, with the value that gives the results an
# older model's stored config was evaluated with: a config without the key gets that value,
# not today's default, so a registered version predicts as it did.
ADDED_LATER = {("improved", "anomaly", "halo_distance"): 0.0, ("improved", "classify", "split_min"): 0,
               ("improved", "anomaly", "step_lattice_periods"): 0.0,
               ("improved", "anomaly", "streak_filter"): False,
               ("improved", "classify", "split_features"): "canonical",
               ("improved", "classify", "features"): "canonical"}


@dataclass(frozen=True)
class PredictConfig:
    method: str = "improved"             # improved (default profile) | paper (the report's pipeline)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    paper: paper.PaperConfig = field(default_factory=paper.PaperConfig)
    improved: ImprovedConfig = field(default_factory=ImprovedConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"detector.method must be one of {METHODS}, not {self.method!r}")

    def to_dict(self) -> dict:
        return jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict, where: str = "prediction config") -> PredictConfig:
        """From a stored config (a model's, a run's); keys it predates take `ADDED_LATER`."""
        if isinstance(data, dict):
            data = _with_added_later(data)
        return build(cls, data, where)

    @property
    def min_scan_px(self) -> int:
        """The smallest scan side (after preprocessing) the method can analyse."""
        return self.paper.patch if self.method == "paper" else self.improved.classify.patch


def _with_added_later(data: dict) -> dict:
    import copy

    data = copy.deepcopy(data)
    for path, old in ADDED_LATER.items():
        node = data
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.setdefault(path[-1], old)
    return data


def analyse(img01: np.ndarray, models: Models, cfg: PredictConfig,
            pixel_nm: float | None = None, missing: np.ndarray | None = None) -> Analysis:
    """One preprocessed image (of ``pixel_nm`` nm per pixel, where known) -> maps, mask and
    classified regions, by `cfg.method`. ``missing`` (`missing_on`): pixels that hold no
    measurement, where the default method looks for nothing; the ``paper`` profile, as the
    report, analyses the whole image (the reader filled those pixels with the median)."""
    if cfg.method == "improved":
        return improved_analyse(img01, models.improved, cfg.improved, pixel_nm, missing)
    return paper.analyse(img01, models, cfg.paper)


def missing_on(scan: Scan, shape: tuple[int, int]) -> np.ndarray | None:
    """`Scan.missing` on the grid of its preprocessed image (``shape``): a resampled pixel is
    missing when any part of it is; None when every pixel was measured."""
    return None if scan.missing is None else mask_on(scan.missing, shape)


def image_pixel_nm(scan: Scan, scale: float) -> float | None:
    """The pixel size of a preprocessed image (`preprocess` resampled it by ``scale``)."""
    return None if scan.pixel_nm is None else scan.pixel_nm / scale


def preprocess_scan(scan: Scan, cfg: PreprocessConfig, min_side: int = 8,
                    span_out: dict | None = None) -> tuple[np.ndarray, float]:
    """`preprocess` one scan: (img01 float32, scale). A resampling to ``cfg.target_pixel_nm`` that
    would leave a side under ``min_side`` pixels (or make an absurdly large image) is refused up
    front as a `ScanError` naming the file. ``span_out`` gets the height span (see `preprocess`)."""
    try:
        return preprocess(scan.height, scan.pixel_nm, cfg, min_side=min_side, span_out=span_out)
    except ResampleError as exc:
        raise ScanError(scan.path, str(exc)) from None


def load_image(path, cfg: PreprocessConfig, *, pixel_nm: float | None = None,
               scan_nm: float | None = None, field_from_name: bool = False) -> tuple[Scan, np.ndarray, float]:
    """Read and preprocess one scan: (scan, img01 float32, scale); see `image_pixel_nm`.
    ``pixel_nm``/``scan_nm``/``field_from_name`` calibrate a file that carries no pixel size
    (`io.scans.read_scan`)."""
    scan = read_scan(path, pixel_nm=pixel_nm, scan_nm=scan_nm, field_from_name=field_from_name)
    img, scale = preprocess_scan(scan, cfg)
    return scan, img, scale
