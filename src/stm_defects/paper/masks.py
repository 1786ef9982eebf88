"""Defect mask from the error map and the character map, then regions.

The mask is the union of (error map > threshold) and (character-map cluster
in ``target_clusters``), cleaned up in this order:

1. remove line-like regions (major/minor axis ratio > ``max_aspect_ratio``),
2. erosion (disk of ``erosion_radius``),
3. Gaussian smoothing of the binary mask (``smooth_sigma``), re-threshold at 0.5,
4. dilation (disk of ``dilation_radius``),
5. removal of regions smaller than ``min_area`` pixels,
6. opening (disk of ``opening_radius``).

Any knob set to 0/None skips its step.  Regions are 8-connected.
Coordinates: ``x`` is the column, ``y`` the row.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label, regionprops
from skimage.morphology import disk

from stm_defects.image.robust import MAD_TO_SIGMA

__all__ = [
    "MaskConfig",
    "cluster_component",
    "defect_mask",
    "defect_regions",
    "dilate",
    "erode",
    "error_component",
    "mask_centres",
    "open_mask",
    "remove_line_like",
    "remove_small",
    "smooth_binary",
    "threshold_value",
]

_CONNECTIVITY = 2  # 8-connected regions
_PCT_RE = re.compile(r"^p(\d+(?:\.\d*)?)$")
_MAD_RE = re.compile(r"^mad:([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)$")


@dataclass(frozen=True)
class MaskConfig:
    """Settings of :func:`defect_mask`.

    ``threshold``: a number is an absolute error threshold; ``"pNN"`` is the
    NN-th percentile of the error map; ``"mad:K"`` is median + K * 1.4826 *
    MAD of the error map; ``None`` disables the error component (the mask
    then comes from ``target_clusters`` alone).  Any other knob set to 0/None
    disables its step.
    """

    threshold: str | float | None = "p97"
    target_clusters: tuple[int, ...] = ()
    max_aspect_ratio: float | None = 4.0
    erosion_radius: int | None = 1
    smooth_sigma: float | None = 1.0
    dilation_radius: int | None = 2
    min_area: int | None = 20
    opening_radius: int | None = 1

    def __post_init__(self):
        tc = self.target_clusters
        if tc is None:
            tc = ()
        elif isinstance(tc, (int, np.integer)):
            tc = (int(tc),)
        object.__setattr__(self, "target_clusters", tuple(int(c) for c in tc))
        if self.threshold is not None:
            _parse_threshold(self.threshold)  # validate early

    @classmethod
    def from_dict(cls, d: dict | None) -> MaskConfig:
        """Build from a mapping; unknown keys raise ``ValueError``."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown MaskConfig keys: {unknown}; allowed: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_clusters"] = list(self.target_clusters)
        return d


# --------------------------------------------------------------------------- #
# threshold
# --------------------------------------------------------------------------- #
def _parse_threshold(spec) -> tuple[str, float]:
    if isinstance(spec, (int, float, np.integer, np.floating)) and not isinstance(spec, bool):
        return "abs", float(spec)
    if isinstance(spec, str):
        s = spec.strip().lower()
        m = _PCT_RE.match(s)
        if m:
            q = float(m.group(1))
            if not 0.0 <= q <= 100.0:
                raise ValueError(f"percentile out of range in {spec!r}")
            return "pct", q
        m = _MAD_RE.match(s)
        if m:
            return "mad", float(m.group(1))
        try:
            return "abs", float(s)
        except ValueError:
            pass
    raise ValueError(f"invalid threshold spec {spec!r}; expected a number, 'pNN' or 'mad:K'")


def threshold_value(error_map, spec) -> float:
    """Numeric threshold for ``error_map`` from ``spec`` (number, ``"pNN"``,
    ``"mad:K"``).  NaNs in the map are ignored."""
    kind, v = _parse_threshold(spec)
    if kind == "abs":
        return v
    e = np.asarray(error_map, dtype=np.float64)
    e = e[np.isfinite(e)]
    if e.size == 0:
        raise ValueError("error map has no finite values")
    if kind == "pct":
        return float(np.percentile(e, v))
    med = float(np.median(e))
    mad = float(np.median(np.abs(e - med)))
    return med + v * MAD_TO_SIGMA * mad


