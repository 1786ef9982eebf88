"""`models.mixture` gives scikit-learn's GaussianMixture numbers to the bit, from the fitted
attributes alone, for every covariance type; the rebuilt `FittedGaussianMixture` stores back to
the same bytes."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from stm_defects.models.mixture import FittedGaussianMixture, predict, predict_proba, score_samples


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_same_numbers_as_sklearn(covariance_type, dtype):
    rng = np.random.default_rng(3)
    X = np.concatenate([rng.normal(c, s, size=(200, 5)) for c, s in ((0, 1), (4, 0.5), (-3, 2))])
    g = GaussianMixture(4, covariance_type=covariance_type, random_state=0, reg_covar=1e-3).fit(X)
    Y = np.concatenate([rng.normal(0, 3, size=(300, 5)), 40 + rng.normal(size=(5, 5))]).astype(dtype)
    light = FittedGaussianMixture.__new__(FittedGaussianMixture)
    light.__setstate__(g.__getstate__())
    for m in (g, light):
        np.testing.assert_array_equal(predict_proba(m, Y), g.predict_proba(Y))
        np.testing.assert_array_equal(score_samples(m, Y), g.score_samples(Y))
        np.testing.assert_array_equal(predict(m, Y), g.predict(Y))
    np.testing.assert_array_equal(light.predict_proba(Y), g.predict_proba(Y))
    assert light.__getstate__() == g.__getstate__()


def test_improved_state_round_trips_to_the_same_bytes_without_sklearn_objects():
    from stm_defects.improved.classify import ClassifyConfig, fit_classes
    from stm_defects.io import safe_models

    rng = np.random.default_rng(0)
    patches = np.concatenate([rng.normal(m, 0.3, size=(60, 9, 9)) for m in (0.0, 2.0, -2.0)]).astype(np.float32)
    state = fit_classes(patches, ClassifyConfig(patch=9), seed=0)
    data = safe_models.dumps(state, "improved")
    back = safe_models.loads(data, "improved")
    assert isinstance(back["gmm"], FittedGaussianMixture)
    assert safe_models.dumps(back, "improved") == data


def test_the_allowed_names_are_the_allowed_classes():
    from stm_defects.io import safe_models

    assert set(safe_models.ALLOWED_NAMES) == set(safe_models.allowed_estimators())


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.InconsistentVersionWarning")   # crafted states
def test_a_paper_model_file_is_checked_without_building_it():
    """`safe_models.check` (what a loader runs on the paper method's K-means and GMM, built on
    first use) refuses what `loads` refuses, with the same message, and builds nothing."""
    import io as _io
    import json
    import zipfile

    from stm_defects.io import safe_models

    def craft(kind, tree):
        header = {"format": safe_models.FORMAT, "version": safe_models.FORMAT_VERSION, "kind": kind, "tree": tree}
        buf = _io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            with zf.open("__header__.npy", "w") as fh:
                np.lib.format.write_array(fh, np.frombuffer(json.dumps(header).encode(), np.uint8))
        return buf.getvalue()

    cases = {"a dict": craft("gmm", {"$dict": {}}),
             "not allowed": craft("gmm", {"$estimator": "os.system", "state": {"$dict": {}}}),
             "light class by name": craft("gmm", {"$estimator": "stm_defects.models.mixture.FittedGaussianMixture",
                                                 "state": {"$dict": {}}}),
             "wrong kind": craft("kmeans", {"$estimator": "sklearn.mixture.GaussianMixture", "state": {"$dict": {}}})}
    for what, data in cases.items():
        kind = "kmeans" if what == "wrong kind" else "gmm"
        with pytest.raises(safe_models.ModelFileError) as built:
            safe_models.loads(data, kind, "m.npz")
        with pytest.raises(safe_models.ModelFileError) as checked:
            safe_models.check(data, kind, "m.npz")
        assert str(built.value) == str(checked.value), what
        assert not str(built.value).endswith("GMMSelector')"), str(built.value)   # a KeyError's repr before
    with pytest.raises(safe_models.ModelFileError, match=r"\(it holds a dict\)"):
        safe_models.loads(cases["a dict"], "gmm", "m.npz")
    ok = craft("gmm", {"$estimator": "sklearn.mixture.GaussianMixture", "state": {"$dict": {"n_components": 2}}})
    assert safe_models.check(ok, "gmm", "m.npz") is None


def test_nan_input_is_refused_as_sklearn_refuses_it():
    g = GaussianMixture(2, random_state=0).fit(np.random.default_rng(0).normal(size=(50, 3)))
    X = np.array([[np.nan, 0.0, 0.0]])
    for f in (predict_proba, score_samples, predict):
        with pytest.raises(ValueError, match="NaN"):
            f(g, X)
        with pytest.raises(ValueError, match="NaN"):
            getattr(g, f.__name__)(X)
