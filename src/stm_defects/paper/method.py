"""The report's two-stage pipeline on one preprocessed image, as pure functions.

`analyse(img01, models, cfg)` runs: AE1 windows -> K-means character map + reconstruction
error map -> defect mask (union + morphology) -> regions -> AE2 latents of mask-centred patches
-> GMM classes per region. It holds no global state: a worker can run it on any scan given a
`Models` bundle, so batch prediction parallelises trivially.

`calibrate` fixes, on the training scans, the values `analyse` then uses on every scan (one
absolute error threshold, the rare K-means clusters that join the mask).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from stm_defects.image.windows import vote_map, windows_at
from stm_defects.paper.maps import character_map, error_map
from stm_defects.paper.masks import MaskConfig, defect_mask, defect_regions, mask_centres, threshold_value
from stm_defects.results import Analysis, Models

__all__ = ["DefectPatchConfig", "MapsConfig", "PaperConfig", "analyse", "calibrate", "classify_regions",
           "defect_patches", "mask_config", "stage1_maps"]


@dataclass(frozen=True)
class MapsConfig:
    char_stride: int = 8             # px between AE1 windows of the character map (the report: 4-8)
    error_stride: int = 16           # px between windows of the reconstruction-error map
    error_sigma: float = 2.0         # Gaussian smoothing of the error map, px
    dense: bool = True               # CPU: share convolutions of overlapping windows (models/dense.py);
                                     # same latents as window by window, 4-7x less CPU (stride 8-4)


@dataclass(frozen=True)
class DefectPatchConfig:
    stride: int = 4                  # grid of patch centres inside the mask, px
    max_patches: int = 8000          # seeded subsample cap for AE2 training


@dataclass(frozen=True)
class PaperConfig:
    """Everything the report's method needs per scan (its sections of params.yaml)."""

    patch: int = 32                  # window side, px (params.yaml: prepare.patch)
    maps: MapsConfig = field(default_factory=MapsConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    defect_patches: DefectPatchConfig = field(default_factory=DefectPatchConfig)


def mask_config(cfg: MaskConfig, calibration: dict) -> MaskConfig:
    """The mask settings with the calibrated absolute threshold and target clusters filled in."""
    updates = {}
    if "error_threshold" in calibration and cfg.threshold is not None:
        updates["threshold"] = float(calibration["error_threshold"])
    if "target_clusters" in calibration:
        updates["target_clusters"] = tuple(calibration["target_clusters"])
    return dataclasses.replace(cfg, **updates)


def calibrate(emaps: list[np.ndarray], cluster_fractions, threshold, target_max_fraction: float) -> dict:
    """Fix the error threshold and the target clusters on the training scans.

    A `threshold` given as "pNN"/"mad:K" is resolved over the pooled error maps of all training
    scans, so one absolute threshold is used for every scan at prediction time (as the report).
    K-means clusters rarer than `target_max_fraction` of the training patches join the mask.
    """
    pooled = np.concatenate([e.ravel()[:: max(1, e.size // 50_000)] for e in emaps])
    calib = {}
    if threshold is not None:
        calib["error_threshold"] = float(threshold_value(pooled.reshape(1, -1), threshold))
    calib["target_clusters"] = [i for i, f in enumerate(cluster_fractions) if f < target_max_fraction]
    return calib


def stage1_maps(img01: np.ndarray, models: Models, cfg: PaperConfig) -> tuple[np.ndarray, np.ndarray]:
    """(character map, error map) of one image."""
    from stm_defects.models.training import encode, reconstruct, resolve_device  # torch: on first use

    size, maps = cfg.patch, cfg.maps
    ae1 = models.autoencoder("ae1")
    windows_fn = None
    if maps.dense and resolve_device("auto").type == "cpu":    # on a GPU, window by window is faster
        from functools import partial

        from stm_defects.models.dense import encode_windows

        windows_fn = partial(encode_windows, ae1, size=size)     # (img, origins) -> latents
    cmap, _, _ = character_map(img01, lambda p: encode(ae1, p), models.estimator("kmeans"), size=size,
                               stride=maps.char_stride, encode_windows_fn=windows_fn)
    emap = error_map(img01, lambda p: reconstruct(ae1, p), size=size,
                     stride=maps.error_stride, sigma=maps.error_sigma)
    return cmap, emap


def defect_patches(img01: np.ndarray, mask: np.ndarray, cfg: PaperConfig) -> tuple[np.ndarray, np.ndarray]:
    """Patches centred on a grid of points inside the mask: (patches (M, 1, s, s), centres (M, 2))."""
    centres = mask_centres(mask, stride=cfg.defect_patches.stride)
    if len(centres) == 0:
        return np.empty((0, 1, cfg.patch, cfg.patch), np.float32), centres
    patches, _ = windows_at(img01, centres, cfg.patch)
    return patches, centres


def classify_regions(img01, mask, regions, models: Models, cfg: PaperConfig) -> tuple[list[dict], np.ndarray]:
    """Give each region a GMM class: mean class probability over the patches centred in it."""
    class_map = np.full(mask.shape, -1, dtype=np.int64)
    if models.ae2 is None or models.gmm is None or not regions:
        return [dict(r, **{"class": None, "probability": None}) for r in regions], class_map
    from skimage.measure import label

    patches, centres = defect_patches(img01, mask, cfg)
    lab = label(mask, connectivity=2)
    keys = [lab[int(round(r["y"])), int(round(r["x"]))] for r in regions]   # region label at centroid
    covered = set(lab[centres[:, 0], centres[:, 1]].tolist()) if len(centres) else set()
    # Regions too thin for the grid still get one patch, at their centroid.
    extra = np.array([[int(round(r["y"])), int(round(r["x"]))]
                      for r, k in zip(regions, keys) if k not in covered], dtype=np.int64)
    if len(extra):
        extra_p, _ = windows_at(img01, extra, cfg.patch)
        patches = np.concatenate([patches, extra_p])
        centres = np.concatenate([centres.reshape(-1, 2), extra])
    from stm_defects.models.training import encode

    proba = models.estimator("gmm").predict_proba(encode(models.autoencoder("ae2"), patches))   # (M, k)
    owner = lab[centres[:, 0], centres[:, 1]]                               # region label per patch
    out = []
    for r, key in zip(regions, keys):
        sel = owner == key
        p = proba[sel].mean(axis=0) if sel.any() else proba.mean(axis=0)
        cls = int(np.argmax(p))
        out.append(dict(r, **{"class": cls, "probability": float(p[cls])}))
    # Class map: per-pixel majority over the patches' central 9x9 footprints, inside the mask.
    size = 9
    origins = np.clip(centres - size // 2, 0, np.array(mask.shape) - size)
    votes = vote_map(np.argmax(proba, axis=1), origins, mask.shape, size, proba.shape[1])
    class_map[mask] = votes[mask]
    return out, class_map


def analyse(img01: np.ndarray, models: Models, cfg: PaperConfig) -> Analysis:
    """One preprocessed image -> maps, mask and classified regions (the report's method)."""
    cmap, emap = stage1_maps(img01, models, cfg)
    mask = defect_mask(emap, cmap, mask_config(cfg.mask, models.calibration))
    regions = defect_regions(mask, emap)
    regions, class_map = classify_regions(img01, mask, regions, models, cfg)
    return Analysis(cmap, emap, mask, regions, class_map)
