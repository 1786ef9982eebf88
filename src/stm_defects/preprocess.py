"""STM image preprocessing: background levelling, scan-line fixes, resampling, normalisation.

Follows the usual Gwyddion / SPIEPy workflow. All functions are pure: they take an
(H, W) image, never modify it, and return a new float32 array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.transform import rescale

_MAD_TO_STD = 1.4826  # robust std = 1.4826 * median absolute deviation (Gaussian noise)
_MIN_SIZE = 8


@dataclass(frozen=True)
class PreprocessConfig:
    plane_order: int = 1  # 0 none, 1 plane, 2 quadratic polynomial background
    plane_iterations: int = 3  # masked refits excluding outliers (defects, adsorbates, steps)
    plane_clip_sigma: float = 2.5
    align_rows: bool = True  # Gwyddion "median of differences" row alignment
    remove_scars: bool = False  # Gwyddion-like scar (streak) removal
    scar_threshold: float = 4.0  # in robust std of the row-to-row difference
    scar_min_length: int = 8
    clip_percentiles: tuple[float, float] = (0.5, 99.5)  # robust normalisation to [0, 1]
    target_pixel_nm: float | None = None  # resample to this pixel size when known


def _check_image(img) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {a.shape}")
    if a.shape[0] < _MIN_SIZE or a.shape[1] < _MIN_SIZE:
        raise ValueError(f"image must be at least {_MIN_SIZE}x{_MIN_SIZE}, got {a.shape}")
    return a


def _robust_std(x: np.ndarray) -> float:
    return float(_MAD_TO_STD * np.median(np.abs(x - np.median(x))))


def _poly_design(shape: tuple[int, int], order: int) -> np.ndarray:
    """Polynomial terms x^i y^j (i + j <= order) on coordinates scaled to [-1, 1]; (H*W, n_terms)."""
    h, w = shape
    y = np.linspace(-1.0, 1.0, h)[:, None] * np.ones((1, w))  # (H, W)
    x = np.ones((h, 1)) * np.linspace(-1.0, 1.0, w)[None, :]  # (H, W)
    terms = [x**i * y**j for d in range(order + 1) for j in range(d + 1) for i in [d - j]]
    return np.stack([t.ravel() for t in terms], axis=1)


def level_plane(img, order: int = 1, iterations: int = 3, clip_sigma: float = 2.5) -> np.ndarray:
    """Subtract a polynomial background (order 0 none, 1 plane, 2 quadratic).

    The fit is iterated: after each fit, pixels whose |residual| exceeds
    ``clip_sigma`` robust standard deviations are excluded from the next fit, so
    defects, adsorbates and step edges do not bias the background.
    """
    a = _check_image(img)
    if order not in (0, 1, 2):
        raise ValueError(f"order must be 0, 1 or 2, got {order}")
    z = a.astype(np.float64).ravel()  # (H*W,)
    if order == 0:
        return a.astype(np.float32, copy=True)
    A = _poly_design(a.shape, order)  # (H*W, n_terms)
    mask = np.ones(z.shape, dtype=bool)
    # floor for the clipping scale, so a noise-free background does not exclude everything
    floor = 1e-9 * max(float(np.ptp(z)), np.finfo(np.float64).tiny)
    coef = np.linalg.lstsq(A, z, rcond=None)[0]
    for _ in range(max(0, iterations)):
        resid = z - A @ coef
        centre = float(np.median(resid[mask]))
        sigma = max(_robust_std(resid[mask]), floor)
        new_mask = np.abs(resid - centre) <= clip_sigma * sigma
        if new_mask.sum() < 4 * A.shape[1] or np.array_equal(new_mask, mask):
            break
        mask = new_mask
        coef = np.linalg.lstsq(A[mask], z[mask], rcond=None)[0]
    return (z - A @ coef).reshape(a.shape).astype(np.float32)


def align_rows(img) -> np.ndarray:
    """Scan-line alignment by median of differences between consecutive rows (cumulative)."""
    a = _check_image(img).astype(np.float64)
    steps = np.median(np.diff(a, axis=0), axis=1)  # (H-1,) offset of each row w.r.t. the previous
    offsets = np.concatenate([[0.0], np.cumsum(steps)])  # (H,)
    offsets -= np.median(offsets)  # keep the overall level
    return (a - offsets[:, None]).astype(np.float32)


def remove_scars(img, threshold: float = 4.0, min_length: int = 8) -> np.ndarray:
    """Replace scars (one-row streaks along the fast-scan axis) by the mean of the rows above and below.

    A pixel is a scar candidate when it differs from both vertical neighbours with
    the same sign by more than ``threshold`` robust std of the row-to-row difference;
    only horizontal runs of at least ``min_length`` candidates are replaced.
    The first and last rows (one neighbour only) are left as they are.
    """
    a = _check_image(img).astype(np.float64)
    sigma = _robust_std(np.diff(a, axis=0))
    up = a[1:-1] - a[:-2]  # (H-2, W) difference to the row above
    down = a[1:-1] - a[2:]  # (H-2, W) difference to the row below
    thr = threshold * sigma
    cand = (np.sign(up) == np.sign(down)) & (np.minimum(np.abs(up), np.abs(down)) > thr)
    if min_length > 1:
        # opening with a horizontal line keeps exactly the runs of length >= min_length
        cand = ndimage.binary_opening(cand, structure=np.ones((1, min_length), dtype=bool))
    out = a.copy()
    inner = out[1:-1]  # (H-2, W) view
    inner[cand] = 0.5 * (a[:-2] + a[2:])[cand]
    return out.astype(np.float32)


def normalize(img, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to the [low, high] percentiles and scale to [0, 1] (float32). Constant image -> zeros."""
    a = np.asarray(img, dtype=np.float64)
    lo, hi = np.percentile(a, [low, high])
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.float32)
    return ((np.clip(a, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def resample(img, pixel_nm: float | None, target_pixel_nm: float | None) -> tuple[np.ndarray, float]:
    """Resample to ``target_pixel_nm``; returns (image, scale = pixel_nm / target_pixel_nm).

    When either pixel size is None (or they are equal) the input is returned
    unchanged (as float32) with scale 1.0.
    """
    a = np.asarray(img)
    if pixel_nm is None or target_pixel_nm is None:
        return a.astype(np.float32, copy=False), 1.0
    if pixel_nm <= 0 or target_pixel_nm <= 0:
        raise ValueError("pixel sizes must be positive")
    scale = float(pixel_nm) / float(target_pixel_nm)
    if scale == 1.0:
        return a.astype(np.float32, copy=False), 1.0
    out = rescale(
        a.astype(np.float64),
        scale,
        order=1,
        mode="reflect",
        anti_aliasing=scale < 1.0,
        preserve_range=True,
    )
    return out.astype(np.float32), scale


def preprocess(
    img, pixel_nm: float | None, cfg: PreprocessConfig = PreprocessConfig()
) -> tuple[np.ndarray, float]:
    """level -> align rows -> remove scars -> resample -> normalise.

    Returns (img01 float32 in [0, 1], scale); original coordinates = resampled / scale.
    """
    a = _check_image(img)
    out = level_plane(a, cfg.plane_order, cfg.plane_iterations, cfg.plane_clip_sigma)
    if cfg.align_rows:
        out = align_rows(out)
    if cfg.remove_scars:
        out = remove_scars(out, cfg.scar_threshold, cfg.scar_min_length)
    out, scale = resample(out, pixel_nm, cfg.target_pixel_nm)
    low, high = cfg.clip_percentiles
    return normalize(out, low, high), scale
