"""Scale bars and labels burned into exported pictures are marked missing, and the default
method looks for no defect there (`image.overlays`, `io.scans.Scan.missing`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from stm_defects.analysis.dispatch import PredictConfig, analyse, missing_on, preprocess_scan
from stm_defects.image.overlays import burned_in_overlays
from stm_defects.io.scans import Scan, read_scan
from stm_defects.results import Models

WSE2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-labelled" / "wse2-dev" / "images"


def _surface(n: int = 384, seed: int = 0) -> np.ndarray:
    """An 8-bit picture of a hexagonal lattice with noise and a few bright and dark blobs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:n, :n].astype(float)
    z = sum(np.cos(2 * np.pi / 6.0 * (x * np.cos(a) + y * np.sin(a))) for a in (0.1, 0.1 + 2.094, 0.1 + 4.189))
    z += rng.normal(0, 0.6, z.shape)
    for cy, cx, h in ((100, 120, 6.0), (250, 300, -6.0), (180, 60, 5.0)):
        z += h * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 3.0 ** 2))
    z = (z - z.min()) / (z.max() - z.min())
    return np.clip(20 + 215 * z, 0, 255).astype(np.uint8)


def _with_bar(img: np.ndarray, colour: int = 0, row: int | None = None, label: bool = True) -> np.ndarray:
    """``img`` with a Gwyddion-like scale bar (ticked line) and its label drawn in."""
    n = img.shape[0]
    pic = Image.fromarray(img.copy())
    d = ImageDraw.Draw(pic)
    r = int(0.92 * n) if row is None else row
    x0, x1 = int(0.55 * n), int(0.9 * n)
    d.line([(x0, r), (x1, r)], fill=colour, width=1)
    d.line([(x0, r - 4), (x0, r + 4)], fill=colour, width=1)
    d.line([(x1, r - 4), (x1, r + 4)], fill=colour, width=1)
    if label:
        d.text(((x0 + x1) // 2 - 20, r + 4), "200 nm", fill=colour)
    return np.asarray(pic)


def _drawn(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a != b


def test_a_scale_bar_and_its_label_are_found_and_nothing_else():
    clean = _surface()
    assert not burned_in_overlays(clean).any()
    for colour in (0, 255):
        pic = _with_bar(clean, colour)
        drawn = _drawn(pic, clean)
        mask = burned_in_overlays(pic)
        assert mask[drawn & (pic == colour)].all(), "the bar, its ticks and its label's strokes are masked"
        assert mask[drawn].mean() > 0.8, "... and most of the label's anti-aliased edges"
        rows = np.flatnonzero(mask.any(axis=1))
        assert rows.min() >= int(0.92 * 384) - 8, "nothing above the bar and its label"
        assert mask.mean() < 0.02


def test_lines_and_blobs_of_the_surface_are_not_bars():
    clean = _surface()
    streak = clean.copy()
    streak[200, 5:-5] = 0                       # a scan line glitch across the picture
    blob = clean.copy()
    blob[300:306, 100:160] = 255                # a saturated elongated feature, not near an edge band
    middle = _with_bar(clean, 0, row=190)        # a ticked, labelled line in the middle of the scan
    for pic in (streak, blob, middle):
        assert not burned_in_overlays(pic).any()


def test_a_jpeg_export_carries_its_bar_as_missing_pixels_and_no_defect_is_found_there(tmp_path):
    clean = _surface(seed=1)
    pic = _with_bar(clean, 0)
    Image.fromarray(pic).save(tmp_path / "bar.jpg", quality=92)
    Image.fromarray(clean).save(tmp_path / "clean.jpg", quality=92)
    scan = read_scan(tmp_path / "bar.jpg", scan_nm=20.0)
    assert scan.missing is not None and scan.meta["overlay_fraction"] > 0.001
    assert scan.missing[_drawn(pic, clean) & (pic == 0)].mean() > 0.9
    assert read_scan(tmp_path / "clean.jpg", scan_nm=20.0).missing is None

    cfg = PredictConfig()
    img, scale = preprocess_scan(scan, cfg.preprocess)
    near = np.zeros_like(scan.missing)
    ys, xs = np.nonzero(scan.missing)
    near[max(0, ys.min() - 6): ys.max() + 7, max(0, xs.min() - 6): xs.max() + 7] = True
    with_mask = analyse(img, Models(), cfg, scan.pixel_nm / scale, missing_on(scan, img.shape)).regions
    drawn_in = dataclasses.replace(scan, missing=None,      # the picture as it was, bar and all
                                   height=np.asarray(Image.open(tmp_path / "bar.jpg").convert("L"), np.float32))
    img0, _ = preprocess_scan(drawn_in, cfg.preprocess)
    without = analyse(img0, Models(), cfg, scan.pixel_nm / scale).regions
    on_bar = [r for r in without if near[int(round(r["y"] / scale)), int(round(r["x"] / scale))]]
    assert on_bar, "the bar draws detections when it is not known to be missing"
    assert not [r for r in with_mask if near[int(round(r["y"] / scale)), int(round(r["x"] / scale))]]
    # the surface's own defects are still found
    for cy, cx in ((100, 120), (250, 300), (180, 60)):
        assert any(abs(r["y"] / scale - cy) < 6 and abs(r["x"] / scale - cx) < 6 for r in with_mask)


@pytest.mark.skipif(not WSE2.is_dir(), reason="needs ../shared/data/real-labelled/wse2-dev (the real WSe2 scans)")
def test_real_exports_bars_found_only_where_drawn():
    """The real WSe2 JPEGs (Smalley et al., GPL-3.0): the 500 nm overviews with a drawn scale
    bar get a mask in their bottom band; the small fields, which have none, get none."""
    with_bar = [p for p in sorted(WSE2.glob("*500x500*.jpg")) if "_4_1_" not in p.name and "_4_2_" not in p.name
                and "_4_3_" not in p.name and "_4_4_" not in p.name and not p.name.startswith("WSe2_SL358")]
    small = sorted(WSE2.glob("WSe2-SL445_*.jpg"))
    assert len(with_bar) == 15 and len(small) == 36
    for p in with_bar:
        a = np.asarray(Image.open(p).convert("L"))
        m = burned_in_overlays(a)
        assert m.any(), p.name
        assert np.flatnonzero(m.any(axis=1)).min() >= 0.8 * a.shape[0], p.name
    for p in small:
        assert not burned_in_overlays(np.asarray(Image.open(p).convert("L"))).any(), p.name


def test_a_hole_of_nan_pixels_is_missing_and_draws_no_defect(tmp_path):
    """Pixels a file holds as NaN (a scan stopped and resumed, a glitch blanked by the
    software) are missing too: filled for the pictures, but no defect is found at the hole."""
    z = _surface(seed=2).astype(np.float32)
    z += 0.5 * np.arange(z.shape[1], dtype=np.float32)[None, :]     # a tilted scan: the hole's fill
    z[140:170, 200:240] = np.nan                                   # (the median) is off its surroundings
    np.save(tmp_path / "hole.npy", z)
    scan = read_scan(tmp_path / "hole.npy", scan_nm=20.0)
    assert scan.missing is not None and scan.missing[140:170, 200:240].all()
    assert np.isfinite(scan.height).all() and scan.meta["nan_filled_fraction"] > 0
    cfg = PredictConfig()
    img, scale = preprocess_scan(scan, cfg.preprocess)
    found = analyse(img, Models(), cfg, scan.pixel_nm / scale, missing_on(scan, img.shape)).regions
    assert not [r for r in found if 130 <= r["y"] / scale <= 180 and 190 <= r["x"] / scale <= 250]
    unmasked = analyse(img, Models(), cfg, scan.pixel_nm / scale).regions
    assert [r for r in unmasked if 130 <= r["y"] / scale <= 180 and 190 <= r["x"] / scale <= 250], \
        "the median-filled hole alone looks like a defect"


def test_a_thin_missing_line_survives_the_resampling_of_preprocessing():
    """`missing_on` on a coarser grid (``preprocess.target_pixel_nm``): a pixel is missing when
    any part of it is, so a one-pixel NaN line is not lost at 1/5 of the size."""
    miss = np.zeros((300, 300), bool)
    miss[150] = True
    scan = Scan(height=np.zeros((300, 300), np.float32), pixel_nm=0.1, unit="nm",
                channel="Z", direction="forward", path="x", format="npy", missing=miss)
    for shape in ((100, 100), (60, 60)):
        m = missing_on(scan, shape)
        assert m.shape == shape and m[int(150 * shape[0] / 300)].all()
        assert m.mean() < 0.1


def test_a_white_bar_on_a_colour_map_export_is_found_channel_by_channel(tmp_path):
    """A colour JPEG (afmhot, chroma subsampled): a white bar's luminance is not beyond the
    bright end of the map, but it is in the blue channel, which the map keeps low."""
    from matplotlib import colormaps

    clean = _surface(seed=4)
    rgb = (colormaps["afmhot"](clean / 255.0)[..., :3] * 255).astype(np.uint8)
    n = clean.shape[0]
    r, x0, x1 = int(0.92 * n), int(0.55 * n), int(0.9 * n)
    pic = Image.fromarray(rgb.copy())
    d = ImageDraw.Draw(pic)
    for line in ([(x0, r), (x1, r)], [(x0, r - 4), (x0, r + 4)], [(x1, r - 4), (x1, r + 4)]):
        d.line(line, fill=(255, 255, 255))
    d.text(((x0 + x1) // 2 - 20, r + 4), "200 nm", fill=(255, 255, 255))
    pic.save(tmp_path / "colour.jpg", quality=90)
    Image.fromarray(rgb).save(tmp_path / "plain.jpg", quality=90)
    luminance = np.asarray(Image.open(tmp_path / "colour.jpg").convert("L"))
    assert not burned_in_overlays(luminance).any(), "the luminance alone hides the bar"
    scan = read_scan(tmp_path / "colour.jpg", scan_nm=20.0)
    drawn = np.any(np.asarray(pic) != rgb, axis=-1)
    assert scan.missing is not None and scan.missing[drawn].all()
    assert np.flatnonzero(scan.missing.any(axis=1)).min() >= r - 40
    assert read_scan(tmp_path / "plain.jpg", scan_nm=20.0).missing is None
