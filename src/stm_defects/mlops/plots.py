"""Training pictures the stages write and log: loss curves, reconstructions, sweeps, t-SNE, masks.

Each takes arrays or dicts and a PNG path (:func:`scatter3d_html`: an HTML path); nothing else.
Matplotlib is imported inside, so importing this module costs nothing.
"""

from __future__ import annotations

import html
import json
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


def latent_sizes(shown: np.ndarray, rows: list[dict], path: Path, title: str) -> None:
    """One picture of a latent-size study: the same held-out patches reconstructed by the model of
    each latent size tried (one row per size, inputs on top), and every trial's loss curves.

    shown: (n, 1, s, s) in [0, 1]; rows: dicts with ``latent``, ``state`` (COMPLETE, PRUNED, ...),
    ``rec`` ((n, 1, s, s) or None when the trial kept none), ``mse`` (on `shown`, or None),
    ``train_loss`` and ``val_loss`` (lists per epoch). Drawn in matplotlib's default style
    (Optuna's plots switch the global style to ggplot).
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def row_label(row: dict) -> str:
        state = "" if row["state"] == "COMPLETE" else f"\n{row['state'].lower()}"
        mse = "" if row.get("mse") is None else f"\nMSE {row['mse']:.4f}"
        return f"latent {row['latent']}{state}{mse}"

    n, r = len(shown), len(rows)
    with plt.style.context("default"):
        fig = plt.figure(figsize=(1.2 * n + 6.0, 1.25 * (r + 1) + 0.7))
        grid = fig.add_gridspec(r + 1, n + 2, width_ratios=[1] * n + [0.9, 4.4], wspace=0.08, hspace=0.12)
        pictures = [(shown, "input\n(held out)")] + [(row["rec"], row_label(row)) for row in rows]
        for i, (pics, label) in enumerate(pictures):
            for j in range(n):
                ax = fig.add_subplot(grid[i, j])
                if pics is not None:
                    ax.imshow(pics[j, 0], cmap="afmhot", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
        ax = fig.add_subplot(grid[:, n + 1])
        for i, row in enumerate(rows):
            colour = f"C{i % 10}"
            state = "" if row["state"] == "COMPLETE" else f" ({row['state'].lower()})"
            ax.plot(range(len(row["val_loss"])), row["val_loss"], "o-", color=colour, ms=3,
                    label=f"latent {row['latent']}{state}")
            ax.plot(range(len(row["train_loss"])), row["train_loss"], "--", color=colour, lw=1)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("MSE")
        ax.set_title("loss per epoch (solid: validation, dashed: train)", fontsize=9)
        ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.subplots_adjust(left=0.09, right=0.98, top=0.92, bottom=0.08)
        fig.savefig(path, dpi=90)
        plt.close(fig)


def cluster_colours(labels: np.ndarray) -> dict[int, str]:
    """A hex colour per label (tab10 up to 10 clusters, tab20 up to 20, then a cycle); noise grey."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    ids = [int(v) for v in np.unique(labels)]
    clusters = [v for v in ids if v >= 0]
    cmap = colormaps["tab10" if len(clusters) <= 10 else "tab20"]
    out = {v: to_hex(cmap(i % cmap.N)) for i, v in enumerate(clusters)}
    if -1 in ids:
        out[-1] = "#9e9e9e"
    return out


