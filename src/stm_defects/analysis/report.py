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
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
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
MAX_THUMBS = 300   # scans shown with a thumbnail; the others are listed with a link
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


def scan_record(doc: dict, names: dict) -> dict:
    """What the report keeps of one prediction JSON: its area (nm², None uncalibrated) and its
    defect counts per class label (a `Counter`)."""
    px = doc.get("pixel_size_nm")
    area = float(np.prod(doc["shape"][:2])) * px ** 2 if px else None
    return {"area_nm2": area, "counts": Counter(class_key(d, names) for d in doc.get("defects", []))}


def density_table(records: list[dict], seed: int = 0, n_boot: int = 2000) -> tuple[list[dict], str]:
    """(rows of class, count, density per 100 nm² with its 95% interval, per cm⁻²; the interval
    method) over the calibrated scans' `scan_record`s."""
    cal = [r for r in records if r["area_nm2"]]
    if not cal:
        return [], "no calibrated scans"
    areas = np.array([r["area_nm2"] for r in cal])
    counts = [r["counts"] for r in cal]
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


def thumbnail_uri(picture: Image.Image) -> str:
    """The page's thumbnail of an overlay picture (a JPEG data URI). `stm predict` makes it from
    the overlay it has just drawn (`analysis.predict.write_prediction`), which saves decoding the
    PNG again here; the PNG is lossless, so both give the same bytes."""
    im = picture.convert("RGB")
    im.thumbnail((THUMB_PX, THUMB_PX))
    return _data_uri(im, "JPEG")


