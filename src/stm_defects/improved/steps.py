"""Step edges, terraces and per-terrace levelling of an STM image (as Gwyddion's
"mark steps" + "level terraces"), as pure functions.

A monatomic step is a long, thin, high-gradient line; a defect is a compact blob.  Steps are
found with Canny on the image smoothed beyond the lattice period, with hysteresis thresholds
in robust (MAD) units of the gradient magnitude; only edge components whose extent reaches
``min_extent_px`` are kept.  The complement of a band around the lines is cut into terraces
(slivers between two lines become band).  `refine_terraces` then moves the band to where the
height really changes: near a line, every pixel goes to the adjacent terrace whose local level
it matches, and pixels half-way between two levels form the band.

Coordinates: rows (y) first, as numpy.  Inputs are never modified.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import canny
from skimage.measure import label

from stm_defects.image.filters import gaussian
from stm_defects.image.robust import median, robust_location_scale

__all__ = [
    "StepConfig",
    "Terraces",
    "detect_steps",
    "fill_from_nearest",
    "level_terraces",
    "masked_smooth",
    "refine_terraces",
    "step_edges",
    "step_profile",
    "terrace_background",
    "terrace_labels",
]



@dataclass(frozen=True)
class StepConfig:
    sigma: float = 2.5            # Gaussian smoothing of Canny (px), above the lattice period / 3
    high_k: float = 8.0           # hysteresis high threshold: median + high_k * MAD of |grad|
    low_k: float = 4.0            # hysteresis low threshold
    min_extent_px: int = 56       # keep edge components whose bbox side reaches this (steps are long)
    band_radius: int = 4          # half width of the first step band
    min_terrace_px: int = 400     # smaller pieces between step lines are band
    min_band_px: float = 2.0      # pixels this close to a step line are always band
    refine_px: int = 7            # refine_terraces works this close to a step line (0: off)
    refine_sigma: float = 1.5     # smoothing of the height compared with the terrace levels
    refine_frac: float = 0.2      # band where the height is this far (x local step) from both levels
    scar_k: float = 5.0           # scar pixels: |img - vertical median| > scar_k * robust std
    scar_min_length: int = 8      # ... in horizontal runs at least this long (0 disables)


@dataclass
class Terraces:
    edges: np.ndarray    # (H, W) bool, thin step lines
    band: np.ndarray     # (H, W) bool, step pixels (belong to no terrace for fitting / scoring)
    labels: np.ndarray   # (H, W) int32, terrace 0..n-1 of every pixel (nearest terrace in the band)
    n: int
    dist: np.ndarray     # (H, W) float32 distance to the nearest step-line pixel (inf: no steps)
    nearest: tuple       # (iy, ix) of that pixel (int16 when the sides allow, else int32), or
                         # None without steps


_robust = robust_location_scale

_BLOCK_ROWS = 256   # rows per block where an image-sized float64 temporary is worked in pieces


def _nearest_zero(mask: np.ndarray) -> np.ndarray:
    """(2, H, W) int32: (row, col) of the nearest False pixel of ``mask``, as
    `scipy.ndimage.distance_transform_edt` gives them (without its float64 distances)."""
    return ndi.distance_transform_edt(mask, return_distances=False, return_indices=True)


def _distances(ft: np.ndarray) -> np.ndarray:
    """(H, W) float32 Euclidean distance from each pixel to the pixel ``ft`` points to: the
    distances `scipy.ndimage.distance_transform_edt` computes (float64), worked in row blocks."""
    h, w = ft.shape[1:]
    out = np.empty((h, w), np.float32)
    cols = np.arange(w, dtype=ft.dtype)[None, :]
    for i0 in range(0, h, _BLOCK_ROWS):
        i1 = min(h, i0 + _BLOCK_ROWS)
        dy = (ft[0, i0:i1] - np.arange(i0, i1, dtype=ft.dtype)[:, None]).astype(np.float64)
        dx = (ft[1, i0:i1] - cols).astype(np.float64)
        np.multiply(dy, dy, dy)
        np.multiply(dx, dx, dx)
        dy += dx
        out[i0:i1] = np.sqrt(dy, out=dy)
    return out


def _compact_indices(ft: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(iy, ix) of a feature transform, as int16 when the image's sides allow (half the memory)."""
    if max(ft.shape[1:]) <= np.iinfo(np.int16).max:
        return ft[0].astype(np.int16), ft[1].astype(np.int16)
    return ft[0], ft[1]




