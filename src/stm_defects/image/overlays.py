"""Annotations burned into exported pictures: scale bars and their labels.

Image exports of scans (JPEG, PNG, 8-bit TIFF from Gwyddion, WSxM or an instrument's own
software) often carry a scale bar with its label ("200 nm") drawn into the pixels. They are
not surface: a detector sees the bar's ends and the label's glyphs as defects. `burned_in_overlays`
finds them, and the reader marks their pixels missing (`io.scans.Scan.missing`), so the
default method neither looks there nor counts them in its noise.

What is taken for an overlay, in pixels of the extreme values of the picture's range (pure
black or white, up to JPEG ringing: ``extreme``):
* a **bar**: a straight, thin (at most ``max_thickness`` px) horizontal or vertical run of them,
  at least ``min_length_frac`` of the picture's side and ``min_length_px`` long, that neither
  reaches the picture's sides nor spans most of it (a scan-line glitch does), lies near the
  picture's top or bottom (its left or right for a vertical bar: ``edge_band``, where export
  software puts it), and ends in ticks or has a label; with its ticks;
* its **label**: three or more glyphs of like heights on one baseline beside the bar, within
  ``label_reach`` of the picture's height, centred on it (`_label_box`); their whole box.
Then the mask grows by ``margin_px`` and, in a JPEG, to the 8 x 8 blocks it touches.
A thin frame around the picture is left as it is: the detector ignores the scan's border.
Scans hold heights, not drawing colours, so a surface feature is rarely a thin run of one
extreme value many pixels long with ticks or a label; a saturated defect core is a blob.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from stm_defects.image.preprocess import horizontal_runs

__all__ = ["OverlayConfig", "burned_in_overlays"]


@dataclass(frozen=True)
class OverlayConfig:
    extreme: float = 0.05          # share of the value range at each end taken as drawing colour
    min_length_px: int = 24        # a bar is at least this long ...
    min_length_frac: float = 0.05  # ... and this share of the picture's side
    max_length_frac: float = 0.8   # a run longer than this share is a scan line, not a bar
    max_thickness: int = 4         # px across a bar
    label_reach: float = 0.08      # label glyphs lie within this share of the picture's height of the bar
    label_max_frac: float = 0.4    # ... and a glyph is smaller than this share of the bar's length
    edge_band: float = 0.15        # a bar lies within this share of the picture from its top or bottom
    margin_px: int = 2             # mask grown by this (JPEG ringing, anti-aliased glyph edges)


def burned_in_overlays(data: np.ndarray, cfg: OverlayConfig = OverlayConfig(), block: int = 1) -> np.ndarray:
    """Boolean mask of the burned-in annotations of an exported picture ``data`` (2-D, any
    numeric type; its own min and max are the drawing colours' range; or (H, W, 3) colour,
    looked at channel by channel: a white bar on a colour map is extreme in the channel the
    map keeps low). All False when there are none. ``block`` 8 for a JPEG: the mask then covers
    every 8 x 8 block it touches, where the compression spread the drawing's edges (ringing)."""
    a = np.asarray(data)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        out = np.zeros(a.shape[:2], bool)
        for ch in range(3):
            if ch and np.array_equal(a[..., ch], a[..., ch - 1]):
                continue        # a grey picture stored as colour: the same channel again
            out |= burned_in_overlays(a[..., ch], cfg, block)
        return out
    if a.ndim != 2 or min(a.shape) < 16:
        return np.zeros(a.shape, bool)
    lo, hi = float(np.min(a)), float(np.max(a))
    if not hi > lo:
        return np.zeros(a.shape, bool)
    cut = cfg.extreme * (hi - lo)
    out = np.zeros(a.shape, bool)
    for ext in (a <= lo + cut, a >= hi - cut):
        for axis in (1, 0):
            view = ext if axis == 1 else np.ascontiguousarray(ext.T)
            marked = _bars_and_labels(view, cfg)
            if marked is not None:
                out |= marked if axis == 1 else marked.T
    if out.any() and cfg.margin_px:
        out = ndi.binary_dilation(out, iterations=int(cfg.margin_px))
    if out.any() and block > 1:
        out = _whole_blocks(out, int(block))
    return out


