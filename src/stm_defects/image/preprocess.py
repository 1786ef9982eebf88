"""STM image preprocessing: background levelling, scan-line fixes, resampling, normalisation.

Follows the usual Gwyddion / SPIEPy workflow. All functions are pure: they take an
(H, W) image, never modify it, and return a new float32 array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.transform import rescale

from stm_defects.image.robust import robust_location_scale, robust_sigma

_MIN_SIZE = 8

#: The largest image (in pixels) a resampling may produce; a float64 copy of it takes 512 MiB.
MAX_RESAMPLED_PIXELS = 8192 * 8192


class ResampleError(ValueError):
    """Resampling to the target pixel size would give an unusable image (too small or too big).

    Raised before anything is allocated; the message says what the resampling would give.
    """


@dataclass(frozen=True)
class PreprocessConfig:
    plane_order: int = 1  # 0 none, 1 plane, 2 quadratic polynomial background
    plane_iterations: int = 3  # masked refits excluding outliers (defects, adsorbates, steps)
    plane_clip_sigma: float = 2.5
    align_rows: bool = True  # Gwyddion "median of differences" row alignment
    remove_scars: bool = False  # Gwyddion-like scar (streak) removal
    scar_threshold: float = 4.0  # in robust std of the departure from the 7-row column median
    scar_min_length: int = 8
    clip_percentiles: tuple[float, float] = (0.5, 99.5)  # robust normalisation to [0, 1]
    target_pixel_nm: float | None = None  # resample to this pixel size when known

    def __post_init__(self):
        t = self.target_pixel_nm
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"target_pixel_nm must be a positive number of nm (or null), not {t!r}")
        if self.plane_order not in (0, 1, 2):
            raise ValueError(f"plane_order must be 0, 1 or 2, not {self.plane_order!r}")
        low, high = self.clip_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"clip_percentiles must be two percentiles, low < high, in [0, 100], "
                             f"not {list(self.clip_percentiles)}")


def _check_image(img) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {a.shape}")
    if a.shape[0] < _MIN_SIZE or a.shape[1] < _MIN_SIZE:
        raise ValueError(f"image must be at least {_MIN_SIZE}x{_MIN_SIZE}, got {a.shape}")
    return a


_robust_std = robust_sigma


def _poly_design(shape: tuple[int, int], order: int) -> np.ndarray:
    """Polynomial terms x^i y^j (i + j <= order) on coordinates scaled to [-1, 1]; (H*W, n_terms)."""
    return _design_rows(shape, order, 0, shape[0])


def _design_rows(shape: tuple[int, int], order: int, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` of the image of `_poly_design` (the same numbers), (n_pixels, n_terms)."""
    h, w = shape
    y = np.linspace(-1.0, 1.0, h)[r0:r1, None] * np.ones((1, w))  # (r1 - r0, W)
    x = np.ones((r1 - r0, 1)) * np.linspace(-1.0, 1.0, w)[None, :]  # (r1 - r0, W)
    terms = [x**i * y**j for d in range(order + 1) for j in range(d + 1) for i in [d - j]]
    return np.stack([t.ravel() for t in terms], axis=1)


_PLANE_BLOCK_PX = 1 << 16   # pixels per block of the design matrix (1.5 MiB for a plane)


