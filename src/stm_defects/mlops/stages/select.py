"""The `select_clusterers` stage: the report's model-selection study (sections 3.2.1 and 3.3),
repeatable. DBSCAN and HDBSCAN grids on the AE1 latents (training patches) and the AE2 latents
(defect patches), beside K-means (k = `kmeans.k`) and the pipeline's GMM, in one table with the
ARI against the synthetic truth, and the choice the scores support (with the GMM's BIC grid).
Seeded 2-D and 3-D t-SNE views of both latent sets, coloured by K-means (AE1) and the GMM (AE2),
as PNGs and one self-contained interactive HTML page, with which view keeps the latents better.

Outputs (all under `reports/select_clusterers/`): `comparison.md|json` (the table, the t-SNE
scores), `choice.md` (the choice, its reason, the BIC), `dbscan_*.png`, `hdbscan_*.png`,
`sizes_*.png`, `tsne_2d.png`, `tsne_3d.png`, `tsne_3d.html`, `metrics.json`.

`fn(params, deps, outs, tracker, progress) -> metrics` (see `mlops.dag`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stm_defects.io.files import fresh_dir, read_json, write_json
from stm_defects.io.model_files import load_autoencoder, load_model


def _subsample(n: int, cap: int, seed: int) -> np.ndarray:
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


def _defect_truth(raw_dir: Path, train: list[str], centres: np.ndarray, owner: np.ndarray,
                  radius: float) -> np.ndarray:
    """The true class of each defect patch (-1: no true defect within `radius` px)."""
    from stm_defects.models.selection import truth_classes

    truth = np.full(len(centres), -1, np.int64)
    for i in np.unique(owner):
        f = (raw_dir / train[i]).with_suffix(".json")
        if f.is_file():
            sel = owner == i
            truth[sel] = truth_classes(centres[sel], read_json(f)["defects"], radius)
    return truth


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if np.isnan(v) else f"{v:.3f}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    """The comparison rows as a Markdown table (each method's lowest-DBI setting in bold)."""
    from stm_defects.models.selection import COLUMNS

    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(("**" if r["best_dbi"] and c == "setting" else "") + _fmt(r[c])
                                            + ("**" if r["best_dbi"] and c == "setting" else "")
                                            for c in COLUMNS) + " |\n" for r in rows)


def tsne_section(views: dict[str, dict], scores: dict[str, dict], verdicts: dict[str, tuple[int, str]],
                 cfg) -> str:
    """The Markdown section comparing the 2-D and 3-D t-SNE views (appended to comparison.md).
    `views`: name -> {"n", "coloured"}; `scores`: name -> {dim: {trustworthiness, separation}}."""
    lines = ["\n## t-SNE views: 2-D or 3-D?\n",
             (f"Seeded t-SNE (perplexity {cfg.tsne_perplexity:g}, {cfg.tsne_max_iter} steps) of a subsample "
              f"of each latent set. Trustworthiness ({cfg.tsne_neighbors} neighbours, 1 = every latent's "
              "nearest neighbours stay its neighbours in the view) measures how faithful a view is; the "
              "silhouette of the clusters in the view measures how separated they look. Pictures: "
              "`tsne_2d.png`, `tsne_3d.png`, and `tsne_3d.html` (interactive, self-contained: drag to "
              "rotate).\n"),
             ("| latents | points | coloured by | trustworthiness 2-D | 3-D | silhouette in view 2-D | 3-D "
              "| better view |"),
             "|---|---|---|---|---|---|---|---|"]
    for name, v in views.items():
        s2, s3 = scores[name][2], scores[name][3]
        lines.append(f"| {name} | {v['n']} | {v['coloured']} | {s2['trustworthiness']:.3f} "
                     f"| {s3['trustworthiness']:.3f} | {_fmt(s2['separation'])} | {_fmt(s3['separation'])} "
                     f"| {verdicts[name][0]}-D |")
    lines.append("")
    lines += [f"* {name}: {verdicts[name][1]}." for name in views]
    return "\n".join(lines) + "\n"


