"""Pictures fit for a paper: the scan with its defects, the class map and the character map, each
with a scale bar in nm, a colour bar and a legend, at a size people can read.

`scan_figure`, `class_figure` and `character_figure` return PIL images (RGB). Each is laid out as

    +--------------------------------+------+
    | title                          |      |
    | picture (scale bar at bottom   | col- |
    | left)                          | our  |
    |                                | bar  |
    +--------------------------------+------+
    | legend: colour swatch, class name, count ...  |
    +-----------------------------------------------+

The picture is the scan resampled so that its longest side is between `FigureStyle.min_side` and
`FigureStyle.max_side` pixels: a 64x64 scan is enlarged (nearest neighbour, so pixels stay
pixels) and an 8192x8192 scan is shrunk (area-averaged), so a figure never runs to tens of MB;
the full-resolution results stay in the scan's JSON. Text, line widths and the scale bar are
sized from the picture, not from the scan.

Heights: the display is the terrace-levelled image when the method made one (each terrace
flat, so a stepped scan shows its lattice on every terrace instead of one colour band per
terrace), clipped to its 0.5-99.5 percentiles; the colour bar gives heights in the scan's unit
(nm for calibrated files) when the preprocessing's height scale is known, else in "a.u.".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from stm_defects.analysis.render import class_colour, grey_to_rgb

__all__ = ["CROP_PX", "FigureStyle", "character_figure", "class_figure", "defect_crops", "defect_heights",
           "display_range", "nice_length", "scan_figure"]

HEIGHT_CMAP = "afmhot"      # the usual STM topography palette (Gwyddion's default is similar)
SCORE_CMAP = "magma"


@dataclass(frozen=True)
class FigureStyle:
    max_side: int = 2048        # px: longest side of the picture, at most
    min_side: int = 768         # px: ... and at least (small scans are enlarged)
    percentiles: tuple[float, float] = (0.5, 99.5)   # display range of heights


@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (shipped with matplotlib) at ``size`` px; PIL's default font otherwise."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except (OSError, ValueError):     # no font file: PIL's own, still scalable in Pillow >= 10.1
        return ImageFont.load_default(size=size)


def nice_length(target: float) -> float:
    """The 1, 2 or 5 x 10^k closest below ``target`` (> 0): a scale-bar length."""
    if not target > 0 or not math.isfinite(target):
        return 1.0
    k = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10 ** k <= target:
            return float(m * 10 ** k)
    return float(10 ** k)


def _format_length(v: float, unit: str) -> str:
    if unit == "nm" and v >= 1000:
        return f"{v / 1000:g} µm"
    return f"{v:g} {unit}"


def display_range(a: np.ndarray, percentiles=(0.5, 99.5), valid: np.ndarray | None = None) -> tuple[float, float]:
    """(low, high) display range of ``a``: its percentiles over ``valid`` (finite) pixels,
    from a strided sample of at most ~1 M values."""
    v = a if valid is None else a[valid]
    v = np.asarray(v).ravel()
    step = max(1, v.size // 1_000_000)
    v = v[::step]
    v = v[np.isfinite(v)]
    if not v.size:
        return 0.0, 1.0
    lo, hi = np.percentile(v, percentiles)
    return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1.0)


def _picture_scale(shape: tuple[int, int], style: FigureStyle) -> float:
    side = max(shape)
    if side > style.max_side:
        return style.max_side / side
    if side < style.min_side:
        return float(max(1, style.min_side // side))
    return 1.0


def _resize(rgb: np.ndarray, scale: float) -> Image.Image:
    img = Image.fromarray(rgb)
    if scale == 1.0:
        return img
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    return img.resize(size, Image.NEAREST if scale > 1 else Image.BOX)


def _text_px(pic: Image.Image) -> int:
    return int(np.clip(min(pic.size) / 40, 12, 40))


def _outlined(draw: ImageDraw.ImageDraw, xy, text: str, f, fill=(255, 255, 255), outline=(0, 0, 0)) -> None:
    draw.text(xy, text, font=f, fill=fill, stroke_width=max(1, f.size // 10), stroke_fill=outline)


def _scale_bar(pic: Image.Image, scale: float, pixel_nm: float | None) -> None:
    """A white bar with its length at the bottom left of ``pic`` (picture px = scan px x scale)."""
    draw = ImageDraw.Draw(pic)
    fs = _text_px(pic)
    unit_per_pic_px = (pixel_nm if pixel_nm else 1.0) / scale
    unit = "nm" if pixel_nm else "px"
    length = nice_length(0.2 * pic.size[0] * unit_per_pic_px)
    bar = length / unit_per_pic_px
    x0, y1 = fs, pic.size[1] - fs
    h = max(3, fs // 3)
    draw.rectangle([x0 - 1, y1 - h - 1, x0 + bar + 1, y1 + 1], fill=(0, 0, 0))
    draw.rectangle([x0, y1 - h, x0 + bar, y1], fill=(255, 255, 255))
    _outlined(draw, (x0, y1 - h - int(1.4 * fs)), _format_length(length, unit), font(fs))


def _colour_bar(height: int, cmap: str, lo: float, hi: float, label: str, fs: int) -> Image.Image:
    """A vertical colour bar ``height`` px tall with 3-5 ticks between ``lo`` and ``hi``."""
    f = font(fs)
    bar_w = max(12, fs)
    ticks = _ticks(lo, hi)
    labels = [f"{t:.3g}" for t in ticks]
    text_w = max([int(f.getlength(s)) for s in labels + [label]] + [1])
    width = bar_w + text_w + 3 * fs // 2
    panel = Image.new("RGB", (width, height), (255, 255, 255))
    top, bottom = 2 * fs, height - fs
    ramp = np.linspace(1, 0, max(bottom - top, 2))[:, None] * np.ones((1, bar_w))
    panel.paste(Image.fromarray(colormaps[cmap](ramp, bytes=True)[..., :3]), (fs // 2, top))
    draw = ImageDraw.Draw(panel)
    draw.rectangle([fs // 2, top, fs // 2 + bar_w, bottom], outline=(0, 0, 0))
    draw.text((fs // 2, 0), label, font=f, fill=(0, 0, 0))
    for t, s in zip(ticks, labels):
        y = bottom - (t - lo) / (hi - lo) * (bottom - top)
        draw.line([fs // 2 + bar_w, y, fs // 2 + bar_w + fs // 3, y], fill=(0, 0, 0))
        draw.text((fs // 2 + bar_w + fs // 2, y - fs // 2), s, font=f, fill=(0, 0, 0))
    return panel


def _ticks(lo: float, hi: float) -> list[float]:
    step = nice_length((hi - lo) / 3) or 1.0
    first = math.ceil(lo / step) * step
    out = [first + i * step for i in range(10) if first + i * step <= hi + 1e-9 * abs(hi - lo)]
    return out or [lo, hi]


def _legend(width: int, entries: list[tuple[tuple[int, int, int], str]], fs: int) -> Image.Image:
    """Rows of (colour swatch, text), wrapped to ``width`` px."""
    f = font(fs)
    items = [(c, t, int(f.getlength(t)) + 2 * fs + fs // 2) for c, t in entries]
    lines, line, used = [], [], 0
    for c, t, w in items:
        if line and used + w > width - fs:
            lines.append(line)
            line, used = [], 0
        line.append((c, t, w))
        used += w
    if line:
        lines.append(line)
    panel = Image.new("RGB", (width, max(1, len(lines)) * int(1.6 * fs) + fs // 2), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, line in enumerate(lines):
        x, y = fs // 2, fs // 2 + i * int(1.6 * fs)
        for c, t, w in line:
            draw.rectangle([x, y + fs // 8, x + fs, y + fs], fill=c, outline=(0, 0, 0))
            draw.text((x + fs + fs // 3, y - fs // 8), t, font=f, fill=(0, 0, 0))
            x += w
    return panel


def _compose(pic: Image.Image, title: str, bar: Image.Image | None, legend: list | None) -> Image.Image:
    fs = _text_px(pic)
    title_h = int(1.8 * fs)
    bar_w = bar.size[0] if bar is not None else 0
    width = pic.size[0] + bar_w
    leg = _legend(width, legend, fs) if legend else None
    height = title_h + pic.size[1] + (leg.size[1] if leg else 0)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(canvas).text((fs // 2, fs // 3), title, font=font(fs), fill=(0, 0, 0))
    canvas.paste(pic, (0, title_h))
    if bar is not None:
        canvas.paste(bar, (pic.size[0], title_h))
    if leg is not None:
        canvas.paste(leg, (0, title_h + pic.size[1]))
    return canvas


def _class_label(d: dict, names: dict | None) -> str:
    cls = d.get("class")
    if d.get("name"):
        return str(d["name"])
    if cls is None:
        return "defect"
    if cls < 0:
        return "unknown"
    return (names or {}).get(str(cls)) or f"class {cls}"


def _legend_entries(defects: list[dict], names: dict | None) -> list[tuple[tuple[int, int, int], str]]:
    counts: dict = {}
    for d in defects:
        key = -1 if d.get("class") is None or d["class"] < 0 else int(d["class"])
        label = _class_label(d, names)
        counts.setdefault((key, label), 0)
        counts[(key, label)] += 1
    return [(class_colour(k), f"{label} ({n})") for (k, label), n in sorted(counts.items())]


def _heights(display: np.ndarray, z_per_unit: float | None, unit: str, style: FigureStyle):
    lo, hi = display_range(display, style.percentiles)
    rgb = grey_to_rgb((display - lo) / (hi - lo), HEIGHT_CMAP)
    if z_per_unit:
        return rgb, 0.0, (hi - lo) * z_per_unit, f"height ({unit})"
    return rgb, 0.0, 1.0, "height (a.u.)"


def scan_figure(display: np.ndarray, defects: list[dict], pixel_nm: float | None = None,
                z_per_unit: float | None = None, unit: str = "nm", names: dict | None = None,
                title: str = "", style: FigureStyle = FigureStyle()) -> Image.Image:
    """The scan with one labelled box per defect, a scale bar, a height colour bar and a legend.

    ``display`` (H, W) is the image to show (`Analysis.display` or the preprocessed image);
    ``defects`` are in its pixel coordinates (``bbox`` [x0, y0, x1, y1], ``class``, ``name``);
    ``pixel_nm`` is its pixel size (None: the scale bar is in px); ``z_per_unit`` converts its
    values to ``unit`` (None: heights in a.u.).
    """
    rgb, lo, hi, label = _heights(display, z_per_unit, unit, style)
    s = _picture_scale(display.shape, style)
    pic = _resize(rgb, s)
    draw = ImageDraw.Draw(pic)
    fs = max(10, int(_text_px(pic) * 0.8))
    f = font(fs)
    width = max(2, fs // 6)
    for d in defects:
        x0, y0, x1, y1 = (v * s for v in d["bbox"])
        colour = class_colour(-1 if d.get("class") is None else d["class"])
        draw.rectangle([x0 - width, y0 - width, x1 + width - 1, y1 + width - 1], outline=colour, width=width)
        text = _class_label(d, names)
        ty = y0 - width - int(1.25 * fs)
        _outlined(draw, (x0, ty if ty >= 0 else y1 + width), text, f, fill=colour)
    _scale_bar(pic, s, pixel_nm)
    bar = _colour_bar(pic.size[1], HEIGHT_CMAP, lo, hi, label, _text_px(pic))
    n = len(defects)
    return _compose(pic, title or f"{n} defect{'s' if n != 1 else ''}", bar,
                    _legend_entries(defects, names) or [((255, 255, 255), "no defects found")])


def class_figure(display: np.ndarray, class_map: np.ndarray, defects: list[dict], pixel_nm: float | None = None,
                 names: dict | None = None, title: str = "defect classes",
                 style: FigureStyle = FigureStyle(), alpha: float = 0.65) -> Image.Image:
    """Each defect's pixels in its class colour over the grey levelled scan, with a scale bar
    and a legend of the classes (name and count)."""
    lo, hi = display_range(display, style.percentiles)
    s = _picture_scale(display.shape, style)
    grey = np.clip((display - lo) / (hi - lo), 0, 1)
    rgb = np.repeat((grey * 200 + 30)[..., None], 3, axis=2).astype(np.float32)
    colours = np.array([class_colour(c) for c in range(20)], np.float32)
    sel = class_map >= 0
    rgb[sel] = (1 - alpha) * rgb[sel] + alpha * colours[class_map[sel] % 20]
    unknown = np.zeros(class_map.shape, bool)
    for d in defects:            # unknown defects: their boxes' outline, as they have no class colour
        if d.get("class") is not None and d["class"] < 0:
            x0, y0, x1, y1 = d["bbox"]
            unknown[y0:y1, x0:x1] = True
    pic = _resize(rgb.astype(np.uint8), s)
    if unknown.any():
        draw = ImageDraw.Draw(pic)
        w = max(2, _text_px(pic) // 8)
        for d in defects:
            if d.get("class") is not None and d["class"] < 0:
                x0, y0, x1, y1 = (v * s for v in d["bbox"])
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=class_colour(-1), width=w)
    _scale_bar(pic, s, pixel_nm)
    return _compose(pic, title, None, _legend_entries(defects, names) or [((255, 255, 255), "no defects found")])


def character_figure(char_map: np.ndarray, score: np.ndarray | None = None, pixel_nm: float | None = None,
                     threshold: float | None = None, title: str = "", method: str = "improved",
                     style: FigureStyle = FigureStyle()) -> Image.Image:
    """What the method sees. Improved: the anomaly score (robust z, colour bar; the detection
    threshold marked) with the step band and terrace borders drawn over it, so a one-terrace scan
    still shows its defects and noise. Paper: the K-means character map, one colour per
    cluster, with a legend."""
    s = _picture_scale(char_map.shape, style)
    if method == "improved" and score is not None:
        top = max(2.0 * (threshold or 5.0), 1.0)
        rgb = grey_to_rgb(np.clip(score / top, 0, 1), SCORE_CMAP)
        band = char_map < 0
        rgb[band] = (80, 160, 255)
        pic = _resize(rgb, s)
        _scale_bar(pic, s, pixel_nm)
        n_terr = int(char_map.max()) + 1 if char_map.size else 0
        bar = _colour_bar(pic.size[1], SCORE_CMAP, 0.0, top, "score (z)", _text_px(pic))
        legend = [((80, 160, 255), "step band"),
                  ((255, 255, 255), f"{n_terr} terrace{'s' if n_terr != 1 else ''}")]
        if threshold:
            legend.insert(0, (tuple(colormaps[SCORE_CMAP](threshold / top, bytes=True)[:3]),
                              f"detection threshold z = {threshold:g}"))
        return _compose(pic, title or "anomaly score", bar, legend)
    from stm_defects.analysis.render import character_picture

    pic = _resize(character_picture(char_map), s)
    _scale_bar(pic, s, pixel_nm)
    n = int(char_map.max()) + 1 if char_map.size else 0
    from stm_defects.paper.maps import colourise

    swatches = colourise(np.arange(max(n, 1))[None, :], max(n, 1))[0]
    legend = [(tuple(int(v) for v in swatches[k]), f"character {k}") for k in range(n)]
    return _compose(pic, title or "character map (K-means of AE1 latents)", None, legend)


# ------------------------------------------------------------------- per-defect measurements
CROP_PX = 64           # side of one crop of a `defect_crops` strip (the report slices it)
MAX_CROPS = 256        # crops per scan, at most (the strip of a scan with more stops there)


def _crop_box(d: dict, shape: tuple[int, int], pixel_nm: float | None) -> tuple[int, int, int, int]:
    """A square around the defect: twice its box, at least 3 nm (or 24 px uncalibrated)."""
    x0, y0, x1, y1 = d["bbox"]
    side = max(2 * max(x1 - x0, y1 - y0), round(3.0 / pixel_nm) if pixel_nm else 24, 8)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    a = int(round(cx - side / 2))
    b = int(round(cy - side / 2))
    a = min(max(a, 0), max(shape[1] - side, 0))
    b = min(max(b, 0), max(shape[0] - side, 0))
    return a, b, min(a + side, shape[1]), min(b + side, shape[0])


def defect_crops(display: np.ndarray, defects: list[dict], pixel_nm: float | None = None,
                 style: FigureStyle = FigureStyle()) -> Image.Image | None:
    """One row of `CROP_PX`-px crops, one per defect (the first `MAX_CROPS`), in the scan's
    height colours: crop i of the strip is ``defects[i]``. None for no defects."""
    n = min(len(defects), MAX_CROPS)
    if not n:
        return None
    lo, hi = display_range(display, style.percentiles)
    strip = Image.new("RGB", (n * CROP_PX, CROP_PX))
    for i, d in enumerate(defects[:n]):
        a, b, c, e = _crop_box(d, display.shape, pixel_nm)
        rgb = grey_to_rgb(np.clip((display[b:e, a:c] - lo) / (hi - lo), 0, 1), HEIGHT_CMAP)
        tile = Image.fromarray(rgb).resize((CROP_PX, CROP_PX), Image.BILINEAR)
        strip.paste(tile, (i * CROP_PX, 0))
    return strip


def defect_heights(display: np.ndarray, defects: list[dict], z_per_unit: float | None) -> list[float | None]:
    """Apparent height of each defect in the display's height unit x ``z_per_unit`` (nm): the
    extreme of the display inside its box (the maximum for a protrusion, the minimum for a
    depression, whichever departs more) minus the median of a ring of the same width around the
    box (its terrace). None for all without a height scale."""
    if not z_per_unit:
        return [None] * len(defects)
    h, w = display.shape
    out = []
    for d in defects:
        x0, y0, x1, y1 = d["bbox"]
        m = max(x1 - x0, y1 - y0, 2)
        a, b, c, e = max(x0 - m, 0), max(y0 - m, 0), min(x1 + m, w), min(y1 + m, h)
        win = display[b:e, a:c]
        inner = np.zeros(win.shape, bool)
        inner[y0 - b:y1 - b, x0 - a:x1 - a] = True
        ring = win[~inner]
        core = win[inner]
        if not ring.size or not core.size:
            out.append(None)
            continue
        base = float(np.median(ring))
        up, down = float(core.max()) - base, float(core.min()) - base
        out.append(round((up if abs(up) >= abs(down) else down) * z_per_unit, 5))
    return out
