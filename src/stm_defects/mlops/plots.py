"""Training pictures the stages write and log: loss curves, reconstructions, sweeps, t-SNE, masks.

Each takes arrays or dicts and a PNG path; nothing else. Matplotlib is imported inside, so
importing this module costs nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _save(fig, path: Path, dpi: int = 90) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def history(history: dict, path: Path, title: str) -> None:
    """Train and validation loss per epoch (log scale)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(history["train_loss"], label="train")
    ax.plot(history["val_loss"], label="validation")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE")
    ax.set_title(title)
    ax.legend()
    _save(fig, path)


def reconstructions(patches: np.ndarray, rec: np.ndarray, path: Path) -> None:
    """Input patches (top row) over their reconstructions (bottom row); (n, 1, s, s) each."""
    import matplotlib.pyplot as plt

    n = len(patches)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(patches[j, 0], cmap="afmhot", vmin=0, vmax=1)
        axes[1, j].imshow(rec[j, 0], cmap="afmhot", vmin=0, vmax=1)
        axes[0, j].axis("off")
        axes[1, j].axis("off")
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
    _save(fig, path)


def kmeans_sweep(sweep: list[dict], chosen: int, path: Path) -> None:
    """Elbow, first derivative of the inertia and silhouette over k."""
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in sweep]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    for ax, key, title in zip(axes, ("inertia", "d_inertia", "silhouette"),
                              ("elbow: inertia", "first derivative of inertia", "silhouette")):
        ax.plot(ks, [r[key] for r in sweep], "o-")
        ax.axvline(chosen, color="grey", ls="--", lw=1)
        ax.set_xlabel("k")
        ax.set_title(title)
    _save(fig, path)


def tsne(latents: np.ndarray, labels: np.ndarray, path: Path, seed: int, n: int = 2000) -> None:
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
    _save(fig, path)


def mask_example(img, char_rgb, emap, mask, path: Path) -> None:
    """Scan, character map (RGB), reconstruction error and defect mask side by side."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    for ax, pic, title, cmap in zip(axes, (img, char_rgb, emap, mask),
                                    ("scan (preprocessed)", "character map (K-means)", "reconstruction error",
                                     "defect mask"), ("afmhot", None, "magma", "gray")):
        ax.imshow(pic, cmap=cmap)
        ax.set_title(title)
        ax.axis("off")
    _save(fig, path, dpi=80)


def gmm_grid(grid: list[dict], path: Path) -> None:
    """BIC, silhouette and Davies-Bouldin over k, one line per covariance type."""
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
    _save(fig, path)


def synth_montage(images: list[np.ndarray], truths: list[dict], titles: list[str], path: Path) -> None:
    """A grid of levelled synthetic scans with their true defects circled."""
    import matplotlib.pyplot as plt

    cols = 3
    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, truth, title in zip(axes.flat, images, truths, titles):
        ax.imshow(img, cmap="afmhot")
        ax.scatter([d["x"] for d in truth["defects"]], [d["y"] for d in truth["defects"]], s=60,
                   facecolors="none", edgecolors="cyan", linewidths=0.8)
        ax.set_title(title, fontsize=9)
    _save(fig, path, dpi=80)


SELECTION_QUANTITIES = (("n_clusters", "number of clusters"), ("noise", "noise fraction"),
                        ("silhouette", "silhouette"), ("davies_bouldin", "Davies-Bouldin"))


def grid_heatmaps(rows: list[dict], x: str, y: str, title: str, path: Path) -> None:
    """The report's four quantities over a 2-D grid (`x` by `y`, keys of `rows`), one panel each."""
    import matplotlib.pyplot as plt

    xs, ys = sorted({r[x] for r in rows}), sorted({r[y] for r in rows})
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (key, label) in zip(axes, SELECTION_QUANTITIES):
        grid = np.full((len(ys), len(xs)), np.nan)
        for r in rows:
            grid[ys.index(r[y]), xs.index(r[x])] = r[key]
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.0f}" if key == "n_clusters" else f"{v:.2f}", ha="center", va="center",
                        fontsize=7, color="w")
        ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
        ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(y.replace("_", " "))
        ax.set_title(label)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    _save(fig, path)


def cluster_sizes(labels: dict[str, np.ndarray], path: Path) -> None:
    """Cluster-size histograms (points per cluster, largest first; noise as its own grey bar),
    one panel per labelling."""
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), squeeze=False)
    for ax, (name, lab) in zip(axes[0], labels.items()):
        sizes = np.bincount(lab[lab >= 0]) if (lab >= 0).any() else np.zeros(0, int)
        sizes = np.sort(sizes[sizes > 0])[::-1]
        ax.bar(range(len(sizes)), sizes, color="C0")
        if (lab < 0).any():
            ax.bar([len(sizes)], [(lab < 0).sum()], color="grey", label="noise")
            ax.legend(fontsize=7)
        ax.set_xlabel("cluster (by size)")
        ax.set_ylabel("points")
        ax.set_title(name, fontsize=9)
    _save(fig, path)
