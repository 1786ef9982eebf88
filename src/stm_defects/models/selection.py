"""Model selection of the latent clusterers (the report's sections 3.2.1 and 3.3): DBSCAN and
HDBSCAN over parameter grids, scored beside K-means and the GMM, and a stated choice.

* :func:`eps_grid` -- DBSCAN radii from quantiles of the k-distance, so a grid is scale-free.
* :func:`labelling_scores` -- number of clusters, noise fraction, silhouette, Davies-Bouldin
  (on the non-noise points) and, given truth, the adjusted Rand index.
* :func:`dbscan_grid` / :func:`hdbscan_grid` -- one row per grid cell (labels kept apart).
* :func:`choose_clusterer` -- the method the scores support, with the reason in words.
* :func:`compare_clusterers` -- all of it on AE1 / AE2 latents: the one-table comparison.
* :func:`truth_classes` -- the true class of each patch centre (synthetic scans).

Arrays in, rows (dicts) out; noise is label -1, as scikit-learn writes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.cluster import DBSCAN, HDBSCAN
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

from stm_defects.models.cluster import cluster_scores

COLUMNS = ("method", "latent", "setting", "n_clusters", "noise", "silhouette", "davies_bouldin", "ari")

__all__ = ["COLUMNS", "choose_clusterer", "compare_clusterers", "dbscan_grid", "eps_grid", "grid_summary", "hdbscan_grid",
           "labelling_scores", "truth_classes"]

_NAN = float("nan")


def eps_grid(X: np.ndarray, min_samples: int, quantiles: Sequence[float]) -> list[float]:
    """DBSCAN radii: the `quantiles` of each point's distance to its `min_samples`-th neighbour
    (itself counted, as DBSCAN counts it). X: (N, d)."""
    k = min(int(min_samples), len(X))
    dist, _ = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X)     # (N, k)
    return [float(v) for v in np.quantile(dist[:, -1], list(quantiles))]


def labelling_scores(X: np.ndarray, labels: np.ndarray, truth: np.ndarray | None = None,
                     seed: int = 0) -> dict:
    """Scores of one labelling of X (N, d). Silhouette and Davies-Bouldin are computed on the
    non-noise points (NaN below two clusters); `ari` against `truth` (N,) where truth >= 0 (the
    noise points count as one more label), NaN without truth."""
    labels = np.asarray(labels)
    kept = labels >= 0
    n_clusters = int(np.unique(labels[kept]).size)
    scores = (cluster_scores(X[kept], labels[kept], sample=None, seed=seed) if n_clusters >= 2
              else {"silhouette": _NAN, "davies_bouldin": _NAN})
    ari = _NAN
    if truth is not None:
        known = np.asarray(truth) >= 0
        if known.sum() >= 2:
            ari = float(adjusted_rand_score(np.asarray(truth)[known], labels[known]))
    return {"n_clusters": n_clusters, "noise": float(1.0 - kept.mean()) if len(labels) else _NAN,
            **scores, "ari": ari}


def dbscan_grid(X: np.ndarray, eps_quantiles: Sequence[float], min_samples: Sequence[int],
                truth: np.ndarray | None = None, seed: int = 0) -> tuple[list[dict], list[np.ndarray]]:
    """DBSCAN over eps quantile x min_samples: (rows, labels per row). X: (N, d)."""
    rows, labels = [], []
    for m in min_samples:
        for q, eps in zip(eps_quantiles, eps_grid(X, m, eps_quantiles)):
            lab = DBSCAN(eps=max(eps, 1e-12), min_samples=int(m)).fit_predict(X)
            rows.append({"eps_quantile": float(q), "eps": eps, "min_samples": int(m),
                         **labelling_scores(X, lab, truth, seed)})
            labels.append(lab)
    return rows, labels


def hdbscan_grid(X: np.ndarray, min_cluster_size: Sequence[int], min_samples: Sequence[int],
                 truth: np.ndarray | None = None, seed: int = 0) -> tuple[list[dict], list[np.ndarray]]:
    """HDBSCAN over min_cluster_size x min_samples: (rows, labels per row). X: (N, d). A cell
    with fewer than `min_samples` points labels them all noise."""
    rows, labels = [], []
    for m in min_samples:
        for c in min_cluster_size:
            if len(X) < max(2, int(m)):            # too few points for the cell: all noise
                lab = np.full(len(X), -1)
            else:
                lab = HDBSCAN(min_cluster_size=int(c), min_samples=int(m), copy=True).fit_predict(X)
            rows.append({"min_cluster_size": int(c), "min_samples": int(m),
                         **labelling_scores(X, lab, truth, seed)})
            labels.append(lab)
    return rows, labels


def grid_summary(rows: list[dict]) -> dict:
    """How a method behaves over its grid: the spread of the number of clusters (coefficient of
    variation, min, max), the median noise fraction and the best (lowest) Davies-Bouldin."""
    n = np.array([r["n_clusters"] for r in rows], float)
    dbi = np.array([r["davies_bouldin"] for r in rows], float)
    finite = np.isfinite(dbi)
    return {"n_clusters_min": int(n.min()), "n_clusters_max": int(n.max()),
            "n_clusters_cv": float(n.std() / n.mean()) if n.mean() > 0 else _NAN,
            "noise_median": float(np.median([r["noise"] for r in rows])),
            "valid_cells": int(finite.sum()), "cells": len(rows),
            "best_dbi": float(dbi[finite].min()) if finite.any() else _NAN,
            "best_cell": int(np.flatnonzero(finite)[np.argmin(dbi[finite])]) if finite.any() else -1}


def choose_clusterer(summaries: dict[str, dict], reference: str, max_cv: float,
                     max_noise: float) -> tuple[str, str]:
    """(method, reason). A density method (one summary per grid) is a candidate only when its
    grid is stable (`n_clusters_cv` <= `max_cv`, at least two clusters in every cell) and its
    median noise fraction <= `max_noise`; among the candidates and `reference` (K-means or the
    GMM, whose summary holds its single cell) the lowest Davies-Bouldin wins."""
    reasons, candidates = [], {reference: summaries[reference]["best_dbi"]}
    for name, s in summaries.items():
        if name == reference:
            continue
        problems = []
        spread = f"{s['n_clusters_min']}-{s['n_clusters_max']} clusters"
        if s["n_clusters_min"] < 2:
            problems.append(f"fewer than two clusters in some cells ({spread})")
        elif not s["n_clusters_cv"] <= max_cv:
            problems.append(f"unstable over its grid ({spread}, coefficient of variation "
                            f"{s['n_clusters_cv']:.2f} > {max_cv})")
        if s["noise_median"] > max_noise:
            problems.append(f"median noise {s['noise_median']:.0%} > {max_noise:.0%}")
        if problems:
            reasons.append(f"{name} rejected: " + "; ".join(problems))
        else:
            candidates[name] = s["best_dbi"]
    finite = {k: v for k, v in candidates.items() if math.isfinite(v)}
    best = min(finite, key=finite.get) if finite else reference
    dbis = ", ".join(f"{k} {v:.3f}" for k, v in candidates.items())
    reasons.append(f"lowest Davies-Bouldin among the candidates ({dbis}): {best}")
    return best, "; ".join(reasons)


SETTINGS = {"DBSCAN": "eps=q{eps_quantile:g} ({eps:.3g}), min_samples={min_samples}",
            "HDBSCAN": "min_cluster_size={min_cluster_size}, min_samples={min_samples}"}


def _ari_key(row: dict) -> float:
    return -math.inf if math.isnan(row["ari"]) else row["ari"]


def compare_clusterers(latents: dict[str, np.ndarray], references: dict[str, tuple[str, str, np.ndarray]],
                       cfg, truth: dict[str, np.ndarray | None], seed: int = 0) -> dict:
    """The whole study on encoded latents. `latents`: name -> (N, d); `references`: name ->
    (method, setting, labels (N,)) of the centroid model each is compared with (K-means, the
    GMM); `cfg`: grids and thresholds (fields of `config.SelectClusterersParams`); `truth`:
    name -> true class per point (-1 unknown), absent for no truth.

    Returns {"rows": the one-table comparison (`COLUMNS` + `best_dbi`, each method's
    lowest-DBI cell), "grids": name -> method -> grid rows, "labels": name -> method -> labels
    (density methods: their lowest-DBI cell), "choices": name -> {method, reason, summaries,
    truth (with truth: does the choice have the highest ARI?)}}."""
    rows, grids, labels, choices = [], {}, {}, {}
    for name, X in latents.items():
        t = truth.get(name)
        method, setting, ref_labels = references[name]
        grids[name] = {}
        grids[name]["DBSCAN"], d_labels = dbscan_grid(X, cfg.eps_quantiles, cfg.min_samples, t, seed)
        grids[name]["HDBSCAN"], h_labels = hdbscan_grid(X, cfg.min_cluster_size, cfg.min_samples, t, seed)
        ref = labelling_scores(X, ref_labels, t, seed)
        summaries = {m: grid_summary(g) for m, g in grids[name].items()}
        summaries[method] = grid_summary([ref])
        labels[name] = {method: ref_labels}
        for m, labs in (("DBSCAN", d_labels), ("HDBSCAN", h_labels)):
            best = summaries[m]["best_cell"]
            rows += [{"method": m, "latent": name, "setting": SETTINGS[m].format(**r), "best_dbi": i == best,
                      **{k: r[k] for k in COLUMNS[3:]}} for i, r in enumerate(grids[name][m])]
            labels[name][m] = labs[max(best, 0)]
        rows.append({"method": method, "latent": name, "setting": setting, "best_dbi": True,
                     **{k: ref[k] for k in COLUMNS[3:]}})
        chosen, reason = choose_clusterer(summaries, method, cfg.max_cluster_cv, cfg.max_noise)
        choices[name] = {"method": chosen, "reason": reason, "summaries": summaries}
        if t is not None:
            top = max((r for r in rows if r["latent"] == name), key=_ari_key)
            choices[name]["truth"] = (f"highest ARI against the synthetic truth (any cell): {top['method']} "
                                      f"({top['ari']:.3f}, {top['setting']}); the chosen {chosen} "
                                      f"{'agrees' if top['method'] == chosen else 'differs'}")
    return {"rows": rows, "grids": grids, "labels": labels, "choices": choices}


def truth_classes(centres: np.ndarray, defects: list[dict], radius: float) -> np.ndarray:
    """The `class_id` of the nearest true defect within `radius` px of each centre (row, col),
    -1 when none is that close. centres: (M, 2); defects: dicts with `x` (col), `y` (row)."""
    out = np.full(len(centres), -1, np.int64)
    if not len(defects) or not len(centres):
        return out
    pos = np.array([[d["y"], d["x"]] for d in defects], float)            # (D, 2) row, col
    dist = np.linalg.norm(np.asarray(centres, float)[:, None, :] - pos[None], axis=2)  # (M, D)
    near = dist.argmin(axis=1)
    hit = dist[np.arange(len(centres)), near] <= radius
    out[hit] = np.array([int(d["class_id"]) for d in defects])[near[hit]]
    return out
