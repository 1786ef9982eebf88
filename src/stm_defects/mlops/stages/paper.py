"""The report's method, stage by stage: K-means on AE1 latents -> defect masks and AE2's
patches (with the mask calibration) -> GMM over AE2 latents chosen by BIC.

Each stage is `fn(params, deps, outs, tracker, progress) -> metrics` (see `mlops.dag`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stm_defects.errors import StageError
from stm_defects.io import safe_models
from stm_defects.io.files import fresh_dir, read_json, write_csv, write_json
from stm_defects.io.model_files import load_autoencoder, load_model
from stm_defects.mlops.lineage import lineage_tags


def kmeans(params, deps, outs, tracker, progress) -> dict:
    """K-means on AE1 latents of the training patches: sweep k, fit the chosen k -> `kmeans.npz`."""
    from stm_defects.mlops import plots
    from stm_defects.models.cluster import choose_k, kmeans_sweep, make_kmeans
    from stm_defects.models.training import encode

    out = fresh_dir(outs["model"])
    kp = params.kmeans
    latents = encode(load_autoencoder(deps["ae1"]), np.load(deps["patches"])["patches"])
    sweep = kmeans_sweep(latents, list(range(kp.k_range[0], kp.k_range[1] + 1)), params.seed,
                         sample=kp.sweep_sample)
    k = choose_k(sweep, method=kp.k_select, fixed=kp.k)
    model = make_kmeans(k, seed=params.seed, minibatch_threshold=kp.minibatch_threshold).fit(latents)
    labels = model.predict(latents)
    safe_models.save(out / "kmeans.npz", model, "kmeans")
    write_json(out / "sweep.json", sweep)
    plots.kmeans_sweep(sweep, k, out / "elbow.png")
    chosen = next(r for r in sweep if r["k"] == k)
    fractions = np.bincount(labels, minlength=k) / len(labels)
    metrics = {"k": k, "inertia": chosen["inertia"], "silhouette": chosen["silhouette"],
               "davies_bouldin": chosen["davies_bouldin"], "n_latents": len(latents),
               "cluster_fractions": [round(float(f), 4) for f in fractions]}
    write_json(out / "metrics.json", metrics)
    plots.tsne(latents, labels, out / "tsne.png", params.seed)
    for row in sweep:
        tracker.metrics({key: v for key, v in row.items() if key != "k"}, prefix="sweep_", step=row["k"])
    tracker.metrics(metrics, prefix="kmeans_")
    tracker.artifacts(out / "elbow.png", out / "tsne.png", out / "sweep.json")
    safe_models.write_manifest(out, "kmeans.npz")              # last: the folder is complete
    tracker.register("kmeans", out / "kmeans.npz",
                     lineage_tags(tracker, {"ae1": deps["ae1"]}, data=deps["patches"]))
    return metrics


def _paper_config(params):
    from stm_defects.paper.method import PaperConfig

    return PaperConfig(patch=params.prepare.patch, maps=params.maps, mask=params.mask,
                       defect_patches=params.defect_patches)


def defects(params, deps, outs, tracker, progress) -> dict:
    """Calibrate the mask on the training scans (-> `calibration`) and collect AE2's training
    patches (-> `defects/patches.npz`)."""
    from stm_defects.analysis.dispatch import load_image
    from stm_defects.analysis.render import character_picture
    from stm_defects.mlops import plots
    from stm_defects.paper.masks import defect_mask
    from stm_defects.paper.method import calibrate, defect_patches, mask_config, stage1_maps
    from stm_defects.results import Models

    raw_dir, out = Path(deps["raw"]), fresh_dir(outs["defects"])
    cfg = _paper_config(params)
    models = Models(ae1=load_autoencoder(deps["ae1"]), kmeans=load_model(deps["kmeans"], "kmeans"))
    fractions = read_json(Path(deps["kmeans"]) / "metrics.json")["cluster_fractions"]
    train = read_json(deps["manifest"])["splits"]["train"]
    images, maps = [], []
    with progress(len(train), "defect masks") as step:
        for name in train:
            _, img, _ = load_image(raw_dir / name, params.preprocess, **params.scan_calibration.read_kwargs())
            images.append(img)
            maps.append(stage1_maps(img, models, cfg))
            step(1)
    calib = calibrate([e for _, e in maps], fractions, params.mask.threshold, params.kmeans.target_max_fraction)
    mcfg = mask_config(params.mask, calib)
    all_p, all_c, owner, masked = [], [], [], []
    for i, (img, (cmap, emap)) in enumerate(zip(images, maps)):
        mask = defect_mask(emap, cmap, mcfg)
        p, c = defect_patches(img, mask, cfg)
        all_p.append(p)
        all_c.append(c.reshape(-1, 2))
        owner.append(np.full(len(p), i, np.int32))
        masked.append(float(mask.mean()))
    patches = np.concatenate(all_p)
    centres, owner = np.concatenate(all_c), np.concatenate(owner)
    cap = params.defect_patches.max_patches
    if len(patches) > cap:
        keep = np.sort(np.random.default_rng(params.seed).choice(len(patches), cap, replace=False))
        patches, centres, owner = patches[keep], centres[keep], owner[keep]
    np.savez(out / "patches.npz", patches=patches.astype(np.float32), centres=centres, scan_index=owner)
    write_json(outs["calibration"], calib)
    metrics = {"n_defect_patches": len(patches), "mean_mask_fraction": float(np.mean(masked)), **calib}
    write_json(out / "metrics.json", metrics)
    cmap0, emap0 = maps[0]
    plots.mask_example(images[0], character_picture(cmap0), emap0, defect_mask(emap0, cmap0, mcfg),
                       out / "example_mask.png")
    tracker.metrics({k: v for k, v in metrics.items() if not isinstance(v, list)}, prefix="defects_")
    tracker.artifacts(out / "example_mask.png", outs["calibration"])
    if len(patches) < 10:
        raise StageError(f"the defect mask kept only {len(patches)} patches on the training scans; "
                         "lower mask.threshold or min_area in params.yaml")
    return metrics


def gmm(params, deps, outs, tracker, progress) -> dict:
    """Gaussian mixtures over covariance type x k on AE2 latents, the lowest BIC kept -> `gmm.npz`."""
    from stm_defects.mlops import plots
    from stm_defects.models.cluster import GMMSelector
    from stm_defects.models.training import encode

    out = fresh_dir(outs["model"])
    gp = params.gmm
    latents = encode(load_autoencoder(deps["ae2"]), np.load(deps["patches"])["patches"])
    rng = np.random.default_rng(params.seed)
    if len(latents) > gp.max_samples:
        latents = latents[np.sort(rng.choice(len(latents), gp.max_samples, replace=False))]
    model = GMMSelector(k_values=tuple(range(gp.k_range[0], gp.k_range[1] + 1)),
                        covariance_types=gp.covariance_types, random_state=params.seed,
                        n_init=gp.n_init).fit(latents)
    safe_models.save(out / "gmm.npz", model, "gmm")
    write_json(out / "grid.json", model.grid_)
    write_csv(out / "grid.csv", model.grid_)
    plots.gmm_grid(model.grid_, out / "bic.png")
    best = next(g for g in model.grid_ if g["k"] == model.n_components_
                and g["covariance_type"] == model.covariance_type_)
    metrics = {"k": int(model.n_components_), "covariance_type": model.covariance_type_,
               "bic": best["bic"], "aic": best["aic"], "silhouette": best["silhouette"],
               "davies_bouldin": best["davies_bouldin"], "n_latents": len(latents)}
    write_json(out / "metrics.json", metrics)
    for row in model.grid_:
        tracker.metrics({f"{row['covariance_type']}_{k}": v for k, v in row.items()
                         if k in ("bic", "aic", "silhouette", "davies_bouldin")}, prefix="grid_", step=row["k"])
    tracker.metrics(metrics, prefix="gmm_")
    tracker.artifacts(out / "bic.png", out / "grid.csv")
    tags = lineage_tags(tracker, {"ae2": deps["ae2"], "ae1": deps["ae1"], "kmeans": deps["kmeans"]},
                        data=deps["patches"])
    tags["calibration"] = json.dumps(read_json(deps["calibration"]))
    safe_models.write_manifest(out, "gmm.npz")                 # last: the folder is complete
    tracker.register("gmm", out / "gmm.npz", tags)
    return metrics
