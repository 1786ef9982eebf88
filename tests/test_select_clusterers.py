"""The clusterer-selection study (`models.selection`, stage `select_clusterers`) on tiny
synthetic latents: well-separated blobs that every method should find."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stm_defects.config import SelectClusterersParams
from stm_defects.models.selection import (
    COLUMNS,
    choose_clusterer,
    compare_clusterers,
    dbscan_grid,
    eps_grid,
    grid_summary,
    hdbscan_grid,
    labelling_scores,
    truth_classes,
)

N_BLOBS, PER_BLOB, DIM = 3, 40, 4


@pytest.fixture
def blobs():
    """(X (120, 4), true labels (120,)): three tight, far-apart Gaussian blobs."""
    rng = np.random.default_rng(0)
    centres = np.eye(N_BLOBS, DIM) * 10.0
    X = np.concatenate([c + 0.3 * rng.standard_normal((PER_BLOB, DIM)) for c in centres])
    return X, np.repeat(np.arange(N_BLOBS), PER_BLOB)


CFG = SelectClusterersParams(max_samples=200, eps_quantiles=(0.5, 0.9), min_samples=(3, 5),
                             min_cluster_size=(5, 10))


def test_eps_grid_rises_with_the_quantile_and_scales_with_the_data(blobs):
    X, _ = blobs
    eps = eps_grid(X, 5, (0.5, 0.9))
    assert eps[0] < eps[1]
    assert np.allclose(eps_grid(10 * X, 5, (0.5, 0.9)), 10 * np.array(eps))


def test_dbscan_grid_has_one_row_per_cell_and_finds_the_blobs(blobs):
    X, y = blobs
    rows, labels = dbscan_grid(X, CFG.eps_quantiles, CFG.min_samples, truth=y)
    assert len(rows) == len(labels) == len(CFG.eps_quantiles) * len(CFG.min_samples)
    assert all(len(lab) == len(X) for lab in labels)
    assert any(r["n_clusters"] == N_BLOBS and r["ari"] > 0.9 for r in rows)


def test_dbscan_grid_labels_do_not_depend_on_the_scale(blobs):
    X, _ = blobs
    _, a = dbscan_grid(X, CFG.eps_quantiles, CFG.min_samples)
    _, b = dbscan_grid(100 * X, CFG.eps_quantiles, CFG.min_samples)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))


def test_hdbscan_grid_finds_the_blobs(blobs):
    X, y = blobs
    rows, _ = hdbscan_grid(X, CFG.min_cluster_size, CFG.min_samples, truth=y)
    assert len(rows) == len(CFG.min_cluster_size) * len(CFG.min_samples)
    assert all(r["n_clusters"] == N_BLOBS for r in rows)
    assert all(r["ari"] > 0.9 for r in rows)


def test_scores_ignore_noise_and_are_nan_below_two_clusters(blobs):
    X, y = blobs
    noisy = y.copy()
    noisy[::10] = -1
    s = labelling_scores(X, noisy, truth=y)
    assert s["n_clusters"] == N_BLOBS and s["noise"] == pytest.approx(0.1)
    assert s["silhouette"] > 0.8 and s["davies_bouldin"] < 0.3
    one = labelling_scores(X, np.zeros(len(X), int))
    assert one["n_clusters"] == 1 and math.isnan(one["silhouette"]) and math.isnan(one["davies_bouldin"])
    assert math.isnan(one["ari"])                                   # no truth given
    assert labelling_scores(X, -np.ones(len(X), int))["noise"] == 1.0


def _summary(n_clusters, noise, dbi):
    return grid_summary([{"n_clusters": n, "noise": noise, "davies_bouldin": dbi} for n in n_clusters])


def test_choice_rejects_unstable_or_noisy_grids():
    summaries = {"K-means": _summary([6], 0.0, 1.4), "DBSCAN": _summary([1, 2, 19], 0.1, 0.7),
                 "HDBSCAN": _summary([3, 3, 3], 0.9, 0.4)}
    method, reason = choose_clusterer(summaries, "K-means", max_cv=0.5, max_noise=0.2)
    assert method == "K-means"
    assert "DBSCAN rejected: fewer than two clusters" in reason and "median noise 90%" in reason


def test_choice_takes_a_stable_density_method_with_lower_dbi():
    summaries = {"GMM": _summary([6], 0.0, 1.4), "HDBSCAN": _summary([3, 3, 4], 0.05, 0.4)}
    assert choose_clusterer(summaries, "GMM", max_cv=0.5, max_noise=0.2)[0] == "HDBSCAN"


def test_truth_classes_take_the_nearest_defect_within_the_radius():
    defects = [{"x": 10.0, "y": 20.0, "class_id": 3}, {"x": 50.0, "y": 20.0, "class_id": 1}]
    centres = np.array([[20, 12], [21, 47], [80, 80]])             # (row, col)
    assert truth_classes(centres, defects, radius=5.0).tolist() == [3, 1, -1]
    assert truth_classes(centres, [], radius=5.0).tolist() == [-1, -1, -1]


def test_compare_builds_the_one_table_with_ari_and_a_choice(blobs):
    X, y = blobs
    refs = {"AE1": ("K-means", "k=3", y), "AE2": ("GMM", "k=3", y)}
    study = compare_clusterers({"AE1": X, "AE2": X}, refs, CFG, {"AE2": y}, seed=0)
    rows = study["rows"]
    cells = len(CFG.eps_quantiles) * len(CFG.min_samples) + len(CFG.min_cluster_size) * len(CFG.min_samples) + 1
    assert len(rows) == 2 * cells
    assert all(set(COLUMNS) <= set(r) for r in rows)
    assert all(math.isnan(r["ari"]) for r in rows if r["latent"] == "AE1")
    gmm = next(r for r in rows if r["method"] == "GMM")
    assert gmm["ari"] == pytest.approx(1.0) and gmm["noise"] == 0.0
    assert sum(r["best_dbi"] for r in rows if r["latent"] == "AE2") == 3      # one per method
    assert set(study["choices"]) == {"AE1", "AE2"} and "truth" in study["choices"]["AE2"]
    assert set(study["labels"]["AE2"]) == {"GMM", "DBSCAN", "HDBSCAN"}


def test_pictures_and_table_are_written(blobs, tmp_path):
    from stm_defects.mlops import plots
    from stm_defects.mlops.stages.select import markdown_table

    X, y = blobs
    rows, labels = hdbscan_grid(X, CFG.min_cluster_size, CFG.min_samples, truth=y)
    plots.grid_heatmaps(rows, "min_cluster_size", "min_samples", "HDBSCAN", tmp_path / "h.png")
    plots.cluster_sizes({"HDBSCAN": labels[0], "all noise": -np.ones(len(X), int)}, tmp_path / "s.png")
    assert (tmp_path / "h.png").stat().st_size > 0 and (tmp_path / "s.png").stat().st_size > 0
    table = markdown_table([{"method": "HDBSCAN", "latent": "AE1", "setting": "s", "best_dbi": True, **rows[0]}])
    assert table.count("\n") == 3 and "**s**" in table


@pytest.mark.parametrize("n", [1, 2, 12])
def test_too_few_points_give_noise_not_errors(n):
    X = np.random.default_rng(0).standard_normal((n, DIM))
    rows, labels = hdbscan_grid(X, CFG.min_cluster_size, (3, 20))
    assert len(rows) == len(CFG.min_cluster_size) * 2
    assert all((lab == -1).all() for r, lab in zip(rows, labels) if r["min_samples"] > n)
    assert len(dbscan_grid(X, CFG.eps_quantiles, (3, 20))[0]) == len(CFG.eps_quantiles) * 2