# --------------------------------------------------------------------------- #
# steps
# --------------------------------------------------------------------------- #
def error_component(error_map, spec) -> np.ndarray:
    """``error_map > threshold_value(error_map, spec)`` (bool)."""
    e = np.asarray(error_map, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return e > threshold_value(e, spec)


def cluster_component(char_map, target_clusters) -> np.ndarray:
    """Pixels whose character-map cluster is in ``target_clusters`` (bool)."""
    c = np.asarray(char_map)
    return np.isin(c, np.asarray(tuple(target_clusters), dtype=np.int64))


def _axis_ratio(region) -> float:
    major = float(region.axis_major_length)
    minor = float(region.axis_minor_length)
    if minor > 0:
        return major / minor
    return np.inf if major > 0 else 1.0


def remove_line_like(mask, max_aspect_ratio: float) -> np.ndarray:
    """Drop regions whose major/minor axis ratio exceeds ``max_aspect_ratio``
    (step edges, scan-line artefacts)."""
    mask = np.asarray(mask, dtype=bool)
    lab = label(mask, connectivity=_CONNECTIVITY)
    drop = np.zeros(int(lab.max()) + 1, bool)
    for r in regionprops(lab):
        drop[r.label] = _axis_ratio(r) > max_aspect_ratio
    return mask & ~drop[lab]


def erode(mask, radius: int) -> np.ndarray:
    """Binary erosion with a disk; pixels beyond the border count as set, so
    regions touching the border are not eaten from outside."""
    return ndi.binary_erosion(np.asarray(mask, bool), structure=disk(int(radius)), border_value=1)


def dilate(mask, radius: int) -> np.ndarray:
    """Binary dilation with a disk."""
    return ndi.binary_dilation(np.asarray(mask, bool), structure=disk(int(radius)), border_value=0)


def smooth_binary(mask, sigma: float) -> np.ndarray:
    """Gaussian-smooth the 0/1 mask and re-threshold at 0.5."""
    return ndi.gaussian_filter(np.asarray(mask, np.float64), sigma=float(sigma), mode="nearest") >= 0.5


def remove_small(mask, min_area: int) -> np.ndarray:
    """Drop 8-connected regions with fewer than ``min_area`` pixels."""
    mask = np.asarray(mask, dtype=bool)
    lab = label(mask, connectivity=_CONNECTIVITY)
    areas = np.bincount(lab.ravel())
    small = areas < int(min_area)
    small[0] = False
    return mask & ~small[lab]


def open_mask(mask, radius: int) -> np.ndarray:
    """Morphological opening (erosion then dilation) with a disk."""
    return dilate(erode(mask, radius), radius)


def defect_mask(error_map, char_map, cfg: MaskConfig | None = None) -> np.ndarray:
    """Defect mask (bool, H x W): union of the error and cluster components,
    then the clean-up steps of :class:`MaskConfig` in order.

    ``error_map`` may be ``None`` when ``cfg.threshold`` is None, and
    ``char_map`` may be ``None`` when ``cfg.target_clusters`` is empty.
    """
    cfg = cfg or MaskConfig()
    shape = None
    for a in (error_map, char_map):
        if a is not None:
            s = np.shape(a)
            if len(s) != 2:
                raise ValueError(f"maps must be 2-D, got shape {s}")
            if shape is not None and s != shape:
                raise ValueError(f"error map {shape} and character map {s} differ in shape")
            shape = s
    if shape is None:
        raise ValueError("need an error map or a character map")

    m = np.zeros(shape, bool)
    if cfg.threshold is not None:
        if error_map is None:
            raise ValueError("threshold is set but no error map was given")
        m |= error_component(error_map, cfg.threshold)
    if cfg.target_clusters:
        if char_map is None:
            raise ValueError("target_clusters is set but no character map was given")
        m |= cluster_component(char_map, cfg.target_clusters)

    if cfg.max_aspect_ratio:
        m = remove_line_like(m, cfg.max_aspect_ratio)
    if cfg.erosion_radius:
        m = erode(m, cfg.erosion_radius)
    if cfg.smooth_sigma:
        m = smooth_binary(m, cfg.smooth_sigma)
    if cfg.dilation_radius:
        m = dilate(m, cfg.dilation_radius)
    if cfg.min_area:
        m = remove_small(m, cfg.min_area)
    if cfg.opening_radius:
        m = open_mask(m, cfg.opening_radius)
    return m


# --------------------------------------------------------------------------- #
# regions and patch centres
# --------------------------------------------------------------------------- #
def defect_regions(mask, score_map=None) -> list[dict]:
    """8-connected regions of ``mask`` as dicts, sorted by (y, x).

    Keys: ``id`` (0-based, in sorted order), ``x``/``y`` (centroid column /
    row, float), ``bbox`` ``[x0, y0, x1, y1]`` (pixels, inclusive-exclusive),
    ``area_px`` and ``score`` (mean of ``score_map`` over the region, NaNs
    ignored; None without a score map).
    """
    mask = np.asarray(mask, dtype=bool)
    if score_map is not None:
        score_map = np.asarray(score_map, dtype=np.float64)
        if score_map.shape != mask.shape:
            raise ValueError(f"score map {score_map.shape} and mask {mask.shape} differ in shape")
    lab = label(mask, connectivity=_CONNECTIVITY)
    out = []
    for r in regionprops(lab):
        cy, cx = r.centroid
        y0, x0, y1, x1 = r.bbox
        score = None
        if score_map is not None:
            vals = score_map[r.coords[:, 0], r.coords[:, 1]]
            vals = vals[np.isfinite(vals)]
            score = float(vals.mean()) if vals.size else None
        out.append(
            {
                "x": float(cx),
                "y": float(cy),
                "bbox": [int(x0), int(y0), int(x1), int(y1)],
                "area_px": int(r.area),
                "score": score,
            }
        )
    out.sort(key=lambda d: (d["y"], d["x"]))
    return [{"id": i, **d} for i, d in enumerate(out)]


def mask_centres(mask, stride: int = 4, margin: int = 0) -> np.ndarray:
    """(M, 2) int64 (row, col) pixels inside ``mask`` on the grid
    ``row, col = 0, stride, 2*stride, ...`` -- the centres of the stage-2
    patches.  ``margin`` > 0 drops centres closer than ``margin`` pixels to
    the image border."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    stride = int(stride)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    h, w = mask.shape
    rows = np.arange(0, h, stride)
    cols = np.arange(0, w, stride)
    if margin:
        rows = rows[(rows >= margin) & (rows < h - margin)]
        cols = cols[(cols >= margin) & (cols < w - margin)]
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    keep = mask[rr, cc]
    return np.stack([rr[keep], cc[keep]], axis=1).astype(np.int64).reshape(-1, 2)
