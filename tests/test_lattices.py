"""Tests for the synthetic multi-lattice STM scan generator."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from stm_defects.data.lattices import (
    DEFECT_KINDS,
    LATTICES,
    MIN_DEFECT_DISTANCE_PX,
    LatticeScan,
    get_spec,
    lattice_height,
    lattice_scan,
    truth_points,
)

S3 = math.sqrt(3) / 2
HEX = ("wse2_hex", "graphite", "si111_7x7")
PERIOD = {  # shortest lattice period (nm)
    "si001_2x1": 0.384,
    "si001_h_1x1": 0.384,
    "ge001_c4x2": 0.8,
    "wse2_hex": 0.328,
    "graphite": 0.246,
    "si111_7x7": 2.688,
}
FRINGE = {  # spacing of the strongest FFT peak (nm): row spacing for the triangular lattices
    "si001_2x1": 0.768,
    "si001_h_1x1": 0.384,
    "ge001_c4x2": 0.8,
    "wse2_hex": 0.328 * S3,
    "graphite": 0.246 * S3,
    "si111_7x7": 2.688 * S3,
}


def _spectrum(z: np.ndarray, pixel_nm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hann-windowed magnitude spectrum (DC removed) and its fx, fy grids in cycles/nm."""
    n0, n1 = z.shape
    win = np.outer(np.hanning(n0), np.hanning(n1))
    F = np.abs(np.fft.fftshift(np.fft.fft2((z - z.mean()) * win)))
    fy, fx = np.meshgrid(
        np.fft.fftshift(np.fft.fftfreq(n0, pixel_nm)),
        np.fft.fftshift(np.fft.fftfreq(n1, pixel_nm)),
        indexing="ij",
    )
    F[np.hypot(fx, fy) < 2.5 / (n0 * pixel_nm)] = 0.0  # DC and the window's leakage around it
    return F, fx, fy


def _peaks(
    F: np.ndarray, fx: np.ndarray, fy: np.ndarray, n: int, exclude: float
) -> list[tuple[float, float, float]]:
    """The n strongest peaks as (|f|, angle_deg, magnitude), sub-bin refined by a 3x3 centroid."""
    F = F.copy()
    out = []
    df = abs(fx[0, 1] - fx[0, 0])
    for _ in range(n):
        i, j = np.unravel_index(int(np.argmax(F)), F.shape)
        sl = (slice(i - 1, i + 2), slice(j - 1, j + 2))
        w = F[sl] ** 2
        cx, cy = float((fx[sl] * w).sum() / w.sum()), float((fy[sl] * w).sum() / w.sum())
        out.append((math.hypot(cx, cy), math.degrees(math.atan2(cy, cx)) % 360.0, float(F[i, j])))
        F[np.hypot(fx - fx[i, j], fy - fy[i, j]) < max(exclude, 2 * df)] = 0.0
    return out


def test_specs():
    assert LATTICES == ("si001_2x1", "si001_h_1x1", "ge001_c4x2", "wse2_hex", "graphite", "si111_7x7")
    for f in LATTICES:
        s = get_spec(f)
        assert s.name == f
        assert s.period_nm == pytest.approx(PERIOD[f], rel=1e-3)
        assert s.fringe_nm == pytest.approx(FRINGE[f], rel=1e-3)
        assert s.hexagonal == (f in HEX)
        assert s.amplitude_nm > 0 and s.corrugation_std_nm > 0 and s.step_nm > 0
        hash(s)  # frozen, usable as a cache key
    with pytest.raises(ValueError):
        get_spec("nope")
    with pytest.raises(ValueError):
        lattice_scan("nope")


@pytest.mark.parametrize("family", LATTICES)
def test_renders_at_all_pixel_sizes(family):
    for px in (0.02, 0.05, 0.5):
        s = lattice_scan(family, 96, px, n_steps=1, seed=1)
        assert isinstance(s, LatticeScan)
        assert s.height.shape == (96, 96) and s.height.dtype == np.float32
        assert np.isfinite(s.height).all()
        assert s.family == family and s.pixel_nm == px
        assert s.period_nm == pytest.approx(PERIOD[family], rel=1e-3)
        json.dumps(s.meta)
    for px in (0.01, 1.0):
        h = lattice_height(family, (40, 56), px, 0.4)
        assert h.shape == (40, 56) and np.isfinite(h).all()


@pytest.mark.parametrize("family", LATTICES)
def test_fft_peak_at_lattice_frequency(family):
    px, angle = 0.05, 17.0
    size = 512 if family == "si111_7x7" else 256  # >= 10 fringes in the field of view
    s = lattice_scan(family, size, px, n_defects=0, seed=2, angle_deg=angle, artefacts=False)
    assert s.defects == []
    F, fx, fy = _spectrum(s.height, px)
    f0 = 1.0 / FRINGE[family]
    n = 6 if family in HEX else 4 if family == "si001_h_1x1" else 2
    peaks = _peaks(F, fx, fy, n, exclude=0.3 * f0)
    assert peaks[0][0] == pytest.approx(f0, rel=0.10)  # strongest non-DC peak
    if family in HEX or family == "si001_h_1x1":
        sym = 60.0 if family in HEX else 90.0
        assert all(p[0] == pytest.approx(f0, rel=0.10) for p in peaks)
        assert all(p[2] > 0.5 * peaks[0][2] for p in peaks)
        ang = sorted(p[1] for p in peaks)
        gaps = np.diff(ang + [ang[0] + 360.0])
        np.testing.assert_allclose(gaps, sym, atol=3.0)
        # the pattern follows angle_deg: first reciprocal vectors at +30 (hex) / 0 (square) deg
        ref = (angle + (30.0 if family in HEX else 0.0)) % sym
        d = [(a - ref + sym / 2) % sym - sym / 2 for a in ang]
        np.testing.assert_allclose(d, 0.0, atol=3.0)
    else:  # dimer rows: the fringe is across the rows, i.e. along angle + 90 deg
        d = (peaks[0][1] - (angle + 90.0) + 90.0) % 180.0 - 90.0
        assert abs(d) < 3.0