def bic_lines(summary: dict, n_latents, recomputed: bool) -> list[str]:
    """The GMM's BIC (from `selection.bic_summary`) as Markdown lines for choice.md."""
    where = ("recomputed on this stage's AE2 latents (the model file holds no grid)" if recomputed else
             f"the `gmm` stage's grid of {summary['settings']} settings (k x covariance type)"
             + (f" on its {n_latents} AE2 latents" if n_latents else ""))
    out = [(f"GMM Bayesian information criterion, {where}: the chosen {summary['covariance_type']} "
            f"k={summary['k']} has BIC {summary['bic']:.1f}")]
    r = summary["runner_up"]
    if r:
        out[0] += (f"; the next lowest is {r['covariance_type']} k={r['k']} at {r['bic']:.1f} "
                   f"(ΔBIC {r['delta']:+.1f}; above 10 counts as very strong evidence for the lower BIC)")
    near = {k: b for k, b in summary["k_neighbours"].items()
            if not (r and r["covariance_type"] == summary["covariance_type"] and r["k"] == k)}
    if near:
        out[0] += "; the same covariance type at " + ", ".join(f"k={k}: ΔBIC {b - summary['bic']:+.1f}"
                                                              for k, b in near.items())
    out[0] += "."
    if summary["at_edge"]:
        lo, hi = summary["k_range"]
        out[0] += (f" The chosen k is the largest searched ({lo}-{hi}): the BIC may still fall beyond it "
                   "(widen `gmm.k_range` to find its minimum; the report searched 2-30).")
    if len(summary["per_type"]) > 1:
        out += ["", "| covariance type | best k | BIC | ΔBIC to the chosen |", "|---|---|---|---|"]
        out += [f"| {g['covariance_type']} | {g['k']} | {g['bic']:.1f} | {g['delta']:+.1f} |"
                for g in summary["per_type"]]
    return out + [""]