def _sobel_magnitude_every_other(s: np.ndarray) -> np.ndarray:
    """``np.hypot(ndi.sobel(s, 0), ndi.sobel(s, 1))[::2, ::2]`` (same numbers), computed only at
    the pixels kept: the thresholds need a sample of the gradient, not all of it."""
    p = np.pad(s, 1, mode="symmetric")           # scipy's default "reflect" border
    h, w = s.shape
    rows, cols = slice(1, h + 1, 2), slice(1, w + 1, 2)

    def at(dr: int, dc: int) -> np.ndarray:      # p shifted by (dr, dc), at the kept pixels
        return p[rows.start + dr:rows.stop + dr:2, cols.start + dc:cols.stop + dc:2]

    # scipy's sobel: the [-1, 0, 1] derivative along the axis, then [1, 2, 1] across it
    d0 = at(1, -1) - at(-1, -1) + 2 * (at(1, 0) - at(-1, 0)) + at(1, 1) - at(-1, 1)
    d1 = at(-1, 1) - at(-1, -1) + 2 * (at(0, 1) - at(0, -1)) + at(1, 1) - at(1, -1)
    return np.hypot(d0, d1)


def step_edges(img: np.ndarray, cfg: StepConfig = StepConfig()) -> np.ndarray:
    """Thin boolean step lines: long Canny edge components of the smoothed image."""
    a = np.asarray(img, dtype=np.float32)
    s = gaussian(a, cfg.sigma)
    med, mad = _robust(_sobel_magnitude_every_other(s))
    edges = canny(s, sigma=0, low_threshold=med + cfg.low_k * mad, high_threshold=med + cfg.high_k * mad)
    lab = label(edges, connectivity=2)
    keep = np.zeros(lab.max() + 1, bool)
    for i, (ys, xs) in enumerate(ndi.find_objects(lab), start=1):   # each component's bbox
        keep[i] = max(ys.stop - ys.start, xs.stop - xs.start) >= cfg.min_extent_px
    return keep[lab]


def terrace_labels(edges: np.ndarray, cfg: StepConfig = StepConfig()) -> Terraces:
    """Terraces between the step lines; every pixel gets its nearest terrace's label."""
    edges = np.asarray(edges, bool)
    if not edges.any():
        z = np.zeros(edges.shape, bool)
        return Terraces(edges, z, np.zeros(edges.shape, np.int32), 1,
                        np.full(edges.shape, np.inf, np.float32), None)
    ft = _nearest_zero(~edges)
    dist = _distances(ft)
    nearest = _compact_indices(ft)
    del ft
    band = dist <= cfg.band_radius
    lab = label(~band, connectivity=1)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    big = np.flatnonzero(sizes >= cfg.min_terrace_px)
    if big.size == 0:
        return Terraces(edges, band, np.zeros(edges.shape, np.int32), 1, dist, nearest)
    remap = np.full(sizes.size, -1, np.int32)
    remap[big] = np.arange(big.size)
    t = remap[lab]
    unknown = t < 0
    band = band | (unknown & (lab > 0))   # slivers between step lines are step, not terrace
    del lab
    if unknown.any():
        t = fill_from_nearest(t, unknown)
    return Terraces(edges, band, t, int(big.size), dist, nearest)


def fill_from_nearest(values: np.ndarray, unknown: np.ndarray) -> np.ndarray:
    """``values`` with each ``unknown`` pixel given the value of its nearest known pixel
    (Euclidean; a pixel equally near two takes either).

    The nearest known pixel of an unknown one always has an unknown 4-neighbour (else its
    neighbour towards the unknown pixel would be known and nearer), so a k-d tree over those
    border pixels answers for the unknown ones: the cost goes with the step band, where a
    whole-image distance transform goes with the scan."""
    from scipy.spatial import cKDTree

    unknown = np.asarray(unknown, bool)
    border = np.zeros_like(unknown)
    border[1:] |= unknown[:-1]
    border[:-1] |= unknown[1:]
    border[:, 1:] |= unknown[:, :-1]
    border[:, :-1] |= unknown[:, 1:]
    border &= ~unknown
    by, bx = np.nonzero(border)
    out = values.copy()
    if not by.size:               # nothing known: nothing to take from
        return out
    uy, ux = np.nonzero(unknown)
    _, idx = cKDTree(np.column_stack([by, bx])).query(np.column_stack([uy, ux]))
    out[uy, ux] = values[by[idx], bx[idx]]
    return out


