"""A class that is two kinds in its own principal components is split; one of two poses, or of
one kind, is not (`improved.classify`, "Split")."""

import dataclasses

import numpy as np
from sklearn.metrics import adjusted_rand_score

from stm_defects.improved.classify import ClassifyConfig, _features, _splits, classify_patches, fit_classes
from stm_defects.io import safe_models

P = 15
YY, XX = np.mgrid[0:P, 0:P] - 7.0
DOT = np.exp(-(XX ** 2 + YY ** 2) / (2 * 1.6 ** 2))
BAR = np.exp(-((XX / 4.5) ** 4) - YY ** 2 / (2 * 1.2 ** 2))          # flat-topped, along the rows
ASYM = np.exp(-(XX ** 2 + (YY - 2.5) ** 2) / 4) - 0.6 * np.exp(-(XX ** 2 + (YY + 2.0) ** 2) / 4)
CFG = ClassifyConfig(patch=P, n_pca=4, split_min=50)


def _noisy(shape, n, rng, noise=0.12):
    amp = rng.uniform(0.8, 1.2, (n, 1, 1))
    return (amp * shape + noise * rng.standard_normal((n, P, P))).astype(np.float32)


def _split_of(patches, cfg=CFG):
    return _splits(_features(patches), patches, np.zeros(len(patches), np.int64), 1, cfg, seed=0)


def test_a_class_of_dots_and_bars_is_split_into_them():
    rng = np.random.default_rng(0)
    p = np.concatenate([_noisy(DOT, 150, rng), _noisy(BAR, 150, rng)])
    truth = np.repeat([0, 1], 150)
    splits = _split_of(p)
    assert len(splits) == 1 and splits[0]["class"] == 0
    sp = splits[0]
    part = sp["gmm"].predict((_features(p) - sp["pca_mean"]) @ sp["pca_components"].T / sp["pca_scale"])
    assert adjusted_rand_score(truth, part) > 0.9


def test_one_kind_in_two_poses_or_alone_is_not_split():
    rng = np.random.default_rng(1)
    one = _noisy(ASYM, 300, rng)
    assert _split_of(one) == []                                   # one kind: one Gaussian is enough
    poses = one.copy()
    poses[::2] = poses[::2, ::-1, :]                              # half of them mirrored across the rows
    assert _split_of(poses, dataclasses.replace(CFG, split_max_flip=1.0)), \
        "two mirror poses are two clusters in the class's own components"
    assert _split_of(poses) == [], "... but flipping moves them from one part to the other: not two kinds"


def test_fit_classes_splits_the_class_that_holds_two_kinds_and_split_min_0_turns_it_off():
    """Two big blobs of either sign dominate the scan-wide components; three mixture components
    (k fixed at 3) put dots and bars together, and the split takes them apart again."""
    rng = np.random.default_rng(2)
    big = np.exp(-(XX ** 2 + YY ** 2) / (2 * 4.0 ** 2))
    p = np.concatenate([_noisy(k, 150, rng) for k in (6 * big, -6 * big, DOT, BAR)])
    truth = np.repeat(np.arange(4), 150)
    cfg = dataclasses.replace(CFG, k_range=(3, 3))
    off = fit_classes(p, dataclasses.replace(cfg, split_min=0), seed=0)
    assert off["splits"] == [] and off["n_classes"] == off["n_base_classes"] == 3
    assert adjusted_rand_score(truth, classify_patches(off, p)["nearest"]) < 0.8
    state = fit_classes(p, cfg, seed=0)
    assert len(state["splits"]) == 1 and state["n_classes"] == 4
    got = classify_patches(state, p)
    assert adjusted_rand_score(truth, got["nearest"]) > 0.95
    assert set(np.unique(got["label"])) <= {-1, 0, 1, 2, 3}
    assert np.all((got["nearest_probability"] >= 0) & (got["nearest_probability"] <= 1))
    # the split travels in the model file (no pickle) and predicts the same
    back = safe_models.loads(safe_models.dumps({"classes": state}, "improved"), "improved")["classes"]
    assert np.array_equal(classify_patches(back, p)["label"], got["label"])


def test_a_state_fitted_before_splits_classifies_as_it_did():
    """A stored state without ``splits`` and ``n_base_classes`` (fitted by an older release)
    gives the same classes; a stored config without ``split_min`` fits without splits."""
    from stm_defects.analysis.dispatch import PredictConfig

    rng = np.random.default_rng(3)
    p = np.concatenate([_noisy(k, 120, rng) for k in (DOT, BAR, -DOT)])
    state = fit_classes(p, dataclasses.replace(CFG, split_min=0), seed=0)
    old = {k: v for k, v in state.items() if k not in ("splits", "n_base_classes")}
    a, b = classify_patches(state, p), classify_patches(old, p)
    assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
    stored = PredictConfig().to_dict()
    del stored["improved"]["classify"]["split_min"]
    assert PredictConfig.from_dict(stored).improved.classify.split_min == 0
