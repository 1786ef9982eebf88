"""report.html: one page a person opens after `stm predict`, instead of dozens of PNGs.

    write_report(out_dir, scans, class_names=..., run=...)   # -> out_dir / "report.html"

``scans`` are the per-scan prediction JSONs of the batch (dicts, as `analysis.predict` writes
them, each with ``json_path``: where it lies under ``out_dir``). The page has

* the run: model versions, where the prediction config came from and its values, the software;
* densities per class per 100 nm² (and per cm⁻²) over the calibrated scans, with 95% intervals:
  a bootstrap over scans when there are at least `BOOTSTRAP_MIN_SCANS` (scan-to-scan variation
  is usually larger than counting noise), else the exact Poisson (Garwood) interval of the count;
* a class gallery: for each class its name, count and example crops of its defects (from each
  scan's ``*_defects.png`` strip, when the prediction wrote one);
* histograms of defect area (nm², or px² for uncalibrated scans) and height (nm) per class;
* one row per scan: a thumbnail linking to its full overlay picture, its size, pixel size,
  counts and density; and the scans that failed, with their reasons.

It is self-contained and works offline: no script, no stylesheet or font from elsewhere; the
pictures it shows are embedded as data: URIs (thumbnails and crops only, so the page stays
small), and links point to the files beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from stm_defects.analysis.figures import CROP_PX
from stm_defects.analysis.render import class_colour
from stm_defects.io.files import atomic_file

__all__ = ["BOOTSTRAP_MIN_SCANS", "density_table", "write_report"]

BOOTSTRAP_MIN_SCANS = 5
NM2_PER_CM2 = 1e14
THUMB_PX = 240
GALLERY_PER_CLASS = 12


# ------------------------------------------------------------------------------ numbers
def class_key(d: dict, names: dict) -> str:
    """The display name of a defect's class: its name, ``class N``, ``unknown`` or ``defect``
    (no classes)."""
    cls = d.get("class")
    if cls is None:
        return "defect"
    if cls < 0:
        return "unknown"
    return d.get("name") or names.get(str(cls)) or f"class {cls}"


def _garwood(k: int, area: float) -> tuple[float, float]:
    from scipy.stats import chi2

    lo = chi2.ppf(0.025, 2 * k) / 2 if k > 0 else 0.0
    hi = chi2.ppf(0.975, 2 * k + 2) / 2
    return lo / area, hi / area


def density_table(scans: list[dict], names: dict, seed: int = 0, n_boot: int = 2000) -> tuple[list[dict], str]:
    """(rows of class, count, density per 100 nm² with its 95% interval, per cm⁻²; the interval
    method) over the calibrated scans (those with a pixel size)."""
    cal = [s for s in scans if s.get("pixel_size_nm")]
    if not cal:
        return [], "no calibrated scans"
    areas = np.array([float(np.prod(s["shape"])) * s["pixel_size_nm"] ** 2 for s in cal])
    counts = [Counter(class_key(d, names) for d in s.get("defects", [])) for s in cal]
    classes = sorted({c for cnt in counts for c in cnt} | {"all defects"})
    per_scan = {c: np.array([cnt.get(c, 0) if c != "all defects" else sum(cnt.values()) for cnt in counts], float)
                for c in classes}
    total = areas.sum()
    boot = len(cal) >= BOOTSTRAP_MIN_SCANS
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(cal), size=(n_boot, len(cal))) if boot else None
    rows = []
    for c in classes:
        k = per_scan[c].sum()
        d = k / total
        if boot:
            ds = per_scan[c][idx].sum(1) / areas[idx].sum(1)
            lo, hi = np.percentile(ds, [2.5, 97.5])
        else:
            lo, hi = _garwood(int(k), total)
        rows.append({"class": c, "count": int(k), "per_100nm2": 100 * d, "lo": 100 * lo, "hi": 100 * hi,
                     "per_cm2": d * NM2_PER_CM2})
    method = (f"bootstrap over {len(cal)} scans ({n_boot} resamples)" if boot
              else f"exact Poisson interval of the count ({len(cal)} scan(s), fewer than {BOOTSTRAP_MIN_SCANS})")
    return rows, method


# ------------------------------------------------------------------------------ pictures
def _data_uri(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _thumbnail(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            return _data_uri(im, "JPEG")
    except (OSError, ValueError):
        return None


def _histograms(scans: list[dict], names: dict) -> str | None:
    """Defect area and height histograms per class, as one embedded PNG (None: no defects)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    area = defaultdict(list)
    height = defaultdict(list)
    calibrated = all(s.get("pixel_size_nm") for s in scans)
    for s in scans:
        px = s.get("pixel_size_nm")
        for d in s.get("defects", []):
            c = class_key(d, names)
            if d.get("area_px") is not None:
                area[c].append(d["area_px"] * (px ** 2 if (px and calibrated) else 1.0))
            if d.get("height_nm") is not None:
                height[c].append(d["height_nm"])
    if not area:
        return None
    panels = [("area", area, "defect area (nm²)" if calibrated else "defect area (px²)")]
    if height:
        panels.append(("height", height, "apparent height (nm)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), squeeze=False)
    for ax, (_, data, label) in zip(axes[0], panels):
        allv = np.concatenate([np.asarray(v, float) for v in data.values()])
        bins = np.histogram_bin_edges(allv, bins=min(40, max(5, int(np.sqrt(allv.size)))))
        for c in sorted(data):
            cls = _class_id(c, scans, names)
            ax.hist(data[c], bins=bins, histtype="step", lw=1.6, label=f"{c} ({len(data[c])})",
                    color=np.array(class_colour(cls)) / 255)
        ax.set_xlabel(label)
        ax.set_ylabel("defects")
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _class_id(key: str, scans: list[dict], names: dict) -> int:
    for s in scans:
        for d in s.get("defects", []):
            if class_key(d, names) == key:
                return -1 if d.get("class") is None else int(d["class"])
    return -1


def _gallery(out_dir: Path, scans: list[dict], names: dict) -> list[tuple[str, int, int, list[str]]]:
    """(class, count, class id, crop data URIs) per class, from the scans' *_defects.png strips."""
    by_class: dict[str, list] = defaultdict(list)
    counts: Counter = Counter()
    cls_id: dict[str, int] = {}
    for s in scans:
        strip_path = _picture(out_dir, s, "defects")
        strip = None
        for d in s.get("defects", []):
            c = class_key(d, names)
            counts[c] += 1
            cls_id.setdefault(c, -1 if d.get("class") is None else int(d["class"]))
            i = d.get("crop")
            if i is None or len(by_class[c]) >= GALLERY_PER_CLASS or strip_path is None:
                continue
            if strip is None:
                try:
                    strip = Image.open(strip_path).convert("RGB")
                except (OSError, ValueError):
                    strip_path = None
                    continue
            by_class[c].append(_data_uri(strip.crop((i * CROP_PX, 0, (i + 1) * CROP_PX, CROP_PX))))
    return [(c, counts[c], cls_id[c], by_class.get(c, [])) for c in sorted(counts)]


def _picture(out_dir: Path, scan: dict, kind: str) -> Path | None:
    """The path of a scan's ``kind`` picture (overlay, classes, character, defects), or None."""
    rel = (scan.get("pictures") or {}).get(kind)
    if rel:
        p = out_dir / rel
    else:
        j = out_dir / scan["json_path"]
        p = j.with_name(f"{j.stem}_{kind}.png")
    return p if p.is_file() else None


# ------------------------------------------------------------------------------- page
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left} .sw{display:inline-block;width:12px;height:12px;border:1px solid #333;margin-right:6px;vertical-align:middle}
.gal img{width:64px;height:64px;image-rendering:pixelated;margin:2px;border:1px solid #ccc}
.thumb{width:160px} .muted{color:#777} pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto;max-height:300px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _swatch(cls: int) -> str:
    r, g, b = class_colour(cls)
    return f'<span class="sw" style="background:rgb({r},{g},{b})"></span>'


def write_report(out_dir: str | Path, scans: Iterable[dict], class_names: dict | None = None,
                 run: dict | None = None, failures: Iterable[dict] = (), title: str = "stm-defects report") -> Path:
    """Write ``out_dir/report.html`` (atomically) for ``scans`` and return its path.

    ``run`` may hold ``models`` (name -> version), ``config`` (the JSON's config block) and
    ``software``; taken from the first scan when not given. ``failures`` are rows with ``scan``,
    ``stage`` and ``reason``.
    """
    out_dir = Path(out_dir)
    scans = sorted(scans, key=lambda s: s["json_path"])
    names = dict(class_names or {})
    run = dict(run or {})
    if scans:
        run.setdefault("models", scans[0].get("models"))
        run.setdefault("config", scans[0].get("config"))
        run.setdefault("software", scans[0].get("software"))
    failures = list(failures)
    n_def = sum(len(s.get("defects", [])) for s in scans)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>",
             f"<p>{len(scans)} scan(s) predicted, {n_def} defects"
             + (f", <b>{len(failures)} failed</b>" if failures else "") + ".</p>"]

    rows, method = density_table(scans, names)
    parts.append("<h2>Densities</h2>")
    if rows:
        parts.append(f"<p class='muted'>Over the calibrated scans; 95% intervals: {_e(method)}.</p>")
        parts.append("<table><tr><th class='l'>class</th><th>defects</th><th>per 100 nm²</th>"
                     "<th>95% interval</th><th>per cm⁻²</th></tr>")
        for r in rows:
            parts.append(f"<tr><td class='l'>{_e(r['class'])}</td><td>{r['count']}</td>"
                         f"<td>{r['per_100nm2']:.3g}</td><td>{r['lo']:.3g} – {r['hi']:.3g}</td>"
                         f"<td>{r['per_cm2']:.3g}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No scan carries a pixel size, so there are no densities: give "
                     "<code>--pixel-nm</code> or <code>--scan-nm</code>.</p>")

    parts.append("<h2>Classes</h2><table><tr><th class='l'>class</th><th>defects</th><th class='l'>examples</th></tr>")
    for c, n, cid, crops in _gallery(out_dir, scans, names):
        imgs = "".join(f"<img src='{u}' alt='{_e(c)}'>" for u in crops) or "<span class='muted'>no crops</span>"
        parts.append(f"<tr><td class='l'>{_swatch(cid)}{_e(c)}</td><td>{n}</td><td class='l gal'>{imgs}</td></tr>")
    parts.append("</table>")
    parts.append("<p class='muted'>Name a class with <code>stm name-class ID NAME</code>; names are stored with "
                 "the models and used by every later prediction.</p>")

    hist = _histograms(scans, names)
    if hist:
        parts.append(f"<h2>Defect sizes and heights</h2><img src='{hist}' alt='histograms'>")

    parts.append("<h2>Scans</h2><table><tr><th class='l'>overlay</th><th class='l'>scan</th><th>pixels</th>"
                 "<th>nm/px</th><th>defects</th><th>per 100 nm²</th><th class='l'>classes</th></tr>")
    for s in scans:
        ov = _picture(out_dir, s, "overlay")
        thumb = _thumbnail(ov) if ov else None
        link = ov.relative_to(out_dir).as_posix() if ov else None
        cell = (f"<a href='{_e(link)}'><img class='thumb' src='{thumb}' alt='overlay'></a>" if thumb and link
                else "<span class='muted'>no picture</span>")
        px = s.get("pixel_size_nm")
        n = len(s.get("defects", []))
        area = float(np.prod(s["shape"])) * px ** 2 if px else None
        cnt = Counter(class_key(d, names) for d in s.get("defects", []))
        parts.append(f"<tr><td class='l'>{cell}</td><td class='l'>{_e(s.get('image', s['json_path']))}</td>"
                     f"<td>{_e('x'.join(map(str, s.get('shape', []))))}</td>"
                     f"<td>{'' if not px else f'{px:.4g}'}</td><td>{n}</td>"
                     f"<td>{'' if not area else f'{100 * n / area:.3g}'}</td>"
                     f"<td class='l'>{_e(', '.join(f'{k}: {v}' for k, v in sorted(cnt.items())))}</td></tr>")
    parts.append("</table>")
    if failures:
        parts.append("<h2>Failed scans</h2><table><tr><th class='l'>scan</th><th class='l'>stage</th>"
                     "<th class='l'>reason</th></tr>")
        for f in failures:
            parts.append(f"<tr><td class='l'>{_e(f['scan'])}</td><td class='l'>{_e(f['stage'])}</td>"
                         f"<td class='l'>{_e(f['reason'])}</td></tr>")
        parts.append("</table>")

    parts.append("<h2>Run</h2><table>")
    for k, v in sorted((run.get("models") or {}).items()):
        parts.append(f"<tr><th class='l'>model {_e(k)}</th><td class='l'>{_e(v)}</td></tr>")
    cfg = run.get("config") or {}
    for k in ("source", "models"):
        if k in cfg and not isinstance(cfg[k], dict):
            parts.append(f"<tr><th class='l'>config {_e(k)}</th><td class='l'>{_e(cfg[k])}</td></tr>")
    for k, v in sorted((run.get("software") or {}).items()):
        parts.append(f"<tr><th class='l'>{_e(k)}</th><td class='l'>{_e(v)}</td></tr>")
    parts.append("</table>")
    if cfg.get("values"):
        parts.append("<details><summary>prediction parameters</summary><pre>"
                     f"{_e(json.dumps(cfg['values'], indent=1, sort_keys=True))}</pre></details>")
    parts.append("</body></html>\n")
    path = out_dir / "report.html"
    with atomic_file(path, "w") as fh:
        fh.write("\n".join(parts))
    return path