def _plane_blocks(shape: tuple[int, int]):
    """Row ranges of about `_PLANE_BLOCK_PX` pixels, in a multiple of 8 rows (so every block but
    the last holds a multiple of 8 design rows)."""
    h, w = shape
    rows = max(8, _PLANE_BLOCK_PX // max(w, 1) // 8 * 8)
    for r0 in range(0, h, rows):
        yield r0, min(h, r0 + rows)


def _masked_design(shape: tuple[int, int], order: int, mask: np.ndarray | None) -> np.ndarray:
    """``_poly_design(shape, order)[mask]`` (all rows for None), built block by block."""
    w = shape[1]
    n = shape[0] * w if mask is None else int(np.count_nonzero(mask))
    out = np.empty((n, _n_terms(order)), np.float64)
    k = 0
    for r0, r1 in _plane_blocks(shape):
        A = _design_rows(shape, order, r0, r1)
        if mask is not None:
            A = A[mask[r0 * w:r1 * w]]
        out[k:k + len(A)] = A
        k += len(A)
    return out


def _plane_residual(z: np.ndarray, shape: tuple[int, int], order: int, coef: np.ndarray) -> np.ndarray:
    """``z - _poly_design(shape, order) @ coef``, computed block by block (float64, (H*W,))."""
    w = shape[1]
    out = np.empty(z.shape, np.float64)
    for r0, r1 in _plane_blocks(shape):
        np.subtract(z[r0 * w:r1 * w], _design_rows(shape, order, r0, r1) @ coef, out=out[r0 * w:r1 * w])
    return out


def level_plane(img, order: int = 1, iterations: int = 3, clip_sigma: float = 2.5) -> np.ndarray:
    """Subtract a polynomial background (order 0 none, 1 plane, 2 quadratic).

    The fit is iterated: after each fit, pixels whose |residual| exceeds
    ``clip_sigma`` robust standard deviations are excluded from the next fit, so
    defects, adsorbates and step edges do not bias the background.

    Memory: the (pixels x terms) design matrix is never held whole: each fit builds only the
    rows of the pixels it uses, and residuals are computed in blocks of rows.
    """
    a = _check_image(img)
    if order not in (0, 1, 2):
        raise ValueError(f"order must be 0, 1 or 2, got {order}")
    if order == 0:
        return a.astype(np.float32, copy=True)
    z = np.asarray(a, dtype=np.float64).ravel()  # (H*W,); a view when the image is float64
    mask = np.ones(z.shape, dtype=bool)
    # floor for the clipping scale, so a noise-free background does not exclude everything
    floor = 1e-9 * max(float(np.ptp(z)), np.finfo(np.float64).tiny)
    coef = np.linalg.lstsq(_masked_design(a.shape, order, None), z, rcond=None)[0]
    for _ in range(max(0, iterations)):
        resid = _plane_residual(z, a.shape, order, coef)
        rm = resid[mask]
        centre = float(np.median(rm))
        sigma = max(_robust_std(rm), floor)
        del rm
        np.subtract(resid, centre, out=resid)
        np.abs(resid, out=resid)
        new_mask = resid <= clip_sigma * sigma
        del resid
        if new_mask.sum() < 4 * _n_terms(order) or np.array_equal(new_mask, mask):
            break
        mask = new_mask
        coef = np.linalg.lstsq(_masked_design(a.shape, order, mask), z[mask], rcond=None)[0]
    return _plane_residual(z, a.shape, order, coef).reshape(a.shape).astype(np.float32)


def _n_terms(order: int) -> int:
    return (order + 1) * (order + 2) // 2


def align_rows(img) -> np.ndarray:
    """Scan-line alignment by median of differences between consecutive rows (cumulative)."""
    a = _check_image(img).astype(np.float64)
    steps = np.median(np.diff(a, axis=0), axis=1)  # (H-1,) offset of each row w.r.t. the previous
    offsets = np.concatenate([[0.0], np.cumsum(steps)])  # (H,)
    offsets -= np.median(offsets)  # keep the overall level
    return (a - offsets[:, None]).astype(np.float32)


def remove_scars(img, k: float = 5.0, min_length: int = 8) -> np.ndarray:
    """Replace 1-3-row horizontal streaks (fast-scan scars) by the vertical median of 7 rows.

    A pixel is a scar candidate when it departs from the median of its column over rows
    -3..+3 by more than ``k`` robust std; only horizontal runs of >= ``min_length`` candidates
    are replaced.  A 7-row median ignores a streak up to 3 rows thick and keeps monotone
    edges (steps) exactly.
    """
    a = np.asarray(img, dtype=np.float32)
    if not min_length:
        return a.copy()
    med = _column_median7(a)
    d = a - med
    s = robust_location_scale(d[::2, ::2])[1]
    np.abs(d, out=d)
    cand = d > k * s
    cand = ndimage.binary_opening(cand, structure=np.ones((1, int(min_length)), bool))
    if not cand.any():
        return a.copy()
    # one row up/down too, so the faint shoulder rows of a thick scar go as well
    cand = ndimage.binary_dilation(cand, structure=np.ones((3, 1), bool)) & (d > 0.5 * k * s)
    del d
    out = a.copy()
    out[cand] = med[cand]
    return out


def _column_median7(a: np.ndarray, block: int = 256) -> np.ndarray:
    """Median of each pixel's column over rows -3..+3 (edge rows repeated), in row blocks."""
    h = a.shape[0]
    med = np.empty_like(a)
    for r0 in range(0, h, block):
        r1 = min(h, r0 + block)
        rows = np.clip(np.arange(r0 - 3, r1 + 3), 0, h - 1)
        p = a[rows]
        stack = np.stack([p[i:i + r1 - r0] for i in range(7)])
        med[r0:r1] = np.partition(stack, 3, axis=0)[3]
    return med


def normalize(img, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to the [low, high] percentiles and scale to [0, 1] (float32). Constant image -> zeros."""
    a = np.asarray(img, dtype=np.float64)
    lo, hi = np.percentile(a, [low, high])
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.float32)
    out = np.clip(a, lo, hi)
    out -= lo
    out /= hi - lo
    return out.astype(np.float32)


def resampled_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """The (H, W) that `rescale_by` gives an image of ``shape`` for ``scale``."""
    return tuple(max(1, round(n * scale)) for n in shape[:2])


def resample_error(shape: tuple[int, int], pixel_nm: float | None, target_pixel_nm: float | None,
                   min_side: int = _MIN_SIZE) -> str | None:
    """Why resampling an image of ``shape`` from ``pixel_nm`` to ``target_pixel_nm`` is refused.

    None when it is fine (or nothing is resampled: a pixel size is None). Refused: a pixel size
    that is not a finite positive number, a result with a side under ``min_side`` pixels (a
    scan shrunk to a few pixels has no defects to find), or one of more than
    `MAX_RESAMPLED_PIXELS` pixels.
    """
    if pixel_nm is None or target_pixel_nm is None:
        return None
    for name, v in (("the scan's pixel size", pixel_nm), ("preprocess.target_pixel_nm", target_pixel_nm)):
        try:
            number = float(v)
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            return f"{name} must be a positive number of nm, not {v!r}"
    scale = float(pixel_nm) / float(target_pixel_nm)
    rows, cols = resampled_shape(shape, scale)
    what = (f"resampling the {shape[0]}x{shape[1]} px image from {pixel_nm:.4g} to {target_pixel_nm:.4g} "
            f"nm/px (preprocess.target_pixel_nm) would give {rows}x{cols} px")
    if min(rows, cols) < min_side:
        return f"{what}, fewer than {min_side} per side; is the pixel size right?"
    if rows * cols > MAX_RESAMPLED_PIXELS:
        return f"{what}, more than {MAX_RESAMPLED_PIXELS} pixels; is the pixel size right?"
    return None


def resample(img, pixel_nm: float | None, target_pixel_nm: float | None,
             min_side: int = _MIN_SIZE) -> tuple[np.ndarray, float]:
    """Resample to ``target_pixel_nm``; returns (image, scale = pixel_nm / target_pixel_nm).

    When either pixel size is None (or they are equal) the input is returned
    unchanged (as float32) with scale 1.0. Raises `ResampleError` (see `resample_error`)
    before allocating when the result would be unusable.
    """
    a = np.asarray(img)
    why = resample_error(a.shape, pixel_nm, target_pixel_nm, min_side)
    if why:
        raise ResampleError(why)
    if pixel_nm is None or target_pixel_nm is None:
        return a.astype(np.float32, copy=False), 1.0
    scale = float(pixel_nm) / float(target_pixel_nm)
    if scale == 1.0:
        return a.astype(np.float32, copy=False), 1.0
    return rescale_by(a, scale), scale


def rescale_by(img, scale: float) -> np.ndarray:
    """The image resampled by ``scale`` (bilinear; anti-aliased when shrinking), as float32."""
    out = rescale(
        np.asarray(img).astype(np.float64),
        scale,
        order=1,
        mode="reflect",
        anti_aliasing=scale < 1.0,
        preserve_range=True,
    )
    return out.astype(np.float32)


def preprocess(
    img, pixel_nm: float | None, cfg: PreprocessConfig = PreprocessConfig(), min_side: int = _MIN_SIZE
) -> tuple[np.ndarray, float]:
    """level -> align rows -> remove scars -> resample -> normalise.

    Returns (img01 float32 in [0, 1], scale); original coordinates = resampled / scale.
    Raises `ResampleError` up front when resampling to ``cfg.target_pixel_nm`` would give a
    side under ``min_side`` pixels or an absurdly large image (`resample_error`).
    """
    a = _check_image(img)
    why = resample_error(a.shape, pixel_nm, cfg.target_pixel_nm, min_side)
    if why:
        raise ResampleError(why)
    out = level_plane(a, cfg.plane_order, cfg.plane_iterations, cfg.plane_clip_sigma)
    if cfg.align_rows:
        out = align_rows(out)
    if cfg.remove_scars:
        out = remove_scars(out, cfg.scar_threshold, cfg.scar_min_length)
    out, scale = resample(out, pixel_nm, cfg.target_pixel_nm, min_side)
    low, high = cfg.clip_percentiles
    return normalize(out, low, high), scale
