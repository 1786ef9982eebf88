"""The fast forms of the detector's steps give what the plain forms give: the FFT Gaussian of
`image.filters` scipy.ndimage's numbers, the k-d-tree peak merge the peaks of the quadratic loop,
the border-pixel fill of the step band the value of a nearest pixel as a distance transform,
the one-position median and sorted percentile numpy's numbers, and the candidate-window peaks
skimage's `peak_local_max`."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from stm_defects.image.filters import GaussianBank, gaussian
from stm_defects.image.peaks import local_peaks
from stm_defects.image.robust import median, median_rows, percentile
from stm_defects.improved.anomaly import _merge
from stm_defects.improved.steps import fill_from_nearest


@pytest.mark.parametrize("shape", [(512, 512), (37, 80), (301, 211), (9, 14)])
@pytest.mark.parametrize("mode", ["reflect", "nearest"])
def test_gaussian_as_scipy(shape, mode):
    rng = np.random.default_rng(sum(shape))
    a = rng.normal(size=shape).astype(np.float32)
    a += np.linspace(0, 5, shape[1], dtype=np.float32)[None, :]     # a slope: borders matter
    a[shape[0] // 2, shape[1] // 3] += 50.0                            # and one sharp spike
    bank = GaussianBank(a, 10.0, mode)
    # float32 rounding (a few 1e-6 here); a kernel one pixel too wide or narrow is off by ~1e-4
    for s in (0.7, 1.5, 2.0, 2.5, 4.0, 10.0):                         # radii past the small sides too
        want = ndi.gaussian_filter(a, s, mode=mode)
        got = bank.at(s)
        assert got.dtype == np.float32 and got.shape == a.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(gaussian(a, 2.5, mode), ndi.gaussian_filter(a, 2.5, mode=mode), rtol=0, atol=1e-5)
    assert np.array_equal(bank.at(0), a)                                # sigma 0: the image, as scipy


def test_gaussian_rounding_goes_with_the_variations_not_the_offset():
    rng = np.random.default_rng(3)
    a = (1000.0 + 0.01 * rng.normal(size=(200, 240))).astype(np.float32)
    want = ndi.gaussian_filter(a.astype(np.float64), 2.0)
    np.testing.assert_allclose(gaussian(a, 2.0), want, rtol=0, atol=1e-4)   # float32 spacing at 1000: 6e-5


def test_level_plane_is_not_fooled_by_a_lattice_on_a_grid():
    """The clipping statistics sample random pixels: a lattice whose period divides a regular
    grid's step would put every sample on its tops (the plane then sits on them)."""
    from stm_defects.image.preprocess import level_plane

    h = w = 1024
    yy, xx = np.mgrid[0:h, 0:w]
    z = np.cos(np.pi * xx / 2) * np.cos(np.pi * yy / 2) + 0.05 * np.random.default_rng(1).normal(size=(h, w))
    out = level_plane(z + 0.001 * xx - 0.002 * yy)
    assert abs(float(np.median(out))) < 0.05 and abs(float(out.mean())) < 0.05


def test_bank_refuses_what_it_cannot_give():
    a = np.zeros((20, 20), np.float32)
    with pytest.raises(ValueError, match="outside"):
        GaussianBank(a, 2.0).at(3.0)
    with pytest.raises(ValueError, match="mode"):
        GaussianBank(a, 2.0, "wrap")
    with pytest.raises(ValueError, match="2-D"):
        GaussianBank(np.zeros(5), 1.0)


def _merge_plain(peaks, vals, dist):
    order = np.argsort(-vals)
    kept = []
    for i in order:
        if all(np.hypot(*(peaks[i] - peaks[j])) >= dist for j in kept):
            kept.append(int(i))
    return np.asarray(kept, np.int64)


@pytest.mark.parametrize("seed", range(5))
def test_merge_same_as_quadratic_loop(seed):
    rng = np.random.default_rng(seed)
    pk = rng.integers(0, 120, (300, 2)).astype(float)
    pk[:10] = pk[10:20] + [[16, 0]] * 10          # pairs exactly at the merge distance stay two
    pk[20:25] = pk[25:30]                          # and coinciding peaks are one
    vals = rng.random(300)
    for dist in (0.0, 5.0, 16.0):
        assert np.array_equal(_merge(pk, vals, dist), _merge_plain(pk, vals, dist))


