"""The `select_clusterers` stage: the report's model-selection study (sections 3.2.1 and 3.3),
repeatable. DBSCAN and HDBSCAN grids on the AE1 latents (training patches) and the AE2 latents
(defect patches), beside K-means (k = `kmeans.k`) and the pipeline's GMM, in one table with the
ARI against the synthetic truth, and the choice the scores support.

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
        return "nan" if v != v else f"{v:.3f}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    """The comparison rows as a Markdown table (each method's lowest-DBI setting in bold)."""
    from stm_defects.models.selection import COLUMNS

    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(("**" if r["best_dbi"] and c == "setting" else "") + _fmt(r[c])
                                            + ("**" if r["best_dbi"] and c == "setting" else "")
                                            for c in COLUMNS) + " |\n" for r in rows)


def select_clusterers(params, deps, outs, tracker, progress) -> dict:
    """DBSCAN / HDBSCAN grids vs K-means and the GMM on AE1 and AE2 latents -> `reports`."""
    from stm_defects.mlops import plots
    from stm_defects.models.cluster import make_kmeans
    from stm_defects.models.selection import compare_clusterers
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
    rows = study["rows"]
    write_json(out / "comparison.json", {"rows": rows, "grids": study["grids"]})
    known = truth["AE2"] >= 0
    (out / "comparison.md").write_text(
        f"# Clusterers on AE1 and AE2 latents\n\n{len(latents['AE1'])} AE1 and {len(latents['AE2'])} AE2 "
        f"latents (seed {seed}). Silhouette and Davies-Bouldin (DBI) on the non-noise points; ARI against "
        f"the synthetic truth on the {int(known.sum())} AE2 patches within {cfg.truth_radius:g} px of a true "
        "defect. Bold: each method's lowest-DBI cell.\n\n" + markdown_table(rows))
    lines = ["# Choice of clusterer\n"]
    for name, c in study["choices"].items():
        lines.append(f"## {name} latents: {c['method']}\n\n{c['reason']}.\n")
        if "truth" in c:
            lines.append(f"Check: {c['truth']}.\n")
    (out / "choice.md").write_text("\n".join(lines))
    metrics = {"ae1_choice": study["choices"]["AE1"]["method"], "ae2_choice": study["choices"]["AE2"]["method"],
               "ae2_truth_fraction": float(known.mean())}
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
    tracker.artifacts(*pngs, out / "comparison.md", out / "comparison.json", out / "choice.md",
                      folder="select_clusterers")
    return metrics
