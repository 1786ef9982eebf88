import pickle

import numpy as np
from sklearn.metrics import adjusted_rand_score

from stm_defects.improved.classify import (
    ClassifyConfig,
    canonical_patches,
    fit_classes,
    predict_classes,
    row_angles,
)


def _surface(n, angle, blobs, seed=0):
    """Rows at ``angle`` plus asymmetric blobs at (y, x): a bump with a dip beside it across the rows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    c, s = np.cos(angle), np.sin(angle)
    t = -xx * s + yy * c
    lat = np.cos(2 * np.pi * t / 7.68)
    res = np.zeros((n, n))
    for (y, x) in blobs:
        u = (xx - x) * c + (yy - y) * s
        v = -(xx - x) * s + (yy - y) * c
        res += 2.0 * np.exp(-((u / 5) ** 2 + (v / 2) ** 2) / 2) - 1.0 * np.exp(-(u ** 2 + (v - 4) ** 2) / 8)
    return res + 0.01 * rng.standard_normal((n, n)), lat


def test_row_angle():
    _, lat = _surface(96, np.radians(30), [])
    a = row_angles(lat, [[48, 48]], 24)
    assert abs(np.degrees(a[0]) - 30) < 2


def test_patches_invariant_to_rot90():
    n = 96
    res, lat = _surface(n, np.radians(20), [(40, 50)])
    cfg = ClassifyConfig()
    p1, _ = canonical_patches(res, lat, [[40, 50]], cfg, unit=1.0)
    r2, l2 = np.rot90(res), np.rot90(lat)
    p2, _ = canonical_patches(r2, l2, [[n - 1 - 50, 40]], cfg, unit=1.0)   # (y, x) -> (W-1-x, y)
    assert np.abs(p1 - p2).max() < 0.1 * np.abs(p1).max()


def test_fit_predict_unknown_and_pickle():
    rng = np.random.default_rng(0)
    P = 15
    yy, xx = np.mgrid[0:P, 0:P] - 7.0
    shapes = [np.exp(-(xx ** 2 + yy ** 2) / 8), -np.exp(-(xx ** 2 / 30 + yy ** 2 / 3)),
              np.exp(-(xx ** 2 / 30 + yy ** 2 / 3))]
    X = np.concatenate([s + 0.05 * rng.standard_normal((60, P, P)) for s in shapes]).astype(np.float32)
    y = np.repeat(np.arange(3), 60)
    cfg = ClassifyConfig(patch=P, k_range=(2, 5), n_boot=2, n_pca=4)
    state = fit_classes(X, cfg, seed=0)
    lab, prob = predict_classes(state, X)
    assert adjusted_rand_score(y, lab) > 0.9
    assert np.all((prob >= 0) & (prob <= 1))
    odd, _ = predict_classes(state, (20 * np.ones((1, P, P))).astype(np.float32))
    assert odd[0] == -1
    again = pickle.loads(pickle.dumps(state))
    assert np.array_equal(predict_classes(again, X)[0], lab)


def test_unknown_defects_carry_typicality_not_a_class_probability():
    """Typicality: the share of training defects the model finds less likely. Training defects
    spread over [0, 1]; a defect unlike every class sits below the unknown quantile, which is
    what made it unknown, and keeps its nearest class."""
    from stm_defects.improved.classify import classify_patches

    rng = np.random.default_rng(1)
    P = 15
    yy, xx = np.mgrid[0:P, 0:P] - 7.0
    shapes = [np.exp(-(xx ** 2 + yy ** 2) / 8), -np.exp(-(xx ** 2 / 30 + yy ** 2 / 3))]
    X = np.concatenate([s + 0.05 * rng.standard_normal((80, P, P)) for s in shapes]).astype(np.float32)
    cfg = ClassifyConfig(patch=P, k_range=(2, 3), n_boot=2, n_pca=4)
    state = fit_classes(X, cfg, seed=0)
    got = classify_patches(state, X)
    assert 0.3 < np.median(got["typicality"]) < 0.7
    assert got["typicality"].min() >= 0 and got["typicality"].max() <= 1
    known = got["label"] >= 0
    assert np.all(got["typicality"][known] >= cfg.unknown_quantile - 0.02)
    odd = classify_patches(state, (20 * np.ones((1, P, P))).astype(np.float32))
    assert odd["label"][0] == -1 and odd["typicality"][0] < cfg.unknown_quantile
    assert 0 <= odd["nearest"][0] < state["n_classes"]      # ... and keeps a nearest class
    # (two or three classes: a mixture fitted on one random half can settle in a local optimum,
    # so k = 2 may fail the stability rule; the classes still follow the two shapes)
    assert adjusted_rand_score(np.repeat([0, 1], 80), got["nearest"]) > 0.8
