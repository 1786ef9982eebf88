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


def test_row_offsets_are_removed_and_a_defect_is_kept():
    noise = np.random.default_rng(1).normal(0, 0.1, (N, N)).astype(np.float32)
    streaks = _streaks(2, 1.0)
    defect = _blob(128, 100, 1.0)
    before = noise + streaks + defect
    out = remove_streaks(before)
    rest = out - noise - defect            # what is left of the streaks (and what the filter did)
    assert np.std(rest) < 0.2 * np.std(streaks)
    # the defect loses its own share of the axes (a few bins of its spectrum), and stands out
    # of what is left many times more than it stood out of the streaks
    assert out[128, 100] > 0.6 * (noise + defect)[128, 100]
    contrast = [a[128, 100] / np.std(np.delete(a, np.s_[110:147], axis=0)) for a in (before, out)]
    assert contrast[1] > 5 * contrast[0], contrast


def test_rows_and_columns_are_treated_alike():
    rng = np.random.default_rng(3)
    r = (rng.normal(0, 0.1, (N, N)).astype(np.float32) + _streaks(4, 1.0) + _blob(60, 190, 1.0))
    a = remove_streaks(np.rot90(r).copy())
    b = np.rot90(remove_streaks(r))
    assert np.allclose(a, b, atol=1e-4 * float(np.abs(r).max()))


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
    assert hit_on >= 7 and false_on <= 1, (hit_on, false_on)
    assert hit_on > hit_off, "the case to fix: the streaks hide them"
    # the class patches are cut from the residual as it is, not from the filtered one
    assert np.allclose(on.residual, off.residual)


def test_a_stored_config_from_before_the_filter_predicts_as_it_did():
    path = ("improved", "anomaly", "streak_filter")
    assert ADDED_LATER[path] is False
    today = PredictConfig().to_dict()
    del today["improved"]["anomaly"]["streak_filter"]
    assert PredictConfig.from_dict(today).improved.anomaly.streak_filter is False
    assert PredictConfig.from_dict(PredictConfig().to_dict()).improved.anomaly.streak_filter is True
