"""The memory-lean forms of the per-scan analysis give the same numbers as the plain formulas.

Each test computes one step the straightforward way (whole-image temporaries, as the code did
before it was made lean) and checks that the library gives the same array, bit for bit. The
whole-pipeline check (detections on synthetic and lattice scans before/after a change) is
`benchmarks/bench_memory.py --results-out / --results-compare`.
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from scipy import ndimage as ndi
from skimage.measure import label

from stm_defects.analysis import render
from stm_defects.image import preprocess
from stm_defects.image.robust import robust_location_scale
from stm_defects.improved import anomaly, steps
from stm_defects.improved.anomaly import AnomalyConfig, detect, score_maps


def _scan(shape=(300, 340), seed=0, dtype=np.float64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    z = 0.01 * xx - 0.004 * yy + 0.2 * np.sin(xx / 3.0) * np.cos(yy / 4.0) + rng.normal(0, 0.05, shape)
    z[yy > 0.4 * xx + 80] += 1.0                      # a step
    for _ in range(8):                                # defects
        cy, cx = rng.integers(20, h - 20), rng.integers(20, w - 20)
        z += 0.8 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
    z[150, 40:200] += 2.0                             # a scar
    return z.astype(dtype)


# ------------------------------------------------------------------------- preprocessing
def _level_plane_plain(img, order=1, iterations=3, clip_sigma=2.5):
    a = np.asarray(img)
    z = a.astype(np.float64).ravel()
    h, w = a.shape
    y = np.linspace(-1.0, 1.0, h)[:, None] * np.ones((1, w))
    x = np.ones((h, 1)) * np.linspace(-1.0, 1.0, w)[None, :]
    A = np.stack([(x**i * y**j).ravel() for d in range(order + 1) for j in range(d + 1) for i in [d - j]], 1)
    mask = np.ones(z.shape, bool)
    floor = 1e-9 * max(float(np.ptp(z)), np.finfo(np.float64).tiny)
    coef = np.linalg.lstsq(A, z, rcond=None)[0]
    for _ in range(iterations):
        resid = z - A @ coef
        centre = float(np.median(resid[mask]))
        sigma = max(preprocess.robust_sigma(resid[mask]), floor)
        new = np.abs(resid - centre) <= clip_sigma * sigma
        if new.sum() < 4 * A.shape[1] or np.array_equal(new, mask):
            break
        mask = new
        coef = np.linalg.lstsq(A[mask], z[mask], rcond=None)[0]
    return (z - A @ coef).reshape(a.shape).astype(np.float32)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_level_plane_same_as_whole_design_matrix(monkeypatch, order, dtype):
    """The normal-equation fit by sums equals lstsq on the whole design matrix, to rounding."""
    monkeypatch.setattr(preprocess, "_PLANE_BLOCK_PX", 4096)   # many blocks, a short last one
    img = _scan((301, 157), seed=1, dtype=dtype)
    got, want = preprocess.level_plane(img, order), _level_plane_plain(img, order)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.ptp(want)))


def test_remove_scars_same_as_stacked_median():
    a = _scan((600, 90), seed=2, dtype=np.float32)
    p = np.pad(a, ((3, 3), (0, 0)), mode="edge")
    med = np.partition(np.stack([p[i:i + a.shape[0]] for i in range(7)]), 3, axis=0)[3]
    assert np.array_equal(preprocess._column_median7(a, block=64), med)
    d = a - med
    s = robust_location_scale(d[::2, ::2])[1]
    cand = ndi.binary_opening(np.abs(d) > 5.0 * s, structure=np.ones((1, 8), bool))
    cand = ndi.binary_dilation(cand, structure=np.ones((3, 1), bool)) & (np.abs(d) > 2.5 * s)
    want = a.copy()
    want[cand] = med[cand]
    assert cand.any()
    assert np.array_equal(preprocess.remove_scars(a, 5.0, 8), want)


def test_normalize_same_as_formula():
    a = _scan(seed=3)
    lo, hi = np.percentile(a, [0.5, 99.5])
    want = ((np.clip(a, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    assert np.array_equal(preprocess.normalize(a), want)


# --------------------------------------------------------------------------------- steps
def _terraces(seed=4):
    img = preprocess.normalize(_scan(seed=seed))
    return img, steps.detect_steps(img)


def test_step_distances_and_nearest_pixels_as_scipy(monkeypatch):
    monkeypatch.setattr(steps, "_BLOCK_ROWS", 7)
    img, terr = _terraces()
    assert terr.n >= 2 and terr.edges.any()
    dist, (iy, ix) = ndi.distance_transform_edt(~terr.edges, return_indices=True)
    t = steps.terrace_labels(terr.edges)
    assert np.array_equal(t.dist, dist.astype(np.float32))
    assert np.array_equal(t.nearest[0], iy) and np.array_equal(t.nearest[1], ix)


@pytest.mark.parametrize("weighted", [False, True])
def test_terrace_background_same_as_stacked_levels(weighted):
    img, terr = _terraces()
    weight = (np.random.default_rng(5).random(img.shape) > 0.1).astype(np.float32) if weighted else None
    levels, supports = steps.terrace_levels(img, terr, 10.0, weight)
    lab = terr.labels[None].astype(np.int64)
    out = np.take_along_axis(np.stack(levels), lab, 0)[0]
    sup = np.take_along_axis(np.stack(supports), lab, 0)[0]
    glob = float(np.median(img[~terr.band]))
    want = np.where(sup > 1e-3, out, glob).astype(np.float32)
    assert np.array_equal(steps.terrace_background(img, terr, 10.0, weight), want)


def _level_terraces_plain(img, terr, subsample=3):
    a = np.asarray(img, dtype=np.float32)
    h, w = a.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy = yy / max(h - 1, 1) * 2 - 1
    xx = xx / max(w - 1, 1) * 2 - 1
    coefs = np.zeros((max(terr.n, 1), 3), np.float64)
    sub = np.zeros((h, w), bool)
    sub[::subsample, ::subsample] = True
    for k in range(terr.n):
        sel = (terr.labels == k) & sub
        fit = sel & ~terr.band
        z = a[fit].astype(np.float64)
        A = np.stack([np.ones_like(z), xx[fit], yy[fit]], 1)
        ok = np.ones(z.size, bool)
        coef = np.linalg.lstsq(A, z, rcond=None)[0]
        for _ in range(2):
            r = z - A @ coef
            med, s = robust_location_scale(r[ok])
            new = np.abs(r - med) <= 3.0 * s
            if new.sum() < A.shape[1] * 4:
                break
            ok = new
            coef = np.linalg.lstsq(A[ok], z[ok], rcond=None)[0]
        coefs[k] = coef
    c = coefs[terr.labels]
    return (a - (c[..., 0] + c[..., 1] * xx + c[..., 2] * yy)).astype(np.float32)


def test_level_terraces_same_as_full_grids(monkeypatch):
    monkeypatch.setattr(steps, "_BLOCK_ROWS", 7)
    img, terr = _terraces(seed=6)
    assert terr.n >= 2
    assert np.array_equal(steps.level_terraces(img, terr), _level_terraces_plain(img, terr))


# ------------------------------------------------------------------------------- anomaly
def _score_maps_plain(residual, valid, scales, floor=0.0, line_smooth=0, line_min_px=200):
    out = np.zeros(residual.shape, np.float32)
    ratio = np.ones(residual.shape, np.float32) if line_smooth else None
    for s in scales:
        g = ndi.gaussian_filter(residual, s)
        v = g[valid][::3]
        dev = g - np.median(v)
        z = np.abs(dev) / max(robust_location_scale(v)[1], floor)
        if ratio is not None:
            noise = max(robust_location_scale(v)[1], floor, 1e-12)
            a = np.where(valid, np.abs(dev), np.nan)
            lines = np.maximum(anomaly._line_noise(a, valid, 1, line_smooth, line_min_px)[:, None],
                               anomaly._line_noise(a, valid, 0, line_smooth, line_min_px)[None, :]) / noise
            better = z > out
            ratio[better] = np.maximum(lines, 1.0)[better]
        np.maximum(out, z, out=out)
    out[~valid] = 0.0
    return out, ratio


@pytest.mark.parametrize("line_smooth", [0, 9])
def test_score_maps_same_as_plain(line_smooth):
    rng = np.random.default_rng(7)
    r = rng.normal(0, 1, (260, 240)).astype(np.float32)
    r[40:44] *= 4.0                                    # noisy scan lines
    valid = np.ones(r.shape, bool)
    valid[:8] = valid[:, -8:] = False
    valid[100:120, 50:200] = False
    got = score_maps(r, valid, (1.5, 2.5, 4.0), 0.1, line_smooth, 100)
    want = _score_maps_plain(r, valid, (1.5, 2.5, 4.0), 0.1, line_smooth, 100)
    # the smoothing is an FFT's (`image.filters`): scipy's numbers to float32 rounding
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
    assert (got[1] is None) == (want[1] is None)
    if want[1] is not None:
        # a pixel whose two best scales tie within rounding may take the other's line ratio
        assert np.isclose(got[1], want[1], rtol=1e-4, atol=1e-4).mean() >= 0.999


def test_lattice_notch_same_as_plain():
    r = preprocess.normalize(_scan(seed=8)).astype(np.float32)
    cfg = AnomalyConfig()
    pad = cfg.notch_pad
    rp = np.pad(r, pad, mode="reflect")
    F = np.fft.rfft2(rp)
    Ps = np.fft.fftshift(np.log(np.abs(F) ** 2 + 1e-20), axes=0)
    peaks = np.fft.ifftshift(Ps - ndi.uniform_filter(Ps, size=cfg.notch_window, mode="nearest") > cfg.notch_k, axes=0)
    peaks &= np.hypot(np.fft.fftfreq(rp.shape[0])[:, None], np.fft.rfftfreq(rp.shape[1])[None, :]) >= cfg.min_freq
    peaks = ndi.binary_dilation(peaks, iterations=cfg.notch_radius)
    keep = np.clip(1.0 - ndi.gaussian_filter(peaks.astype(np.float32), 0.7), 0.0, 1.0)
    keep[0, 0] = 1.0
    clean = np.fft.irfft2(F * keep, s=rp.shape)[pad:pad + r.shape[0], pad:pad + r.shape[1]].astype(np.float32)
    got = anomaly.lattice_notch(r, cfg)
    # single-precision transforms: the same notches, the same numbers to float32 rounding
    np.testing.assert_allclose(got[0], clean, atol=1e-5)
    np.testing.assert_allclose(got[1], (r - clean).astype(np.float32), atol=1e-5)


def test_regions_same_as_whole_image_loop():
    img = preprocess.normalize(_scan(seed=9))
    cfg = AnomalyConfig()
    res = detect(img, cfg)
    assert len(res.regions) >= 3
    score = res.score
    pk = np.array([r["peak"] for r in res.regions])
    vals = score[pk[:, 0], pk[:, 1]]
    # the plain form: one whole-image comparison per defect, distances and indices from scipy
    lab = label(score > cfg.low_threshold, connectivity=2)
    seeds = np.zeros(score.shape, np.int32)
    seeds[pk[:, 0], pk[:, 1]] = np.arange(1, len(pk) + 1)
    _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    owner = seeds[iy, ix]
    mask = np.zeros(score.shape, bool)
    for i, (y, x) in enumerate(pk):
        reg = (lab == lab[y, x]) & (owner == i + 1)
        mask |= reg
        ys, xs = np.nonzero(reg)
        r = res.regions[i]
        assert r["bbox"] == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        assert r["area_px"] == len(ys) and r["score"] == float(vals[i])
        assert np.array_equal(res.region_map == r["id"] + 1, reg)   # the map holds each region's own pixels
    assert np.array_equal(res.mask, mask)
    assert np.array_equal(res.region_map > 0, mask)
    none, regions = anomaly._regions(score, np.zeros((0, 2), np.int64), np.zeros(0), np.zeros(0),
                                     np.zeros(0, np.int64), cfg)
    assert not none.any() and regions == []


# ------------------------------------------------------------------------------- pictures
def test_pictures_same_as_whole_image_formulas(monkeypatch):
    monkeypatch.setattr(render, "_BLOCK_PX", 1000)     # many blocks of rows
    rng = np.random.default_rng(10)
    img = (rng.random((90, 70)) * 1.2 - 0.1).astype(np.float32)
    rgba = colormaps["afmhot"](np.clip(img, 0, 1))
    assert np.array_equal(render.grey_to_rgb(img), (rgba[..., :3] * 255).astype(np.uint8))
    cm = rng.integers(-1, 25, img.shape)
    grey = (np.repeat(np.clip(img, 0, 1)[..., None], 3, axis=2) * 255).astype(np.float32)
    colours = np.array([render.class_colour(c) for c in range(20)], dtype=np.float32)
    want = grey.copy()
    sel = cm >= 0
    want[sel] = (1 - 0.6) * grey[sel] + 0.6 * colours[cm[sel] % 20]
    assert np.array_equal(render.class_picture(img, cm), want.astype(np.uint8))
    ch = rng.integers(-1, 6, img.shape)
    assert np.array_equal(render.character_picture(ch), render.colourise(ch, int(ch.max()) + 1))
    defects = [{"bbox": [3, 4, 20, 30], "class": 2, "name": "dimer"}, {"bbox": [10, 10, 15, 16], "class": None}]
    assert np.array_equal(render.overlay(img, defects), np.asarray(render.overlay_image(img, defects)))