@pytest.mark.parametrize("family", LATTICES)
def test_unresolved_lattice_is_band_limited(family):
    px = 0.5
    s = lattice_scan(family, 128, px, n_defects=0, seed=3, artefacts=False)
    spec = get_spec(family)
    if spec.fringe_nm < 2 * px:  # above Nyquist: no lattice, no moire
        assert float(np.ptp(s.height)) < 1e-3 * spec.amplitude_nm
        z = lattice_height(spec, (64, 64), 1.0, 0.7)
        assert float(np.abs(z).max()) < 1e-3 * spec.amplitude_nm
    else:  # Si(111)-7x7: the 2.69 nm cell is still resolved at 0.5 nm/px
        F, fx, fy = _spectrum(s.height, px)
        (peak,) = _peaks(F, fx, fy, 1, exclude=0.1)
        assert peak[0] == pytest.approx(1.0 / spec.fringe_nm, rel=0.10)
    # the same family at 0.05 nm/px shows a strong lattice
    z = lattice_height(spec, (128, 128), 0.05, 0.7)
    assert float(z.std()) > 0.5 * spec.corrugation_std_nm


@pytest.mark.parametrize("px", [0.02, 0.05, 0.5])
def test_defect_placement(px):
    size = 128
    for i, family in enumerate(LATTICES):
        s = lattice_scan(family, size, px, n_defects=(4, 8), n_steps=2, seed=10 + i)
        if px == 0.05:
            assert len(s.defects) >= 3
        assert len(s.defects) <= 8
        dist_to_step = ndimage.distance_transform_edt(~s.step_mask)
        for d in s.defects:
            assert d["class"] in DEFECT_KINDS and DEFECT_KINDS[d["class_id"]] == d["class"]
            r = d["radius_px"]
            assert r >= 1.0
            assert r <= d["x"] <= size - 1 - r and r <= d["y"] <= size - 1 - r
            assert dist_to_step[round(d["y"]), round(d["x"])] >= r
        pts = truth_points(s)
        assert pts.shape == (len(s.defects), 2)
        for a in range(len(pts)):
            for b in range(a):
                da, db = s.defects[a], s.defects[b]
                sep = math.hypot(da["x"] - db["x"], da["y"] - db["y"])
                assert sep >= max(MIN_DEFECT_DISTANCE_PX, da["radius_px"] + db["radius_px"])


@pytest.mark.parametrize("px", [0.05, 0.5])
def test_defects_visible(px):
    """Bright kinds stand out above, dark kinds below the clean surface, also when unresolved."""
    for i, family in enumerate(LATTICES):
        s = lattice_scan(family, 128, px, n_defects=(6, 8), seed=20 + i, artefacts=False)
        z = s.height
        med = float(np.median(z))
        amp = get_spec(family).amplitude_nm
        for d in s.defects:
            v = float(z[round(d["y"]), round(d["x"])])
            if d["class"] in ("adatom", "bright_cluster"):
                assert v > med + 0.3 * amp, (family, d)
            else:
                assert v < med - 0.1 * amp, (family, d)


def test_deterministic():
    a = lattice_scan("ge001_c4x2", 96, 0.05, n_steps=1, seed=5)
    b = lattice_scan("ge001_c4x2", 96, 0.05, n_steps=1, seed=5)
    c = lattice_scan("ge001_c4x2", 96, 0.05, n_steps=1, seed=6)
    assert np.array_equal(a.height, b.height)
    assert a.defects == b.defects and a.angle_deg == b.angle_deg and a.meta == b.meta
    assert not np.array_equal(a.height, c.height)
    assert a.angle_deg != c.angle_deg


def test_truth_points_and_options():
    s = lattice_scan("graphite", 96, 0.05, n_defects=0, seed=0)
    assert truth_points(s).shape == (0, 2)
    s = lattice_scan("graphite", 128, 0.05, n_defects=5, seed=0, angle_deg=12.5, snr=float("inf"))
    assert s.angle_deg == pytest.approx(12.5)
    assert s.meta["noise_std_nm"] == 0.0
    pts = truth_points(s)
    assert pts.shape == (len(s.defects), 2) and len(s.defects) == 5
    np.testing.assert_array_equal(pts[:, 0], [d["x"] for d in s.defects])
    np.testing.assert_array_equal(pts[:, 1], [d["y"] for d in s.defects])
    with pytest.raises(ValueError):
        lattice_scan("graphite", snr=0.0)
    with pytest.raises(ValueError):
        lattice_scan("graphite", pixel_nm=0.0)
