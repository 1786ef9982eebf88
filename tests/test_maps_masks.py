import math

import numpy as np
import pytest
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from stm_defects.models.cluster import make_kmeans
from stm_defects.paper.maps import character_map, colourise, error_map
from stm_defects.paper.masks import (
    MaskConfig,
    defect_mask,
    defect_regions,
    mask_centres,
    remove_line_like,
    remove_small,
    threshold_value,
)

NO_MORPH = {
    "max_aspect_ratio": None,
    "erosion_radius": 0,
    "smooth_sigma": 0,
    "dilation_radius": 0,
    "min_area": 0,
    "opening_radius": 0,
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with threadpool_limits(limits=1):
        yield


def mean_encoder(patches):
    """Fake encoder: mean intensity and spread of each patch, (N, 2)."""
    p = np.asarray(patches).reshape(len(patches), -1)
    return np.stack([p.mean(axis=1), p.std(axis=1)], axis=1)


# --------------------------------------------------------------------------- #
# maps
# --------------------------------------------------------------------------- #
def test_character_map_bright_half():
    rng = np.random.default_rng(0)
    img = 0.2 + 0.02 * rng.standard_normal((96, 128))
    img[:, 64:] += 0.6
    calls = []

    def enc(p):
        calls.append(len(p))
        return mean_encoder(p)

    km = KMeans(n_clusters=2, n_init=4, random_state=0)
    cmap, labels, origins = character_map(img, enc, km, size=32, stride=8, batch=10)
    assert cmap.shape == img.shape and cmap.dtype.kind == "i"
    assert labels.shape == (len(origins),) and origins.shape[1] == 2
    assert max(calls) <= 10 and sum(calls) == len(origins)  # batched
    left, right = cmap[:, :48], cmap[:, 80:]
    assert np.unique(left).size == 1 and np.unique(right).size == 1
    assert left[0, 0] != right[0, 0]
    assert set(np.unique(cmap)) == {0, 1}
    # boundary near the middle column
    row = cmap[48]
    switch = np.flatnonzero(row != row[0])[0]
    assert 56 <= switch <= 72

    # an already fitted pipeline is used as is (predict only)
    pipe = make_kmeans(2, seed=0).fit(mean_encoder(np.stack([img[None, :32, :32], img[None, :32, -32:]])))
    cmap2, _, _ = character_map(img, mean_encoder, pipe, size=32, stride=8)
    assert np.unique(cmap2[:, :48]).size == 1 and cmap2[0, 0] != cmap2[0, -1]


def test_error_map_peaks_on_bright_blob():
    img = np.zeros((96, 96), np.float32)
    yy, xx = np.mgrid[:96, :96]
    img[(yy - 40) ** 2 + (xx - 60) ** 2 <= 25] = 1.0

    def recon(p):
        return np.zeros_like(p)

    e = error_map(img, recon, size=32, stride=16, sigma=2.0)
    assert e.shape == img.shape and e.dtype == np.float32
    assert np.all(np.isfinite(e))
    r, c = np.unravel_index(np.argmax(e), e.shape)
    assert abs(r - 40) <= 2 and abs(c - 60) <= 2
    assert e[5, 5] < 1e-3 * e.max()
    # no smoothing: exactly the squared error (each pixel covered identically)
    e0 = error_map(img, recon, size=32, stride=16, sigma=0)
    np.testing.assert_allclose(e0, img**2, atol=1e-6)

    e_const = error_map(img, lambda p: np.full_like(p, 0.5), sigma=0)
    np.testing.assert_allclose(e_const, 0.25, atol=1e-6)


def test_colourise():
    lab = np.array([[0, 1], [2, -1]])
    rgb = colourise(lab, 3)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert np.all(rgb[1, 1] == 0)
    assert len({tuple(rgb[0, 0]), tuple(rgb[0, 1]), tuple(rgb[1, 0])}) == 3
    rgb2 = colourise(lab, 30, cmap="viridis")
    assert rgb2.shape == (2, 2, 3)
    with pytest.raises(ValueError):
        colourise(lab, 2)


# --------------------------------------------------------------------------- #
# thresholds / config
# --------------------------------------------------------------------------- #
def test_threshold_value():
    e = np.arange(101, dtype=float)
    assert threshold_value(e, 3.5) == 3.5
    assert threshold_value(e, "p95") == pytest.approx(95.0)
    assert threshold_value(e, "p99.5") == pytest.approx(99.5)
    med = 50.0
    mad = np.median(np.abs(e - med))
    assert threshold_value(e, "mad:3") == pytest.approx(med + 3 * 1.4826 * mad)
    with pytest.raises(ValueError):
        threshold_value(e, "q95")
    with pytest.raises(ValueError):
        threshold_value(e, "p150")


def test_mask_config_from_dict():
    cfg = MaskConfig.from_dict({"threshold": "mad:4", "target_clusters": [2, 5], "min_area": 10})
    assert cfg.target_clusters == (2, 5) and cfg.min_area == 10 and cfg.threshold == "mad:4"
    assert MaskConfig.from_dict({}) == MaskConfig()
    with pytest.raises(ValueError, match="unknown"):
        MaskConfig.from_dict({"treshold": 0.1})
    with pytest.raises(ValueError):
        MaskConfig(threshold="bogus")
    assert MaskConfig.from_dict(cfg.to_dict()) == cfg


# --------------------------------------------------------------------------- #
# defect mask
# --------------------------------------------------------------------------- #
def _disc(shape, r0, c0, rad):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - r0) ** 2 + (xx - c0) ** 2 <= rad**2


