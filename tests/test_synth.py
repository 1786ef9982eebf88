"""Tests for the synthetic Si(001) STM scan generator."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from stm_defects.data.synth import (
    DEFECT_CLASSES,
    HARD,
    SI001_ROW_PERIOD_NM,
    SynthConfig,
    SynthScan,
    synth_scan,
    truth_dict,
)

SMALL = SynthConfig(size=128)
# 25.6 nm square (explicit, not the size default): the default density of 1.2-3.0 defects per
# 100 nm^2 gives about 8-20 defects per scan.
SCAN = SynthConfig(size=256)
CLEAN = SynthConfig(
    snr=(1e9, 1e9),
    tilt_nm_per_px=0.0,
    line_offset_nm=0.0,
    scar_prob=0.0,
    tip_change_prob=0.0,
    defects_per_100nm2=(0.0, 0.0),
    n_steps=(1, 1),
)


def _row_wavevector_angle(z: np.ndarray, mask: np.ndarray, pixel_nm: float) -> float:
    """Angle (deg, mod 180) of the strongest Fourier peak at the dimer-row frequency."""
    zz = np.where(mask, z - z[mask].mean(), 0.0)
    F = np.abs(np.fft.fftshift(np.fft.fft2(zz)))
    n0, n1 = z.shape
    fy, fx = np.meshgrid(
        np.fft.fftshift(np.fft.fftfreq(n0)), np.fft.fftshift(np.fft.fftfreq(n1)), indexing="ij"
    )
    fr = np.hypot(fx, fy)
    f0 = pixel_nm / SI001_ROW_PERIOD_NM
    F[(fr < 0.75 * f0) | (fr > 1.25 * f0)] = 0.0
    i = int(np.argmax(F))
    return math.degrees(math.atan2(fy.ravel()[i], fx.ravel()[i])) % 180.0


def test_defect_classes_distinct():
    assert len(DEFECT_CLASSES) >= 5
    assert len(set(DEFECT_CLASSES)) == len(DEFECT_CLASSES)


def test_shape_and_dtype():
    s = synth_scan(SMALL, 0)
    assert isinstance(s, SynthScan)
    assert s.height.shape == (128, 128)
    assert s.height.dtype == np.float32
    assert np.isfinite(s.height).all()
    assert s.step_mask.shape == (128, 128) and s.step_mask.dtype == bool
    assert s.terraces.shape == (128, 128) and np.issubdtype(s.terraces.dtype, np.integer)
    assert s.pixel_nm == SMALL.pixel_nm


def test_deterministic_per_seed():
    a, b, c = synth_scan(SMALL, 7), synth_scan(SMALL, 7), synth_scan(SMALL, 8)
    np.testing.assert_array_equal(a.height, b.height)
    np.testing.assert_array_equal(a.step_mask, b.step_mask)
    np.testing.assert_array_equal(a.terraces, b.terraces)
    assert a.defects == b.defects
    assert a.meta == b.meta
    assert not np.array_equal(a.height, c.height)


def test_defects_inside_and_separated():
    for seed in range(6):
        cfg = SCAN
        s = synth_scan(cfg, seed)
        H, W = s.height.shape
        assert 5 <= len(s.defects) <= 25
        pts = []
        for d in s.defects:
            assert 0 <= d["x"] <= W - 1 and 0 <= d["y"] <= H - 1
            assert d["class"] in DEFECT_CLASSES
            assert DEFECT_CLASSES[d["class_id"]] == d["class"]
            assert d["radius_px"] > 0
            iy, ix = round(d["y"]), round(d["x"])
            assert not s.step_mask[iy, ix], "defect centre on a step edge"
            pts.append((d["x"], d["y"]))
        p = np.array(pts)
        dist = np.hypot(p[:, None, 0] - p[None, :, 0], p[:, None, 1] - p[None, :, 1])
        dist[np.diag_indices(len(p))] = np.inf
        assert dist.min() >= cfg.min_defect_distance_px


def test_default_density_gives_8_to_20_defects():
    counts = [len(synth_scan(SCAN, s).defects) for s in range(10)]
    assert 8 <= np.mean(counts) <= 20


def test_every_class_appears():
    seen = set()
    for seed in range(6):
        seen.update(d["class"] for d in synth_scan(SCAN, seed).defects)
    assert seen == set(DEFECT_CLASSES)


def test_step_mask_iff_steps():
    saw_zero = saw_some = False
    for seed in range(12):
        s = synth_scan(SMALL, seed)
        n = s.meta["n_steps"]
        assert s.step_mask.any() == (n > 0)
        assert s.terraces.max() <= n
        if n == 0:
            saw_zero = True
            assert (s.terraces == 0).all()
        else:
            saw_some = True
    assert saw_zero and saw_some


def test_truth_dict_json_serialisable():
    s = synth_scan(HARD, 3)
    t = truth_dict(s)
    txt = json.dumps(t, allow_nan=False)
    back = json.loads(txt)
    assert back["shape"] == [HARD.size, HARD.size]
    assert back["pixel_nm"] == pytest.approx(0.1)
    assert back["n_steps"] == s.meta["n_steps"]
    assert len(back["defects"]) == len(s.defects)
    for key in ("seed", "snr", "n_steps", "tip_change_row", "config"):
        assert key in back["meta"]


def test_rows_rotate_across_step():
    checked = 0
    for seed in range(20):
        s = synth_scan(CLEAN, seed)
        masks = [(s.terraces == t) & ~s.step_mask for t in (0, 1)]
        if min(m.mean() for m in masks) < 0.2:
            continue
        a0 = _row_wavevector_angle(s.height, masks[0], s.pixel_nm)
        a1 = _row_wavevector_angle(s.height, masks[1], s.pixel_nm)
        diff = abs(a0 - a1) % 180.0
        diff = min(diff, 180.0 - diff)
        assert abs(diff - 90.0) < 8.0, (seed, a0, a1)
        # the measured row normal matches the recorded row direction (+90 deg)
        exp0 = (s.meta["terrace_row_angles_deg"][0] + 90.0) % 180.0
        d0 = abs(a0 - exp0) % 180.0
        assert min(d0, 180.0 - d0) < 8.0
        checked += 1
        if checked == 2:
            break
    assert checked == 2


def test_step_height_is_monatomic():
    s = synth_scan(dataclasses.replace(CLEAN, row_angle_deg=0.0), 1)
    h = s.height
    far = ~s.step_mask
    m0 = np.median(h[(s.terraces == 0) & far])
    m1 = np.median(h[(s.terraces == 1) & far])
    assert abs(m0 - m1) == pytest.approx(0.136, abs=0.02)


def test_hard_has_more_steps_and_lower_snr():
    d = [synth_scan(dataclasses.replace(SynthConfig(), size=96), s).meta for s in range(20)]
    h = [synth_scan(dataclasses.replace(HARD, size=96), s).meta for s in range(20)]
    assert np.mean([m["n_steps"] for m in h]) > np.mean([m["n_steps"] for m in d])
    assert np.mean([m["snr"] for m in h]) < np.mean([m["snr"] for m in d])
    assert HARD.n_steps == (1, 4)
    assert max(HARD.snr) <= max(SynthConfig().snr) and np.mean(HARD.snr) < np.mean(SynthConfig().snr)


def test_truth_defect_records_have_required_keys():
    s = synth_scan(SynthConfig(size=128), 4)
    t = truth_dict(s)
    for d in t["defects"]:
        assert set(d) >= {"x", "y", "class", "class_id", "radius_px"}
