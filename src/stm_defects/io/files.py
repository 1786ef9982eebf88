"""Small disk helpers shared by the stages and the CLI (JSON, CSV, PNG pictures, output folders).

Every writer here is atomic: the bytes go to a hidden temporary file in the target's folder
(``.NAME.PID.RANDOM.tmp``) that is renamed onto the target only once it is complete
(`atomic_file`). A reader, or a second process, sees the old file or the whole new one, never a
part, and a writer that raises leaves no partial file behind.

`output_folder` and `output_lock` make a folder ready for a command's outputs and hold an OS
lock on it for the length of a run, so that two runs cannot write into one folder at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from stm_defects.errors import StageError


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
    """Write ``text`` (UTF-8) to ``path`` atomically (see `atomic_file`)."""
    with atomic_file(path, "w") as fh:
        fh.write(text)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; rename it onto ``path`` on success.

    ``mode`` is ``"w"`` (text, UTF-8 unless ``encoding`` is given) or ``"wb"``; ``open_kwargs``
    go to ``open`` (e.g. ``newline=""`` for CSV). The temporary file is created with mode 0o666
    less the umask, as ``open`` would create ``path`` itself. If the body raises, or the rename
    fails (``path`` is a folder, the disk is full), the temporary file is removed and the old
    ``path`` (or none) is left as it was. A killed process leaves at most a hidden
    ``.NAME.*.tmp``, never a partial ``path``. (No fsync: this guards against concurrent
    readers and killed processes, not against power loss.)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes a new file: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if mode == "w":
            open_kwargs.setdefault("encoding", "utf-8")
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_csv(path: str | Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """Write ``rows`` as CSV with a header, atomically; the columns are ``fields`` (default: the
    keys of the first row). A row with a key outside ``fields`` raises, leaving no file."""
    import csv

    with atomic_file(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields if fields is not None else (list(rows[0]) if rows else []))
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


#: zlib level of the PNGs written: 1 writes a scan's pictures 3-5x faster than Pillow's default
#: 6 (about 0.1 s instead of 0.4 s for a 512^2 scan's four), for files about 8% larger.
PNG_COMPRESS_LEVEL = 1


def save_png(path: str | Path, rgb_or_grey: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array, or a float array in [0, 1], as PNG, atomically."""
    from PIL import Image

    arr = np.asarray(rgb_or_grey)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    save_picture(path, Image.fromarray(arr))


def save_picture(path: str | Path, picture) -> None:
    """Write a PIL image as PNG (at `PNG_COMPRESS_LEVEL`), atomically."""
    with atomic_file(path, "wb") as fh:
        picture.save(fh, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


# ----------------------------------------------------------------------------- output folders
LOCK_NAME = ".stm-predict.lock"


def describe_os_error(err: OSError) -> str:
    """One line for a failed file operation: the path it was about (for a rename, the target)
    and the system's reason, e.g. ``out/scan.json: Is a directory``."""
    target = err.filename2 if err.filename2 is not None else err.filename
    reason = err.strerror or str(err) or type(err).__name__
    return f"{os.fsdecode(target)}: {reason}" if target is not None else reason


def output_folder(path: str | Path, option: str = "--out") -> Path:
    """Make ``path`` ready to take a command's outputs: create it (and its parents) if needed.

    Raises `StageError` with one line when ``path`` is an existing file, cannot be created, or
    is a folder this process may not write into (a probe file is created and removed).
    ``option`` names the setting in the messages.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StageError(f"{option} {path}: is a file, not a folder; give a folder for the outputs")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}.{secrets.token_hex(4)}"
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as err:
        raise StageError(f"{option} {path}: cannot write there ({err.strerror or describe_os_error(err)})") from None
    return path


@contextlib.contextmanager
def output_lock(folder: str | Path, command: str = "stm predict") -> Iterator[Path]:
    """Hold an exclusive OS lock on ``folder`` (its ``.stm-predict.lock`` file) for the block.

    A second holder, in this or another process, is refused at once with a `StageError`
    naming the process that holds it. The lock is ``fcntl.flock`` on an open file: the kernel
    drops it when the holder exits, however it exits, so a crashed run never leaves a stale
    lock. The lock file itself stays in the folder (it is hidden and empty of meaning once
    released); it is not deleted, since deleting a lock file lets a third process lock a new
    file while the second still holds the old one. Where ``fcntl`` does not exist (Windows),
    no lock is taken.
    """
    try:
        import fcntl
    except ImportError:   # pragma: no cover - not POSIX
        yield Path(folder) / LOCK_NAME
        return
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise StageError(f"cannot lock the output folder {folder} ({describe_os_error(err)})") from None
    try:
        _flock_or_refuse(fcntl, fd, folder, command)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)          # releases the lock


def check_unlocked(folder: str | Path, command: str = "stm predict") -> None:
    """Refuse at once (`StageError`, as `output_lock` would) when a run holds ``folder``'s lock;
    a cheap early check, so a second run stops before loading anything. Creates nothing."""
    try:
        import fcntl
    except ImportError:   # pragma: no cover - not POSIX
        return
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDWR)
    except OSError:       # no lock file (or not readable): `output_lock` decides later
        return
    try:
        _flock_or_refuse(fcntl, fd, folder, command)
    finally:
        os.close(fd)


def _flock_or_refuse(fcntl, fd: int, folder, command: str) -> None:
    """Take the exclusive lock of open lock file ``fd`` without waiting, or raise `StageError`
    naming the holder (the pid and start time it wrote into the file)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", errors="replace").strip() or "another process"
        raise StageError(f"{folder} is in use by another `{command}` ({holder}); wait for it to finish, "
                         "or give another --out") from None
