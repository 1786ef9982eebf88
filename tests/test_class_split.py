"""A class that is two kinds in its own principal components is split; one of two poses, or of
one kind, is not (`improved.classify`, "Split")."""

import dataclasses

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from stm_defects.improved.classify import (
    ClassifyConfig,
    _features_of,
    _splits,
    classify_patches,
    fit_classes,
)
from stm_defects.io import safe_models
from stm_defects.schema import ConfigError

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
    return _splits(_features_of(patches, cfg.features), patches, np.zeros(len(patches), np.int64), 1, cfg, seed=0)


def test_a_class_of_dots_and_bars_is_split_into_them():
    rng = np.random.default_rng(0)
    p = np.concatenate([_noisy(DOT, 150, rng), _noisy(BAR, 150, rng)])
    truth = np.repeat([0, 1], 150)
    splits = _split_of(p)
    assert len(splits) == 1 and splits[0]["class"] == 0
    sp = splits[0]
    X = _features_of(p, sp["features"])
    part = sp["gmm"].predict((X - sp["pca_mean"]) @ sp["pca_components"].T / sp["pca_scale"])
    assert adjusted_rand_score(truth, part) > 0.9


def test_one_kind_in_two_poses_or_alone_is_not_split():
    rng = np.random.default_rng(1)
    one = _noisy(ASYM, 300, rng)
    across = one.copy()
    across[::2] = across[::2, ::-1, :]                            # half of them mirrored across the rows
    along = np.roll(one, 2, axis=2)                               # off-centre along the rows, too ...
    along[::2] = along[::2, :, ::-1]                              # ... and half of them mirrored along them
    canonical = dataclasses.replace(CFG, split_features="canonical")
    for poses in (across, along):
        for cfg in (CFG, canonical):
            assert _split_of(one, cfg) == [], cfg.split_features  # one kind: one Gaussian is enough
            assert _split_of(poses, cfg) == [], cfg.split_features
        assert _split_of(poses, dataclasses.replace(canonical, split_max_flip=1.0)), \
            "two mirror poses are two clusters in the class's own canonical components"
        # ... which "canonical" refuses because flipping moves them from one part to the other,
        # and "symmetric" never sees: the flip-averaged patches of both poses are the same
        assert _split_of(poses, dataclasses.replace(CFG, split_max_flip=1.0)) == []


def test_two_kinds_in_mirror_poses_are_split_by_kind():
    """Off-centre dots and bars (a dangling bond on one side of its row, an adsorbate in the
    trough), each in both mirror poses: the class's own canonical components split it by pose,
    which the flip rule refuses, so "canonical" keeps the two kinds together; the flip-averaged
    patches split it into dots and bars."""
    p, truth = _two_kinds_in_poses(np.random.default_rng(4))
    assert _split_of(p, dataclasses.replace(CFG, split_features="canonical")) == []
    splits = _split_of(p)
    assert len(splits) == 1 and splits[0]["features"] == "symmetric"
    got = classify_patches(_one_class_state(splits), p)["nearest"]
    assert adjusted_rand_score(truth, got) > 0.9


def _two_kinds_in_poses(rng, n=150):
    """Off-centre dots and bars, each in all four poses (mirrored across the rows, along them,
    both, neither): (patches, kind)."""
    dot = np.exp(-(XX ** 2 + (YY - 2.5) ** 2) / (2 * 1.6 ** 2))
    bar = np.exp(-(((XX - 1.5) / 4.5) ** 4) - (YY - 2.5) ** 2 / (2 * 1.2 ** 2))
    p = np.concatenate([_noisy(dot, n, rng, 0.2), _noisy(bar, n, rng, 0.2)])
    p[1::4] = p[1::4, ::-1, :]
    p[2::4] = p[2::4, :, ::-1]
    p[3::4] = p[3::4, ::-1, ::-1]
    return p, np.repeat([0, 1], n)


def _one_class_state(splits):
    """A fitted state of one class (a one-component mixture on two dummy components) with
    ``splits``."""
    from sklearn.mixture import GaussianMixture

    one = GaussianMixture(1, random_state=0).fit(np.random.default_rng(0).standard_normal((8, 2)))
    return {"pca_mean": np.zeros(P * P), "pca_components": np.eye(2, P * P), "pca_scale": np.ones(2),
            "gmm": one, "component_class": np.array([0]), "n_classes": 2, "n_base_classes": 1,
            "splits": splits, "loglik_threshold": -np.inf}


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