def _thumbnail(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            return thumbnail_uri(im)
    except (OSError, ValueError):
        return None


class _Collector:
    """One pass over the batch's JSONs, keeping only what the page shows: per-scan rows, per-class
    areas and heights, up to `GALLERY_PER_CLASS` crops per class and the first `MAX_THUMBS`
    thumbnails. Memory grows with the number of defects by two floats each, not with the JSONs."""

    def __init__(self, out_dir: Path, names: dict, thumbs: dict | None = None):
        self.out_dir, self.names, self.thumbs = out_dir, names, thumbs or {}
        self.records: list[dict] = []
        self.rows: list[dict] = []
        self.area: dict[str, list] = defaultdict(list)
        self.height: dict[str, list] = defaultdict(list)
        self.crops: dict[str, list] = defaultdict(list)
        self.class_id: dict[str, int] = {}
        self.calibrated = True
        self.run: dict = {}

    def add(self, rel: str, doc: dict) -> None:
        doc = dict(doc, json_path=rel)
        if not self.run:
            self.run = {"models": doc.get("models"), "config": doc.get("config"), "software": doc.get("software")}
        rec = scan_record(doc, self.names)
        self.records.append(rec)
        px = doc.get("pixel_size_nm")
        self.calibrated &= bool(px)
        defects = doc.get("defects", [])
        strip_path, strip = _picture(self.out_dir, doc, "defects"), None
        for d in defects:
            c = class_key(d, self.names)
            self.class_id.setdefault(c, -1 if d.get("class") is None else int(d["class"]))
            if d.get("area_px") is not None:
                self.area[c].append(d["area_px"] * (px ** 2 if px else 1.0))
            if d.get("height_nm") is not None:
                self.height[c].append(d["height_nm"])
            i = d.get("crop")
            if i is None or strip_path is None or len(self.crops[c]) >= GALLERY_PER_CLASS:
                continue
            if strip is None:
                try:
                    strip = Image.open(strip_path).convert("RGB")
                except (OSError, ValueError):
                    strip_path = None
                    continue
            self.crops[c].append(_data_uri(strip.crop((i * CROP_PX, 0, (i + 1) * CROP_PX, CROP_PX))))
        ov = _picture(self.out_dir, doc, "overlay")
        # the thumbnail `stm predict` made from the drawn overlay, else the overlay's path: its
        # thumbnail is made later, with the others (`thumbnails_and_histograms`)
        thumb = (self.thumbs.get(rel) or ov) if ov and len(self.rows) < MAX_THUMBS else None
        self.rows.append({"image": doc.get("image", rel), "shape": doc.get("shape", []), "px": px,
                          "n": len(defects), "area": rec["area_nm2"], "counts": rec["counts"],
                          "link": ov.relative_to(self.out_dir).as_posix() if ov else None, "thumb": thumb})

    def thumbnails_and_histograms(self) -> str | None:
        """Each row's thumbnail (a data URI in place of its overlay's path, None where it could
        not be read) and `histograms`' picture, made in threads: Pillow decodes and resizes
        without the GIL, so the PNG decoding, most of the page's time, runs on every core while
        matplotlib draws the histograms."""
        from concurrent.futures import ThreadPoolExecutor

        todo = [r for r in self.rows if isinstance(r["thumb"], Path)]
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
            thumbs = pool.map(_thumbnail, [r["thumb"] for r in todo])
            hist = self.histograms()
            for r, t in zip(todo, thumbs):
                r["thumb"] = t
        return hist

    def histograms(self) -> str | None:
        """Defect area and height histograms per class, as one embedded PNG (None: no defects)."""
        if not self.area:
            return None
        # a Figure on the Agg canvas, without pyplot (its import alone was 0.2-0.3 s of a command)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        unit = "nm²" if self.calibrated else "px² (some scans uncalibrated)"
        panels = [(self.area, f"defect area ({unit})")]
        if self.height:
            panels.append((self.height, "apparent height (nm)"))
        fig = Figure(figsize=(5.2 * len(panels), 3.4))
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(panels), squeeze=False)
        for ax, (data, label) in zip(axes[0], panels):
            allv = np.concatenate([np.asarray(v, float) for v in data.values()])
            bins = np.histogram_bin_edges(allv, bins=min(40, max(5, int(np.sqrt(allv.size)))))
            for c in sorted(data):
                ax.hist(data[c], bins=bins, histtype="step", lw=1.6, label=f"{c} ({len(data[c])})",
                        color=np.array(class_colour(self.class_id.get(c, -1))) / 255)
            ax.set_xlabel(label)
            ax.set_ylabel("defects")
            ax.legend(fontsize=7, frameon=False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _picture(out_dir: Path, scan: dict, kind: str) -> Path | None:
    """The path of a scan's ``kind`` picture (overlay, classes, character, defects), or None."""
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


def write_report(out_dir: str | Path, jsons: Iterable[str], class_names: dict | None = None,
                 failures: Iterable[dict] = (), title: str = "stm-defects report",
                 load: Callable[[Path], dict | None] | None = None, thumbs: dict | None = None) -> Path:
    """Write ``out_dir/report.html`` (atomically) for the prediction JSONs ``jsons`` (paths
    relative to ``out_dir``, read one at a time) and return its path. ``failures`` are rows with
    ``scan``, ``stage`` and ``reason``. ``thumbs``: JSON path -> `thumbnail_uri` of its overlay,
    where already made (the others are made from the overlay PNGs)."""
    out_dir = Path(out_dir)
    names = dict(class_names or {})
    load = load or (lambda p: json.loads(p.read_text()))
    col = _Collector(out_dir, names, thumbs)
    for rel in jsons:
        doc = load(out_dir / rel)
        if doc is not None:
            col.add(rel, doc)
    run = col.run
    failures = list(failures)
    n_def = sum(r["n"] for r in col.rows)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>",
             f"<p>{len(col.rows)} scan(s) predicted, {n_def} defects"
             + (f", <b>{len(failures)} failed</b>" if failures else "") + ".</p>"]

    rows, method = density_table(col.records)
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

    totals = Counter()
    for r in col.records:
        totals.update(r["counts"])
    parts.append("<h2>Classes</h2><table><tr><th class='l'>class</th><th>defects</th><th class='l'>examples</th></tr>")
    for c in sorted(totals):
        imgs = "".join(f"<img src='{u}' alt='{_e(c)}'>" for u in col.crops.get(c, [])) \
            or "<span class='muted'>no crops</span>"
        parts.append(f"<tr><td class='l'>{_swatch(col.class_id.get(c, -1))}{_e(c)}</td><td>{totals[c]}</td>"
                     f"<td class='l gal'>{imgs}</td></tr>")
    parts.append("</table>")
    parts.append("<p class='muted'>Name a class with <code>stm name-class ID NAME</code>; names are stored with "
                 "the models and used by every later prediction.</p>")

    hist = col.thumbnails_and_histograms()
    if hist:
        parts.append(f"<h2>Defect sizes and heights</h2><img src='{hist}' alt='histograms'>")

    parts.append("<h2>Scans</h2><table><tr><th class='l'>overlay</th><th class='l'>scan</th><th>pixels</th>"
                 "<th>nm/px</th><th>defects</th><th>per 100 nm²</th><th class='l'>classes</th></tr>")
    for r in col.rows:
        if r["link"] and r["thumb"]:
            cell = f"<a href='{_e(r['link'])}'><img class='thumb' src='{r['thumb']}' alt='overlay'></a>"
        elif r["link"]:
            cell = f"<a href='{_e(r['link'])}'>overlay</a>"
        else:
            cell = "<span class='muted'>no picture</span>"
        px = f"{r['px']:.4g}" if r["px"] else ""
        density = f"{100 * r['n'] / r['area']:.3g}" if r["area"] else ""
        classes = ", ".join(f"{k}: {v}" for k, v in sorted(r["counts"].items()))
        parts.append(f"<tr><td class='l'>{cell}</td><td class='l'>{_e(r['image'])}</td>"
                     f"<td>{_e('x'.join(map(str, r['shape'])))}</td><td>{px}</td><td>{r['n']}</td>"
                     f"<td>{density}</td><td class='l'>{_e(classes)}</td></tr>")
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
