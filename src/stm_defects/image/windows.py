"""Sliding windows over an image, with their origins, and aggregation of per-window results back to maps.

Origins are (N, 2) int arrays of (row, col) top-left corners; windows are square (size x size).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _axis_starts(n: int, size: int, step: int) -> np.ndarray:
    """Start positions along one axis: regular grid plus one flush with the end."""
    starts = np.arange(0, n - size + 1, step)
    if starts[-1] != n - size:
        starts = np.append(starts, n - size)
    return starts


def _check(shape, size: int) -> tuple[int, int]:
    h, w = (int(v) for v in shape[:2])
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} is smaller than the window size {size}")
    return h, w


def window_origins(shape, size: int, step: int) -> np.ndarray:
    """(N, 2) int64 top-left corners, row-major: a regular grid plus a last row/column flush with the border.

    Every pixel is covered when step <= size. Raises ValueError if the image is smaller than size.
    """
    h, w = _check(shape, size)
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    rr, cc = np.meshgrid(_axis_starts(h, size, step), _axis_starts(w, size, step), indexing="ij")
    return np.stack([rr.ravel(), cc.ravel()], axis=1).astype(np.int64)


def _gather(img: np.ndarray, origins: np.ndarray, size: int) -> np.ndarray:
    view = sliding_window_view(img, (size, size))  # (H-s+1, W-s+1, s, s), no copy
    return view[origins[:, 0], origins[:, 1]][:, None].astype(np.float32, copy=False)  # (N, 1, s, s)


def extract_windows(img, size: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """All windows of the grid from ``window_origins``: (patches (N, 1, s, s) float32, origins (N, 2))."""
    a = np.asarray(img)
    origins = window_origins(a.shape, size, step)
    return _gather(a, origins, size), origins


def windows_at(img, centres, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows centred on (row, col) ``centres`` (origin = centre - size // 2), shifted to lie inside the image.

    Returns (patches (N, 1, s, s) float32, origins (N, 2)).
    """
    a = np.asarray(img)
    h, w = _check(a.shape, size)
    c = np.round(np.asarray(centres, dtype=np.float64).reshape(-1, 2)).astype(np.int64)  # (N, 2)
    origins = c - size // 2
    origins[:, 0] = np.clip(origins[:, 0], 0, h - size)
    origins[:, 1] = np.clip(origins[:, 1], 0, w - size)
    return _gather(a, origins, size), origins


def _check_origins(origins, shape, size: int) -> np.ndarray:
    """(N, 2) int64 origins, verified to put every window inside the image."""
    h, w = _check(shape, size)
    org = np.asarray(origins).reshape(-1, 2).astype(np.int64)
    if len(org) and (org.min() < 0 or org[:, 0].max() > h - size or org[:, 1].max() > w - size):
        raise ValueError("origins put windows outside the image")
    return org


def _integrate(diff: np.ndarray) -> np.ndarray:
    """In-place 2-D prefix sum over the last two axes of (L, H+1, W+1); returns the (L, H, W) part."""
    for i in range(1, diff.shape[1]):  # row loop: much faster than numpy's strided cumsum over axis 1
        diff[:, i] += diff[:, i - 1]
    np.cumsum(diff, axis=2, out=diff)
    return diff[:, :-1, :-1]


def _box_sum(
    weights, origins: np.ndarray, shape, size: int, n_layers: int = 1, layer=None, dtype=np.float64
) -> np.ndarray:
    """Sum of ``weights`` spread uniformly over each window, via a 2-D difference array.

    weights (N,) or None (= ones), layer (N,) int in [0, n_layers) -> (n_layers, H, W).
    """
    h, w = shape
    r = origins[:, 0].astype(np.int64)
    c = origins[:, 1].astype(np.int64)
    base = r * (w + 1) + c
    if layer is not None:
        base = base + np.asarray(layer, np.int64) * ((h + 1) * (w + 1))
    idx = np.concatenate(
        [base, base + size, base + size * (w + 1), base + size * (w + 2)]
    )  # (4N,) box corners
    n = len(r)
    wts = np.ones(n, dtype) if weights is None else np.asarray(weights, dtype)
    diff = np.zeros(n_layers * (h + 1) * (w + 1), dtype)
    np.add.at(diff, idx, np.concatenate([wts, -wts, -wts, wts]))
    diff = diff.reshape(n_layers, h + 1, w + 1)  # (L, H+1, W+1)
    return _integrate(diff)


def vote_map(labels, origins, shape, size: int, n_labels: int) -> np.ndarray:
    """(H, W) int64 per-pixel majority label over the covering windows (ties -> smallest label); -1 uncovered."""
    h, w = (int(v) for v in shape[:2])
    lab = np.asarray(labels).astype(np.int64).ravel()  # (N,)
    org = _check_origins(origins, (h, w), size)
    if lab.size != len(org):
        raise ValueError(f"got {lab.size} labels for {len(org)} windows")
    if lab.size and (lab.min() < 0 or lab.max() >= n_labels):
        raise ValueError("labels must lie in [0, n_labels)")
    counts = _box_sum(None, org, (h, w), size, n_labels, lab, dtype=np.int32)  # (L, H, W)
    best = counts[0].copy()
    out = np.zeros((h, w), np.int64)
    for k in range(1, n_labels):  # strict '>' keeps the smallest label on ties
        better = counts[k] > best
        out[better] = k
        np.maximum(best, counts[k], out=best)
    out[best == 0] = -1  # a covered pixel has at least one vote
    return out


