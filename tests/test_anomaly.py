import numpy as np
import pytest

from stm_defects.analysis.scores import detection_scores
from stm_defects.data.synth import SynthConfig, synth_scan
from stm_defects.image.preprocess import PreprocessConfig, preprocess
from stm_defects.improved.anomaly import AnomalyConfig, detect, lattice_notch


def test_notch_removes_a_lattice():
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float32)
    lat = np.cos(2 * np.pi * (0.8 * xx + 0.6 * yy) / 7.68) + 0.3 * np.cos(2 * np.pi * xx / 3.84)
    clean, removed = lattice_notch(lat.astype(np.float32), AnomalyConfig())
    assert np.std(clean[16:-16, 16:-16]) < 0.15 * np.std(lat)
    assert np.allclose(clean + removed, lat, atol=1e-4)


@pytest.fixture(scope="module")
def scan():
    s = synth_scan(SynthConfig(size=256, n_steps=(1, 1)), seed=7)
    img, _ = preprocess(s.height, s.pixel_nm, PreprocessConfig())
    return s, img


def test_detects_synthetic_defects(scan):
    s, img = scan
    res = detect(img)
    pred = [(r["x"], r["y"]) for r in res.regions]
    sc = detection_scores(pred, [(d["x"], d["y"]) for d in s.defects], 6.0)
    assert sc["recall"] >= 0.8 and sc["precision"] >= 0.7
    assert res.score.shape == img.shape and res.mask.dtype == bool
    for r in res.regions:
        x0, y0, x1, y1 = r["bbox"]
        assert x0 <= r["peak"][1] < x1 and y0 <= r["peak"][0] < y1
        assert r["score"] >= AnomalyConfig().threshold


def test_deterministic_and_pure(scan):
    _, img = scan
    before = img.copy()
    a, b = detect(img), detect(img)
    assert np.array_equal(img, before)
    assert [(r["x"], r["y"]) for r in a.regions] == [(r["x"], r["y"]) for r in b.regions]


def test_empty_image_has_no_defects():
    rng = np.random.default_rng(0)
    img = (0.5 + 0.05 * rng.standard_normal((128, 128))).astype(np.float32)
    assert len(detect(img).regions) == 0


def test_a_threshold_below_the_region_threshold_gives_each_peak_a_region():
    # peaks scoring between threshold and low_threshold lie outside every region component;
    # each still gets a region (its peak pixel), not a crash
    import dataclasses

    from stm_defects.config import load_params, predict_config

    params = load_params(__import__("pathlib").Path(__file__).resolve().parents[1] / "params.yaml")
    cfg = predict_config(params)
    s = synth_scan(params.synth, 0)
    img, _ = preprocess(s.height, s.pixel_nm, dataclasses.replace(cfg.preprocess, align_rows=False))
    res = detect(img, dataclasses.replace(cfg.improved.anomaly, threshold=3.0, streak_filter=False))
    assert len(res.regions) > 0
    for r in res.regions:
        x0, y0, x1, y1 = r["bbox"]
        assert r["area_px"] >= 1 and x0 <= r["peak"][1] < x1 and y0 <= r["peak"][0] < y1
