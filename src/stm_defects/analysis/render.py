"""Pictures people look at: the scan with labelled boxes, colourised class and character maps.

Pure array functions (RGB uint8 out); PIL draws, so a 512x512 overlay costs milliseconds.
Colour mapping is done in blocks of rows, so a large scan never needs float RGBA copies of
itself.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from stm_defects.paper.maps import colourise

_BLOCK_PX = 1 << 20   # pixels per block of rows when colour-mapping a picture


def _row_blocks(shape: tuple[int, ...]):
    rows = max(1, _BLOCK_PX // max(shape[1], 1))
    for r0 in range(0, shape[0], rows):
        yield slice(r0, min(shape[0], r0 + rows))


def grey_to_rgb(img01: np.ndarray, cmap: str = "afmhot") -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 with an STM-style colormap."""
    colormap = colormaps[cmap]
    if np.ndim(img01) != 2:
        return colormap(np.clip(img01, 0, 1), bytes=True)[..., :3]
    out = np.empty(img01.shape + (3,), np.uint8)
    for rows in _row_blocks(img01.shape):
        # the colormap's own uint8 table: the same numbers as (float RGBA * 255).astype(uint8)
        out[rows] = colormap(np.clip(img01[rows], 0, 1), bytes=True)[..., :3]
    return out


def class_colour(cls: int | None, n: int = 20) -> tuple[int, int, int]:
    if cls is None or cls < 0:
        return (0, 255, 255)
    r, g, b, _ = colormaps["tab20"](cls % n)
    return int(r * 255), int(g * 255), int(b * 255)


def overlay(img01: np.ndarray, defects: list[dict], scale: int = 2) -> np.ndarray:
    """The scan with one box per defect, labelled with its class name (or id).

    `defects` use the coordinates of `img01`: `bbox` [x0, y0, x1, y1], `class`, `name` (optional).
    The picture is upscaled `scale` times so labels stay readable.
    """
    return np.asarray(overlay_image(img01, defects, scale))


def overlay_image(img01: np.ndarray, defects: list[dict], scale: int = 2) -> Image.Image:
    """`overlay` as a PIL image (RGB), which a caller can save without a numpy copy of it."""
    base = Image.fromarray(grey_to_rgb(img01)).resize(
        (img01.shape[1] * scale, img01.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(base)
    for d in defects:
        x0, y0, x1, y1 = (v * scale for v in d["bbox"])
        colour = class_colour(d.get("class"))
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=max(1, scale))
        label = d.get("name") or ("?" if d.get("class") is None else str(d["class"]))
        draw.text((x0 + 1, max(0, y0 - 11)), label, fill=colour)
    return base


def class_picture(img01: np.ndarray, class_map: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Colourised defect-class map blended over the grey scan (-1 = no defect)."""
    colours = np.array([class_colour(c) for c in range(20)], dtype=np.float32)
    out = np.empty(img01.shape + (3,), np.uint8)
    for rows in _row_blocks(img01.shape):
        grey = (np.repeat(np.clip(img01[rows], 0, 1)[..., None], 3, axis=2) * 255).astype(np.float32)
        cm = class_map[rows]
        sel = cm >= 0
        grey[sel] = (1 - alpha) * grey[sel] + alpha * colours[cm[sel] % 20]
        out[rows] = grey.astype(np.uint8)
    return out


def character_picture(char_map: np.ndarray) -> np.ndarray:
    n = int(char_map.max()) + 1 if char_map.size else 1
    if char_map.ndim != 2:
        return colourise(char_map, max(n, 1))
    out = np.empty(char_map.shape + (3,), np.uint8)
    for rows in _row_blocks(char_map.shape):
        out[rows] = colourise(char_map[rows], max(n, 1))
    return out


def class_gallery(examples: dict, names: dict | None = None, per_class: int = 8, scale: int = 3) -> np.ndarray:
    """A per-class montage: one row per class, up to `per_class` example patches each.

    `examples` maps class id (int, -1 = unknown) to a list of (s, s) patches in [0, 1]; the
    row label is the class name from `names` (str(id) -> name) or the id.
    """
    classes = sorted(examples)
    if not classes:
        return np.zeros((20, 200, 3), np.uint8)
    s = next(iter(examples.values()))[0].shape[0] * scale
    label_w, pad = 110, 4
    h = len(classes) * (s + pad) + pad
    w = label_w + per_class * (s + pad) + pad
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, cls in enumerate(classes):
        y = pad + row * (s + pad)
        name = (names or {}).get(str(cls)) or ("unknown" if cls == -1 else f"class {cls}")
        draw.text((4, y + s // 2 - 12), name, fill=class_colour(cls))
        draw.text((4, y + s // 2 + 2), f"n={len(examples[cls])}", fill=(90, 90, 90))
        for j, patch in enumerate(examples[cls][:per_class]):
            tile = Image.fromarray(grey_to_rgb(patch)).resize((s, s), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + j * (s + pad), y))
    return np.asarray(canvas)
