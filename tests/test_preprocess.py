import numpy as np
import pytest

from stm_defects.image.preprocess import (
    PreprocessConfig,
    align_rows,
    level_plane,
    normalize,
    preprocess,
    remove_scars,
    resample,
)


def _tilted_with_blobs(h=96, w=128):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    plane = 0.02 * xx - 0.015 * yy + 3.0
    tilt_amplitude = float(np.ptp(plane))
    blobs = np.zeros((h, w))
    centres = [(20, 30), (60, 90), (75, 25), (30, 100)]
    for r, c in centres:
        blobs += 1.5 * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * 3.0**2))
    far = np.ones((h, w), bool)
    for r, c in centres:
        far &= (yy - r) ** 2 + (xx - c) ** 2 > (6 * 3.0) ** 2
    return (plane + blobs).astype(np.float32), far, tilt_amplitude


def test_level_plane_flattens_background_unbiased_by_blobs():
    img, background, amp = _tilted_with_blobs()
    before = img.copy()
    out = level_plane(img, order=1, iterations=3, clip_sigma=2.5)
    assert out.dtype == np.float32 and out.shape == img.shape
    np.testing.assert_array_equal(img, before)  # input untouched
    bg = out[background]
    assert np.ptp(bg) < 1e-3 * amp
    assert np.abs(bg).max() < 1e-3 * amp

    # a plain least-squares plane is pulled by the blobs
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    A = np.stack([np.ones(h * w), xx.ravel(), yy.ravel()], axis=1)
    coef = np.linalg.lstsq(A, img.ravel().astype(np.float64), rcond=None)[0]
    naive = (img.ravel() - A @ coef).reshape(h, w)[background]
    assert np.abs(naive).max() > 10 * np.abs(bg).max()


def test_level_plane_quadratic_and_none():
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float64)
    bowl = (1e-3 * (xx - 20) ** 2 + 5e-4 * (yy - 40) ** 2 + 0.01 * xx).astype(np.float32)
    out = level_plane(bowl, order=2)
    assert np.abs(out).max() < 1e-3 * np.ptp(bowl)
    none = level_plane(bowl, order=0)
    np.testing.assert_array_equal(none, bowl)
    assert none is not bowl


def test_align_rows_removes_row_offsets():
    rng = np.random.default_rng(0)
    h, w = 64, 80
    profile = np.sin(np.arange(w) / 5.0)  # same structure on every row
    offsets = rng.normal(0, 2.0, size=h)
    img = (profile[None, :] + offsets[:, None]).astype(np.float32)
    before = img.copy()
    out = align_rows(img)
    np.testing.assert_array_equal(img, before)
    assert out.dtype == np.float32
    med = np.median(out, axis=1)
    assert np.ptp(med) < 1e-4
    assert np.ptp(np.median(img, axis=1)) > 1.0

    # with noise the row medians agree to within the noise level
    noisy = img + rng.normal(0, 0.05, size=img.shape).astype(np.float32)
    assert np.ptp(np.median(align_rows(noisy), axis=1)) < 0.2


def test_remove_scars_fixes_streak_and_keeps_clean_image():
    rng = np.random.default_rng(1)
    clean = rng.normal(0, 0.1, size=(64, 64)).astype(np.float32)
    np.testing.assert_array_equal(remove_scars(clean, k=4.0, min_length=8), clean)

    scarred = clean.copy()
    scarred[30, 10:40] += 3.0
    out = remove_scars(scarred, k=4.0, min_length=8)
    # the streak is replaced by the median of its column over rows -3..+3 (which ignores it)
    expected = np.median(scarred[27:34, 10:40], axis=0)
    np.testing.assert_allclose(out[30, 10:40], expected, atol=1e-6)
    assert np.abs(out[30, 10:40] - clean[30, 10:40]).max() < 0.6  # back at the noise level
    # only the streak and its two neighbouring rows may change
    mask = np.ones(clean.shape, bool)
    mask[29:32, 10:40] = False
    np.testing.assert_array_equal(out[mask], clean[mask])
    assert scarred[30, 10:40].mean() > 2.0  # input untouched

    short = clean.copy()
    short[20, 5:9] += 3.0  # shorter than min_length: kept
    np.testing.assert_array_equal(remove_scars(short, min_length=8), short)
    np.testing.assert_array_equal(remove_scars(scarred, min_length=0), scarred)  # 0 disables


def test_remove_scars_thick_streak_and_step_kept():
    rng = np.random.default_rng(5)
    clean = rng.normal(0, 0.1, size=(64, 64)).astype(np.float32)
    clean[32:] += 1.0  # a monotone step across the whole width: not a scar
    np.testing.assert_array_equal(remove_scars(clean), clean)

    scarred = clean.copy()
    scarred[10:13, 5:50] -= 2.0  # a 3-row streak is still within the 7-row median
    out = remove_scars(scarred)
    assert np.abs(out[10:13, 5:50] - clean[10:13, 5:50]).max() < 0.6
    # (the median of 4 clean + 3 low rows is biased low by about one noise sigma, not by the streak)
    assert np.abs(out[10:13, 5:50].mean() - clean[10:13, 5:50].mean()) < 0.2


def test_normalize_range_dtype_and_clipping():
    rng = np.random.default_rng(2)
    img = rng.normal(0, 1, size=(50, 60)).astype(np.float32)
    img[0, 0] = 1e3  # outlier
    out = normalize(img, 0.5, 99.5)
    assert out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    lo, hi = np.percentile(img, [0.5, 99.5])
    expected = (np.clip(img, lo, hi) - lo) / (hi - lo)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert np.mean(out == 1.0) >= 0.004  # top 0.5 % saturated
    np.testing.assert_array_equal(normalize(np.full((8, 8), 3.0, np.float32)), 0.0)


def test_resample_factor_and_passthrough():
    img = np.random.default_rng(3).random((40, 60)).astype(np.float32)
    out, scale = resample(img, 0.1, 0.05)
    assert scale == pytest.approx(2.0)
    assert out.shape == (80, 120) and out.dtype == np.float32
    out, scale = resample(img, 0.1, 0.2)
    assert scale == pytest.approx(0.5) and out.shape == (20, 30)
    same, scale = resample(img, None, 0.05)
    assert scale == 1.0 and same is img
    same, scale = resample(img, 0.1, None)
    assert scale == 1.0 and same is img


def test_preprocess_returns_unit_image_and_scale():
    img, _, _ = _tilted_with_blobs(64, 64)
    cfg = PreprocessConfig(target_pixel_nm=0.2, remove_scars=True)
    out, scale = preprocess(img, 0.1, cfg)
    assert scale == pytest.approx(0.5)
    assert out.shape == (32, 32) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    out, scale = preprocess(img, None, PreprocessConfig())
    assert scale == 1.0 and out.shape == img.shape


def test_small_image_rejected():
    with pytest.raises(ValueError):
        level_plane(np.zeros((4, 20), np.float32))
    out, _ = preprocess(np.random.default_rng(4).random((8, 8)).astype(np.float32), None, PreprocessConfig())
    assert out.shape == (8, 8)
