"""The clusterer-selection study (`models.selection`, stage `select_clusterers`) on tiny
synthetic latents: well-separated blobs that every method should find. Also the t-SNE views
(2-D / 3-D, PNG and the self-contained HTML), the GMM's BIC summary, and the whole stage on
tiny models (tests/tiny.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from stm_defects.config import SelectClusterersParams
from stm_defects.models.selection import (
    COLUMNS,
    better_view,
    bic_summary,
    choose_clusterer,
    compare_clusterers,
    dbscan_grid,
    eps_grid,
    grid_summary,
    hdbscan_grid,
    labelling_scores,
    truth_classes,
    tsne_views,
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


# ---------------------------------------------------------------------------------- t-SNE
def test_tsne_views_are_seeded_and_scored(blobs):
    from sklearn.manifold import trustworthiness

    X, y = blobs
    views = tsne_views(X, y, (2, 3), seed=0, max_iter=500)
    assert views[2]["embedding"].shape == (len(X), 2) and views[3]["embedding"].shape == (len(X), 3)
    chance = trustworthiness(X, np.random.default_rng(0).normal(size=(len(X), 2)), n_neighbors=10)
    assert all(v["trustworthiness"] > chance for v in views.values())
    # far-apart blobs stay apart; scikit-learn's 3-D t-SNE uses a Student t with 2 degrees of freedom
    # (lighter tails than 2-D's 1), so its clusters look less separated
    assert views[2]["separation"] > views[3]["separation"] > 0
    again = tsne_views(X, y, (3,), seed=0, max_iter=500)
    assert np.array_equal(again[3]["embedding"], views[3]["embedding"])
    assert math.isnan(tsne_views(X[:12], np.zeros(12, int), (2,), max_iter=500)[2]["separation"])


def _view(trust, sep):
    return {"trustworthiness": trust, "separation": sep}


def test_the_3d_view_must_earn_its_axis():
    assert better_view({2: _view(0.94, 0.3), 3: _view(0.955, 0.3)})[0] == 2      # gain within the margin
    dim, reason = better_view({2: _view(0.90, 0.3), 3: _view(0.95, 0.35)})
    assert dim == 3 and "0.900" in reason and "0.950" in reason
    assert better_view({2: _view(0.90, 0.3), 3: _view(0.95, 0.2)})[0] == 2       # clusters separate less


def test_tsne_pictures_and_a_self_contained_page(blobs, tmp_path):
    import json
    import re
    import shutil
    import subprocess

    from stm_defects.mlops import plots

    X, y = blobs
    views = tsne_views(X, y, (2, 3), seed=0, max_iter=500)
    panels = {d: {"AE1": {"embedding": views[d]["embedding"], "labels": y, "subtitle": "blobs"},
                  "AE2": {"embedding": views[d]["embedding"], "labels": np.where(y == 2, -1, y), "subtitle": "noise"}}
              for d in (2, 3)}
    for d in (2, 3):
        plots.tsne_panels(panels[d], d, tmp_path / f"t{d}.png", "t")
        assert (tmp_path / f"t{d}.png").stat().st_size > 0
    page = tmp_path / "t.html"
    plots.scatter3d_html(panels[3], page, "3-D <t-SNE>", "a note")
    text = page.read_text()
    assert "://" not in text and "src=" not in text and "<link" not in text      # no CDN, no fetch
    assert "3-D &lt;t-SNE&gt;" in text
    data = json.loads(re.search(r"const PANELS = (.*);\n", text).group(1))
    assert [p["name"] for p in data] == ["AE1", "AE2"] and all(len(p["points"]) == len(X) for p in data)
    assert set(data[1]["colours"]) == {"-1", "0", "1"}
    xyz = np.array([q[:3] for q in data[0]["points"]])
    assert np.abs(xyz).max() == pytest.approx(1.0, abs=1e-3)
    if shutil.which("node"):                      # the viewer's JavaScript at least parses
        script = tmp_path / "viewer.js"
        script.write_text(text.split("<script>")[1].split("</script>")[0])
        assert subprocess.run(["node", "--check", str(script)], capture_output=True, check=False).returncode == 0


# ------------------------------------------------------------------------------------ BIC
GRID = [{"covariance_type": c, "k": k, "bic": b} for c, k, b in (
    ("full", 2, -100.0), ("full", 3, -130.0), ("full", 4, -120.0), ("diag", 2, -90.0), ("diag", 3, -125.0),
    ("diag", 4, float("nan")))]


def test_bic_summary_around_the_chosen_setting():
    s = bic_summary(GRID, 3, "full")
    assert s["bic"] == -130.0 and s["settings"] == 5                               # NaN row dropped
    assert (s["runner_up"]["covariance_type"], s["runner_up"]["k"]) == ("diag", 3)
    assert s["runner_up"]["delta"] == pytest.approx(5.0)
    assert [(g["covariance_type"], g["k"], g["delta"]) for g in s["per_type"]] == [("full", 3, 0.0), ("diag", 3, 5.0)]
    assert s["k_neighbours"] == {2: -100.0, 4: -120.0} and not s["at_edge"]
    edge = bic_summary(GRID, 4, "full")
    assert edge["at_edge"] and edge["k_range"] == (2, 4) and edge["runner_up"]["delta"] < 0


def test_bic_lines_state_the_evidence_and_the_edge():
    from stm_defects.mlops.stages.select import bic_lines

    text = "\n".join(bic_lines(bic_summary(GRID, 4, "full"), 5000, recomputed=False))
    assert "5000 AE2 latents" in text and "full k=4 has BIC -120.0" in text
    assert "largest searched (2-4)" in text and "| diag | 3 | -125.0 | -5.0 |" in text
    one = bic_lines(bic_summary(GRID[:1], 2, "full"), None, recomputed=True)
    assert "recomputed" in one[0] and "next lowest" not in one[0]


# ------------------------------------------------------------------------------ the stage
class _Tracker:
    def __init__(self):
        self.metrics_logged, self.artifacts_logged = {}, []

    def metrics(self, metrics, prefix=""):
        self.metrics_logged.update({prefix + k: v for k, v in metrics.items()})

    def artifacts(self, *paths, folder=None):
        self.artifacts_logged += [Path(p).name for p in paths]


def test_the_stage_writes_the_table_the_choice_with_bic_and_the_tsne_views(tmp_path):
    import dataclasses
    import json

    from stm_defects.config import ScopedParams, load_params
    from stm_defects.io.model_files import load_model
    from stm_defects.mlops.dag import stage
    from stm_defects.mlops.run import _progress_factory
    from stm_defects.mlops.stages.select import select_clusterers
    from tiny import tiny_models

    files = tiny_models(tmp_path / "models")
    rng = np.random.default_rng(0)
    n = 150
    patches = rng.random((n, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "train.npz", patches=patches)
    np.savez(tmp_path / "defects.npz", patches=patches, centres=rng.uniform(0, 64, (n, 2)),
             scan_index=np.repeat([0, 1], n // 2))
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.json").write_text(json.dumps({"defects": [{"x": 30.0, "y": 30.0, "class_id": 1}]}))
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"train": ["a.tif", "b.tif"]}}))
    root = Path(__file__).resolve().parents[1]
    params = load_params(root / "params.yaml")
    params = dataclasses.replace(params, select_clusterers=dataclasses.replace(
        CFG, tsne_samples=100, tsne_max_iter=500), kmeans=dataclasses.replace(params.kmeans, k=3))
    st = stage("select_clusterers")
    deps = {"ae1": files["ae1"], "ae2": files["ae2"], "gmm": files["gmm"].parent, "patches": tmp_path / "train.npz",
            "defects": tmp_path / "defects.npz", "raw": tmp_path / "raw", "manifest": tmp_path / "manifest.json"}
    tracker = _Tracker()
    m = select_clusterers(ScopedParams(params, st.params, st.name), deps, {"reports": tmp_path / "out"}, tracker,
                          _progress_factory(False))
    out = tmp_path / "out"
    for name in ("tsne_2d.png", "tsne_3d.png", "tsne_3d.html", "comparison.md", "choice.md", "metrics.json"):
        assert (out / name).is_file(), name
        assert name == "metrics.json" or name in tracker.artifacts_logged, name
    assert m["ae1_tsne_better_dim"] in (2, 3) and 0 < m["ae2_tsne_3d_trustworthiness"] <= 1
    gmm = load_model(deps["gmm"], "gmm")                    # tiny.py's GMM: k=2, diag
    assert m["ae2_gmm_bic"] == pytest.approx(bic_summary(gmm.grid_, 2, "diag")["bic"])
    assert "GMM Bayesian information criterion" in (out / "choice.md").read_text()
    comparison = (out / "comparison.md").read_text()
    assert "## t-SNE views: 2-D or 3-D?" in comparison and "| AE1 | 100 | K-means (3 clusters) |" in comparison
    assert json.loads((out / "metrics.json").read_text())["ae1_tsne_better_dim"] == m["ae1_tsne_better_dim"]