def _axis_classes(pos: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """Class of each position: rank among distinct positions modulo k, with same-class positions >= size apart."""
    u, inv = np.unique(pos, return_inverse=True)
    k = int((np.searchsorted(u, u + size) - np.arange(len(u))).max())
    return (np.arange(len(u)) % k)[inv], k


def _scatter_add(acc: np.ndarray, vals: np.ndarray, r: np.ndarray, c: np.ndarray, size: int) -> None:
    """acc (H, W) += per-pixel window values vals (n, s, s) at origins (r, c), for any origins.

    Windows are split into groups in which no two overlap, so a plain fancy-index
    add is exact; repeated origins go through ``np.add.at``.
    """
    if len(r) == 0:
        return
    w = acc.shape[1]
    flat = acc.reshape(-1)
    offs = (np.arange(size)[:, None] * w + np.arange(size)[None, :]).ravel()  # (s*s,)
    v = vals.reshape(len(r), size * size)  # (n, s*s)
    rc, kr = _axis_classes(r, size)
    cc, kc = _axis_classes(c, size)
    group = rc * kc + cc  # (n,)
    _, first = np.unique(r * (w + 1) + c, return_index=True)
    dup = np.ones(len(r), bool)
    dup[first] = False  # later copies of a repeated origin
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(kr * kc + 1))
    for g in range(kr * kc):
        sel = order[bounds[g] : bounds[g + 1]]
        sel = sel[~dup[sel]]
        if sel.size:
            flat[(r[sel] * w + c[sel])[:, None] + offs] += v[sel]  # (m, s*s) distinct targets
    if dup.any():
        d = np.flatnonzero(dup)
        np.add.at(flat, (r[d] * w + c[d])[:, None] + offs, v[d])


def _regular_prefix(u: np.ndarray) -> tuple[int, int]:
    """Length m and step t of the longest evenly spaced prefix of sorted distinct positions u."""
    if len(u) < 2:
        return len(u), 1
    d = np.diff(u)
    m = int(np.argmax(d != d[0])) + 1 if (d != d[0]).any() else len(d) + 1
    return m, int(d[0])


def _pixel_sum(values: np.ndarray, origins: np.ndarray, shape, size: int) -> np.ndarray:
    """(H, W) float64 sum of per-pixel window values (N, s, s).

    Fast path for grids (as from ``window_origins``): the evenly spaced part of the
    grid is split into phases of non-overlapping windows, each added through a
    writable strided view of the accumulator (no index arrays). Everything else
    goes through ``_scatter_add``.
    """
    h, w = shape
    acc = np.zeros((h, w), np.float64)
    r = origins[:, 0].astype(np.int64)
    c = origins[:, 1].astype(np.int64)
    ur, ir = np.unique(r, return_inverse=True)
    uc, ic = np.unique(c, return_inverse=True)
    pos = np.full((len(ur), len(uc)), -1, np.int64)  # window index at each grid node
    pos[ir, ic] = np.arange(len(r))
    if len(r) != pos.size or (pos < 0).any():  # not a full grid (or repeated origins)
        _scatter_add(acc, values, r, c, size)
        return acc
    mr, tr = _regular_prefix(ur)
    mc, tc = _regular_prefix(uc)
    kr, kc = -(-size // tr), -(-size // tc)  # phases so that same-phase windows do not overlap
    vg = (
        values.reshape(len(ur), len(uc), size, size)
        if np.array_equal(pos.ravel(), np.arange(pos.size))
        else None
    )
    isz = acc.itemsize
    for a in range(min(kr, mr)):
        for b in range(min(kc, mc)):
            rows, cols = slice(a, mr, kr), slice(b, mc, kc)
            nr, nc = len(range(a, mr, kr)), len(range(b, mc, kc))
            view = np.lib.stride_tricks.as_strided(
                acc[ur[a] :, uc[b] :],
                shape=(nr, nc, size, size),
                strides=(kr * tr * w * isz, kc * tc * isz, w * isz, isz),
                writeable=True,
            )  # (nr, nc, s, s) disjoint windows of acc
            src = vg[rows, cols] if vg is not None else values[pos[rows, cols]]
            view += src.astype(np.float64, copy=False)  # one contiguous cast beats a buffered mixed-type add
    rest = np.ones(pos.shape, bool)
    rest[:mr, :mc] = False  # windows off the evenly spaced part
    idx = pos[rest]
    _scatter_add(acc, values[idx], r[idx], c[idx], size)
    return acc


def mean_map(values, origins, shape, size: int) -> np.ndarray:
    """(H, W) float32 average over covering windows; NaN where uncovered.

    ``values`` is either (N,) one value per window (spread over the window) or
    (N, size, size) / (N, 1, size, size) per-pixel values.
    """
    h, w = (int(v) for v in shape[:2])
    org = _check_origins(origins, (h, w), size)
    v = np.asarray(values)
    if not np.issubdtype(v.dtype, np.floating):
        v = v.astype(np.float64)
    n = len(org)
    cover = _box_sum(None, org, (h, w), size, dtype=np.int32)[0]  # (H, W) coverage count
    if v.ndim == 1:
        if v.shape[0] != n:
            raise ValueError(f"got {v.shape[0]} values for {n} windows")
        total = _box_sum(v, org, (h, w), size)[0]
    else:
        if v.size != n * size * size:
            raise ValueError(f"values of shape {v.shape} do not match {n} windows of size {size}")
        total = _pixel_sum(v.reshape(n, size, size), org, (h, w), size)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(cover > 0, total / cover, np.nan)
    return out.astype(np.float32)
