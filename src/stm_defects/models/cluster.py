"""Clustering of autoencoder latents.

* :func:`make_kmeans` / :class:`LatentKMeans` -- K-means used for the
  "character map" (stage 1).
* :func:`kmeans_sweep` / :func:`choose_k` -- pick the number of K-means clusters.
* :class:`GMMSelector` -- Gaussian mixture selected by BIC over covariance
  types x number of components (stage 2, defect classes).
* :func:`cluster_scores` -- silhouette / Davies-Bouldin with safe handling of
  degenerate labelings.

All randomness goes through ``seed`` / ``random_state``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics import davies_bouldin_score, silhouette_score
from sklearn.mixture import GaussianMixture
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler
from sklearn.utils.validation import check_is_fitted

__all__ = [
    "GMMSelector",
    "LatentKMeans",
    "choose_k",
    "cluster_scores",
    "kmeans_sweep",
    "make_kmeans",
]

_NAN = float("nan")


# --------------------------------------------------------------------------- #
# scores
# --------------------------------------------------------------------------- #
def cluster_scores(X, labels, sample: int | None = 5000, seed: int = 0) -> dict:
    """Silhouette (on a seeded subsample of at most ``sample`` points) and
    Davies-Bouldin (on all points).

    Either score is NaN when it is undefined: fewer than two clusters, or as
    many clusters as points (for the silhouette: within the subsample).
    """
    X = np.asarray(X, dtype=float)
    labels = np.asarray(labels)
    if X.ndim == 1:
        X = X[:, None]
    n = labels.shape[0]
    if X.shape[0] != n:
        raise ValueError(f"X has {X.shape[0]} rows but labels has {n} entries")

    def _defined(lab: np.ndarray) -> bool:
        n_lab = np.unique(lab).size
        return 2 <= n_lab < lab.shape[0]

    dbi = float(davies_bouldin_score(X, labels)) if _defined(labels) else _NAN

    if sample is not None and n > sample:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(n, size=int(sample), replace=False))
        Xs, ls = X[idx], labels[idx]
    else:
        Xs, ls = X, labels
    sil = float(silhouette_score(Xs, ls)) if _defined(ls) else _NAN
    return {"silhouette": sil, "davies_bouldin": dbi}


# --------------------------------------------------------------------------- #
# K-means
# --------------------------------------------------------------------------- #
class LatentKMeans(BaseEstimator, ClusterMixin):
    """K-means that switches to :class:`~sklearn.cluster.MiniBatchKMeans`
    when the training set has more than ``minibatch_threshold`` samples.

    The choice is made at fit time; the fitted inner estimator is stored in
    ``estimator_`` and its main attributes are mirrored (``cluster_centers_``,
    ``labels_``, ``inertia_``, ``n_iter_``).  ``minibatch_`` says which
    variant was used.
    """

    def __init__(
        self,
        n_clusters: int = 6,
        minibatch_threshold: int | None = 20000,
        random_state=0,
        n_init: int = 10,
        batch_size: int = 4096,
        max_iter: int = 300,
    ):
        self.n_clusters = n_clusters
        self.minibatch_threshold = minibatch_threshold
        self.random_state = random_state
        self.n_init = n_init
        self.batch_size = batch_size
        self.max_iter = max_iter

    def fit(self, X, y=None):
        X = np.asarray(X)
        n = X.shape[0]
        use_mb = self.minibatch_threshold is not None and n > self.minibatch_threshold
        if use_mb:
            est = MiniBatchKMeans(
                n_clusters=self.n_clusters,
                random_state=self.random_state,
                n_init=self.n_init,
                batch_size=self.batch_size,
                max_iter=self.max_iter,
            )
        else:
            est = KMeans(
                n_clusters=self.n_clusters,
                random_state=self.random_state,
                n_init=self.n_init,
                max_iter=self.max_iter,
            )
        est.fit(X)
        self.estimator_ = est
        self.minibatch_ = bool(use_mb)
        self.cluster_centers_ = est.cluster_centers_
        self.labels_ = est.labels_
        self.inertia_ = float(est.inertia_)
        self.n_iter_ = est.n_iter_
        self.n_features_in_ = est.n_features_in_
        return self

    def _as_fitted_dtype(self, X) -> np.ndarray:
        # scikit-learn's K-means kernels need X and the centres in one dtype
        check_is_fitted(self, "estimator_")
        return np.asarray(X, dtype=self.cluster_centers_.dtype)

    def predict(self, X):
        return self.estimator_.predict(self._as_fitted_dtype(X))

    def transform(self, X):
        """Distances to the cluster centres."""
        return self.estimator_.transform(self._as_fitted_dtype(X))

    def score(self, X, y=None):
        """Opposite of the inertia of ``X`` (higher is better)."""
        return float(self.estimator_.score(self._as_fitted_dtype(X)))


def make_kmeans(k: int, seed: int = 0, minibatch_threshold: int | None = 20000) -> Pipeline:
    """``Pipeline(MinMaxScaler, LatentKMeans)``.

    The last step is named ``"kmeans"`` (``pipe["kmeans"].inertia_`` etc.).
    """
    return Pipeline(
        [
            ("scale", MinMaxScaler()),
            (
                "kmeans",
                LatentKMeans(
                    n_clusters=int(k),
                    minibatch_threshold=minibatch_threshold,
                    random_state=seed,
                ),
            ),
        ]
    )


def kmeans_sweep(
    latents,
    k_values: Iterable[int],
    seed: int = 0,
    sample: int | None = 5000,
    minibatch_threshold: int | None = 20000,
) -> list[dict]:
    """Fit :func:`make_kmeans` for every ``k`` and score it.

    Returns one dict per ``k`` (in the given order) with keys ``k``,
    ``inertia`` (in MinMax-scaled space), ``d_inertia`` (first derivative of
    the inertia with respect to ``k``; NaN for the first entry),
    ``silhouette`` (seeded subsample of at most ``sample`` points) and
    ``davies_bouldin``.
    """
    X = np.asarray(latents, dtype=float)
    out: list[dict] = []
    prev: tuple[int, float] | None = None
    for k in k_values:
        k = int(k)
        pipe = make_kmeans(k, seed, minibatch_threshold=minibatch_threshold).fit(X)
        inertia = float(pipe["kmeans"].inertia_)
        labels = pipe["kmeans"].labels_
        Xs = pipe["scale"].transform(X)
        scores = cluster_scores(Xs, labels, sample=sample, seed=seed)
        if prev is None or k == prev[0]:
            d = _NAN
        else:
            d = (inertia - prev[1]) / (k - prev[0])
        out.append({"k": k, "inertia": inertia, "d_inertia": float(d), **scores})
        prev = (k, inertia)
    return out


def choose_k(sweep: Sequence[dict], method: str = "fixed", fixed: int = 6) -> int:
    """Pick ``k`` from a :func:`kmeans_sweep` result.

    * ``"fixed"``: return ``fixed``.
    * ``"silhouette"``: the ``k`` with the largest (non-NaN) silhouette.
    * ``"elbow"``: the knee of the inertia curve -- the point farthest from
      the straight line joining the first and last points, both axes scaled
      to [0, 1] (the "kneedle" criterion).  With fewer than three points the
      smallest ``k`` is returned.
    """
    if method == "fixed":
        return int(fixed)
    if not sweep:
        raise ValueError("empty sweep")
    rows = sorted(sweep, key=lambda r: r["k"])
    ks = np.array([r["k"] for r in rows], dtype=float)
    if method == "silhouette":
        sil = np.array([r["silhouette"] for r in rows], dtype=float)
        if np.all(np.isnan(sil)):
            raise ValueError("silhouette is undefined for every k in the sweep")
        return int(ks[int(np.nanargmax(sil))])
    if method == "elbow":
        if len(rows) < 3:
            return int(ks[0])
        inertia = np.array([r["inertia"] for r in rows], dtype=float)
        x = (ks - ks[0]) / (ks[-1] - ks[0])
        span = inertia[0] - inertia[-1]
        if not np.isfinite(span) or span <= 0:
            return int(ks[0])
        y = (inertia[0] - inertia) / span  # rising 0 -> 1
        # distance above the chord y = x (for a convex decreasing curve)
        return int(ks[int(np.argmax(y - x))])
    raise ValueError(f"unknown method {method!r}; expected 'fixed', 'silhouette' or 'elbow'")


# --------------------------------------------------------------------------- #
# Gaussian mixture selected by BIC
# --------------------------------------------------------------------------- #
class GMMSelector(BaseEstimator, ClusterMixin):
    """Gaussian mixture whose number of components and covariance type are
    chosen by minimum BIC.

    ``fit`` MinMax-scales the data (when ``scale``) and fits one
    :class:`~sklearn.mixture.GaussianMixture` per (covariance type, k).
    Combinations with more components than samples are skipped.

    Fitted attributes
    -----------------
    grid_ : list of dict
        ``covariance_type``, ``k``, ``bic``, ``aic``, ``silhouette``,
        ``davies_bouldin`` (NaN where undefined), ``converged``.
    best_ : GaussianMixture
        The model with the smallest BIC (first one wins on ties).
    scaler_ : MinMaxScaler or None
    n_components_, covariance_type_ : selected configuration.
    labels_ : labels of the training data.
    """

    def __init__(
        self,
        k_values: Sequence[int] = tuple(range(2, 11)),
        covariance_types: Sequence[str] = ("spherical", "diag", "tied", "full"),
        scale: bool = True,
        random_state=0,
        n_init: int = 1,
        reg_covar: float = 1e-6,
        max_iter: int = 200,
        score_sample: int | None = 5000,
    ):
        self.k_values = k_values
        self.covariance_types = covariance_types
        self.scale = scale
        self.random_state = random_state
        self.n_init = n_init
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.score_sample = score_sample

    def _scaled(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=float)
        if X.ndim != 2:
            raise ValueError(f"expected a 2-D array, got shape {X.shape}")
        return self.scaler_.transform(X) if self.scaler_ is not None else X

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=float)
        if X.ndim != 2:
            raise ValueError(f"expected a 2-D array, got shape {X.shape}")
        n = X.shape[0]
        self.scaler_ = MinMaxScaler().fit(X) if self.scale else None
        Xs = self._scaled(X)
        seed_for_scores = self.random_state if isinstance(self.random_state, int) else 0

        grid: list[dict] = []
        best = None
        best_bic = math.inf
        for cov in self.covariance_types:
            for k in self.k_values:
                k = int(k)
                if k < 1 or k > n:
                    continue
                gm = GaussianMixture(
                    n_components=k,
                    covariance_type=cov,
                    random_state=self.random_state,
                    n_init=self.n_init,
                    reg_covar=self.reg_covar,
                    max_iter=self.max_iter,
                ).fit(Xs)
                bic = float(gm.bic(Xs))
                aic = float(gm.aic(Xs))
                labels = gm.predict(Xs)
                scores = cluster_scores(Xs, labels, sample=self.score_sample, seed=seed_for_scores)
                grid.append(
                    {
                        "covariance_type": cov,
                        "k": k,
                        "bic": bic,
                        "aic": aic,
                        **scores,
                        "converged": bool(gm.converged_),
                    }
                )
                if bic < best_bic:
                    best_bic, best = bic, gm
        if best is None:
            raise ValueError(
                f"no valid (covariance_type, k) combination for {n} samples (k_values={tuple(self.k_values)})"
            )
        self.grid_ = grid
        self.best_ = best
        self.n_components_ = int(best.n_components)
        self.covariance_type_ = best.covariance_type
        self.bic_ = float(best_bic)
        self.n_features_in_ = X.shape[1]
        self.labels_ = best.predict(Xs)
        return self

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self, "best_")
        return self.best_.predict(self._scaled(X))

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self, "best_")
        return self.best_.predict_proba(self._scaled(X))

    def score_samples(self, X) -> np.ndarray:
        """Per-sample log-likelihood under the selected mixture (in scaled space)."""
        check_is_fitted(self, "best_")
        return self.best_.score_samples(self._scaled(X))
