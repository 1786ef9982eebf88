"""Small disk helpers shared by the stages and the CLI (JSON, arrays, PNG pictures)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np


def fresh_dir(path: str | Path) -> Path:
    """Remove and recreate a stage output folder (DVC outs are rewritten completely)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.mkdir(parents=True)
    return path


def write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as strict JSON, atomically.

    Non-finite floats (NaN, inf; numpy scalars and arrays included) become ``null`` through
    `jsonable`, and the encoder runs with ``allow_nan=False``, so ``NaN``/``Infinity`` can never
    reach the file. The text goes to a temporary file in the same folder that then replaces
    ``path`` (``os.replace``): a reader sees the old file or the whole new one, never a part.
    """
    text = json.dumps(jsonable(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"
    write_text_atomic(path, text)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, then rename it onto ``path``.

    The temporary file is created with mode 0o666 less the umask, as ``open`` would create
    ``path`` itself; it is removed again if anything fails before the rename. A killed process
    leaves the old file (or none) and at most a hidden ``.NAME.*.tmp``, never a partial
    ``path``. (No fsync: this guards against concurrent readers and killed processes, not
    against power loss.)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def jsonable(value: Any, max_array: int | None = None) -> Any:
    """A plain-JSON copy of `value`: numpy scalars unwrapped, NaN/inf -> None, tuples -> lists,
    paths -> str; arrays become lists (or a short description when larger than `max_array`).
    Anything else (complex numbers, arbitrary objects) becomes its ``str``."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {str(k): jsonable(v, max_array) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v, max_array) for v in value]
    if isinstance(value, np.ndarray):
        if max_array is None or value.size <= max_array:
            return jsonable(value.tolist(), max_array)
        return f"<array {value.dtype} {value.shape}>"
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value), max_array)
    return str(value)


def save_png(path: str | Path, rgb_or_grey: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array, or a float array in [0, 1], as PNG."""
    from PIL import Image

    arr = np.asarray(rgb_or_grey)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
