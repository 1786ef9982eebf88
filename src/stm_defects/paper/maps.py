"""Per-pixel maps built from sliding windows (stage 1 of the pipeline).

* :func:`character_map` -- K-means label of every window, per-pixel majority
  vote over the covering windows.
* :func:`error_map` -- per-pixel squared reconstruction error, averaged over
  covering windows, Gaussian-smoothed.
* :func:`colourise` -- label map to an RGB array (no figures).

The neural-network parts are passed in as callables so they can be replaced
by fakes: ``encode_fn(patches (N,1,s,s)) -> latents (N,d)`` and
``reconstruct_fn(patches (N,1,s,s)) -> reconstructions (N,1,s,s)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.ndimage import gaussian_filter

from stm_defects.image.windows import extract_windows, mean_map, vote_map, window_origins

__all__ = ["character_map", "colourise", "error_map"]


def _batched(fn: Callable, patches: np.ndarray, batch: int) -> np.ndarray:
    """Apply ``fn`` to ``patches`` in chunks of ``batch`` and concatenate."""
    if batch is None or batch <= 0:
        batch = max(len(patches), 1)
    outs = [np.asarray(fn(patches[i : i + batch])) for i in range(0, len(patches), batch)]
    return np.concatenate(outs, axis=0)


def _n_labels(estimator, labels: np.ndarray) -> int:
    k = None
    for obj in (estimator, getattr(estimator, "steps", [[None, None]])[-1][-1]):
        k = getattr(obj, "n_clusters", None) or getattr(obj, "n_components_", None)
        if k:
            break
    top = int(labels.max()) + 1 if labels.size else 0
    return max(int(k or 0), top, 1)


def character_map(
    img01,
    encode_fn: Callable[[np.ndarray], np.ndarray],
    kmeans,
    size: int = 32,
    stride: int = 4,
    batch: int = 4096,
    encode_windows_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Character map of an image scaled to [0, 1].

    Every ``size`` x ``size`` window (grid step ``stride``) is encoded with
    ``encode_fn`` and assigned a cluster by ``kmeans`` (any estimator with
    ``predict``; if it is not fitted yet it is fitted on these latents with
    ``fit_predict``).  Each pixel takes the majority label of the windows
    covering it.

    ``encode_windows_fn(img (H,W), origins (N,2)) -> latents (N,d)``, if given,
    replaces ``encode_fn``: it encodes the windows straight from the image
    (e.g. ``models.dense.encode_windows``, which shares the convolutions of
    overlapping windows and returns the same latents), so the patches are
    never extracted.

    Returns ``(char_map (H,W) int64, window labels (N,), origins (N,2))``.
    """
    img = np.asarray(img01, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    if encode_windows_fn is not None:
        origins = window_origins(img.shape, size, stride)
        latents = np.asarray(encode_windows_fn(img, origins)).reshape(len(origins), -1)
    else:
        patches, origins = extract_windows(img, size, stride)
        latents = _batched(encode_fn, patches, batch).reshape(len(patches), -1)
    from sklearn.exceptions import NotFittedError  # here: importing the module needs no scikit-learn

    try:
        labels = kmeans.predict(latents)
    except NotFittedError:
        labels = kmeans.fit_predict(latents)
    labels = np.asarray(labels).astype(np.int64).ravel()
    cmap = vote_map(labels, origins, img.shape, size, _n_labels(kmeans, labels))
    return cmap, labels, origins


def error_map(
    img01,
    reconstruct_fn: Callable[[np.ndarray], np.ndarray],
    size: int = 32,
    stride: int = 16,
    sigma: float = 2.0,
    batch: int = 4096,
) -> np.ndarray:
    """Reconstruction-error map, (H, W) float32.

    Windows (grid step ``stride``) are reconstructed with ``reconstruct_fn``;
    the per-pixel squared error is averaged over the windows covering each
    pixel, then smoothed with ``gaussian_filter(sigma)`` (``sigma`` 0/None:
    no smoothing).
    """
    img = np.asarray(img01, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    patches, origins = extract_windows(img, size, stride)
    recon = _batched(reconstruct_fn, patches, batch)
    recon = np.asarray(recon, dtype=np.float32).reshape(patches.shape)
    sq = ((recon - patches) ** 2).reshape(len(patches), size, size)
    emap = np.asarray(mean_map(sq, origins, img.shape, size), dtype=np.float64)
    if np.isnan(emap).any():  # uncovered pixels (not expected with full-coverage windows)
        fill = np.nanmedian(emap) if np.isfinite(emap).any() else 0.0
        emap = np.where(np.isnan(emap), fill, emap)
    if sigma:
        emap = gaussian_filter(emap, sigma=float(sigma), mode="nearest")
    return emap.astype(np.float32)


def colourise(label_map, n_labels: int, cmap: str = "tab20") -> np.ndarray:
    """(H, W) integer labels -> (H, W, 3) uint8 RGB; label -1 is black.

    Qualitative colormaps (``ListedColormap``) are indexed directly when they
    have enough colours; otherwise ``n_labels`` colours are sampled evenly.
    """
    import matplotlib
    from matplotlib.colors import ListedColormap

    lab = np.asarray(label_map)
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.equal(np.mod(lab, 1), 0)):
            raise ValueError("label_map must contain integers")
        lab = lab.astype(np.int64)
    n_labels = int(n_labels)
    if lab.size and (lab.min() < -1 or lab.max() >= n_labels):
        raise ValueError(f"labels must lie in [-1, {n_labels})")
    cm = matplotlib.colormaps[cmap]
    if isinstance(cm, ListedColormap) and n_labels <= cm.N:
        rgba = cm(np.arange(n_labels))
    else:
        rgba = cm(np.linspace(0.0, 1.0, max(n_labels, 1)))
    lut = np.zeros((n_labels + 1, 3), np.uint8)  # last row: black for -1
    lut[:n_labels] = np.round(np.asarray(rgba)[:n_labels, :3] * 255).astype(np.uint8)
    return lut[np.where(lab < 0, n_labels, lab)]