def _whole_blocks(mask: np.ndarray, block: int) -> np.ndarray:
    """``mask`` grown to every ``block`` x ``block`` tile of the image grid that it touches."""
    h, w = mask.shape
    hb, wb = -(-h // block), -(-w // block)
    padded = np.zeros((hb * block, wb * block), bool)
    padded[:h, :w] = mask
    tiles = padded.reshape(hb, block, wb, block).any(axis=(1, 3))
    return np.repeat(np.repeat(tiles, block, axis=0), block, axis=1)[:h, :w]


def _bars_and_labels(ext: np.ndarray, cfg: OverlayConfig) -> np.ndarray | None:
    """The horizontal scale bars of ``ext`` (rows of the picture), with their ticks and the box
    of their label; None when there are none. A bar is a thin straight run that neither
    touches the sides nor spans most of the width, lies in the top or bottom band, and ends in
    ticks or has a label."""
    h, w = ext.shape
    length = max(int(cfg.min_length_px), int(np.ceil(cfg.min_length_frac * w)))
    if length >= w or not (ext.sum(axis=1) >= length).any():
        return None
    runs = horizontal_runs(ext, length)
    if not runs.any():
        return None
    lab, _ = ndi.label(runs, structure=np.ones((3, 3), bool))
    out = np.zeros(ext.shape, bool)
    for sl in ndi.find_objects(lab):
        rows, cols = sl
        thick = rows.stop - rows.start
        if thick > cfg.max_thickness or cols.stop - cols.start > cfg.max_length_frac * w:
            continue
        if cols.start <= 1 or cols.stop >= w - 1:
            continue        # reaches a side: part of a scan line
        if not (rows.stop <= cfg.edge_band * h or rows.start >= (1 - cfg.edge_band) * h):
            continue        # export software draws its bar near the top or bottom
        label = _label_box(ext, rows, cols, cfg)
        if label is None and not _ticked(ext, rows, cols):
            continue
        reach = 3 + thick   # the bar and its ticks
        near = (slice(max(0, rows.start - reach), rows.stop + reach), slice(max(0, cols.start - 2), cols.stop + 2))
        out[near] |= ext[near]
        if label is not None:
            out[label] = True
    return out if out.any() else None


def _ticked(ext: np.ndarray, rows: slice, cols: slice) -> bool:
    """Whether the bar in ``rows`` x ``cols`` ends in ticks: extreme pixels running on across it
    (at least 3 px beyond its rows) within 2 px of both its ends."""
    h, w = ext.shape
    reach = 3 + (rows.stop - rows.start)
    above = slice(max(0, rows.start - reach), rows.start)
    below = slice(rows.stop, min(h, rows.stop + reach))

    def tick(c0: int, c1: int) -> bool:
        c0, c1 = max(0, c0), min(w, c1)
        for part in (above, below):
            run = ext[part, c0:c1].any(axis=1)
            if part is above:
                run = run[::-1]            # count outward from the bar
            if run.size and np.argmin(np.append(run, False)) >= 3:
                return True
        return False

    return tick(cols.start - 2, cols.start + 3) and tick(cols.stop - 3, cols.stop + 2)


def _label_box(ext: np.ndarray, rows: slice, cols: slice, cfg: OverlayConfig) -> tuple[slice, slice] | None:
    """The box of the bar's label, or None: at least three glyphs (small components of ``ext``
    of like heights on one baseline) on one side of the bar, within label reach, their extent
    centred on the bar's. The box is their extent and a pixel more, so it holds the glyphs'
    anti-aliased edges too."""
    h, w = ext.shape
    span = cols.stop - cols.start
    reach = max(8, int(round(cfg.label_reach * h)))
    for r0, r1 in ((max(0, rows.start - reach), rows.start - 1), (rows.stop + 1, min(h, rows.stop + reach))):
        if r1 - r0 < 3:
            continue
        box = ext[r0:r1, cols.start:cols.stop]
        lab, n = ndi.label(box, structure=np.ones((3, 3), bool))
        if n < 3:
            continue
        glyphs = [g for g in ndi.find_objects(lab)
                  if max(g[0].stop - g[0].start, g[1].stop - g[1].start) < cfg.label_max_frac * span
                  and (g[0].stop - g[0].start) >= 3]
        if len(glyphs) < 3:
            continue
        heights = np.array([g[0].stop - g[0].start for g in glyphs])    # the commonest baseline,
        bottoms = np.array([g[0].stop for g in glyphs])                 # glyphs of like heights
        base, tall = np.median(bottoms), np.median(heights)
        glyphs = [g for g, b, t in zip(glyphs, bottoms, heights) if abs(b - base) <= 2 and 0.5 * tall <= t <= 2 * tall]
        if len(glyphs) < 3:
            continue
        left = min(g[1].start for g in glyphs)
        right = max(g[1].stop for g in glyphs)
        if abs((left + right) / 2 - span / 2) > 0.2 * span:
            continue
        top = min(g[0].start for g in glyphs)
        bottom = max(g[0].stop for g in glyphs)
        # every piece on the glyphs' line under the bar belongs to the label (thin strokes
        # of anti-aliased glyphs break into pieces too small to be glyphs themselves)
        line = np.flatnonzero(box[top:bottom].any(axis=0))
        left, right = min(left, int(line[0])), max(right, int(line[-1]) + 1)
        return (slice(max(0, r0 + top - 1), min(h, r0 + bottom + 1)),
                slice(max(0, cols.start + left - 1), min(w, cols.start + right + 1)))
    return None
