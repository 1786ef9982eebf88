"""STM image preprocessing: background levelling, scan-line fixes, resampling, normalisation.

Follows the usual Gwyddion / SPIEPy workflow. All functions are pure: they take an
(H, W) image, never modify it, and return a new float32 array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from skimage.transform import rescale

from stm_defects.image.robust import (
    MAD_TO_SIGMA,
    median,
    median_rows,
    percentile,
    robust_location_scale,
    robust_sigma,
)

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
    h, w = shape
    y = np.linspace(-1.0, 1.0, h)[:, None] * np.ones((1, w))
    x = np.ones((h, 1)) * np.linspace(-1.0, 1.0, w)[None, :]
    return np.stack([(x**i * y**j).ravel() for i, j in _terms(order)], axis=1)


def _terms(order: int) -> list[tuple[int, int]]:
    """Exponents (i, j) of the terms x^i y^j of `_poly_design`, in its column order."""
    return [(d - j, j) for d in range(order + 1) for j in range(d + 1)]


_PLANE_BLOCK_PX = 1 << 16   # pixels per block of rows (float64 temporaries of 0.5 MiB)


def _plane_blocks(shape: tuple[int, int]):
    """Row ranges of about `_PLANE_BLOCK_PX` pixels."""
    h, w = shape
    rows = max(8, _PLANE_BLOCK_PX // max(w, 1))
    for r0 in range(0, h, rows):
        yield r0, min(h, r0 + rows)


def _powers(n: int, k: int) -> np.ndarray:
    """(n, k + 1): the coordinates of n pixels on [-1, 1] to the powers 0..k."""
    return np.linspace(-1.0, 1.0, n)[:, None] ** np.arange(k + 1)[None, :]


def _plane_fit(z: np.ndarray, order: int, mask: np.ndarray | None) -> np.ndarray:
    """Least-squares coefficients of `_poly_design` fitted to the pixels of ``z`` (H, W) in
    ``mask`` (None: all), by the normal equations.

    The design's columns are products x^i y^j, so its Gram matrix and right-hand side are sums
    of x^a y^b (times z) over the masked pixels: each block of rows is reduced along x by one
    matrix product and then along y. No (pixels x terms) design matrix is built; the
    coordinates lie in [-1, 1], so the normal equations are well conditioned."""
    h, w = z.shape
    X, Y = _powers(w, 2 * order), _powers(h, 2 * order)
    S = np.zeros((2 * order + 1, 2 * order + 1))          # S[a, b] = sum of x^a y^b
    T = np.zeros((order + 1, order + 1))                  # T[a, b] = sum of z x^a y^b
    for r0, r1 in _plane_blocks(z.shape):
        zb = z[r0:r1].astype(np.float64)
        if mask is None:
            S += np.outer(np.full(w, 1.0) @ X, Y[r0:r1].sum(0))
        else:
            m = mask[r0:r1].astype(np.float64)
            S += (m @ X).T @ Y[r0:r1]
            zb *= m
        T += (zb @ X[:, :order + 1]).T @ Y[r0:r1, :order + 1]
    t = _terms(order)
    A = np.array([[S[i + k, j + l] for k, l in t] for i, j in t])
    b = np.array([T[i, j] for i, j in t])
    return np.linalg.lstsq(A, b, rcond=None)[0]


def _plane_residual(z: np.ndarray, order: int, coef: np.ndarray) -> np.ndarray:
    """``z - polynomial(coef)`` (float64, (H, W)), row block by row block: each row's polynomial
    in x has coefficients that are polynomials in that row's y."""
    h, w = z.shape
    X, Y = _powers(w, order), _powers(h, order)
    C = np.zeros((order + 1, order + 1))                   # C[i, j]: coefficient of x^i y^j
    for (i, j), c in zip(_terms(order), coef):
        C[i, j] = c
    out = np.empty((h, w), np.float64)
    for r0, r1 in _plane_blocks(z.shape):
        rows = Y[r0:r1] @ C.T                              # (rows, order + 1): per-row x coefficients
        np.subtract(z[r0:r1], rows @ X.T, out=out[r0:r1])
    return out


