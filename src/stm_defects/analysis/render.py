"""Pictures people look at: the scan with labelled boxes, colourised class and character maps.

Pure array functions (RGB uint8 out); PIL draws, so a 512x512 overlay costs milliseconds.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from stm_defects.paper.maps import colourise


def grey_to_rgb(img01: np.ndarray, cmap: str = "afmhot") -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 with an STM-style colormap."""
    rgba = colormaps[cmap](np.clip(img01, 0, 1))
    return (rgba[..., :3] * 255).astype(np.uint8)


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
    base = Image.fromarray(grey_to_rgb(img01)).resize(
        (img01.shape[1] * scale, img01.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(base)
    for d in defects:
        x0, y0, x1, y1 = (v * scale for v in d["bbox"])
        colour = class_colour(d.get("class"))
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=max(1, scale))
        label = d.get("name") or ("?" if d.get("class") is None else str(d["class"]))
        draw.text((x0 + 1, max(0, y0 - 11)), label, fill=colour)
    return np.asarray(base)


def class_picture(img01: np.ndarray, class_map: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Colourised defect-class map blended over the grey scan (-1 = no defect)."""
    grey = (np.repeat(np.clip(img01, 0, 1)[..., None], 3, axis=2) * 255).astype(np.float32)
    colours = np.array([class_colour(c) for c in range(20)], dtype=np.float32)
    out = grey.copy()
    sel = class_map >= 0
    out[sel] = (1 - alpha) * grey[sel] + alpha * colours[class_map[sel] % 20]
    return out.astype(np.uint8)


def character_picture(char_map: np.ndarray) -> np.ndarray:
    n = int(char_map.max()) + 1 if char_map.size else 1
    return colourise(char_map, max(n, 1))


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
