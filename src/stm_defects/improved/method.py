"""The improved per-scan analysis: lattice-aware anomaly detection that keeps step edges out,
orientation-free defect features and stable classes with an "unknown" class.

    state = fit_improved(train_images, ImprovedConfig(), seed)     # once, on training scans
    result = improved_analyse(img01, state, ImprovedConfig())      # per scan -> Analysis

``img01`` is the preprocessed image (`image.preprocess.preprocess`), as for `paper.method.analyse`.
The state is a plain dict (numpy arrays, numbers, one sklearn GaussianMixture), so it can be
saved with joblib and logged as an artifact.  Pure functions: no I/O, no printing; randomness
only from ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stm_defects.improved.anomaly import AnomalyConfig, AnomalyResult, detect
from stm_defects.improved.classify import ClassifyConfig, canonical_patches, fit_classes, predict_classes
from stm_defects.results import Analysis

__all__ = ["ImprovedConfig", "defect_patches", "fit_improved", "improved_analyse"]

STATE_VERSION = 1


@dataclass(frozen=True)
class ImprovedConfig:
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    min_train_defects: int = 20     # fewer detections on the training scans -> no classes


def _centres(res: AnomalyResult) -> np.ndarray:
    return np.array([[r["y"], r["x"]] for r in res.regions], np.float64).reshape(-1, 2)


def _unit(res: AnomalyResult) -> float:
    v = res.lattice[~res.terraces.band]
    return float(np.std(v[::3])) if v.size else 1.0


def defect_patches(res: AnomalyResult, cfg: ImprovedConfig) -> tuple[np.ndarray, np.ndarray]:
    """Canonical patches (N, P, P) and row angles (N,) of the defects of one detection result."""
    return canonical_patches(res.residual, res.lattice, _centres(res), cfg.classify, _unit(res))


def fit_improved(train_images, cfg: ImprovedConfig = ImprovedConfig(), seed: int = 0) -> dict:
    """Detect defects on the (preprocessed) training images and fit the classes."""
    patches = []
    n_det = []
    for img in train_images:
        res = detect(img, cfg.anomaly)
        p, _ = defect_patches(res, cfg)
        patches.append(p)
        n_det.append(len(p))
    P = int(cfg.classify.patch)
    allp = np.concatenate(patches) if patches else np.zeros((0, P, P), np.float32)
    state = {"version": STATE_VERSION, "n_train_images": len(n_det),
             "n_train_defects": len(allp), "classes": None}
    if len(allp) >= cfg.min_train_defects:
        state["classes"] = fit_classes(allp, cfg.classify, seed)
    return state


def improved_analyse(img01: np.ndarray, state: dict | None, cfg: ImprovedConfig = ImprovedConfig()
                     ) -> Analysis:
    """One scan -> `Analysis`: char_map = terrace labels (step band: -1), error_map = the
    anomaly score (robust z), mask, regions (id, x, y, bbox, area_px, score, class,
    probability, row_angle_deg) and class_map.

    ``class`` is an int class, -1 for "unknown" (low likelihood), None without a fitted
    state.  class_map holds each region's class on its pixels and -1 elsewhere (so unknown
    defects are -1 there too; their regions still are in ``mask``).
    """
    res = detect(img01, cfg.anomaly)
    classes = state.get("classes") if state else None
    regions = []
    if res.regions:
        patches, ang = defect_patches(res, cfg)
        if classes is not None:
            lab, prob = predict_classes(classes, patches)
        else:
            lab, prob = [None] * len(patches), [None] * len(patches)
        for r, c, p, a in zip(res.regions, lab, prob, ang):
            regions.append({"id": r["id"], "x": r["x"], "y": r["y"], "bbox": r["bbox"],
                            "area_px": r["area_px"], "score": r["score"],
                            "class": None if c is None else int(c),
                            "probability": None if p is None else float(p),
                            "row_angle_deg": float(np.degrees(a))})
    class_map = np.full(res.mask.shape, -1, np.int64)
    if regions and classes is not None:
        owner = _region_owner(res)
        cls = np.array([-1] + [r["class"] for r in regions], np.int64)
        class_map = cls[owner]
    char_map = np.where(res.terraces.band, -1, res.terraces.labels).astype(np.int64)
    return Analysis(char_map, res.score.astype(np.float32), res.mask, regions, class_map)


def _region_owner(res: AnomalyResult) -> np.ndarray:
    """(H, W) int: 1 + index of the region owning each mask pixel, 0 elsewhere."""
    from scipy import ndimage as ndi

    seeds = np.zeros(res.mask.shape, np.int32)
    for i, r in enumerate(res.regions):
        y, x = r["peak"]
        seeds[y, x] = i + 1
    _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    return np.where(res.mask, seeds[iy, ix], 0)
