"""Each terrace carries the lattice with its own phase, so the scan-wide notch leaves a wall of
lattice-like residual along every step: no defect is looked for within
`AnomalyConfig.step_lattice_periods` lattice periods of a step line (`anomaly.lattice_period`);
the noise is still estimated there."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage as ndi

from stm_defects.analysis.dispatch import ADDED_LATER, PredictConfig, analyse
from stm_defects.analysis.scores import match_points
from stm_defects.data.lattices import lattice_scan
from stm_defects.image.preprocess import preprocess
from stm_defects.improved.anomaly import AnomalyConfig, lattice_notch, lattice_period
from stm_defects.results import Models


@pytest.mark.parametrize("period", [4.0, 7.5, 12.0])
def test_lattice_period_is_the_strongest_peak_of_the_removed_lattice(period):
    yy, xx = np.mgrid[:256, :256].astype(np.float32)
    rng = np.random.default_rng(0)
    img = np.cos(2 * np.pi * (0.8 * xx + 0.6 * yy) / period) + 0.3 * rng.normal(size=(256, 256))
    _, lat = lattice_notch(img.astype(np.float32), AnomalyConfig())
    assert lattice_period(lat, AnomalyConfig().min_freq) == pytest.approx(period, rel=0.08)
    assert lattice_period(np.zeros((64, 64), np.float32), 0.06) is None


def _run(scan, periods: float):
    cfg = PredictConfig()
    cfg = dataclasses.replace(cfg, improved=dataclasses.replace(
        cfg.improved, anomaly=dataclasses.replace(cfg.improved.anomaly, step_lattice_periods=periods)))
    img, scale = preprocess(scan.height, scan.pixel_nm, cfg.preprocess)
    res = analyse(img, Models(), cfg, scan.pixel_nm / scale)
    p = np.array([[r["x"] / scale, r["y"] / scale] for r in res.regions]).reshape(-1, 2)
    t = np.array([[d["x"], d["y"]] for d in scan.defects]).reshape(-1, 2)
    m = match_points(p, t, [d["radius_px"] + 2.0 + 0.3 / scan.pixel_nm for d in scan.defects])
    false = np.array([i for i in range(len(p)) if i not in {a for a, _ in m}], int)
    return p, len(m), false


def test_no_wall_of_false_detections_along_the_steps_of_a_7x7_scan():
    # Si(111)-7x7 at 0.21 nm/px with two steps: the scan-wide notch leaves the lattice's phase
    # change across each step as a line of false detections a few px beside it
    scan = lattice_scan("si111_7x7", size=384, pixel_nm=0.21, n_defects=(9, 9), snr=4.1, seed=8, n_steps=2)
    dist = ndi.distance_transform_edt(~scan.step_mask)            # px to the true step edges
    p0, tp0, false0 = _run(scan, 0.0)
    p1, tp1, false1 = _run(scan, 1.0)
    near0 = int((dist[p0[false0, 1].round().astype(int), p0[false0, 0].round().astype(int)] < 20).sum())
    assert near0 >= 8, (near0, len(false0))                       # the wall, without the rule
    # <= 8: five detections 10-18 px from the steps (beyond one 7x7 period, 12.8 px here) are
    # left, and the streak filter's lower noise estimate (`remove_streaks`) lifts three more
    # over the threshold, as on the lattice dev split (7x7 precision 0.75 -> 0.74)
    assert len(false1) <= len(false0) - 8 and len(false1) <= 8, (len(false0), len(false1))
    assert tp1 >= tp0 - 1, (tp0, tp1)                              # the defects are still found


def test_a_scan_without_steps_is_not_touched():
    scan = lattice_scan("si111_7x7", size=256, pixel_nm=0.1, n_defects=(6, 6), snr=4.0, seed=3, n_steps=0)
    p0, _, _ = _run(scan, 0.0)
    p1, _, _ = _run(scan, 3.0)
    assert np.array_equal(p0, p1)


def test_a_stored_config_from_before_predicts_as_it_did():
    path = ("improved", "anomaly", "step_lattice_periods")
    assert ADDED_LATER[path] == 0.0
    today = PredictConfig().to_dict()
    del today["improved"]["anomaly"]["step_lattice_periods"]
    assert PredictConfig.from_dict(today).improved.anomaly.step_lattice_periods == 0.0
    assert PredictConfig().improved.anomaly.step_lattice_periods == 1.0
