"""Step edges, terraces and per-terrace levelling of an STM image (as Gwyddion's
"mark steps" + "level terraces"), as pure functions.

A monatomic step is a long, thin, high-gradient line; a defect is a compact blob.  Steps are
found with Canny on the image smoothed well beyond the lattice period, with hysteresis
thresholds in robust (MAD) units of the gradient magnitude, and only edge components whose
extent exceeds ``min_extent_px`` are kept.  The complement of a band around the edges is cut
into terraces; every pixel is then given the label of its nearest terrace.

Coordinates: rows (y) first, as numpy.  Inputs are never modified.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import canny
from skimage.measure import label, regionprops

__all__ = [
    "StepConfig",
    "Terraces",
    "detect_steps",
    "level_terraces",
    "remove_scars",
    "step_edges",
    "terrace_background",
    "terrace_labels",
]

_MAD = 1.4826


@dataclass(frozen=True)
class StepConfig:
    sigma: float = 2.5            # Gaussian smoothing of Canny (px), above the lattice period / 3
    high_k: float = 8.0           # hysteresis high threshold: median + high_k * MAD of |grad|
    low_k: float = 4.0            # hysteresis low threshold
    min_extent_px: int = 56       # keep edge components whose bbox side reaches this (steps are long)
    band_radius: int = 4          # half width of the step band excluded from terraces / scoring
    min_terrace_px: int = 400     # smaller pieces are absorbed by the nearest terrace
    scar_k: float = 5.0           # scar pixels: |img - vertical median| > scar_k * robust std
    scar_min_length: int = 8      # ... in horizontal runs at least this long (0 disables)


@dataclass
class Terraces:
    edges: np.ndarray    # (H, W) bool, thin step lines
    band: np.ndarray     # (H, W) bool, pixels within band_radius of a step line
    labels: np.ndarray   # (H, W) int32, terrace 0..n-1 of every pixel (nearest terrace in the band)
    n: int


def _robust(x: np.ndarray) -> tuple[float, float]:
    med = float(np.median(x))
    return med, float(_MAD * np.median(np.abs(x - med))) + 1e-12


def remove_scars(img: np.ndarray, k: float = 5.0, min_length: int = 8) -> np.ndarray:
    """Replace 1-3-row horizontal streaks (fast-scan scars) by the vertical median of 7 rows.

    A pixel is a scar candidate when it departs from the median of its column over rows
    -3..+3 by more than ``k`` robust std; only horizontal runs of >= ``min_length`` candidates
    are replaced.  A median over 7 rows ignores a streak up to 3 rows thick and keeps
    monotone edges (steps) exactly.
    """
    a = np.asarray(img, dtype=np.float32)
    if not min_length:
        return a.copy()
    med = ndi.median_filter(a, size=(7, 1), mode="nearest")
    d = a - med
    _, s = _robust(d[::2, ::2])
    cand = np.abs(d) > k * s
    cand = ndi.binary_opening(cand, structure=np.ones((1, int(min_length)), bool))
    # grow one row up/down so the faint shoulder rows of a thick scar go too
    cand = ndi.binary_dilation(cand, structure=np.ones((3, 1), bool)) & (np.abs(d) > 0.5 * k * s)
    out = a.copy()
    out[cand] = med[cand]
    return out


def step_edges(img: np.ndarray, cfg: StepConfig = StepConfig()) -> np.ndarray:
    """Thin boolean step lines: long Canny edge components of the smoothed image."""
    a = np.asarray(img, dtype=np.float32)
    s = ndi.gaussian_filter(a, cfg.sigma)
    gm = np.hypot(ndi.sobel(s, 0), ndi.sobel(s, 1))
    med, mad = _robust(gm[::2, ::2])
    edges = canny(s, sigma=0, low_threshold=med + cfg.low_k * mad, high_threshold=med + cfg.high_k * mad)
    lab = label(edges, connectivity=2)
    keep = np.zeros(lab.max() + 1, bool)
    for r in regionprops(lab):
        y0, x0, y1, x1 = r.bbox
        if max(y1 - y0, x1 - x0) >= cfg.min_extent_px:
            keep[r.label] = True
    keep[0] = False
    return keep[lab]


def terrace_labels(edges: np.ndarray, cfg: StepConfig = StepConfig()) -> Terraces:
    """Terraces between the step lines; every pixel gets its nearest terrace's label."""
    edges = np.asarray(edges, bool)
    dist = ndi.distance_transform_edt(~edges) if edges.any() else np.full(edges.shape, np.inf)
    band = dist <= cfg.band_radius
    lab = label(~band, connectivity=1)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    big = np.flatnonzero(sizes >= cfg.min_terrace_px)
    if big.size == 0:
        return Terraces(edges, band, np.zeros(edges.shape, np.int32), 1)
    remap = np.full(sizes.size, -1, np.int64)
    remap[big] = np.arange(big.size)
    t = remap[lab]
    unknown = t < 0
    if unknown.any():
        _, (iy, ix) = ndi.distance_transform_edt(unknown, return_indices=True)
        t = t[iy, ix]
    return Terraces(edges, band, t.astype(np.int32), int(big.size))


