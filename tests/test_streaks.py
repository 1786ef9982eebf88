"""Scan-line streaks are taken out of the residual before it is scored (`anomaly.remove_streaks`,
`AnomalyConfig.streak_filter`): the power on the spectrum's two axes is brought down to that of
the other directions, learned from the scan itself."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stm_defects.analysis.dispatch import ADDED_LATER, PredictConfig
from stm_defects.improved.anomaly import AnomalyConfig, detect, remove_streaks

N = 256


def _blob(y: float, x: float, amp: float, sigma: float = 3.0) -> np.ndarray:
    yy, xx = np.mgrid[:N, :N].astype(np.float32)
    return (amp * np.exp(-0.5 * ((yy - y) ** 2 + (xx - x) ** 2) / sigma ** 2)).astype(np.float32)


def _streaks(seed: int, amp: float) -> np.ndarray:
    """Line-to-line offsets (constant along each row), as tip changes and feedback leave them."""
    rng = np.random.default_rng(seed)
    return np.repeat((amp * rng.standard_normal(N)).astype(np.float32)[:, None], N, axis=1)


def test_white_noise_is_left_about_as_it_is():
    r = np.random.default_rng(0).normal(size=(N, N)).astype(np.float32)
    out = remove_streaks(r)
    assert out.dtype == np.float32 and out.shape == r.shape
    assert np.std(out - r) < 0.1 * np.std(r)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_row_offsets_are_removed_and_a_defect_is_kept(seed):
    noise = np.random.default_rng(seed).normal(0, 0.1, (N, N)).astype(np.float32)
    streaks = _streaks(seed + 10, 1.0)
    defect = _blob(128, 100, 1.0)
    before = noise + streaks + defect
    out = remove_streaks(before)
    rest = out - noise - defect            # what is left of the streaks (and what the filter did)
    assert np.std(rest) < 0.3 * np.std(streaks)   # 0.16-0.22 on these seeds

    def contrast(a):
        """The defect's height over its own row, against the std of the rows away from it."""
        return (a[128, 100] - np.median(a[128, 130:])) / np.std(np.delete(a, np.s_[110:147], axis=0))

    # the defect loses a little of itself (its share of the axes) and stands out of what is
    # left many times more than out of the streaks (about 1 -> 5 on these seeds)
    assert out[128, 100] > 0.5 * (noise + defect)[128, 100]
    assert contrast(before) < 1.5 and contrast(out) > 3 * contrast(before), (contrast(before), contrast(out))


def test_rows_and_columns_are_treated_alike():
    rng = np.random.default_rng(3)
    r = (rng.normal(0, 0.1, (N, N)).astype(np.float32) + _streaks(4, 1.0) + _blob(60, 190, 1.0))
    a = remove_streaks(np.rot90(r).copy())
    b = np.rot90(remove_streaks(r))
    assert np.allclose(a, b, atol=1e-4 * float(np.abs(r).max()))


@pytest.mark.parametrize("shape", [(8, 8), (9, 13), (13, 9), (65, 81), (64, 80)])
def test_the_half_spectrum_is_smoothed_as_the_whole_one(shape):
    from scipy import ndimage as ndi

    from stm_defects.improved.anomaly import _smooth_half_spectrum

    h, w = shape
    a = np.random.default_rng(7).normal(size=shape)
    whole = np.log(np.abs(np.fft.fft2(a)) ** 2)
    half = np.log(np.abs(np.fft.rfft2(a)) ** 2)
    want = ndi.gaussian_filter(whole, 1.0, mode="wrap")[:, :w // 2 + 1]
    assert np.allclose(_smooth_half_spectrum(half, w), want, atol=1e-9)


def test_tiny_scans_pass_through():
    r = np.arange(10, dtype=np.float32).reshape(1, 10)
    assert np.array_equal(remove_streaks(r), r)
    assert remove_streaks(np.zeros((2, 2), np.float32)).shape == (2, 2)


def test_zero_pixels_stay_zero():
    r = np.random.default_rng(5).normal(size=(64, 80)).astype(np.float32) + _streaks(6, 2.0)[:64, :80]
    zero = np.zeros(r.shape, bool)
    zero[20:30] = True
    r[zero] = 0.0
    out = remove_streaks(r, zero)
    assert (out[zero] == 0).all() and out.shape == (64, 80)


def _scan(seed: int) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """White noise with strong row streaks and eight faint defects (on a 4 x 2 grid)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0.0, 0.05, (N, N)).astype(np.float32) + _streaks(seed + 100, 0.15)
    spots = [(48 + 53 * i, 80 + 96 * j) for i in range(4) for j in range(2)]
    for y, x in spots:
        img += _blob(y, x, 0.16, 2.5)
    return ((img - img.min()) / np.ptp(img)).astype(np.float32), spots


def _found(res, spots) -> tuple[int, int]:
    got = np.array([[r["y"], r["x"]] for r in res.regions]).reshape(-1, 2)
    hit = sum(bool(len(got)) and np.hypot(*(got - s).T).min() <= 4 for s in spots)
    return hit, len(got) - hit


@pytest.mark.parametrize("seed", [0, 1])
def test_faint_defects_among_streaks_are_found(seed):
    img, spots = _scan(seed)
    off = detect(img, dataclasses.replace(AnomalyConfig(), streak_filter=False))
    on = detect(img, AnomalyConfig())
    hit_off, false_off = _found(off, spots)
    hit_on, false_on = _found(on, spots)
    assert hit_off <= 2, "the case to fix: the streaks hide them"
    assert hit_on >= hit_off + 4 and false_on <= 1, (hit_off, hit_on, false_on)
    # the class patches are cut from the residual as it is, not from the filtered one
    assert np.allclose(on.residual, off.residual)


def test_a_stored_config_from_before_the_filter_predicts_as_it_did():
    path = ("improved", "anomaly", "streak_filter")
    assert ADDED_LATER[path] is False
    today = PredictConfig().to_dict()
    del today["improved"]["anomaly"]["streak_filter"]
    assert PredictConfig.from_dict(today).improved.anomaly.streak_filter is False
    assert PredictConfig.from_dict(PredictConfig().to_dict()).improved.anomaly.streak_filter is True


@pytest.mark.parametrize("h,w", [(512, 512), (511, 510), (64, 65), (7, 4)])
def test_ring_medians_are_numpy_medians_of_each_ring(h, w):
    from stm_defects.improved.anomaly import _ring_medians, _rings

    rng = np.random.default_rng(h * w)
    v = rng.standard_normal((h, w // 2 + 1)).astype(np.float32)
    v[rng.random(v.shape) < 0.01] = 0.5          # ties
    ring = _rings(h, w)
    use = rng.random(v.shape) > 0.1
    got = _ring_medians(v, ring, use)
    for r in range(int(ring.max()) + 1):
        sel = v[(ring == r) & use]
        want = np.median(sel) if sel.size else np.inf
        assert got[r] == want, (r, sel.size)
    assert got.dtype == np.float32
    assert np.all(_ring_medians(v, ring, np.zeros_like(use)) == np.inf)     # no bins: +inf
