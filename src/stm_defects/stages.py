"""One function per DVC stage: (input paths, output paths, params) -> metrics.

Paths come from `dvc.yaml` (through the CLI); numbers from `params.yaml`. Each stage reads only
what it declares, rewrites its outputs completely, and is deterministic given `params.seed`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .config import Params
from .io import fresh_dir, read_json, save_png, write_csv, write_json
from .scans import ScanError, find_scans, read_scan

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage cannot go on (e.g. too few valid scans). One line for the user."""


# --------------------------------------------------------------------------------------- synth
SPLITS_SYNTH = {"default": ("synth", "n_scans", 0), "hard": ("synth_hard", "n_hard", 1_000_000)}


def synth(params: Params, out_dir: str | Path, progress=None) -> dict:
    """Generate the embedded synthetic data: `<out>/<split>/<name>.gwy` + truth JSON + step mask."""
    from .scans import save_gwy
    from .synth import synth_scan, truth_dict

    out = fresh_dir(out_dir)
    counts = {}
    for split, (section, count_key, offset) in SPLITS_SYNTH.items():
        cfg = getattr(params, section)
        n = getattr(params.data, count_key)
        folder = out / split
        folder.mkdir()
        for i in range(n):
            seed = params.seed * 10_000_019 + offset + i
            s = synth_scan(cfg, seed)
            name = f"{split}_{i:03d}"
            save_gwy(folder / f"{name}.gwy", s.height, s.pixel_nm, unit="nm",
                     meta={"source": "stm-defects synth", "seed": seed, "split": split})
            write_json(folder / f"{name}.json", truth_dict(s))
            np.savez_compressed(folder / f"{name}_steps.npz", step_mask=s.step_mask)
            if progress:
                progress(1)
        counts[split] = n
    montage(out, out / "montage.png")
    return counts