def select_clusterers(params, deps, outs, tracker, progress) -> dict:
    """DBSCAN / HDBSCAN grids vs K-means and the GMM on AE1 and AE2 latents -> `reports`."""
    from stm_defects.mlops import plots
    from stm_defects.models.cluster import make_kmeans
    from stm_defects.models.selection import better_view, bic_summary, compare_clusterers, tsne_views
    from stm_defects.models.training import encode

    cfg, seed, out = params.select_clusterers, params.seed, fresh_dir(outs["reports"])
    train = np.load(deps["patches"])["patches"]
    train = train[_subsample(len(train), cfg.max_samples, seed)]
    defects = np.load(deps["defects"])
    keep = _subsample(len(defects["patches"]), cfg.max_samples, seed)
    latents = {"AE1": encode(load_autoencoder(deps["ae1"]), train),                     # (N, latent)
               "AE2": encode(load_autoencoder(deps["ae2"]), defects["patches"][keep])}
    k = params.kmeans.k
    gmm = load_model(deps["gmm"], "gmm")
    references = {
        "AE1": ("K-means", f"k={k}", make_kmeans(k, seed=seed).fit(latents["AE1"]).predict(latents["AE1"])),
        "AE2": ("GMM", f"k={gmm.n_components_}, {gmm.covariance_type_} (models/gmm)",
                gmm.predict(latents["AE2"])),
    }
    names = read_json(deps["manifest"])["splits"]["train"]
    truth = {"AE2": _defect_truth(Path(deps["raw"]), names, defects["centres"][keep],
                                  defects["scan_index"][keep], cfg.truth_radius)}
    with progress(1, "clusterer grids") as step:
        study = compare_clusterers(latents, references, cfg, truth, seed)
        step(1)

    pngs = []
    for name, grids in study["grids"].items():
        for method, rows in grids.items():
            x, y = ("eps_quantile", "min_samples") if method == "DBSCAN" else ("min_cluster_size", "min_samples")
            pngs.append(out / f"{method.lower()}_{name.lower()}.png")
            plots.grid_heatmaps(rows, x, y, f"{method} on {name} latents ({len(latents[name])} points)", pngs[-1])
        pngs.append(out / f"sizes_{name.lower()}.png")
        plots.cluster_sizes({f"{m}{'' if m in ('K-means', 'GMM') else ' (best DBI)'}": lab
                             for m, lab in study["labels"][name].items()}, pngs[-1])
    # t-SNE views of both latent sets, coloured by their centroid model (K-means / GMM)
    views, scores, verdicts, panels = {}, {}, {}, {2: {}, 3: {}}
    with progress(1, "t-SNE views") as step:
        for name, (method, setting, labels) in references.items():
            sub = _subsample(len(latents[name]), cfg.tsne_samples, seed)
            emb = tsne_views(latents[name][sub], labels[sub], (2, 3), seed, cfg.tsne_perplexity,
                             cfg.tsne_max_iter, cfg.tsne_neighbors)
            n_clusters = len(np.unique(labels))
            views[name] = {"n": len(sub), "coloured": f"{method} ({n_clusters} clusters)"}
            scores[name] = {d: {k: v for k, v in e.items() if k != "embedding"} for d, e in emb.items()}
            verdicts[name] = better_view(emb)
            for d in (2, 3):
                panels[d][name] = {"embedding": emb[d]["embedding"], "labels": labels[sub],
                                   "subtitle": f"{len(sub)} latents by {method} ({n_clusters} clusters), "
                                               f"trustworthiness {emb[d]['trustworthiness']:.3f}"}
        step(1)
    for d in (2, 3):
        pngs.append(out / f"tsne_{d}d.png")
        plots.tsne_panels(panels[d], d, pngs[-1], f"{d}-D t-SNE of the AE1 and AE2 latents (seed {seed})")
    plots.scatter3d_html(panels[3], out / "tsne_3d.html",
                         f"3-D t-SNE of the AE1 and AE2 latents (seed {seed})",
                         ("AE1 latents coloured by K-means, AE2 latents by the GMM; see comparison.md for "
                          "whether the 2-D or the 3-D view keeps the latents better."))

    # the GMM's BIC: the gmm stage's grid (k x covariance type), else the chosen model recomputed here
    grid = list(getattr(gmm, "grid_", None) or [])
    recomputed = not grid
    if recomputed:
        x2 = latents["AE2"] if gmm.scaler_ is None else gmm.scaler_.transform(latents["AE2"])
        grid = [{"covariance_type": gmm.covariance_type_, "k": gmm.n_components_,
                 "bic": float(gmm.best_.bic(x2))}]
    bic = bic_summary(grid, gmm.n_components_, gmm.covariance_type_)
    gmm_metrics = Path(deps["gmm"]) / "metrics.json"
    n_gmm = read_json(gmm_metrics).get("n_latents") if gmm_metrics.is_file() else None

    rows = study["rows"]
    write_json(out / "comparison.json", {"rows": rows, "grids": study["grids"], "tsne": scores,
                                         "tsne_better_view": {k: v[0] for k, v in verdicts.items()},
                                         "gmm_bic": bic})
    known = truth["AE2"] >= 0
    (out / "comparison.md").write_text(
        f"# Clusterers on AE1 and AE2 latents\n\n{len(latents['AE1'])} AE1 and {len(latents['AE2'])} AE2 "
        f"latents (seed {seed}). Silhouette and Davies-Bouldin (DBI) on the non-noise points; ARI against "
        f"the synthetic truth on the {int(known.sum())} AE2 patches within {cfg.truth_radius:g} px of a true "
        "defect. Bold: each method's lowest-DBI cell.\n\n" + markdown_table(rows)
        + tsne_section(views, scores, verdicts, cfg))
    lines = ["# Choice of clusterer\n"]
    for name, c in study["choices"].items():
        lines.append(f"## {name} latents: {c['method']}\n\n{c['reason']}.\n")
        if name == "AE2":
            lines += bic_lines(bic, n_gmm, recomputed)
        if "truth" in c:
            lines.append(f"Check: {c['truth']}.\n")
    (out / "choice.md").write_text("\n".join(lines))
    metrics = {"ae1_choice": study["choices"]["AE1"]["method"], "ae2_choice": study["choices"]["AE2"]["method"],
               "ae2_truth_fraction": float(known.mean()), "ae2_gmm_bic": bic["bic"]}
    if bic["runner_up"]:
        metrics["ae2_gmm_bic_runner_up_delta"] = bic["runner_up"]["delta"]
    for name in views:
        for d in (2, 3):
            metrics[f"{name.lower()}_tsne_{d}d_trustworthiness"] = scores[name][d]["trustworthiness"]
            metrics[f"{name.lower()}_tsne_{d}d_separation"] = scores[name][d]["separation"]
        metrics[f"{name.lower()}_tsne_better_dim"] = verdicts[name][0]
    for name, c in study["choices"].items():
        for m, s in c["summaries"].items():
            key = f"{name}_{m}".lower().replace("-", "")
            metrics[f"{key}_cv"] = s["n_clusters_cv"]
            metrics[f"{key}_noise"] = s["noise_median"]
            metrics[f"{key}_best_dbi"] = s["best_dbi"]
        for r in rows:
            if r["latent"] == name and r["best_dbi"] and r["ari"] == r["ari"]:
                metrics[f"{name}_{r['method']}_ari".lower().replace("-", "")] = r["ari"]
    write_json(out / "metrics.json", metrics)
    tracker.metrics(metrics, prefix="select_")
    tracker.artifacts(*pngs, out / "tsne_3d.html", out / "comparison.md", out / "comparison.json",
                      out / "choice.md", folder="select_clusterers")
    return metrics