def tsne_panels(panels: dict[str, dict], dim: int, path: Path, title: str) -> None:
    """t-SNE views side by side, one panel per latent set, points coloured by cluster.

    panels: name -> {"embedding": (N, dim), "labels": (N,), "subtitle": str}; `dim` 2 or 3
    (matplotlib's 3-D axes, one fixed viewpoint: the HTML of :func:`scatter3d_html` rotates)."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(5.2 * len(panels), 5.0))
    for i, (name, p) in enumerate(panels.items()):
        emb, lab = np.asarray(p["embedding"]), np.asarray(p["labels"])
        colours = cluster_colours(lab)
        ax = fig.add_subplot(1, len(panels), i + 1, **({"projection": "3d"} if dim == 3 else {}))
        style = {"depthshade": False} if dim == 3 else {"edgecolors": "none"}
        for v, c in colours.items():
            sel = lab == v
            ax.scatter(*emb[sel, :dim].T, s=5, color=c, label=str(v) if v >= 0 else "noise", alpha=0.8,
                       **style)
        if dim == 3:
            ax.view_init(elev=20, azim=-60)
            ax.set_zticklabels([])
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_xticklabels([])
        ax.set_yticklabels([])
        ax.set_title(f"{name}: {p['subtitle']}", fontsize=9)
        ax.legend(title="cluster", fontsize=6, title_fontsize=7, markerscale=2,
                  ncol=2 if len(colours) > 10 else 1, loc="upper left",
                  bbox_to_anchor=(1.0, 1.0) if dim == 2 else (0.92, 1.0))
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


_VIEWER_JS = r"""
function viewer(p) {
  const wrap = document.createElement("div"); wrap.className = "panel";
  const h = document.createElement("h2"); h.textContent = p.name; wrap.appendChild(h);
  const sub = document.createElement("div"); sub.className = "sub"; sub.textContent = p.subtitle; wrap.appendChild(sub);
  const c = document.createElement("canvas"); c.width = c.height = 460; wrap.appendChild(c);
  const bar = document.createElement("div"); wrap.appendChild(bar);
  const spinBox = document.createElement("label");
  spinBox.innerHTML = '<input type="checkbox" checked> spin'; bar.appendChild(spinBox);
  const reset = document.createElement("button"); reset.textContent = "reset view"; bar.appendChild(reset);
  const legend = document.createElement("div"); legend.className = "legend"; wrap.appendChild(legend);
  document.getElementById("panels").appendChild(wrap);
  const ctx = c.getContext("2d"), pts = p.points, hidden = new Set();
  let yaw = 0.6, pitch = 0.35, zoom = 1.0, drag = null;
  const spin = spinBox.querySelector("input");
  function draw() {
    const cy = Math.cos(yaw), sy = Math.sin(yaw), cp = Math.cos(pitch), sp = Math.sin(pitch);
    const proj = [];
    for (const q of pts) {
      if (hidden.has(q[3])) continue;
      const x = cy * q[0] + sy * q[2], z1 = -sy * q[0] + cy * q[2];
      proj.push([x, cp * q[1] - sp * z1, sp * q[1] + cp * z1, q[3]]);
    }
    proj.sort((a, b) => a[2] - b[2]);                 /* far points first, near ones on top */
    ctx.clearRect(0, 0, c.width, c.height);
    const half = c.width / 2, scale = c.width * 0.36 * zoom;
    for (const q of proj) {
      const f = 3.5 / (3.5 - q[2]);                   /* a little perspective: near points larger */
      ctx.fillStyle = p.colours[q[3]];
      ctx.globalAlpha = 0.35 + 0.6 * (q[2] + 1.8) / 3.6;
      ctx.beginPath();
      ctx.arc(half + scale * f * q[0], half - scale * f * q[1], 2.4 * f, 0, 2 * Math.PI);
      ctx.fill();
    }
    ctx.globalAlpha = 1;
  }
  c.addEventListener("pointerdown", e => { drag = [e.clientX, e.clientY]; spin.checked = false; c.setPointerCapture(e.pointerId); });
  c.addEventListener("pointermove", e => {
    if (!drag) return;
    yaw += (e.clientX - drag[0]) * 0.01;
    pitch = Math.max(-1.55, Math.min(1.55, pitch + (e.clientY - drag[1]) * 0.01));
    drag = [e.clientX, e.clientY]; draw();
  });
  c.addEventListener("pointerup", () => { drag = null; });
  c.addEventListener("wheel", e => { e.preventDefault(); zoom *= Math.exp(-e.deltaY * 0.001); draw(); }, {passive: false});
  reset.addEventListener("click", () => { yaw = 0.6; pitch = 0.35; zoom = 1.0; draw(); });
  for (const [label, colour] of Object.entries(p.colours)) {
    const n = pts.filter(q => String(q[3]) === label).length;
    const s = document.createElement("span");
    s.innerHTML = '<i style="background:' + colour + '"></i>' + (label === "-1" ? "noise" : "cluster " + label) + " (" + n + ")";
    s.title = "click: show / hide";
    s.addEventListener("click", () => {
      const v = Number(label);
      if (hidden.has(v)) { hidden.delete(v); s.classList.remove("off"); } else { hidden.add(v); s.classList.add("off"); }
      draw();
    });
    legend.appendChild(s);
  }
  (function tick() { if (spin.checked) { yaw += 0.004; draw(); } requestAnimationFrame(tick); })();
  draw();
}
PANELS.forEach(viewer);
"""

_VIEWER_CSS = """body{font:14px sans-serif;margin:16px;color:#222;max-width:1100px}
h1{font-size:18px}h2{font-size:15px;margin:4px 0}.sub{font-size:12px;color:#555;margin-bottom:4px}
.panel{display:inline-block;vertical-align:top;margin:0 20px 20px 0;width:470px}
canvas{border:1px solid #ccc;cursor:grab;touch-action:none;background:#fff}
.legend span{display:inline-block;margin:2px 8px 2px 0;cursor:pointer;user-select:none;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;border-radius:5px;margin-right:4px}
.off{opacity:.3}button{margin-left:10px}"""


def scatter3d_html(panels: dict[str, dict], path: Path, title: str, note: str = "") -> None:
    """A self-contained interactive 3-D scatter page (inline canvas + JavaScript: no library, no URL).

    panels: name -> {"embedding": (N, 3), "labels": (N,) int, "subtitle": str}. Each panel
    rotates by dragging (and spins until touched), zooms with the wheel, and hides or shows a
    cluster when its legend entry is clicked. Coordinates are centred, scaled to [-1, 1] and
    rounded to 3 decimals (the page stays ~20 bytes a point).
    """
    data = []
    for name, p in panels.items():
        emb = np.asarray(p["embedding"], dtype=float)[:, :3]
        emb = emb - (emb.max(axis=0) + emb.min(axis=0)) / 2
        emb = emb / max(float(np.abs(emb).max()), 1e-12)
        lab = np.asarray(p["labels"]).astype(int)
        data.append({"name": name, "subtitle": p["subtitle"],
                     "colours": {str(k): v for k, v in cluster_colours(lab).items()},
                     "points": [[round(float(a), 3), round(float(b), 3), round(float(c), 3), int(v)]
                                for (a, b, c), v in zip(emb, lab)]})
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    Path(path).write_text(
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_VIEWER_CSS}</style></head>\n<body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(note)}</p><p>Drag to rotate, wheel to zoom, click a legend entry to hide or show "
        f'a cluster.</p><div id="panels"></div>\n<script>\nconst PANELS = {payload};\n{_VIEWER_JS}</script>'
        "</body></html>\n")
