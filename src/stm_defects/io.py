"""Small disk helpers shared by the stages and the CLI (JSON, arrays, PNG pictures)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np


def fresh_dir(path: str | Path) -> Path:
    """Remove and recreate a stage output folder (DVC outs are rewritten completely)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.mkdir(parents=True)
    return path


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def write_csv(path: str | Path, rows: list[dict]) -> None:
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else [])
        w.writeheader()
        w.writerows(rows)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def _jsonable(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_png(path: str | Path, rgb_or_grey: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array, or a float array in [0, 1], as PNG."""
    from PIL import Image

    arr = np.asarray(rgb_or_grey)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
