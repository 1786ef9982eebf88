"""A fitted Gaussian mixture's predictions without scikit-learn: the numbers of
`sklearn.mixture.GaussianMixture`'s `predict_proba`, `score_samples` and `predict`, from its fitted
attributes (``weights_``, ``means_``, ``precisions_cholesky_``, ``covariance_type``).

Why: importing scikit-learn costs every `stm predict` about 0.6 s (it brings scipy.stats and
pandas), while the default method only evaluates its fitted mixtures. `FittedGaussianMixture` is
what `io.safe_models` rebuilds a stored GaussianMixture as inside the default method's state
(stored back, it writes the same bytes), and the functions also take a scikit-learn mixture, so
fitting keeps using scikit-learn.

The arithmetic is scikit-learn's (1.9: ``_estimate_log_gaussian_prob``,
``_compute_log_det_cholesky``, ``utils._array_api._logsumexp``), step for step in numpy, so the
results are the same to the bit (`tests/test_mixture.py` compares them for every covariance type).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["FittedGaussianMixture", "log_prob_resp", "predict", "predict_proba", "score_samples"]


class FittedGaussianMixture:
    """The fitted state of a `sklearn.mixture.GaussianMixture` (its ``__getstate__``), with the
    predictions of one. Built by `io.safe_models` (``__new__`` + ``__setstate__``, as pickle)."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def predict_proba(self, X) -> np.ndarray:
        return predict_proba(self, X)

    def score_samples(self, X) -> np.ndarray:
        return score_samples(self, X)

    def predict(self, X) -> np.ndarray:
        return predict(self, X)


def _as_float(X) -> np.ndarray:
    """``X`` checked as scikit-learn checks a mixture's input (2-D, finite): float64 and float32
    kept, anything else as float64 (where scikit-learn would keep an integer or float16 dtype and
    compute in it: the callers here always pass floats)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D array of samples x features, got shape {X.shape}")
    X = X if X.dtype in (np.float64, np.float32) else X.astype(np.float64)
    if not np.isfinite(X).all():
        raise ValueError("Input X contains NaN or infinity.")
    return X


def _log_det_cholesky(chol: np.ndarray, covariance_type: str, n_features: int) -> np.ndarray:
    if covariance_type == "full":
        n_components = chol.shape[0]
        return np.sum(np.log(np.reshape(chol, (n_components, -1))[:, :: n_features + 1]), axis=1)
    if covariance_type == "tied":
        return np.sum(np.log(np.diagonal(chol)))
    if covariance_type == "diag":
        return np.sum(np.log(chol), axis=1)
    return n_features * np.log(chol)


def _log_gaussian_prob(X: np.ndarray, means: np.ndarray, chol: np.ndarray, covariance_type: str) -> np.ndarray:
    n_samples, n_features = X.shape
    n_components = means.shape[0]
    log_det = _log_det_cholesky(chol, covariance_type, n_features)
    if covariance_type in ("full", "tied"):
        log_prob = np.empty((n_samples, n_components), dtype=X.dtype)
        for k in range(n_components):
            mu = means[k, :]
            pc = chol[k, :, :] if covariance_type == "full" else chol
            y = (X @ pc) - (mu @ pc)
            log_prob[:, k] = np.sum(np.square(y), axis=1)
    elif covariance_type == "diag":
        precisions = chol ** 2
        log_prob = (np.sum((means ** 2 * precisions), axis=1) - 2.0 * (X @ (means * precisions).T)
                    + (X ** 2 @ precisions.T))
    elif covariance_type == "spherical":
        precisions = chol ** 2
        row_norms = np.einsum("ij,ij->i", X, X)
        log_prob = (np.sum(means ** 2, axis=1) * precisions - 2 * (X @ means.T * precisions)
                    + np.outer(row_norms, precisions))
    else:
        raise ValueError(f"unknown covariance_type {covariance_type!r}")
    return -0.5 * (n_features * math.log(2 * math.pi) + log_prob) + log_det


def _weighted_log_prob(gmm, X: np.ndarray) -> np.ndarray:
    return _log_gaussian_prob(X, gmm.means_, gmm.precisions_cholesky_, gmm.covariance_type) + np.log(gmm.weights_)


def _logsumexp_rows(a: np.ndarray) -> np.ndarray:
    """scikit-learn's ``_logsumexp(a, axis=1)``."""
    a_max = np.max(a, axis=1, keepdims=True)
    at_max = a == a_max
    b = np.array(a, copy=True)
    b[at_max] = -np.inf
    m = np.sum(at_max.astype(b.dtype), axis=1, keepdims=True, dtype=b.dtype)
    shift = np.where(np.isfinite(a_max), a_max, 0)
    e = np.exp(b - shift)
    s = np.sum(e, axis=1, keepdims=True, dtype=e.dtype)
    s = np.where(s == 0, s, s / m)
    out = np.log1p(s) + np.log(m) + a_max
    return np.squeeze(out, axis=1)


def log_prob_resp(gmm, X) -> tuple[np.ndarray, np.ndarray]:
    """(log p(x) per sample, log responsibilities (N, k)) of a fitted mixture."""
    w = _weighted_log_prob(gmm, _as_float(X))
    norm = _logsumexp_rows(w)
    with np.errstate(under="ignore"):
        return norm, w - norm[:, np.newaxis]


def predict_proba(gmm, X) -> np.ndarray:
    """``GaussianMixture.predict_proba``: each component's posterior per sample."""
    return np.exp(log_prob_resp(gmm, X)[1])


def score_samples(gmm, X) -> np.ndarray:
    """``GaussianMixture.score_samples``: the log-likelihood of each sample."""
    return _logsumexp_rows(_weighted_log_prob(gmm, _as_float(X)))


def predict(gmm, X) -> np.ndarray:
    """``GaussianMixture.predict``: the most probable component of each sample."""
    return np.argmax(_weighted_log_prob(gmm, _as_float(X)), axis=1)