def level_plane(img, order: int = 1, iterations: int = 3, clip_sigma: float = 2.5) -> np.ndarray:
    """Subtract a polynomial background (order 0 none, 1 plane, 2 quadratic).

    The fit is iterated: after each fit, pixels whose |residual| exceeds
    ``clip_sigma`` robust standard deviations are excluded from the next fit, so
    defects, adsorbates and step edges do not bias the background.

    Cost and memory: the fits reduce the image block by block to a few sums (`_plane_fit`), so
    no (pixels x terms) design matrix is held; one float64 residual image is the largest
    temporary. The clipping's centre and robust sigma are medians over a fixed random sample of
    `STATS_SAMPLES` pixels (every pixel of a small image; `stats_sample`), so their cost does not
    grow with the scan; the fits use every pixel.
    """
    a = _check_image(img)
    if order not in (0, 1, 2):
        raise ValueError(f"order must be 0, 1 or 2, got {order}")
    if order == 0:
        return a.astype(np.float32, copy=True)
    # floor for the clipping scale, so a noise-free background does not exclude everything
    floor = 1e-9 * max(float(np.ptp(a)), np.finfo(np.float64).tiny)
    mask = None
    coef = _plane_fit(a, order, mask)
    sample = stats_sample(a.shape)
    for _ in range(max(0, iterations)):
        resid = _plane_residual(a, order, coef)
        rs = resid.reshape(-1)[sample] if mask is None else resid.reshape(-1)[sample[mask.reshape(-1)[sample]]]
        centre = float(median(rs)) if rs.size else 0.0
        # robust sigma (1.4826 x MAD) about the centre just found: `robust_sigma` without
        # taking the median twice
        np.subtract(rs, centre, out=rs)
        np.abs(rs, out=rs)
        sigma = max(MAD_TO_SIGMA * float(median(rs)) if rs.size else 0.0, floor)
        del rs
        np.subtract(resid, centre, out=resid)
        np.abs(resid, out=resid)
        new_mask = resid <= clip_sigma * sigma
        del resid
        if new_mask.sum() < 4 * _n_terms(order) or (mask is not None and np.array_equal(new_mask, mask)) \
                or (mask is None and new_mask.all()):
            break
        mask = new_mask
        coef = _plane_fit(a, order, mask)
    return _plane_residual(a, order, coef).astype(np.float32)


STATS_SAMPLES = 1 << 16    # pixels a scan-wide robust statistic is taken over


def stats_sample(shape: tuple[int, int], samples: int = STATS_SAMPLES) -> np.ndarray:
    """Flat indices (sorted) of the pixels a scan-wide median is taken over: all of them for an
    image of at most ``samples`` pixels, else ``samples`` drawn at random (with replacement) by
    a fixed seed. Random, not every k-th row and column: a lattice whose period divides k would
    put every sample on the same lattice phase."""
    n = int(shape[0]) * int(shape[1])
    if n <= samples:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).integers(0, n, samples))


def _n_terms(order: int) -> int:
    return (order + 1) * (order + 2) // 2


def align_rows(img) -> np.ndarray:
    """Scan-line alignment by median of differences between consecutive rows (cumulative)."""
    a = _check_image(img).astype(np.float64)
    steps = median_rows(np.diff(a, axis=0))  # (H-1,) offset of each row w.r.t. the previous
    offsets = np.concatenate([[0.0], np.cumsum(steps)])  # (H,)
    offsets -= median(offsets)  # keep the overall level
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
    cand = horizontal_runs(cand, int(min_length))
    if not cand.any():
        return a.copy()
    # one row up/down too, so the faint shoulder rows of a thick scar go as well
    grown = cand.copy()
    grown[1:] |= cand[:-1]
    grown[:-1] |= cand[1:]
    cand = grown & (d > 0.5 * k * s)
    del d
    out = a.copy()
    out[cand] = med[cand]
    return out