def test_defect_mask_blob_gives_one_region():
    shape = (80, 100)
    err = np.zeros(shape)
    err[_disc(shape, 30, 60, 6)] = 1.0
    cfg = MaskConfig(threshold=0.5)
    m = defect_mask(err, None, cfg)
    assert m.dtype == bool and m.shape == shape
    regs = defect_regions(m, score_map=err)
    assert len(regs) == 1
    r = regs[0]
    assert r["id"] == 0
    assert r["x"] == pytest.approx(60, abs=0.5) and r["y"] == pytest.approx(30, abs=0.5)
    x0, y0, x1, y1 = r["bbox"]
    # net effect of erode(1) + smooth + dilate(2) + open(1): grown by ~1 px
    assert abs(x0 - 54) <= 2 and abs(x1 - 67) <= 2
    assert abs(y0 - 24) <= 2 and abs(y1 - 37) <= 2
    assert r["area_px"] == int(m.sum())
    assert 0 < r["score"] <= 1

    # with all steps disabled the mask is exactly the thresholded disc
    m0 = defect_mask(err, None, MaskConfig(threshold=0.5, **NO_MORPH))
    np.testing.assert_array_equal(m0, _disc(shape, 30, 60, 6))
    (r0,) = defect_regions(m0)
    assert r0["bbox"] == [54, 24, 67, 37]
    assert r0["score"] is None


def test_thin_line_removed_by_aspect_filter():
    shape = (80, 100)
    err = np.zeros(shape)
    err[40:43, 10:90] = 1.0  # 3 px x 80 px line
    err[_disc(shape, 15, 20, 5)] = 1.0
    only_aspect = dict(NO_MORPH, max_aspect_ratio=4.0)
    m = defect_mask(err, None, MaskConfig(threshold=0.5, **only_aspect))
    assert not m[41, 50]
    assert m[15, 20]
    regs = defect_regions(m)
    assert len(regs) == 1
    # a thick line (wider than the erosion) also goes with the full pipeline
    err2 = np.zeros(shape)
    err2[30:37, 5:95] = 1.0
    assert not defect_mask(err2, None, MaskConfig(threshold=0.5)).any()
    # and stays without the aspect filter
    assert defect_mask(err2, None, MaskConfig(threshold=0.5, max_aspect_ratio=None)).any()
    # remove_line_like on its own
    diag = np.eye(30, dtype=bool)
    assert not remove_line_like(diag, 4.0).any()
    single = np.zeros((5, 5), bool)
    single[2, 2] = True
    assert remove_line_like(single, 4.0)[2, 2]