def masked_smooth(a: np.ndarray, m: np.ndarray, sigma: float, factor: int = 4
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(Gaussian of a*m, Gaussian of m) at width ``sigma``, computed on a grid ``factor`` times
    coarser and interpolated back (the results are smooth on that scale)."""
    a = np.asarray(a, np.float32)
    m = np.asarray(m, np.float32)
    f = int(factor) if sigma >= 2 * factor else 1
    if f == 1:
        return ndi.gaussian_filter(a * m, sigma), ndi.gaussian_filter(m, sigma)
    h, w = a.shape
    H, W = -(-h // f) * f, -(-w // f) * f
    am = np.zeros((H, W), np.float32)
    np.multiply(a, m, out=am[:h, :w])
    am = _block_mean(am, f)
    mm = np.zeros((H, W), np.float32)
    mm[:h, :w] = m
    mm = _block_mean(mm, f)
    s = max(float(np.sqrt(max(sigma ** 2 - (f ** 2 - 1) / 12.0, 0.25))) / f, 0.5)
    am = ndi.gaussian_filter(am, s, mode="nearest")
    mm = ndi.gaussian_filter(mm, s, mode="nearest")
    return upsample_linear(am, f, (h, w)), upsample_linear(mm, f, (h, w))


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Mean of each f x f block of ``a`` (sides multiples of f), by adding strided slices: the
    same means as ``a.reshape(H // f, f, W // f, f).mean(axis=(1, 3))`` to float32 rounding,
    an order of magnitude faster."""
    cols = a[:, 0::f].copy()
    for j in range(1, f):
        cols += a[:, j::f]
    out = cols[0::f].copy()
    for i in range(1, f):
        out += cols[i::f]
    out *= np.float32(1.0 / (f * f))
    return out


def upsample_linear(a: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """``scipy.ndimage.zoom(a, f, order=1, mode="nearest", grid_mode=True)[:h, :w]`` (to float32
    rounding), computed separably with strided slices: the zoom's spline machinery was the
    slowest step of the terrace backgrounds.

    Output pixel o sits at input coordinate (o + 0.5) / f - 0.5 = i + t for o = f i + q, so
    each phase q is a fixed blend of input pixel i and its neighbour on the side of t; edge
    values are held beyond the first and last centres."""
    a = np.asarray(a, np.float32)
    h, w = shape
    offsets = [(q + 0.5) / f - 0.5 for q in range(f)]
    p = np.pad(a, 1, mode="edge")                             # p[i + 1, j + 1] = a[i, j]
    rows = np.empty((a.shape[0] * f, a.shape[1] + 2), np.float32)
    for q, t in enumerate(offsets):
        near, other = p[1:-1], (p[:-2] if t < 0 else p[2:])
        rows[q::f] = near + np.float32(abs(t)) * (other - near)
    rows = rows[:h]
    out = np.empty((h, a.shape[1] * f), np.float32)
    for q, t in enumerate(offsets):
        near, other = rows[:, 1:-1], (rows[:, :-2] if t < 0 else rows[:, 2:])
        out[:, q::f] = near + np.float32(abs(t)) * (other - near)
    return np.ascontiguousarray(out[:, :w])


def _terrace_base(terr: Terraces, weight=None) -> np.ndarray:
    base = (~terr.band).astype(np.float32)
    if weight is not None:
        base *= np.asarray(weight, np.float32)
    return base


def _iter_levels(img: np.ndarray, terr: Terraces, sigma: float, weight=None):
    """Per terrace k, one at a time: (k, local mean level of terrace k extrapolated everywhere,
    its support); a generator, so only one terrace's maps are alive at once."""
    base = _terrace_base(terr, weight)
    for k in range(terr.n):
        m = terr.labels == k
        m = np.multiply(base, m, dtype=np.float32)
        num, den = masked_smooth(img, m, sigma)
        del m
        lvl = np.maximum(den, 1e-6)
        np.divide(num, lvl, out=lvl)
        del num
        yield k, lvl, den


def terrace_levels(img: np.ndarray, terr: Terraces, sigma: float, weight=None):
    """Per terrace k: (local mean level of terrace k extrapolated everywhere, its support)."""
    levels, supports = [], []
    for _, lvl, den in _iter_levels(img, terr, sigma, weight):
        levels.append(lvl)
        supports.append(den)
    return levels, supports


def terrace_background(img: np.ndarray, terr: Terraces, sigma: float, weight=None) -> np.ndarray:
    """Local mean of each terrace (normalised convolution of width ``sigma``), never mixing
    terraces or step-band pixels.  ``weight`` (H, W) in [0, 1] down-weights pixels (defects)."""
    a = np.asarray(img, dtype=np.float32)
    if terr.n == 1:
        base = _terrace_base(terr, weight)
        num, den = masked_smooth(a, base, sigma)
        glob = float(np.sum(a * base) / max(base.sum(), 1e-6))
        del base
        out = np.maximum(den, 1e-6)
        np.divide(num, out, out=out)
        out[~(den > 1e-3)] = glob
        return out
    # each pixel takes the level of its own terrace, terrace by terrace
    out = np.zeros(a.shape, np.float32)
    sup = np.zeros(a.shape, np.float32)
    for k, lvl, den in _iter_levels(a, terr, sigma, weight):
        sel = terr.labels == k
        np.copyto(out, lvl, where=sel)
        np.copyto(sup, den, where=sel)
        del lvl, den, sel
    lost = ~(sup > 1e-3)          # pixels no terrace reaches take the scan's median level
    del sup
    if lost.any():
        out[lost] = float(median(a[~terr.band])) if (~terr.band).any() else 0.0
    return out


def refine_terraces(img: np.ndarray, terr: Terraces, cfg: StepConfig = StepConfig(),
                    sigma: float = 8.0) -> Terraces:
    """Move the step band onto the real height change: within ``refine_px`` of a step line,
    each pixel joins the nearby terrace whose local level its (lightly smoothed) height is
    closest to; pixels far from every nearby level (the slope of the step) become band."""
    if terr.n < 2 or not cfg.refine_px or terr.nearest is None:
        return terr
    a = np.asarray(img, np.float32)
    zone = terr.dist <= cfg.refine_px
    lv = np.empty((terr.n, int(zone.sum())), np.float32)     # (n, Z)
    sp = np.empty_like(lv)
    for k, lvl, den in _iter_levels(a, terr, sigma):        # one terrace's maps at a time
        lv[k], sp[k] = lvl[zone], den[zone]
        del lvl, den
    s = gaussian(a, cfg.refine_sigma)[zone]
    ok = sp > 0.02                                           # terraces near enough to compare
    del sp
    d = np.where(ok, np.abs(lv - s[None]), np.inf)
    best = np.argmin(d, axis=0)
    dmin = d[best, np.arange(best.size)]
    lv_ok = np.where(ok, lv, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # a pixel with no terrace near: NaN
        span = np.nanmax(lv_ok, axis=0) - np.nanmin(lv_ok, axis=0)
    span = np.nan_to_num(span, nan=0.0)
    amb = (dmin > cfg.refine_frac * span) | ~np.isfinite(dmin) | (ok.sum(0) < 2) & (terr.dist[zone] <= 1.5)
    labels = terr.labels.copy()
    band = terr.band.copy()
    labels[zone] = np.where(np.isfinite(dmin), best, labels[zone])
    band[zone] = amb | (terr.dist[zone] <= cfg.min_band_px)
    return Terraces(terr.edges, band, labels.astype(np.int32), terr.n, terr.dist, terr.nearest)


def detect_steps(img: np.ndarray, cfg: StepConfig = StepConfig()) -> Terraces:
    terr = terrace_labels(step_edges(img, cfg), cfg)
    return refine_terraces(img, terr, cfg)


def level_terraces(img: np.ndarray, terr: Terraces, order: int = 1, iterations: int = 2,
                   clip: float = 3.0, subsample: int = 3) -> np.ndarray:
    """Subtract a robust plane (order 1) or offset (order 0) fitted on each terrace, band
    excluded (Gwyddion-style terrace levelling); fits use every ``subsample``-th pixel."""
    a = np.asarray(img, dtype=np.float32)
    h, w = a.shape
    # coordinates in [-1, 1], as a column and a row (the same float32 numbers as full grids)
    yv = np.arange(h).astype(np.float32)[:, None] / max(h - 1, 1) * 2 - 1
    xv = np.arange(w).astype(np.float32)[None, :] / max(w - 1, 1) * 2 - 1
    # the fits see every subsample-th pixel: work on that grid (the same pixels, in the same order)
    ss = (slice(None, None, subsample), slice(None, None, subsample))
    xx, yy = np.broadcast_to(xv, (h, w))[ss], np.broadcast_to(yv, (h, w))[ss]
    a_s, lab_s, free_s = a[ss], terr.labels[ss], ~terr.band[ss]
    coefs = np.zeros((max(terr.n, 1), 3), np.float64)
    for k in range(terr.n):
        sel = lab_s == k
        fit = sel & free_s
        if fit.sum() < 16:
            fit = sel
        if fit.sum() < 4:
            continue
        z = a_s[fit].astype(np.float64)
        cols = [np.ones_like(z), xx[fit], yy[fit]] if order >= 1 else [np.ones_like(z)]
        A = np.stack(cols, 1)
        ok = np.ones(z.size, bool)
        coef = np.linalg.lstsq(A, z, rcond=None)[0]
        for _ in range(iterations):
            r = z - A @ coef
            med, s = _robust(r[ok])
            new = np.abs(r - med) <= clip * s
            if new.sum() < A.shape[1] * 4:
                break
            ok = new
            coef = np.linalg.lstsq(A[ok], z[ok], rcond=None)[0]
        coefs[k, :coef.size] = coef
    out = np.empty((h, w), np.float32)
    for i0 in range(0, h, _BLOCK_ROWS):   # the float64 plane of each pixel's terrace, in row blocks
        i1 = min(h, i0 + _BLOCK_ROWS)
        lab = terr.labels[i0:i1]
        plane = np.take(coefs[:, 0], lab)                 # c0 + c1 x + c2 y, in that order
        plane += np.take(coefs[:, 1], lab) * xv
        plane += np.take(coefs[:, 2], lab) * yv[i0:i1]
        np.subtract(a[i0:i1], plane, out=out[i0:i1])
    return out


def step_profile(resid: np.ndarray, terr: Terraces, weight=None, max_dist: int = 14,
                 tile: int = 32) -> np.ndarray:
    """What is left of the steps in a residual, as a function of the distance to the step line.

    The leftovers of a step vary across the step and barely along it, while a defect is
    compact.  Pixels within ``max_dist`` of a step line are binned by (tile of their nearest
    step pixel, terrace, distance rounded to 1 px); the weighted mean residual of each bin
    (defects down-weighted by ``weight``) is the step profile there.  Returns an (H, W) map,
    zero farther than ``max_dist`` from every step.
    """
    r = np.asarray(resid, dtype=np.float32)
    out = np.zeros_like(r)
    if terr.nearest is None or not terr.edges.any():
        return out
    iy, ix = terr.nearest
    near = (terr.dist <= max_dist) & ~terr.band
    h, w = r.shape
    nty, ntx = -(-h // tile), -(-w // tile)
    nd = max_dist + 1
    iy, ix = iy[near].astype(np.int64), ix[near].astype(np.int64)
    key = (((iy // tile) * ntx + ix // tile) * max(terr.n, 1) + terr.labels[near]) * nd \
        + np.rint(terr.dist[near]).astype(np.int64)
    wt = np.ones(key.size) if weight is None else np.asarray(weight, np.float64)[near]
    n_keys = nty * ntx * max(terr.n, 1) * nd
    num = np.bincount(key, weights=wt * r[near], minlength=n_keys)
    den = np.bincount(key, weights=wt, minlength=n_keys)
    prof = np.where(den >= 4.0, num / np.maximum(den, 1e-9), 0.0)
    out[near] = prof[key]
    return out