def horizontal_runs(mask: np.ndarray, length: int) -> np.ndarray:
    """The pixels of ``mask`` in horizontal runs of at least ``length``: the binary opening by a
    1 x ``length`` line (``ndimage.binary_opening(mask, np.ones((1, length)))``), as ANDs and
    ORs of shifted rows, an order of magnitude faster than scipy's morphology."""
    m = np.asarray(mask, bool)
    w = m.shape[1]
    if length <= 1:
        return m.copy()
    out = np.zeros_like(m)
    if length > w:
        return out
    n = w - length + 1
    start = m[:, :n].copy()                  # start[:, j]: the run j .. j + length - 1 is all set
    for k in range(1, length):
        start &= m[:, k:k + n]
    for k in range(length):
        out[:, k:k + n] |= start
    return out


#: A selection network for the median of 7 (compare-exchange pairs; the median ends in slot 3),
#: as in N. Devillard's "Fast median search" (opt_med7): 13 elementwise min/max pairs.
_MEDIAN7_NETWORK = ((0, 5), (0, 3), (1, 6), (2, 4), (0, 1), (3, 5), (2, 6), (2, 3), (3, 6), (4, 5),
                    (1, 4), (1, 3), (3, 4))


def _column_median7(a: np.ndarray, block: int = 256) -> np.ndarray:
    """Median of each pixel's column over rows -3..+3 (edge rows repeated), in row blocks.

    A min/max selection network over the 7 shifted row blocks: the same numbers as
    ``np.partition(stack, 3, axis=0)[3]``, several times faster (whole-array min/max instead of a
    strided partition per pixel)."""
    h = a.shape[0]
    med = np.empty_like(a)
    for r0 in range(0, h, block):
        r1 = min(h, r0 + block)
        rows = np.clip(np.arange(r0 - 3, r1 + 3), 0, h - 1)
        p = a[rows]
        v = [p[i:i + r1 - r0].copy() for i in range(7)]
        for i, j in _MEDIAN7_NETWORK:
            lo = np.minimum(v[i], v[j])
            np.maximum(v[i], v[j], out=v[j])
            v[i] = lo
        med[r0:r1] = v[3]
    return med


def normalize(img, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to the [low, high] percentiles and scale to [0, 1] (float32). Constant image -> zeros."""
    return normalize_span(img, low, high)[0]


def normalize_span(img, low: float = 0.5, high: float = 99.5) -> tuple[np.ndarray, float]:
    """(`normalize`'s image, the height span it mapped onto [0, 1], in the input's units; 0 for a
    constant image): one unit of the result is that many nm of a calibrated scan."""
    a = np.asarray(img, dtype=np.float64)
    lo, hi = percentile(a, [low, high])
    return _normalized(a, lo, hi), float(hi - lo) if hi > lo else 0.0


def _normalized(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
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


def mask_on(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask on another grid of ``shape``: a pixel of the new grid is set when any part
    of it was (anti-aliased resize, any coverage above 1%), so a one-pixel line survives a
    coarser grid."""
    from skimage.transform import resize

    if mask.shape == tuple(shape):
        return mask
    return resize(mask.astype(np.float32), shape, order=1, mode="edge", anti_aliasing=True) > 0.01


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
    img, pixel_nm: float | None, cfg: PreprocessConfig = PreprocessConfig(), min_side: int = _MIN_SIZE,
    span_out: dict | None = None,
) -> tuple[np.ndarray, float]:
    """level -> align rows -> remove scars -> resample -> normalise.

    Returns (img01 float32 in [0, 1], scale); original coordinates = resampled / scale. A dict
    given as ``span_out`` gets ``z_span``: the heights (in the input's unit) that one unit of
    img01 stands for, so pictures can give heights in nm.
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
    img01, span = normalize_span(out, low, high)
    if span_out is not None:
        span_out["z_span"] = span
    return img01, scale
