"""The improved per-scan analysis: lattice-aware anomaly detection that keeps step edges out,
orientation-free defect features and stable classes with an "unknown" class.

    state = fit_improved(train_images, ImprovedConfig(), seed, pixel_nms)   # once, on training scans
    result = improved_analyse(img01, state, ImprovedConfig(), pixel_nm)      # per scan -> Analysis

``img01`` is the preprocessed image (`image.preprocess.preprocess`), as for `paper.method.analyse`,
and ``pixel_nm`` its pixel size where known. Scans finer than ``working_pixel_nm`` are analysed at
that pixel size (anti-aliased downsampling), so the detector's lengths (`AnomalyConfig`, in
working pixels) mean the same nanometres on a 5 nm and a 100 nm scan; results come back on the
``img01`` grid. Scans of unknown pixel size are analysed as they are.
The state is a plain dict (numpy arrays, numbers, one sklearn GaussianMixture), so it can be
stored by `io.safe_models` (no pickle) and logged as an artifact.  Pure functions: no I/O, no
printing; randomness only from ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stm_defects.image.preprocess import mask_on, rescale_by
from stm_defects.improved.anomaly import AnomalyConfig, AnomalyResult, detect
from stm_defects.improved.classify import ClassifyConfig, canonical_patches, classify_patches, fit_classes
from stm_defects.results import Analysis

__all__ = ["ImprovedConfig", "defect_patches", "fit_improved", "improved_analyse", "working_scale"]

STATE_VERSION = 2   # 2: class patches in nm (`patch_step`); a version-1 state was fitted on patches in pixels


@dataclass(frozen=True)
class ImprovedConfig:
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    min_train_defects: int = 20     # fewer detections on the training scans -> no classes
    working_pixel_nm: float | None = 0.1   # finer scans are analysed at this pixel size; None: never
    min_working_px: int = 128       # ... but never on fewer pixels than this along the short side


def working_scale(shape: tuple[int, int], pixel_nm: float | None, cfg: ImprovedConfig) -> float:
    """The factor (<= 1) from the ``img01`` grid to the grid the detector works on."""
    if pixel_nm is None or cfg.working_pixel_nm is None or not pixel_nm > 0:
        return 1.0
    k = min(1.0, float(pixel_nm) / float(cfg.working_pixel_nm))
    return max(k, min(1.0, cfg.min_working_px / min(shape)))


def _to_working(img01: np.ndarray, k: float) -> np.ndarray:
    return img01 if k >= 1.0 else rescale_by(img01, k)


def _map_back(a: np.ndarray, shape: tuple[int, int], order: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(a, shape, order=order, mode="edge", anti_aliasing=False,
                  preserve_range=True).astype(a.dtype)


def _centres(res: AnomalyResult) -> np.ndarray:
    return np.array([[r["y"], r["x"]] for r in res.regions], np.float64).reshape(-1, 2)


def _unit(res: AnomalyResult) -> float:
    v = res.lattice[~res.terraces.band]
    return float(np.std(v[::3])) if v.size else 1.0


def patch_step(pixel_nm: float | None, k: float, cfg: ImprovedConfig) -> float:
    """Image pixels of the working grid per canonical-patch pixel: the patch pixel is
    ``working_pixel_nm`` on every calibrated scan (coarser scans are sampled between their
    pixels), so a patch covers the same nm whatever the scan's pixel size; 1 in pixel units."""
    if pixel_nm is None or cfg.working_pixel_nm is None or not pixel_nm > 0:
        return 1.0
    return float(cfg.working_pixel_nm) / (float(pixel_nm) / k)


