"""Model selection of the latent clusterers (the report's sections 3.2.1 and 3.3): DBSCAN and
HDBSCAN over parameter grids, scored beside K-means and the GMM, and a stated choice.

* :func:`eps_grid` -- DBSCAN radii from quantiles of the k-distance, so a grid is scale-free.
* :func:`labelling_scores` -- number of clusters, noise fraction, silhouette, Davies-Bouldin
  (on the non-noise points) and, given truth, the adjusted Rand index.
* :func:`dbscan_grid` / :func:`hdbscan_grid` -- one row per grid cell (labels kept apart).
* :func:`choose_clusterer` -- the method the scores support, with the reason in words.
* :func:`compare_clusterers` -- all of it on AE1 / AE2 latents: the one-table comparison.
* :func:`truth_classes` -- the true class of each patch centre (synthetic scans).
* :func:`tsne_views` / :func:`better_view` -- seeded 2-D and 3-D t-SNE embeddings of latents,
  scored (trustworthiness, cluster separation in the view), and which view is worth showing.
* :func:`bic_summary` -- the GMM's BIC grid (k x covariance type) reduced to what the choice needs.

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

__all__ = ["COLUMNS", "better_view", "bic_summary", "choose_clusterer", "compare_clusterers", "dbscan_grid",
           "eps_grid", "grid_summary", "hdbscan_grid", "labelling_scores", "truth_classes", "tsne_views"]

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


# ---------------------------------------------------------------------------------- t-SNE
TRUST_MARGIN = 0.02     # trustworthiness a 3-D view must gain over 2-D to be the better picture


def tsne_views(X: np.ndarray, labels: np.ndarray, dims: Sequence[int] = (2, 3), seed: int = 0,
               perplexity: float = 30.0, max_iter: int = 500, n_neighbors: int = 10) -> dict[int, dict]:
    """Seeded t-SNE embeddings of X (N, d), one per entry of `dims`, each scored.

    Returns {dim: {"embedding": (N, dim) float32, "trustworthiness": how well the view keeps each
    point's `n_neighbors` nearest latents as neighbours (scikit-learn's, 1 = perfectly),
    "separation": silhouette of `labels` (N,) in the view (NaN below two clusters)}}.

    scikit-learn gives the Student t of an n-D view n - 1 degrees of freedom: 3-D views have
    lighter tails than 2-D ones and pull clusters apart less (lower separation for the same data).
    Initialised by PCA, or at random for a view with more dimensions than the latents.
    Barnes-Hut t-SNE runs on one thread: its parallel gradient sums in a machine-dependent order,
    and two OpenMP threads on a busy 2-core machine were measured 3-7x slower than one. The
    perplexity is capped below N / 3 so that tiny sets still embed.
    """
    from sklearn.manifold import TSNE, trustworthiness
    from sklearn.metrics import silhouette_score
    from threadpoolctl import threadpool_limits

    X = np.asarray(X, dtype=np.float32)
    labels = np.asarray(labels)
    perp = float(min(perplexity, max(1.0, (len(X) - 1) / 3)))
    k = int(min(n_neighbors, max(1, len(X) // 2 - 1)))      # trustworthiness needs k < N / 2
    two_clusters = np.unique(labels).size >= 2
    out = {}
    for dim in dims:
        with threadpool_limits(1):
            init = "pca" if int(dim) <= X.shape[1] else "random"         # PCA cannot add dimensions
            emb = TSNE(n_components=int(dim), perplexity=perp, max_iter=int(max_iter), init=init,
                       random_state=seed).fit_transform(X).astype(np.float32)       # (N, dim)
        out[int(dim)] = {"embedding": emb, "trustworthiness": float(trustworthiness(X, emb, n_neighbors=k)),
                         "separation": float(silhouette_score(emb, labels)) if two_clusters else _NAN}
    return out


def better_view(views: dict[int, dict], margin: float = TRUST_MARGIN) -> tuple[int, str]:
    """(2 or 3, reason): 3-D only when it keeps neighbourhoods clearly better (trustworthiness up
    by more than `margin`) without separating the clusters worse; otherwise the 2-D view, which a
    static picture shows without hiding points behind others. `views`: from :func:`tsne_views`."""
    t2, t3 = views[2]["trustworthiness"], views[3]["trustworthiness"]
    s2, s3 = views[2]["separation"], views[3]["separation"]
    nums = (f"trustworthiness 2-D {t2:.3f} vs 3-D {t3:.3f}; "
            f"cluster silhouette in the view {s2:.3f} vs {s3:.3f}")
    if t3 - t2 > margin and not s3 < s2:
        return 3, f"{nums}: the third axis keeps neighbourhoods clearly better (+{t3 - t2:.3f} > {margin})"
    why = (f"the 3-D gain in trustworthiness ({t3 - t2:+.3f}) is within {margin}" if t3 - t2 <= margin
           else "the clusters separate less in 3-D")
    return 2, f"{nums}: {why}, so the flat view, which hides no points behind others, is the better picture"


# ------------------------------------------------------------------------------------ BIC
def bic_summary(grid: list[dict], k: int, covariance_type: str) -> dict:
    """The GMM's BIC grid (rows with ``covariance_type``, ``k``, ``bic``, as ``GMMSelector.grid_``)
    around the chosen (`k`, `covariance_type`).

    Returns {"bic", "k", "covariance_type": the chosen setting, "settings": rows in the grid,
    "runner_up": the next lowest setting {covariance_type, k, bic, delta}, "per_type": the best k
    of each covariance type {covariance_type, k, bic, delta} (delta = BIC - chosen BIC, >= 0 when
    the chosen is the minimum), "k_neighbours": the chosen type's BIC at k-1 and k+1 where fitted,
    "k_range": (min, max) k fitted for the chosen type, "at_edge": the chosen k is the largest
    fitted (above 1 setting), so the BIC may still fall beyond the searched range}."""
    rows = sorted(({"covariance_type": str(g["covariance_type"]), "k": int(g["k"]), "bic": float(g["bic"])}
                   for g in grid if math.isfinite(float(g["bic"]))), key=lambda g: g["bic"])
    chosen = next(g for g in rows if g["k"] == int(k) and g["covariance_type"] == covariance_type)

    def with_delta(g: dict) -> dict:
        return {**g, "delta": g["bic"] - chosen["bic"]}

    per_type = {}
    for g in rows:                              # rows are sorted by BIC: first of a type is its best
        per_type.setdefault(g["covariance_type"], with_delta(g))
    others = [g for g in rows if g is not chosen]
    same = {g["k"]: g["bic"] for g in rows if g["covariance_type"] == covariance_type}
    return {"bic": chosen["bic"], "k": chosen["k"], "covariance_type": chosen["covariance_type"],
            "settings": len(rows),
            "runner_up": with_delta(others[0]) if others else None,
            "per_type": list(per_type.values()),
            "k_neighbours": {kk: same[kk] for kk in (int(k) - 1, int(k) + 1) if kk in same},
            "k_range": (min(same), max(same)), "at_edge": len(same) > 1 and int(k) == max(same)}
