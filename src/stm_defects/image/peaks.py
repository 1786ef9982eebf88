"""Local maxima of a score map, as `skimage.feature.peak_local_max` finds them, at a cost that
goes with the pixels above the threshold rather than with the scan.

    pk = local_peaks(score, min_distance=5, threshold=5.0)
    # == peak_local_max(score, min_distance=5, threshold_abs=5.0, exclude_border=False)

skimage runs a maximum filter over the whole image and then keeps the pixels above the
threshold; a detector's score is above it on a few per cent of the pixels at most, so here the
filter's window is looked at only around those. The rest is skimage's rule: a pixel is a peak
when it equals the maximum of the (2 min_distance + 1)^2 square around it (the border held as
its nearest pixel) and exceeds the threshold; peaks are taken strongest first (ties in raster
order) and a peak closer than ``min_distance`` (Chebyshev) to one already taken is dropped; a
constant image has no peak. Where the window approach would not pay (many pixels above the
threshold), the image holds NaN or is one pixel, skimage's own function answers.
"""

from __future__ import annotations

import numpy as np

__all__ = ["local_peaks"]

_MAX_WINDOW_VALUES = 1 << 23   # window values looked at before skimage's whole-image filter pays


def local_peaks(image: np.ndarray, min_distance: int, threshold: float) -> np.ndarray:
    """(N, 2) intp (row, col) of the peaks, strongest first: ``peak_local_max(image,
    min_distance=min_distance, threshold_abs=threshold, exclude_border=False)``."""
    a = np.asarray(image)
    r = int(min_distance)
    side = 2 * r + 1
    cand = np.flatnonzero(a > threshold)
    if a.ndim != 2 or a.size == 1 or r < 1 or cand.size * side * side > _MAX_WINDOW_VALUES or np.isnan(a).any():
        from skimage.feature import peak_local_max

        return peak_local_max(a, min_distance=r, threshold_abs=threshold, exclude_border=False)
    if not cand.size or a.min() == a.max():   # nothing above it, or a constant image
        return np.zeros((0, 2), np.intp)
    ys, xs = np.divmod(cand, a.shape[1])
    # the window around each candidate, the border held as its nearest pixel (whose value is
    # in the window already, so padding with the lowest value gives the same maximum)
    low = np.finfo(a.dtype).min if a.dtype.kind == "f" else np.iinfo(a.dtype).min
    padded = np.pad(a, r, mode="constant", constant_values=low)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (side, side))
    is_peak = np.empty(cand.size, bool)
    for i0 in range(0, cand.size, 4096):           # window values in pieces of 4096 candidates
        sl = slice(i0, i0 + 4096)
        is_peak[sl] = a[ys[sl], xs[sl]] == windows[ys[sl], xs[sl]].max(axis=(1, 2))
    coord = np.column_stack([ys[is_peak], xs[is_peak]]).astype(np.intp)
    coord = coord[np.argsort(-a[coord[:, 0], coord[:, 1]], kind="stable")]
    if r > 1 and len(coord) > 1:
        coord = coord[_spaced(coord, r)]
    return coord


def _spaced(coord: np.ndarray, spacing: int) -> np.ndarray:
    """Indices (in order) of the points kept when each point, in order, drops the later ones
    closer than ``spacing`` (Chebyshev) to it, unless it was dropped itself."""
    from scipy.spatial import cKDTree

    # integer coordinates: closer than spacing is at most spacing - 1 away
    near = cKDTree(coord).query_ball_point(coord, r=spacing - 0.5, p=np.inf)
    dropped = np.zeros(len(coord), bool)
    kept = []
    for i, others in enumerate(near):
        if dropped[i]:
            continue
        kept.append(i)
        dropped[others] = True
    return np.asarray(kept, np.intp)