def defect_patches(res: AnomalyResult, cfg: ImprovedConfig, step: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Canonical patches (N, P, P) and row angles (N,) of the defects of one detection result
    (``step``: see `patch_step`)."""
    return canonical_patches(res.residual, res.lattice, _centres(res), cfg.classify, _unit(res), step)


def _detect(img01: np.ndarray, k: float, missing: np.ndarray | None, cfg: ImprovedConfig) -> AnomalyResult:
    """`detect` on the working grid (factor ``k``), with the missing pixels resampled too."""
    work = _to_working(img01, k)
    return detect(work, cfg.anomaly, None if missing is None else mask_on(missing, work.shape))


def fit_improved(train_images, cfg: ImprovedConfig = ImprovedConfig(), seed: int = 0,
                 pixel_nms=None, missing=None) -> dict:
    """Detect defects on the (preprocessed) training images and fit the classes.
    ``missing``: per image, its pixels without a measurement (or None)."""
    patches = []
    n_det = []
    pixel_nms = list(pixel_nms) if pixel_nms is not None else [None] * len(train_images)
    missing = list(missing) if missing is not None else [None] * len(train_images)
    for img, px, miss in zip(train_images, pixel_nms, missing):
        k = working_scale(img.shape, px, cfg)
        res = _detect(img, k, miss, cfg)
        p, _ = defect_patches(res, cfg, patch_step(px, k, cfg))
        patches.append(p)
        n_det.append(len(p))
    P = int(cfg.classify.patch)
    allp = np.concatenate(patches) if patches else np.zeros((0, P, P), np.float32)
    state = {"version": STATE_VERSION, "n_train_images": len(n_det),
             "n_train_defects": len(allp), "classes": None}
    if len(allp) >= cfg.min_train_defects:
        state["classes"] = fit_classes(allp, cfg.classify, seed)
    return state


def improved_analyse(img01: np.ndarray, state: dict | None, cfg: ImprovedConfig = ImprovedConfig(),
                     pixel_nm: float | None = None, missing: np.ndarray | None = None) -> Analysis:
    """One scan -> `Analysis`: char_map = terrace labels (step band: -1), error_map = the
    anomaly score (robust z), mask, regions (id, x, y, bbox, area_px, score, class,
    probability, row_angle_deg) and class_map.

    ``class`` is an int class, -1 for "unknown" (low likelihood), None without a fitted
    state.  ``missing``: pixels that hold no measurement (`analysis.dispatch.missing_on`), where
    no defect is looked for. class_map holds each region's class on its pixels and -1 elsewhere (so unknown
    defects are -1 there too; their regions still are in ``mask``).
    """
    k = working_scale(img01.shape, pixel_nm, cfg)
    res = _detect(img01, k, missing, cfg)
    classes = state.get("classes") if state else None
    regions = []
    if res.regions:
        step = patch_step(pixel_nm, k, cfg) if (state or {}).get("version", 1) >= 2 else 1.0
        patches, ang = defect_patches(res, cfg, step)
        got = classify_patches(classes, patches) if classes is not None else None
        for i, (r, a) in enumerate(zip(res.regions, ang)):
            region = {"id": r["id"], "x": r["x"], "y": r["y"], "bbox": r["bbox"],
                      "area_px": r["area_px"], "score": r["score"], "class": None, "probability": None,
                      "row_angle_deg": float(np.degrees(a))}
            if got is not None:
                c, typ = int(got["label"][i]), float(got["typicality"][i])
                region["class"] = c
                # an unknown defect has no class probability: its typicality says how unlike
                # every class it is, and the nearest class is kept for who wants it
                region["probability"] = None if c < 0 else float(got["nearest_probability"][i])
                region["typicality"] = None if np.isnan(typ) else typ
                if c < 0:
                    region["nearest_class"] = int(got["nearest"][i])
            regions.append(region)
    if regions and classes is not None:
        cls = np.array([-1] + [r["class"] for r in regions], np.int64)
        class_map = cls[res.region_map]      # each region's pixels take its class
    else:
        class_map = np.full(res.mask.shape, -1, np.int64)
    band, labels = res.terraces.band, res.terraces.labels
    score, mask = res.score.astype(np.float32, copy=False), res.mask
    display = res.levelled            # the scan with each terrace levelled, for pictures
    del res   # the detector's other maps are no longer needed
    char_map = labels.astype(np.int64)
    char_map[band] = -1
    del band, labels
    if k < 1.0:   # back to the img01 grid
        shape = img01.shape
        char_map, class_map = _map_back(char_map, shape, 0), _map_back(class_map, shape, 0)
        score, mask = _map_back(score, shape, 1), _map_back(mask, shape, 0)
        display = _map_back(display, shape, 1)
        regions = [_region_back(r, k, shape) for r in regions]
    return Analysis(char_map, score, mask, regions, class_map, display)


def _region_back(r: dict, k: float, shape: tuple[int, int]) -> dict:
    x0, y0, x1, y1 = r["bbox"]
    h, w = shape
    return dict(r, x=(r["x"] + 0.5) / k - 0.5, y=(r["y"] + 0.5) / k - 0.5,
                bbox=[int(np.floor(x0 / k)), int(np.floor(y0 / k)),
                      min(w, int(np.ceil(x1 / k))), min(h, int(np.ceil(y1 / k)))],
                area_px=int(round(r["area_px"] / k ** 2)))