def detect_steps(img: np.ndarray, cfg: StepConfig = StepConfig()) -> Terraces:
    return terrace_labels(step_edges(img, cfg), cfg)


def level_terraces(img: np.ndarray, terr: Terraces, order: int = 1, iterations: int = 2,
                   clip: float = 3.0) -> np.ndarray:
    """Subtract a robust plane (order 1) or offset (order 0) fitted on each terrace, band excluded."""
    a = np.asarray(img, dtype=np.float64)
    h, w = a.shape
    yy, xx = np.mgrid[0:h, 0:w]
    yy = yy / max(h - 1, 1) * 2 - 1
    xx = xx / max(w - 1, 1) * 2 - 1
    out = np.empty_like(a)
    for k in range(terr.n):
        sel = terr.labels == k
        fit = sel & ~terr.band
        if fit.sum() < 16:
            fit = sel
        z = a[fit]
        A = np.stack([np.ones_like(z), xx[fit], yy[fit]], 1) if order >= 1 else np.ones((z.size, 1))
        ok = np.ones(z.size, bool)
        coef = None
        for _ in range(iterations + 1):
            coef = np.linalg.lstsq(A[ok], z[ok], rcond=None)[0]
            r = z - A @ coef
            med, s = _robust(r[ok])
            new = np.abs(r - med) <= clip * s
            if new.sum() < A.shape[1] * 4:
                break
            ok = new
        B = np.stack([np.ones(sel.sum()), xx[sel], yy[sel]], 1) if order >= 1 else np.ones((sel.sum(), 1))
        out[sel] = a[sel] - B @ coef
    return out.astype(np.float32)


def terrace_background(img: np.ndarray, terr: Terraces, sigma: float, weight=None) -> np.ndarray:
    """Local mean of each terrace (normalised convolution of width ``sigma``), never mixing
    terraces or step-band pixels.  ``weight`` (H, W) in [0, 1] down-weights pixels (defects)."""
    a = np.asarray(img, dtype=np.float32)
    base = (~terr.band).astype(np.float32)
    if weight is not None:
        base = base * np.asarray(weight, np.float32)
    out = np.zeros_like(a)
    glob = float(np.sum(a * base) / max(base.sum(), 1e-6))
    for k in range(terr.n):
        sel = terr.labels == k
        m = base * sel
        num = ndi.gaussian_filter(a * m, sigma, mode="nearest")
        den = ndi.gaussian_filter(m, sigma, mode="nearest")
        val = np.where(den > 1e-3, num / np.maximum(den, 1e-6), glob)
        out[sel] = val[sel]
    return out