@pytest.mark.parametrize("seed", range(4))
def test_fill_takes_a_nearest_known_pixel(seed):
    rng = np.random.default_rng(seed)
    h, w = 90, 130
    values = rng.integers(0, 5, (h, w)).astype(np.int32)
    unknown = ndi.binary_dilation(rng.random((h, w)) < 0.01, iterations=rng.integers(1, 6))
    unknown[40:47, :] = True                                    # a band across the scan
    got = fill_from_nearest(values, unknown)
    dist, (iy, ix) = ndi.distance_transform_edt(unknown, return_indices=True)
    assert np.array_equal(got[~unknown], values[~unknown])
    uy, ux = np.nonzero(unknown)
    # the value came from a known pixel exactly as near as scipy's nearest (ties: either)
    ok = np.zeros(len(uy), bool)
    for k, (y, x) in enumerate(zip(uy, ux)):
        r = int(np.ceil(dist[y, x]))
        ys, xs = np.mgrid[max(0, y - r):min(h, y + r + 1), max(0, x - r):min(w, x + r + 1)]
        at = (~unknown[ys, xs]) & np.isclose(np.hypot(ys - y, xs - x), dist[y, x])
        ok[k] = got[y, x] in set(values[ys[at], xs[at]].tolist())
    assert ok.all()
    assert np.array_equal(fill_from_nearest(values, np.zeros((h, w), bool)), values)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_median_and_percentile_are_numpys(dtype):
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 4, 5, 50, 51, 1000, 82_007):
        for ties in (False, True):
            x = rng.normal(scale=100, size=n)
            if ties:
                x = np.round(x / 50) * 50
            if n > 4:
                x[::5] = np.inf if dtype is not np.int64 else x[::5]
            x = x.astype(dtype)
            want, got = np.median(x), median(x)
            assert type(got) is type(want) and got == want, (n, ties)
            q = [0.5, 2.5, 50, 97.5, 99.5]
            with np.errstate(invalid="ignore"):   # numpy's inf - inf between an inf and a number
                w, g = np.percentile(x, q), percentile(x, q)
            assert g.dtype == w.dtype and np.array_equal(g, w, equal_nan=True), (n, ties)
            rows = x[: (n // 7) * 7].reshape(7, -1) if n >= 7 else x.reshape(1, -1)
            w, g = np.median(rows, axis=1), median_rows(rows)
            assert g.dtype == w.dtype and np.array_equal(g, w), (n, ties)


def test_median_with_nan_or_nothing_is_numpys():
    x = np.array([3.0, np.nan, 1.0, 2.0], np.float32)
    assert np.isnan(median(x)) and np.isnan(median_rows(x[None]))[0]
    with pytest.warns(RuntimeWarning):
        assert np.isnan(median(np.zeros(0)))


@pytest.mark.parametrize("seed", range(6))
def test_local_peaks_are_peak_local_max(seed):
    from skimage.feature import peak_local_max

    rng = np.random.default_rng(seed)
    for k in range(30):
        h, w = rng.integers(5, 140, 2)
        img = ndi.gaussian_filter(rng.normal(size=(h, w)), rng.uniform(0.3, 3.0))
        img = (img / (np.abs(img).max() + 1e-12) * 10).astype(np.float32 if k % 2 else np.float64)
        if k % 3 == 0:
            img = np.round(img * 2) / 2            # plateaus: ties between neighbours
        md, thr = int(rng.integers(1, 8)), float(rng.uniform(-2.0, 6.0))
        want = peak_local_max(img, min_distance=md, threshold_abs=thr, exclude_border=False)
        got = local_peaks(img, md, thr)
        assert np.array_equal(got, want), (seed, k, md, thr)
    flat = np.full((20, 30), 9.0)                 # a constant image has no peak, as in skimage
    assert local_peaks(flat, 3, 5.0).shape == (0, 2)
    one = np.array([[5.0]])                       # ... but a one-pixel image above it has one
    assert np.array_equal(local_peaks(one, 1, 1.0), peak_local_max(one, min_distance=1, threshold_abs=1.0,
                                                                   exclude_border=False))
    img = np.full((30, 40), -np.inf)              # infinite and integer values
    img[5, 7], img[20, 30], img[21, 31] = 7.0, np.inf, 9.0
    for a in (img, np.where(np.isfinite(img), img, -5).astype(np.int64)):
        want = peak_local_max(a, min_distance=3, threshold_abs=1, exclude_border=False)
        assert np.array_equal(local_peaks(a, 3, 1), want)
