import math

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.datasets import make_blobs
from sklearn.exceptions import NotFittedError
from sklearn.metrics import adjusted_rand_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler
from threadpoolctl import threadpool_limits

from stm_defects.models.cluster import (
    GMMSelector,
    LatentKMeans,
    choose_k,
    cluster_scores,
    kmeans_sweep,
    make_kmeans,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # tiny problems: thread start-up/spinning costs far more than it saves
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(
        n_samples=600, centers=4, n_features=5, cluster_std=0.5, center_box=(-10, 10), random_state=1
    )
    return X, y


def test_make_kmeans_recovers_blobs(blobs):
    X, y = blobs
    pipe = make_kmeans(4, seed=0).fit(X)
    assert isinstance(pipe, Pipeline)
    assert isinstance(pipe[0], MinMaxScaler)
    assert isinstance(pipe["kmeans"], LatentKMeans)
    assert adjusted_rand_score(y, pipe.predict(X)) > 0.99
    assert pipe["kmeans"].minibatch_ is False
    assert isinstance(pipe["kmeans"].estimator_, KMeans)
    # deterministic under the seed
    again = make_kmeans(4, seed=0).fit(X)
    np.testing.assert_array_equal(pipe.predict(X), again.predict(X))
    # float32 latents (as a network returns them) against a float64 fit, and back
    np.testing.assert_array_equal(pipe.predict(X.astype(np.float32)), pipe.predict(X))
    p32 = make_kmeans(4, seed=0).fit(X.astype(np.float32))
    assert adjusted_rand_score(y, p32.predict(X)) > 0.99


def test_latent_kmeans_switches_to_minibatch(blobs):
    X, y = blobs
    km = LatentKMeans(n_clusters=4, minibatch_threshold=100, random_state=0, n_init=3)
    assert km.fit(X) is km
    assert km.minibatch_ is True
    assert isinstance(km.estimator_, MiniBatchKMeans)
    assert adjusted_rand_score(y, km.predict(X)) > 0.99
    assert km.labels_.shape == (len(X),)
    assert km.cluster_centers_.shape == (4, 5)
    # estimator API
    c = clone(km)
    assert c.get_params() == km.get_params()
    assert not hasattr(c, "estimator_")


def test_kmeans_sweep_keys_and_inertia(blobs):
    X, _ = blobs
    ks = [2, 3, 4, 5, 6]
    sweep = kmeans_sweep(X, ks, seed=0, sample=300)
    assert [r["k"] for r in sweep] == ks
    for r in sweep:
        assert {"k", "inertia", "d_inertia", "silhouette", "davies_bouldin"} <= set(r)
    inertia = np.array([r["inertia"] for r in sweep])
    assert np.all(np.diff(inertia) < 0)
    assert math.isnan(sweep[0]["d_inertia"])
    np.testing.assert_allclose([r["d_inertia"] for r in sweep[1:]], np.diff(inertia))
    assert all(-1 <= r["silhouette"] <= 1 for r in sweep)
    assert choose_k(sweep, "silhouette") == 4
    assert choose_k(sweep, "elbow") == 4
    assert choose_k(sweep, "fixed", fixed=6) == 6
    assert choose_k(sweep) == 6


def test_choose_k_edge_cases():
    sweep = [
        {"k": 2, "inertia": 100.0, "silhouette": float("nan")},
        {"k": 3, "inertia": 40.0, "silhouette": 0.4},
        {"k": 4, "inertia": 35.0, "silhouette": 0.6},
        {"k": 5, "inertia": 32.0, "silhouette": 0.5},
    ]
    assert choose_k(sweep, "silhouette") == 4
    assert choose_k(sweep, "elbow") == 3
    assert choose_k(sweep[:2], "elbow") == 2
    with pytest.raises(ValueError):
        choose_k(sweep, "nope")
    with pytest.raises(ValueError):
        choose_k([{"k": 2, "inertia": 1.0, "silhouette": float("nan")}], "silhouette")


def test_cluster_scores_degenerate():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 3))
    s = cluster_scores(X, np.zeros(50, int))
    assert math.isnan(s["silhouette"]) and math.isnan(s["davies_bouldin"])
    s = cluster_scores(X, np.arange(50))
    assert math.isnan(s["silhouette"])
    lab = (X[:, 0] > 0).astype(int)
    s = cluster_scores(X, lab, sample=20, seed=3)
    assert -1 <= s["silhouette"] <= 1 and s["davies_bouldin"] > 0
    assert s == cluster_scores(X, lab, sample=20, seed=3)


@pytest.fixture(scope="module")
def aniso():
    rng = np.random.default_rng(0)
    n = 150
    A = np.array([[1.0, 0.0], [1.6, 0.35]])  # strongly correlated, elongated
    parts, ys = [], []
    for i, centre in enumerate([(0.0, 0.0), (8.0, 2.0), (2.0, 9.0)]):
        parts.append(rng.normal(size=(n, 2)) @ A.T + centre)
        ys.append(np.full(n, i))
    return np.vstack(parts), np.concatenate(ys)


def test_gmm_selector_picks_k_by_bic(aniso):
    X, y = aniso
    sel = GMMSelector(k_values=(1, 2, 3, 4, 5), random_state=0, n_init=2)
    assert sel.fit(X) is sel
    assert sel.n_components_ == 3
    assert sel.covariance_type_ in ("tied", "full")
    assert len(sel.grid_) == 5 * 4
    row = sel.grid_[0]
    assert {"covariance_type", "k", "bic", "aic", "silhouette", "davies_bouldin"} <= set(row)
    best = min(sel.grid_, key=lambda r: r["bic"])
    assert (best["k"], best["covariance_type"]) == (sel.n_components_, sel.covariance_type_)
    # k = 1: silhouette undefined
    assert all(math.isnan(r["silhouette"]) for r in sel.grid_ if r["k"] == 1)
    pred = sel.predict(X)
    assert pred.shape == (len(X),)
    assert adjusted_rand_score(y, pred) > 0.95
    proba = sel.predict_proba(X)
    assert proba.shape == (len(X), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert sel.score_samples(X).shape == (len(X),)
    np.testing.assert_array_equal(sel.fit_predict(X), pred)


def test_gmm_selector_estimator_api(aniso):
    X, _ = aniso
    sel = GMMSelector(k_values=(2, 3), covariance_types=("diag",), scale=False, random_state=3)
    c = clone(sel)
    assert c.get_params() == sel.get_params()
    assert not hasattr(c, "best_")
    with pytest.raises(NotFittedError):
        c.predict(X)
    c.fit(X)
    assert c.scaler_ is None
    assert c.covariance_type_ == "diag"
    # k larger than the number of samples is skipped
    few = GMMSelector(k_values=(2, 50), covariance_types=("spherical",)).fit(X[:10])
    assert [r["k"] for r in few.grid_] == [2]