def test_tiny_speck_removed_by_min_area():
    shape = (60, 60)
    err = np.zeros(shape)
    err[10:13, 10:13] = 1.0  # 9 px speck
    err[_disc(shape, 40, 40, 6)] = 1.0
    cfg = MaskConfig(threshold=0.5, **dict(NO_MORPH, min_area=20))
    m = defect_mask(err, None, cfg)
    assert not m[11, 11] and m[40, 40]
    # the same with the full default pipeline
    m_full = defect_mask(err, None, MaskConfig(threshold=0.5))
    assert not m_full[11, 11] and m_full[40, 40]
    assert len(defect_regions(m_full)) == 1
    # remove_small keeps regions of exactly min_area
    x = np.zeros((10, 10), bool)
    x[1:5, 1:6] = True  # 20 px
    np.testing.assert_array_equal(remove_small(x, 20), x)
    assert not remove_small(x, 21).any()


def test_union_with_target_cluster():
    shape = (64, 64)
    err = np.zeros(shape)
    err[_disc(shape, 16, 16, 5)] = 1.0
    char = np.zeros(shape, int)
    char[_disc(shape, 45, 45, 6)] = 3
    char[_disc(shape, 45, 15, 6)] = 1
    m_err = defect_mask(err, char, MaskConfig(threshold=0.5))
    assert m_err[16, 16] and not m_err[45, 45] and not m_err[45, 15]
    m_union = defect_mask(err, char, MaskConfig(threshold=0.5, target_clusters=(3,)))
    assert m_union[16, 16] and m_union[45, 45] and not m_union[45, 15]
    assert len(defect_regions(m_union)) == 2
    m_clusters_only = defect_mask(None, char, MaskConfig(threshold=None, target_clusters=(1, 3)))
    assert not m_clusters_only[16, 16] and m_clusters_only[45, 45] and m_clusters_only[45, 15]
    with pytest.raises(ValueError):
        defect_mask(err, char[:10], MaskConfig(threshold=0.5))


def test_percentile_threshold_default():
    rng = np.random.default_rng(0)
    shape = (128, 128)
    err = 0.01 * rng.random(shape)
    err[_disc(shape, 64, 64, 8)] += 1.0  # ~1.2 % of the pixels
    m = defect_mask(err, None, MaskConfig())  # a percentile default keeps the top few %: disc plus specks
    assert str(MaskConfig().threshold).startswith("p")
    regs = defect_regions(m, err)
    big = max(regs, key=lambda r: r["area_px"])
    assert big["x"] == pytest.approx(64, abs=1) and big["y"] == pytest.approx(64, abs=1)
    m_mad = defect_mask(err, None, MaskConfig(threshold="mad:10"))
    assert len(defect_regions(m_mad)) == 1


def test_defect_regions_sorted_and_empty():
    m = np.zeros((50, 50), bool)
    m[30:34, 5:9] = True
    m[5:9, 40:44] = True
    m[5:9, 10:14] = True
    regs = defect_regions(m)
    assert [r["id"] for r in regs] == [0, 1, 2]
    assert [(r["bbox"][0], r["bbox"][1]) for r in regs] == [(10, 5), (40, 5), (5, 30)]
    assert all(r["area_px"] == 16 for r in regs)
    assert regs[0]["x"] == pytest.approx(11.5) and regs[0]["y"] == pytest.approx(6.5)
    assert defect_regions(np.zeros((5, 5), bool)) == []
    score = np.full((50, 50), np.nan)
    score[m] = 2.0
    assert all(math.isclose(r["score"], 2.0) for r in defect_regions(m, score))


def test_mask_centres():
    m = np.zeros((40, 40), bool)
    m[10:19, 20:29] = True
    c = mask_centres(m, stride=4)
    assert c.shape == (6, 2) and c.dtype == np.int64
    assert set(map(tuple, c)) == {(r, q) for r in (12, 16) for q in (20, 24, 28)}
    assert np.all(m[c[:, 0], c[:, 1]])
    assert mask_centres(np.zeros((8, 8), bool)).shape == (0, 2)
    full = np.ones((40, 40), bool)
    cm = mask_centres(full, stride=4, margin=16)
    assert cm.min() >= 16 and cm.max() < 24