def test_a_split_fitted_before_split_features_predicts_on_canonical_patches():
    """A stored config without ``split_features`` fits canonical splits, and a stored split
    without ``features`` (fitted by an older release) is applied to canonical patches."""
    from stm_defects.analysis.dispatch import PredictConfig

    stored = PredictConfig().to_dict()
    del stored["improved"]["classify"]["split_features"]
    assert PredictConfig.from_dict(stored).improved.classify.split_features == "canonical"
    p, _ = _two_kinds_in_poses(np.random.default_rng(6))
    canonical = dataclasses.replace(CFG, split_features="canonical", split_max_flip=1.0)
    splits = _split_of(p, canonical)                # the pose split, which only this allows
    assert [sp["features"] for sp in splits] == ["canonical"]
    state = _one_class_state(splits)
    old = _one_class_state([{k: v for k, v in sp.items() if k != "features"} for sp in splits])
    labels = classify_patches(state, p)["nearest"]
    assert np.array_equal(classify_patches(old, p)["nearest"], labels)
    # ... and the data tell the two feature kinds apart: the same split on flip-averaged patches
    # (every pose alike) classifies otherwise
    other = _one_class_state([dict(sp, features="symmetric") for sp in splits])
    assert not np.array_equal(classify_patches(other, p)["nearest"], labels)


def test_split_features_are_checked_in_configs_and_model_states():
    from stm_defects.analysis.dispatch import PredictConfig
    from stm_defects.errors import StageError

    with pytest.raises(ValueError, match="split_features must be one of"):
        ClassifyConfig(split_features="mirror")
    stored = PredictConfig().to_dict()
    stored["improved"]["classify"]["split_features"] = "mirror"
    with pytest.raises(ConfigError, match="classify.*split_features must be one of"):
        PredictConfig.from_dict(stored, "params.yaml")
    p, _ = _two_kinds_in_poses(np.random.default_rng(7))
    splits = [dict(sp, features="mirror") for sp in _split_of(p)]
    with pytest.raises(StageError, match="unknown features 'mirror'"):
        classify_patches(_one_class_state(splits), p)


def test_one_kind_whose_shape_varies_continuously_is_not_split():
    """Many dots of widths spread evenly over a factor of two: no Gaussian in the class's own
    components, so two fit better by BIC, but their parts overlap; two kinds do not."""
    rng = np.random.default_rng(5)
    widths = rng.uniform(1.2, 2.4, 800)
    p = np.stack([np.exp(-(XX ** 2 + YY ** 2) / (2 * w ** 2)) for w in widths])
    p = (p + 0.12 * rng.standard_normal(p.shape)).astype(np.float32)
    assert _split_of(p, dataclasses.replace(CFG, split_max_overlap=CFG.merge_overlap)), \
        "two Gaussians fit it better, with parts that overlap as much as the merge rule allows"
    assert _split_of(p) == []


def test_classes_see_kinds_not_poses_with_flip_averaged_features():
    """Off-centre dots and bars in all four mirror poses, no split: the classes of flip-averaged
    patches (`features` "symmetric") are the two kinds; those of canonical patches follow the
    poses as well, as a canonical flip of an off-centre defect is a guess."""
    p, truth = _two_kinds_in_poses(np.random.default_rng(4))
    cfg = dataclasses.replace(CFG, split_min=0, k_range=(2, 6))
    sym = fit_classes(p, cfg, seed=0)
    assert sym["features"] == "symmetric"
    assert adjusted_rand_score(truth, classify_patches(sym, p)["nearest"]) > 0.9
    canon = fit_classes(p, dataclasses.replace(cfg, features="canonical"), seed=0)
    assert adjusted_rand_score(truth, classify_patches(canon, p)["nearest"]) < 0.9


def test_a_state_fitted_before_features_was_recorded_reads_canonical_patches():
    """A stored state without "features" was fitted on canonical patches and predicts so."""
    p, _ = _two_kinds_in_poses(np.random.default_rng(5))
    canon = fit_classes(p, dataclasses.replace(CFG, features="canonical"), seed=0)
    old = {k: v for k, v in canon.items() if k != "features"}
    assert np.array_equal(classify_patches(old, p)["label"], classify_patches(canon, p)["label"])
    sym = fit_classes(p, CFG, seed=0)
    flipped = p[:, ::-1, ::-1].copy()
    # symmetric features: a defect's class does not depend on its pose
    assert np.array_equal(classify_patches(sym, flipped)["label"], classify_patches(sym, p)["label"])


def test_unknown_features_are_refused_and_old_configs_keep_canonical_patches():
    from stm_defects.analysis.dispatch import PredictConfig

    with pytest.raises(ValueError, match="features must be one of"):
        ClassifyConfig(features="mirror")
    stored = PredictConfig().to_dict()
    assert stored["improved"]["classify"]["features"] == "symmetric"
    del stored["improved"]["classify"]["features"]
    assert PredictConfig.from_dict(stored).improved.classify.features == "canonical"
    stored["improved"]["classify"]["features"] = "mirror"
    with pytest.raises(ConfigError):
        PredictConfig.from_dict(stored)
