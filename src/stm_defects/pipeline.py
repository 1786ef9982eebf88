"""The report's two-stage pipeline on one preprocessed image, as pure functions.

`analyse(img01, models, params)` runs: AE1 windows -> K-means character map + reconstruction
error map -> defect mask (union + morphology) -> regions -> AE2 latents of mask-centred patches
-> GMM classes per region. It holds no global state: a worker can run it on any scan given a
`Models` bundle, so batch prediction parallelises trivially.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .maps import character_map, error_map
from .masks import defect_mask, defect_regions, mask_centres
from .training import encode, reconstruct
from .windows import vote_map, window_origins, windows_at


@dataclass
class Models:
    """Everything prediction needs. `calibration` holds values fitted on the training scans."""

    ae1: object
    kmeans: object
    ae2: object | None = None
    gmm: object | None = None
    calibration: dict = field(default_factory=dict)   # error_threshold, target_clusters
    versions: dict = field(default_factory=dict)      # model name -> version/path, for outputs
    class_names: dict = field(default_factory=dict)   # class id (str) -> human name
    improved: dict | None = None                      # fitted state of the improved analysis


@dataclass
class Analysis:
    char_map: np.ndarray        # (H, W) int, K-means cluster per pixel
    error_map: np.ndarray       # (H, W) float32
    mask: np.ndarray            # (H, W) bool
    regions: list[dict]         # defect_regions() + "class", "probability"
    class_map: np.ndarray       # (H, W) int, GMM class per masked pixel, -1 elsewhere


def mask_config(params, calibration: dict):
    """The mask settings with the calibrated absolute threshold and target clusters filled in."""
    cfg = params.mask
    updates = {}
    if "error_threshold" in calibration and cfg.threshold is not None:
        updates["threshold"] = float(calibration["error_threshold"])
    if "target_clusters" in calibration:
        updates["target_clusters"] = tuple(calibration["target_clusters"])
    return dataclasses.replace(cfg, **updates)


def stage1_maps(img01: np.ndarray, models: Models, params) -> tuple[np.ndarray, np.ndarray]:
    """(character map, error map) of one image."""
    size = params.prepare.patch
    if params.maps.dense:
        from .dense import encode_windows

        origins = window_origins(img01.shape, size, params.maps.char_stride)
        labels = models.kmeans.predict(encode_windows(models.ae1, img01, origins, size))
        cmap = vote_map(labels, origins, img01.shape, size, int(models.kmeans[-1].n_clusters))
    else:
        cmap, _, _ = character_map(img01, lambda p: encode(models.ae1, p), models.kmeans,
                                   size=size, stride=params.maps.char_stride)
    emap = error_map(img01, lambda p: reconstruct(models.ae1, p), size=size,
                     stride=params.maps.error_stride, sigma=params.maps.error_sigma)
    return cmap, emap


def defect_patches(img01: np.ndarray, mask: np.ndarray, params) -> tuple[np.ndarray, np.ndarray]:
    """32x32 patches centred on a grid of points inside the mask: (patches, centres (M, 2))."""
    centres = mask_centres(mask, stride=params.defect_patches.stride)
    if len(centres) == 0:
        size = params.prepare.patch
        return np.empty((0, 1, size, size), np.float32), centres
    patches, _ = windows_at(img01, centres, params.prepare.patch)
    return patches, centres


def classify_regions(img01, mask, regions, models: Models, params) -> tuple[list[dict], np.ndarray]:
    """Give each region a GMM class: mean class probability over the patches centred in it."""
    class_map = np.full(mask.shape, -1, dtype=np.int64)
    if models.ae2 is None or models.gmm is None or not regions:
        return [dict(r, **{"class": None, "probability": None}) for r in regions], class_map
    from skimage.measure import label

    patches, centres = defect_patches(img01, mask, params)
    lab = label(mask, connectivity=2)
    keys = [lab[int(round(r["y"])), int(round(r["x"]))] for r in regions]   # region label at centroid
    covered = set(lab[centres[:, 0], centres[:, 1]].tolist()) if len(centres) else set()
    # Regions too thin for the grid still get one patch, at their centroid.
    extra = np.array([[int(round(r["y"])), int(round(r["x"]))]
                      for r, k in zip(regions, keys) if k not in covered], dtype=np.int64)
    if len(extra):
        extra_p, _ = windows_at(img01, extra, params.prepare.patch)
        patches = np.concatenate([patches, extra_p])
        centres = np.concatenate([centres.reshape(-1, 2), extra])
    proba = models.gmm.predict_proba(encode(models.ae2, patches))           # (M, k)
    owner = lab[centres[:, 0], centres[:, 1]]                               # region label per patch
    out = []
    for r, key in zip(regions, keys):
        sel = owner == key
        p = proba[sel].mean(axis=0) if sel.any() else proba.mean(axis=0)
        cls = int(np.argmax(p))
        out.append(dict(r, **{"class": cls, "probability": float(p[cls])}))
    # Class map: per-pixel majority over the patches' central 8x8 footprints, inside the mask.
    size = 9
    origins = np.clip(centres - size // 2, 0, np.array(mask.shape) - size)
    votes = vote_map(np.argmax(proba, axis=1), origins, mask.shape, size, proba.shape[1])
    class_map[mask] = votes[mask]
    return out, class_map


def analyse(img01: np.ndarray, models: Models, params) -> Analysis:
    """One preprocessed image -> maps, mask and classified regions, by `params.detector.method`."""
    if params.detector.method == "improved":
        from .improved import improved_analyse

        return improved_analyse(img01, models, params.improved)
    cmap, emap = stage1_maps(img01, models, params)
    mask = defect_mask(emap, cmap, mask_config(params, models.calibration))
    regions = defect_regions(mask, emap)
    regions, class_map = classify_regions(img01, mask, regions, models, params)
    return Analysis(cmap, emap, mask, regions, class_map)