def montage(raw_dir: Path, path: Path, n_default: int = 6, n_hard: int = 3) -> None:
    """A picture of a few levelled synthetic scans, so people can see what the data looks like."""
    import matplotlib.pyplot as plt

    from .preprocess import PreprocessConfig, preprocess

    files = sorted((raw_dir / "default").glob("*.gwy"))[:n_default]
    files += sorted((raw_dir / "hard").glob("*.gwy"))[:n_hard]
    if not files:
        return
    cols = 3
    rows = (len(files) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, f in zip(axes.flat, files):
        scan = read_scan(f)
        img, _ = preprocess(scan.height, scan.pixel_nm, PreprocessConfig())
        ax.imshow(img, cmap="afmhot")
        truth = read_json(f.with_suffix(".json"))
        xs = [d["x"] for d in truth["defects"]]
        ys = [d["y"] for d in truth["defects"]]
        ax.scatter(xs, ys, s=60, facecolors="none", edgecolors="cyan", linewidths=0.8)
        ax.set_title(f"{f.stem}: {len(xs)} defects, {truth.get('n_steps', 0)} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------ validate
def scan_folders(raw_dir: Path) -> list[Path]:
    """The synthetic data's split folders when present (not its montage), else the folder itself."""
    split_dirs = [raw_dir / s for s in SPLITS_SYNTH if (raw_dir / s).is_dir()]
    return split_dirs or [raw_dir]


def validate(params: Params, raw_dir: str | Path, out_dir: str | Path) -> dict:
    """Per-scan statistics + GX suite. Failing scans are quarantined, with their reasons."""
    from .validate import mark_duplicates, run_suite, scan_stats

    raw_dir, out = Path(raw_dir), fresh_dir(out_dir)
    rows, quarantined = [], {}
    files = find_scans(scan_folders(raw_dir))
    for path in files:
        name = str(path.relative_to(raw_dir))
        try:
            rows.append(scan_stats(name, read_scan(path)))
        except ScanError as err:
            quarantined[name] = [err.reason]
    mark_duplicates(rows)
    result = run_suite(rows, params.validate, docs_dir=out / "datadocs") if rows else {
        "success": False, "failures": {}, "results": []}
    for name, reasons in result["failures"].items():
        quarantined.setdefault(name, []).extend(reasons)
    passed = sorted(r["scan"] for r in rows if r["scan"] not in quarantined)
    summary = {
        "n_scans": len(files),
        "n_passed": len(passed),
        "n_quarantined": len(quarantined),
        "passed": passed,
        "quarantined": {k: quarantined[k] for k in sorted(quarantined)},
        "expectations": result["results"],
    }
    write_json(out / "summary.json", summary)
    write_json(out / "scan_stats.json", rows)
    for name, reasons in summary["quarantined"].items():
        log.warning("quarantined %s: %s", name, "; ".join(reasons))
    if len(passed) < params.validate.min_passed:
        raise StageError(f"only {len(passed)} scans passed validation (need validate.min_passed = "
                         f"{params.validate.min_passed} in params.yaml); see {out / 'summary.json'}")
    return {"n_passed": len(passed), "n_quarantined": len(quarantined)}


# ------------------------------------------------------------------------------------- prepare
def split_scans(names: list[str], fractions, seed: int) -> dict[str, list[str]]:
    """Seeded split by scan (never by patch) into train/test/predict."""
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    n = len(order)
    n_test = int(round(fractions[1] * n))
    n_predict = max(1, int(round(fractions[2] * n))) if n >= 3 else 0
    n_train = n - n_test - n_predict
    if n_train < 1:
        raise StageError(f"{n} scans are too few to split into train/test/predict")
    return {"train": sorted(order[:n_train]),
            "test": sorted(order[n_train:n_train + n_test]),
            "predict": sorted(order[n_train + n_test:])}


def load_image(path: str | Path, params: Params):
    """Read and preprocess one scan: (scan, img01 float32, scale)."""
    from .preprocess import preprocess

    scan = read_scan(path)
    img, scale = preprocess(scan.height, scan.pixel_nm, params.preprocess)
    return scan, img, scale


def prepare(params: Params, raw_dir: str | Path, summary_path: str | Path, out_dir: str | Path) -> dict:
    """Split the validated scans and extract non-overlapping training patches with origins."""
    from .windows import extract_windows

    raw_dir, out = Path(raw_dir), fresh_dir(out_dir)
    passed = read_json(summary_path)["passed"]
    default = [p for p in passed if not p.startswith("hard/")]
    splits = split_scans(default, params.prepare.fractions, params.seed)
    splits["hard"] = sorted(p for p in passed if p.startswith("hard/"))
    patches, origins, owners = [], [], []
    for idx, name in enumerate(splits["train"]):
        _, img, _ = load_image(raw_dir / name, params)
        p, o = extract_windows(img, params.prepare.patch, params.prepare.stride)
        patches.append(p)
        origins.append(o)
        owners.append(np.full(len(p), idx, dtype=np.int32))
    patches = np.concatenate(patches).astype(np.float32)          # (N, 1, s, s)
    np.savez(out / "train_patches.npz", patches=patches, origins=np.concatenate(origins),
             scan_index=np.concatenate(owners))
    manifest = {"splits": splits, "n_patches": len(patches), "patch": params.prepare.patch,
                "stride": params.prepare.stride, "raw_dir": str(raw_dir)}
    write_json(out / "manifest.json", manifest)
    return {k: len(v) for k, v in splits.items()} | {"n_patches": len(patches)}


# ------------------------------------------------------------------------------ autoencoders
def _plot_history(history: dict, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(history["train_loss"], label="train")
    ax.plot(history["val_loss"], label="validation")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_reconstructions(model, patches: np.ndarray, path: Path, n: int = 8, seed: int = 0) -> None:
    import matplotlib.pyplot as plt

    from .training import reconstruct

    idx = np.random.default_rng(seed).choice(len(patches), size=min(n, len(patches)), replace=False)
    rec = reconstruct(model, patches[idx])
    fig, axes = plt.subplots(2, len(idx), figsize=(1.6 * len(idx), 3.4), squeeze=False)
    for j, i in enumerate(idx):
        axes[0, j].imshow(patches[i, 0], cmap="afmhot", vmin=0, vmax=1)
        axes[1, j].imshow(rec[j, 0], cmap="afmhot", vmin=0, vmax=1)
        axes[0, j].axis("off")
        axes[1, j].axis("off")
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def train_autoencoder(params: Params, which: str, patches_path: str | Path, out_dir: str | Path,
                      on_epoch=None, tracker=None, ae1_path: str | Path | None = None) -> dict:
    """Train AE1 (`which="ae1"`, on general patches) or AE2 (on defect patches).

    `ae1_path` (AE2 only) names the AE1 checkpoint the defect patches came from, for lineage.
    """
    from .models import build_autoencoder, save_checkpoint
    from .models.autoencoder import count_parameters
    from .training import fit_autoencoder

    if which not in ("ae1", "ae2"):
        raise StageError(f"unknown autoencoder {which!r} (ae1 or ae2)")
    out = fresh_dir(out_dir)
    patches = np.load(patches_path)["patches"]
    if len(patches) < 10:
        raise StageError(f"{patches_path}: only {len(patches)} patches, too few to train {which}")
    cfg, tcfg = getattr(params, which), getattr(params, f"{which}_train")
    seed = params.seed + (0 if which == "ae1" else 1)
    model = build_autoencoder(cfg, seed=seed)
    hist = fit_autoencoder(model, patches, tcfg, seed=seed, on_epoch=on_epoch)
    h = hist.to_dict()
    save_checkpoint(out / "model.pt", model, extra={"which": which, "history": h,
                                                     "params_digest": params.digest()})
    write_json(out / "history.json", h)
    write_csv(out / "history.csv", [{"epoch": i, "train_loss": t, "val_loss": v, "lr": lr}
                                    for i, (t, v, lr) in enumerate(zip(h["train_loss"], h["val_loss"], h["lr"]))])
    _plot_history(h, out / "loss.png", f"{which.upper()} loss")
    _plot_reconstructions(model, patches, out / "reconstructions.png", seed=params.seed)
    metrics = {
        "n_patches": len(patches), "n_params": count_parameters(model),
        "epochs_run": hist.epochs_run, "best_epoch": hist.best_epoch,
        "final_train_loss": h["train_loss"][-1], "final_val_loss": h["val_loss"][-1],
        "best_val_loss": hist.best_val_loss, "patches_per_s": hist.patches_per_s,
        "seconds": hist.seconds,
    }
    write_json(out / "metrics.json", metrics)
    if tracker is not None:
        tracker.params_of("seed", "profile", which, f"{which}_train")
        tracker.history(h, prefix=f"{which}_")
        tracker.metrics(metrics, prefix=f"{which}_")
        tracker.artifacts(out / "loss.png", out / "reconstructions.png", out / "history.csv")
        tracker.register(which, model, file_sha256(out / "model.pt"), _lineage(
            tracker, {"ae1": ae1_path} if which == "ae2" else {},
            data=patches_path))
    return metrics


def _lineage(tracker, upstream: dict, data: str | Path) -> dict:
    """Tags naming the registered versions a model was built on, and the data version."""
    from .tracking import data_version, version_by_sha

    tags = {"data_version": data_version(data)}
    if not tracker.enabled:
        return tags
    for key, path in upstream.items():
        if path is not None:
            tags[f"{key}_version"] = version_by_sha(key, file_sha256(path))
    return tags


def file_sha256(path: str | Path) -> str:
    from .tracking import file_sha256 as sha

    return sha(path)


def load_autoencoder(path: str | Path):
    from .models import load_checkpoint

    model, _ = load_checkpoint(path)
    return model


# ------------------------------------------------------------------------ general clustering
def _plot_sweep(sweep: list[dict], chosen: int, path: Path) -> None:
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in sweep]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    for ax, key, title in zip(axes, ("inertia", "d_inertia", "silhouette"),
                              ("elbow: inertia", "first derivative of inertia", "silhouette")):
        ax.plot(ks, [r[key] for r in sweep], "o-")
        ax.axvline(chosen, color="grey", ls="--", lw=1)
        ax.set_xlabel("k")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cluster_general(params: Params, ae1_path: str | Path, patches_path: str | Path,
                    out_dir: str | Path, tracker=None) -> dict:
    """K-means on AE1 latents of the training patches: sweep k, fit the chosen k."""
    import joblib

    from .cluster import choose_k, kmeans_sweep, make_kmeans
    from .training import encode

    out = fresh_dir(out_dir)
    kp = params.kmeans
    latents = encode(load_autoencoder(ae1_path), np.load(patches_path)["patches"])
    sweep = kmeans_sweep(latents, list(range(kp.k_range[0], kp.k_range[1] + 1)), params.seed,
                         sample=kp.sweep_sample)
    k = choose_k(sweep, method=kp.k_select, fixed=kp.k)
    model = make_kmeans(k, seed=params.seed, minibatch_threshold=kp.minibatch_threshold).fit(latents)
    labels = model.predict(latents)
    joblib.dump(model, out / "kmeans.joblib")
    write_json(out / "sweep.json", sweep)
    _plot_sweep(sweep, k, out / "elbow.png")
    chosen = next(r for r in sweep if r["k"] == k)
    fractions = np.bincount(labels, minlength=k) / len(labels)
    metrics = {"k": k, "inertia": chosen["inertia"], "silhouette": chosen["silhouette"],
               "davies_bouldin": chosen["davies_bouldin"], "n_latents": len(latents),
               "cluster_fractions": [round(float(f), 4) for f in fractions]}
    write_json(out / "metrics.json", metrics)
    _plot_tsne(latents, labels, out / "tsne.png", params.seed)
    if tracker is not None:
        tracker.params_of("seed", "kmeans")
        for row in sweep:
            tracker.metrics({k: v for k, v in row.items() if k != "k"}, prefix="sweep_", step=row["k"])
        tracker.metrics(metrics, prefix="kmeans_")
        tracker.artifacts(out / "elbow.png", out / "tsne.png", out / "sweep.json")
        tracker.register("kmeans", model, file_sha256(out / "kmeans.joblib"),
                         _lineage(tracker, {"ae1": ae1_path}, data=patches_path))
    return metrics


def _plot_tsne(latents: np.ndarray, labels: np.ndarray, path: Path, seed: int, n: int = 2000) -> None:
    """t-SNE of up to `n` latents coloured by cluster (the report's figure 3.6, in 2-D)."""
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(latents), size=min(n, len(latents)), replace=False)
    if len(idx) < 10:
        return
    perplexity = min(30.0, (len(idx) - 1) / 3)
    emb = TSNE(n_components=2, random_state=seed, init="pca", perplexity=perplexity).fit_transform(latents[idx])
    fig, ax = plt.subplots(figsize=(5, 4.5))
    sc = ax.scatter(emb[:, 0], emb[:, 1], c=labels[idx], cmap="tab10", s=4)
    ax.legend(*sc.legend_elements(), title="cluster", fontsize=7, loc="best")
    ax.set_title(f"t-SNE of {len(idx)} latents")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------- models on disk
def load_models(models_dir: str | Path, calibration_path: str | Path | None = None,
                stage2: bool = True):
    """Load the locally trained models (`<models_dir>/{ae1,kmeans,ae2,gmm}`) into a `Models`."""
    import joblib

    from .pipeline import Models

    d = Path(models_dir)
    models = Models(ae1=load_autoencoder(d / "ae1" / "model.pt"),
                    kmeans=joblib.load(d / "kmeans" / "kmeans.joblib"),
                    versions={"ae1": str(d / "ae1"), "kmeans": str(d / "kmeans")})
    calibration_path = Path(calibration_path or d / "calibration.json")
    if calibration_path.is_file():
        models.calibration = read_json(calibration_path)
    if (d / "improved" / "state.joblib").is_file():
        models.improved = joblib.load(d / "improved" / "state.joblib")
        models.versions["improved"] = str(d / "improved")
    if stage2:
        models.ae2 = load_autoencoder(d / "ae2" / "model.pt")
        models.gmm = joblib.load(d / "gmm" / "gmm.joblib")
        models.versions |= {"ae2": str(d / "ae2"), "gmm": str(d / "gmm")}
    return models


# --------------------------------------------------------------------- mask + defect patches
def calibrate(emaps: list[np.ndarray], cluster_fractions, params: Params) -> dict:
    """Fix the error threshold and the target clusters on the training scans.

    A threshold given as "pNN"/"mad:K" is resolved over the pooled error maps of all training
    scans, so one absolute threshold is used for every scan at prediction time (as the report).
    """
    from .masks import threshold_value

    pooled = np.concatenate([e.ravel()[:: max(1, e.size // 50_000)] for e in emaps])
    spec = params.mask.threshold
    calib = {}
    if spec is not None:
        calib["error_threshold"] = float(threshold_value(pooled.reshape(1, -1), spec))
    rare = params.kmeans.target_max_fraction
    calib["target_clusters"] = [i for i, f in enumerate(cluster_fractions) if f < rare]
    return calib


def defects(params: Params, raw_dir: str | Path, manifest_path: str | Path, models_dir: str | Path,
            out_dir: str | Path, calibration_path: str | Path, progress=None, tracker=None) -> dict:
    """Calibrate the mask on the training scans (-> `calibration_path`) and collect AE2's
    training patches (-> `out_dir/patches.npz`)."""
    from .masks import defect_mask
    from .pipeline import defect_patches, mask_config, stage1_maps

    raw_dir, out = Path(raw_dir), fresh_dir(out_dir)
    models = load_models(models_dir, calibration_path=calibration_path, stage2=False)
    models.calibration = {}
    fractions = read_json(Path(models_dir) / "kmeans" / "metrics.json")["cluster_fractions"]
    train = read_json(manifest_path)["splits"]["train"]
    images, maps = [], []
    for name in train:
        _, img, _ = load_image(raw_dir / name, params)
        images.append(img)
        maps.append(stage1_maps(img, models, params))
        if progress:
            progress(1)
    calib = calibrate([e for _, e in maps], fractions, params)
    cfg = mask_config(params, calib)
    all_p, all_c, owner, masked = [], [], [], []
    for i, (img, (cmap, emap)) in enumerate(zip(images, maps)):
        mask = defect_mask(emap, cmap, cfg)
        p, c = defect_patches(img, mask, params)
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
    write_json(calibration_path, calib)
    metrics = {"n_defect_patches": len(patches), "mean_mask_fraction": float(np.mean(masked)),
               **calib}
    write_json(out / "metrics.json", metrics)
    _plot_mask_example(images[0], maps[0], defect_mask(maps[0][1], maps[0][0], cfg), out / "example_mask.png")
    if tracker is not None:
        tracker.params_of("maps", "mask", "defect_patches")
        tracker.metrics({k: v for k, v in metrics.items() if not isinstance(v, list)}, prefix="defects_")
        tracker.artifacts(out / "example_mask.png", calibration_path)
    if len(patches) < 10:
        raise StageError(f"the defect mask kept only {len(patches)} patches on the training scans; "
                         "lower mask.threshold or min_area in params.yaml")
    return metrics


def _plot_mask_example(img, maps, mask, path: Path) -> None:
    import matplotlib.pyplot as plt

    from .render import character_picture

    cmap, emap = maps
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    for ax, pic, title in zip(axes, (img, character_picture(cmap), emap, mask),
                              ("scan (preprocessed)", "character map (K-means)", "reconstruction error",
                               "defect mask")):
        ax.imshow(pic, cmap="afmhot" if pic is img else ("magma" if pic is emap else "gray"))
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------ defect clustering
def _plot_gmm_grid(grid: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for cov in sorted({g["covariance_type"] for g in grid}):
        rows = [g for g in grid if g["covariance_type"] == cov]
        ks = [g["k"] for g in rows]
        for ax, key in zip(axes, ("bic", "silhouette", "davies_bouldin")):
            ax.plot(ks, [g[key] for g in rows], "o-", ms=3, label=cov)
            ax.set_title(key.replace("_", "-"))
            ax.set_xlabel("components k")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cluster_defects(params: Params, ae2_path: str | Path, patches_path: str | Path,
                    out_dir: str | Path, tracker=None, lineage: dict | None = None) -> dict:
    """Gaussian mixtures over covariance type x k on AE2 latents, selected by BIC.

    `lineage` maps "ae1"/"kmeans"/"calibration" to the files the defect patches came from.
    """
    import joblib

    from .cluster import GMMSelector
    from .training import encode

    out = fresh_dir(out_dir)
    gp = params.gmm
    latents = encode(load_autoencoder(ae2_path), np.load(patches_path)["patches"])
    rng = np.random.default_rng(params.seed)
    if len(latents) > gp.max_samples:
        latents = latents[np.sort(rng.choice(len(latents), gp.max_samples, replace=False))]
    gmm = GMMSelector(k_values=tuple(range(gp.k_range[0], gp.k_range[1] + 1)),
                      covariance_types=gp.covariance_types, random_state=params.seed,
                      n_init=gp.n_init).fit(latents)
    joblib.dump(gmm, out / "gmm.joblib")
    write_json(out / "grid.json", gmm.grid_)
    write_csv(out / "grid.csv", gmm.grid_)
    _plot_gmm_grid(gmm.grid_, out / "bic.png")
    best = next(g for g in gmm.grid_ if g["k"] == gmm.n_components_
                and g["covariance_type"] == gmm.covariance_type_)
    metrics = {"k": int(gmm.n_components_), "covariance_type": gmm.covariance_type_,
               "bic": best["bic"], "aic": best["aic"], "silhouette": best["silhouette"],
               "davies_bouldin": best["davies_bouldin"], "n_latents": len(latents)}
    write_json(out / "metrics.json", metrics)
    if tracker is not None:
        lineage = dict(lineage or {})
        tracker.params_of("seed", "gmm")
        for row in gmm.grid_:
            tracker.metrics({f"{row['covariance_type']}_{k}": v for k, v in row.items()
                             if k in ("bic", "aic", "silhouette", "davies_bouldin")}, prefix="grid_", step=row["k"])
        tracker.metrics(metrics, prefix="gmm_")
        tracker.artifacts(out / "bic.png", out / "grid.csv")
        calibration = lineage.pop("calibration", None)
        tags = _lineage(tracker, {"ae2": ae2_path, **lineage}, data=patches_path)
        if calibration is not None:
            tags["calibration"] = json.dumps(read_json(calibration))
        tracker.register("gmm", gmm, file_sha256(out / "gmm.joblib"), tags)
    return metrics


# --------------------------------------------------------------------------- improved method
def fit_improved_stage(params: Params, raw_dir: str | Path, manifest_path: str | Path, out_dir: str | Path,
                       progress=None, tracker=None) -> dict:
    """Fit the improved analysis (defect classes) on the training scans -> `<out>/state.joblib`."""
    import joblib

    from .improved import fit_improved

    raw_dir, out = Path(raw_dir), fresh_dir(out_dir)
    images = []
    for name in read_json(manifest_path)["splits"]["train"]:
        images.append(load_image(raw_dir / name, params)[1])
        if progress:
            progress(1)
    state = fit_improved(images, params.improved, params.seed)
    joblib.dump(state, out / "state.joblib")
    from .pipeline import Models

    save_png(out / "gallery.png", gallery(images[:8], Models(ae1=None, kmeans=None, improved=state), params))
    classes = state.get("classes") or {}
    metrics = {"n_train_images": state["n_train_images"], "n_train_defects": state["n_train_defects"],
               "n_classes": classes.get("n_classes"), "k": classes.get("k")}
    write_json(out / "metrics.json", metrics)
    if tracker is not None:
        tracker.params_of("seed", "detector")
        tracker.metrics(metrics, prefix="improved_")
        tracker.artifacts(out / "gallery.png")
        tracker.register("improved", state, file_sha256(out / "state.joblib"),
                         {"data_version": _data_version(raw_dir)})
    return metrics


def gallery(images: list[np.ndarray], models, params, per_class: int = 8) -> np.ndarray:
    """Per-class montage of defect patches found on preprocessed `images` (RGB uint8)."""
    from .pipeline import analyse
    from .render import class_gallery
    from .windows import windows_at

    examples: dict[int, list] = {}
    for img in images:
        regions = analyse(img, models, params).regions
        if not regions:
            continue
        centres = np.array([[int(round(r["y"])), int(round(r["x"]))] for r in regions])
        patches, _ = windows_at(img, centres, params.prepare.patch)
        for r, p in zip(regions, patches):
            if r["class"] is not None:
                examples.setdefault(int(r["class"]), []).append(p[0])
    return class_gallery(examples, models.class_names, per_class)


def _data_version(path) -> str:
    from .tracking import data_version

    return data_version(path)


# ------------------------------------------------------------------------------- evaluation
def evaluate_split(params: Params, raw_dir: Path, names: list[str], models, progress=None) -> tuple[dict, list]:
    """Score the pipeline on scans with truth (`<name>.json`, `<name>_steps.npz` beside them)."""
    from .evaluate import aggregate, evaluate_scan
    from .predict import analyse_scan

    per_scan = []
    for name in names:
        path = raw_dir / name
        truth = read_json(path.with_suffix(".json"))
        steps = np.load(path.with_name(path.stem + "_steps.npz"))["step_mask"]
        _, _, result, defects = analyse_scan(read_scan(path), models, params)
        t = truth["defects"]
        res = evaluate_scan(
            pred_xy=[(d["x"], d["y"]) for d in defects], true_xy=[(d["x"], d["y"]) for d in t],
            pred_labels=[-1 if d["class"] is None else d["class"] for d in defects],
            true_labels=[d["class_id"] for d in t], step_mask=steps, score_map=result.error_map,
            truth_radii=[d["radius_px"] for d in t], radius=params.evaluate.match_radius,
            step_radius=params.evaluate.step_radius)
        res["scan"] = name
        per_scan.append(res)
        if progress:
            progress(1)
    return aggregate(per_scan), per_scan


def rotation_agreement(params: Params, raw_dir: Path, names: list[str], models) -> dict:
    """Share of defects that keep their class when the (preprocessed) scan is turned by 90 deg.

    Defects of the scan and of its np.rot90 copy are matched by position (one-to-one, within
    the match radius); the preprocessed image is rotated so that scan-line artefacts, which a
    real rotated scan would not rotate, do not enter the comparison.
    """
    from .evaluate import match_points
    from .pipeline import analyse

    same = pairs = 0
    for name in names:
        _, img, _ = load_image(raw_dir / name, params)
        a = analyse(img, models, params).regions
        b = analyse(np.ascontiguousarray(np.rot90(img)), models, params).regions
        w = img.shape[1]
        m = match_points([(r["y"], w - 1 - r["x"]) for r in a], [(r["x"], r["y"]) for r in b],
                         params.evaluate.match_radius)
        same += sum(a[i]["class"] == b[j]["class"] for i, j in m)
        pairs += len(m)
    return {"rotation_agreement": same / pairs if pairs else float("nan"), "rotation_pairs": pairs}


def evaluate(params: Params, raw_dir: str | Path, manifest_path: str | Path, models_dir: str | Path,
             metrics_path: str | Path, per_scan_path: str | Path, ablation_path: str | Path | None = None,
             progress=None, tracker=None, ablation_md: str | Path | None = None) -> dict:
    """Detection, class, step-edge and rotation scores on the test and hard splits.

    The configured method goes to `metrics_path`; with `ablation_path`, both methods (the
    report's `paper` pipeline and the `improved` one) are scored side by side on the same scans.
    """
    import dataclasses

    raw_dir = Path(raw_dir)
    models = load_models(models_dir)
    splits = read_json(manifest_path)["splits"]
    methods = [params.detector.method]
    if ablation_path is not None:
        methods += [m for m in ("paper", "improved") if m not in methods]
    table, rows = {}, []
    for method in methods:
        p = dataclasses.replace(params, detector=dataclasses.replace(params.detector, method=method))
        res = {}
        for split in ("test", "hard"):
            agg, per_scan = evaluate_split(p, raw_dir, splits[split], models, progress)
            res[split] = {k: v for k, v in agg.items() if not isinstance(v, (list, dict))}
            if method == params.detector.method:
                for r in per_scan:
                    rows.append({"split": split, "scan": r["scan"], "tp": r["tp"], "fp": r["fp"],
                                 "fn": r["fn"], "f1": r["f1"], "step_edge_fp": r.get("step_edge_fp"),
                                 "auroc": r.get("auroc")})
        res["test"].update(rotation_agreement(p, raw_dir, splits["test"], models))
        table[method] = res
    metrics = {**table[params.detector.method], "profile": params.profile, "method": params.detector.method}
    write_json(metrics_path, metrics)
    write_json(per_scan_path, rows)
    if ablation_path is not None:
        ablation_md = Path(ablation_md or Path(ablation_path).with_suffix(".md"))
        write_ablation(table, Path(ablation_path), ablation_md)
    if tracker is not None:
        tracker.params_of("evaluate")
        for split in ("test", "hard"):
            tracker.metrics(metrics[split], prefix=f"{split}_")
        for method, res in table.items():
            for split in ("test", "hard"):
                tracker.metrics(res[split], prefix=f"ablation_{method}_{split}_")
        if ablation_path is not None:
            tracker.artifacts(ablation_path, ablation_md)
        import tempfile

        from .predict import predict_scan

        with tempfile.TemporaryDirectory() as pics:     # pictures go to MLflow only
            predict_scan(raw_dir / splits["test"][0], models, params, pics)
            tracker.artifacts(*sorted(Path(pics).glob("*.png")), folder="example")
    return metrics


ABLATION_COLUMNS = [("F1 test", "test", "f1"), ("F1 hard", "hard", "f1"),
                    ("recall hard", "hard", "recall"),
                    ("step-edge FP/scan test", "test", "step_edge_fp_mean"),
                    ("step-edge FP/scan hard", "hard", "step_edge_fp_mean"),
                    ("ARI test", "test", "ari"), ("NMI test", "test", "nmi"),
                    ("purity test", "test", "purity"), ("rotation agreement", "test", "rotation_agreement")]


def write_ablation(table: dict, path: Path, md_path: Path | None = None) -> None:
    """`path` (JSON) and `md_path` (markdown, default `<path>.md`): the methods side by side."""
    write_json(path, table)
    lines = ["| method | " + " | ".join(c for c, _, _ in ABLATION_COLUMNS) + " |",
             "|---" * (len(ABLATION_COLUMNS) + 1) + "|"]
    for method, res in table.items():
        cells = []
        for _, split, key in ABLATION_COLUMNS:
            v = res[split].get(key)
            cells.append("n/a" if v is None or v != v else f"{v:.2f}" if key.startswith("step") else f"{v:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    (md_path or path.with_suffix(".md")).write_text("\n".join(lines) + "\n")
