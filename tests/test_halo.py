"""One defect per charged defect: a core in a ring of the opposite sign (`anomaly.halo_groups`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stm_defects.analysis.dispatch import ADDED_LATER, PredictConfig
from stm_defects.improved.anomaly import AnomalyConfig, detect

N = 192


def _scan(features, seed: int = 0) -> np.ndarray:
    """A flat scan with white noise and the given (y, x, amplitude, sigma, ring radius) features:
    ring radius 0 is a Gaussian blob; > 0 a Gaussian ring of that radius."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:N, :N].astype(float)
    img = rng.normal(0.0, 0.02, (N, N))
    for y, x, amp, sigma, radius in features:
        r = np.hypot(yy - y, xx - x)
        img += amp * np.exp(-0.5 * ((r - radius) / sigma) ** 2)
    return ((img - img.min()) / np.ptp(img)).astype(np.float32)


def _halo(y: float, x: float) -> list[tuple]:
    """A bright core (sigma 3 px) in a dark ring of radius 16 px, which is weaker per pixel but
    larger, as a charged defect in a TMD images."""
    return [(y, x, 1.0, 3.0, 0.0), (y, x, -0.35, 3.0, 16.0)]


def _centres(res) -> np.ndarray:
    return np.array([[r["y"], r["x"]] for r in res.regions]).reshape(-1, 2)


def test_a_core_in_its_halo_is_one_defect_at_the_core():
    img = _scan(_halo(96, 96))
    split = detect(img, dataclasses.replace(AnomalyConfig(), halo_distance=0.0))
    assert len(split.regions) > 1, "the ring gives peaks of its own (the case to fix)"
    res = detect(img, AnomalyConfig())
    assert len(res.regions) == 1
    (y, x), = _centres(res)
    assert np.hypot(y - 96, x - 96) < 3, "placed at the core, not on the ring"
    assert res.regions[0]["sign"] > 0
    # the ring's pixels belong to the defect
    box = res.regions[0]["bbox"]
    assert box[2] - box[0] > 30 and box[3] - box[1] > 30


def test_two_defects_of_opposite_sign_side_by_side_stay_two():
    # a bright and a dark blob 24 px apart (closer than halo_distance): neither rings the other
    img = _scan([(96, 84, 1.0, 3.0, 0.0), (96, 108, -1.0, 3.0, 0.0)])
    res = detect(img, AnomalyConfig())
    assert len(res.regions) == 2
    assert sorted(np.sign([r["sign"] for r in res.regions])) == [-1.0, 1.0]


def test_a_weak_dip_among_strong_defects_does_not_swallow_them():
    """Four strong bright defects around a weak dark dip ring it, but a ring is induced by its
    core and is not many times stronger than it (`halo_ring_max`): all five stay. (Without
    that bound the dip takes the four.)"""
    around = [(96 + 22 * np.sin(a), 96 + 22 * np.cos(a), 0.4, 4.0, 0.0) for a in np.arange(4) * np.pi / 2 + 0.3]
    img = _scan([(96, 96, -0.06, 3.0, 0.0), *around])
    res = detect(img, AnomalyConfig())
    assert sum(r["sign"] > 0 for r in res.regions) == 4
    assert any(r["sign"] < 0 and np.hypot(r["y"] - 96, r["x"] - 96) < 3 for r in res.regions)
    unbounded = detect(img, dataclasses.replace(AnomalyConfig(), halo_ring_max=100.0))
    assert sum(r["sign"] > 0 for r in unbounded.regions) == 0


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_halo_merge_keeps_the_rotation(k):
    img = _scan(_halo(90, 100) + [(40, 40, -1.0, 3.0, 0.0)])
    res = detect(np.rot90(img, k).copy(), AnomalyConfig())
    assert len(res.regions) == 2


def test_a_stored_config_from_before_halos_predicts_as_it_did():
    """A registered model's config that predates `halo_distance` gets 0 (off), not today's default."""
    path = ("improved", "anomaly", "halo_distance")
    assert ADDED_LATER[path] == 0.0
    today = PredictConfig().to_dict()
    del today["improved"]["anomaly"]["halo_distance"]
    old = PredictConfig.from_dict(today)
    assert old.improved.anomaly.halo_distance == 0.0
    assert PredictConfig.from_dict(PredictConfig().to_dict()).improved.anomaly.halo_distance == 30.0
    assert "halo_distance" not in today["improved"]["anomaly"], "the caller's dict is left alone"
