"""Read STM topography images from instrument files and plain image files.

Every reader returns a :class:`Scan`: a float32 height map in nanometres (or raw
values, unit ``"a.u."``, when the file carries no physical unit), the pixel size
in nanometres when known, and JSON-serialisable instrument metadata.

Supported inputs and the package that reads each one:

* Omicron MATRIX ``.Z_mtrx`` (+ ``*_0001.mtrx`` parameter file): ``access2thematrix``
* Nanonis ``.sxm``: ``nanonispy2`` (header parsing; the data block is reshaped here
  so that channels recorded in one direction only are handled too)
* RHK ``.sm4``: the standalone ``RHKsm4`` class shipped inside ``spym``
  (``spym/io/rhksm4/_sm4.py``), loaded from its file so that spym's undeclared
  xarray/hvplot dependencies are not needed
* Gwyddion ``.gwy``: ``gwyfile``
* SPIEPy demo ``.dat``: a 2 x uint32 (rows, cols) header then float64 heights in metres
* ``.npy`` (numpy), ``.tif``/``.tiff`` (``tifffile``), ``.png`` (Pillow)

Bad input raises :class:`ScanError`, whose message is a single line naming the file.

Headers are checked strictly, the same way for every format:

* the data block holds exactly the number of values the header's dimensions give (no
  fewer, no more: an edited dimension field is refused, never read as re-wrapped data);
  see each reader for what "the header" is in its format;
* a pixel size taken from the file is finite, positive and inside :data:`PIXEL_NM_RANGE`
  (:func:`pixel_size_error` words the reason: "is NaN", "is infinite", "is negative", ...);
  a user calibration (``pixel_nm`` / ``scan_nm``) replaces a bad one;
* only lines that were never scanned are cropped: whole rows or columns of NaN at the
  edges (Nanonis writes NaN for unscanned lines; the RHK reader turns the zero counts of
  lines past ``RHK_CompletedLineCount`` into NaN; an aborted Matrix scan simply holds fewer
  values). Rows or columns of real zeros are kept. ``Scan.origin`` and
  ``Scan.original_shape`` relate the cropped image to the original pixel grid.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import math
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stm_defects.io.files import jsonable

__all__ = [
    "PIXEL_NM_RANGE",
    "SCAN_EXTENSIONS",
    "Scan",
    "ScanError",
    "calibration_error",
    "find_scans",
    "pixel_size_error",
    "read_scan",
    "require_min_size",
    "save_gwy",
]

SCAN_EXTENSIONS: tuple[str, ...] = (
    ".z_mtrx",
    ".sxm",
    ".sm4",
    ".gwy",
    ".dat",
    ".npy",
    ".tif",
    ".tiff",
    ".png",
    ".jpg",
    ".jpeg",
)

#: The pixel sizes (nm per pixel) a scan may have. Outside this range a header is corrupt or
#: mis-scaled (0.1 pm/px is far below any STM's resolution; 10 um/px is beyond any STM scanner's
#: range for a usefully sized image), and analysing it would resample absurdly.
PIXEL_NM_RANGE: tuple[float, float] = (1e-4, 1e4)

# Heights with one of these length units are converted to nanometres.
_LENGTH_TO_NM = {
    "m": 1e9,
    "mm": 1e6,
    "um": 1e3,
    "µm": 1e3,
    "μm": 1e3,
    "nm": 1.0,
    "å": 0.1,
    "angstrom": 0.1,
    "pm": 1e-3,
}

_H_WORDS = {
    "forward": "forward",
    "fwd": "forward",
    "fw": "forward",
    "f": "forward",
    "trace": "forward",
    "backward": "backward",
    "bwd": "backward",
    "bw": "backward",
    "b": "backward",
    "back": "backward",
    "retrace": "backward",
}
_V_WORDS = {"up": "up", "u": "up", "down": "down", "dn": "down", "d": "down"}
_DIRECTION_HELP = (
    "use forward/up, backward/up, forward/down or backward/down (short forms: fwd, bwd, up, down)"
)


class ScanError(Exception):
    """A user-facing error about one input file.

    ``str(err) == f"{path}: {reason}"`` on one line; ``.path`` and ``.reason``
    hold the two parts.
    """

    def __init__(self, path: Any, reason: str) -> None:
        self.path = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
        self.reason = _one_line(reason)
        super().__init__(self.path, self.reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True, eq=False)
class Scan:
    """One topography image read from a file.

    ``eq=False``: scans compare and hash by identity (the height array makes
    field-wise equality ambiguous).
    """

    height: np.ndarray
    pixel_nm: float | None
    unit: str
    channel: str
    direction: str
    path: str
    format: str
    origin: tuple[int, int] = (0, 0)
    original_shape: tuple[int, int] | None = None
    meta: dict = field(default_factory=dict)
    #: True where a pixel holds no measurement (NaN or infinite in the file, or an annotation
    #: burned into an exported picture: `image.overlays`); ``height`` holds the median there.
    #: None when every pixel is measured.
    missing: np.ndarray | None = None


@dataclass
class _Raw:
    """What a format reader hands to :func:`_finalise`."""

    data: Any
    to_nm: float | None  # multiply raw values by this to get nm; None: keep raw ("a.u.")
    pixel_nm: float | None
    channel: str
    direction: str
    format: str
    meta: dict
    origin: tuple[int, int] = (0, 0)  # of data[0, 0] in the instrument's full grid
    full_shape: tuple[int, int] | None = None  # the full grid when the reader already cropped
    pixel_y_nm: float | None = None  # the pixel height, where the header gives it separately
    pixel_source: str = ""  # the header fields the pixel size comes from, for error messages
    overlay: np.ndarray | None = None  # pixels of annotations burned into an exported picture


# ---------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------


def read_scan(path: str | os.PathLike, direction: str | None = None, *,
              pixel_nm: float | None = None, scan_nm: float | None = None,
              channel: str | None = None, field_from_name: bool = False) -> Scan:
    """Read the topography image of one file.

    ``pixel_nm`` (nm per pixel) or ``scan_nm`` (the scan's width in nm) calibrate files that
    carry no pixel size (PNG, JPEG, TIFF, npy, SPIEPy .dat) and override the file's own where it
    has one. ``field_from_name`` takes the field of a file that carries no pixel size from its
    name (``..._100x100_...``, ``..._50nm.png``; see :func:`name_field`); a file's own pixel size
    wins over it. ``scan.meta["pixel_nm_source"]`` says which was used ("file", "pixel_nm",
    "scan_nm", "file name" or None for pixel units).

    ``direction`` picks the trace where a file holds several: "forward/up"
    (default), "backward/up", "forward/down" or "backward/down" for Matrix;
    "forward" (default) or "backward" for Nanonis, RHK and Gwyddion files. Short
    forms ("fwd", "bwd", "up", "down") are accepted. A vertical part is ignored
    by formats that record a single vertical direction.

    ``channel`` picks a channel by name (case-insensitive) where a file holds several: a
    Nanonis signal ("Z", "Current", ...) or a Gwyddion data-field title. Default: the topography
    channel. Other formats hold one image; a ``channel`` that does not name it is refused.

    Raises :class:`ScanError` for anything wrong with the file (see the module docstring for
    the header checks) or with the calibration.
    """
    spath = os.fspath(path)
    p = Path(spath)
    if not p.exists():
        raise ScanError(spath, "file not found")
    if p.is_dir():
        raise ScanError(spath, "is a folder, not a file")
    ext = p.suffix.lower()
    if ext == ".mtrx":
        raise ScanError(
            spath,
            "this is a Matrix parameter file, not an image; read the .Z_mtrx data file next to it",
        )
    if ext not in _READERS:
        shown = ext if ext else "(no extension)"
        raise ScanError(
            spath,
            f"unsupported file type {shown}; supported: {', '.join(_display_extensions())}",
        )
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ScanError(spath, f"cannot access file ({exc.strerror or exc})") from exc
    if size == 0:
        raise ScanError(spath, "empty file (0 bytes)")

    try:
        hdir, vdir = _parse_direction(direction)
    except ValueError as exc:
        raise ScanError(spath, str(exc)) from None
    why = calibration_error(pixel_nm, scan_nm)
    if why:
        raise ScanError(spath, why)

    reader, label = _READERS[ext]
    kwargs = {"channel": channel} if channel is not None and reader in _CHANNEL_READERS else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = reader(p, hdir, vdir, **kwargs)
    except ScanError as exc:
        raise ScanError(spath, exc.reason) from None
    except MemoryError as exc:
        raise ScanError(spath, f"{label} file too large to load (corrupt header?)") from exc
    except OSError as exc:
        if exc.errno is not None:
            raise ScanError(spath, f"cannot read file ({exc.strerror or exc})") from exc
        raise ScanError(spath, f"corrupt or truncated {label} file ({_describe(exc)})") from exc
    except Exception as exc:  # the reader libraries raise all sorts on bad files
        raise ScanError(spath, f"corrupt or truncated {label} file ({_describe(exc)})") from exc
    if channel is not None and not kwargs and raw.channel.strip().lower() != channel.strip().lower():
        raise ScanError(spath, f"{label} files hold one image here, channel {raw.channel!r}; "
                               f"--channel {channel!r} does not name it")
    if pixel_nm is None and scan_nm is None:
        _check_file_pixels(raw, spath)
    return _calibrate(_finalise(raw, spath), pixel_nm, scan_nm, field_from_name)


def directions_in(path: str | os.PathLike, channel: str | None = None, **calibration: Any) -> list[str]:
    """The scan directions a file holds, named as :func:`read_scan` takes them ("forward/up" ...
    for Matrix; "forward", "backward" for Nanonis, RHK and Gwyddion; "forward" for one-image
    formats); [] when no direction can be read (reading the file then says why). Each direction
    is tried on its own, with the caller's ``calibration`` (``pixel_nm``, ``scan_nm``,
    ``field_from_name``), so a file recorded backward only still counts."""
    ext = Path(path).suffix.lower()
    tries = (("forward/up", "backward/up", "forward/down", "backward/down") if ext == ".z_mtrx"
             else ("forward", "backward"))
    found = []
    for d in tries:
        try:
            found.append(read_scan(path, direction=d, channel=channel, **calibration).direction)
        except ScanError:
            continue
    return list(dict.fromkeys(found))


# A field in a file name: "100x100", "1.5x1.5um", "20 x 20 nm", "50nm" (unit nm when none is
# given), between separators, so that "SL445", "-1.4V", "Z_030" or "c(4x2)" never match.
_NAME_UNITS = {"nm": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3}
_NAME_FIELD = re.compile(
    r"(?<![0-9A-Za-z.(])(?:(\d+(?:\.\d+)?)\s*(nm|um|µm|μm)?\s*[x×]\s*(\d+(?:\.\d+)?)\s*(nm|um|µm|μm)?"
    r"|(\d+(?:\.\d+)?)\s*(nm|um|µm|μm))(?![0-9A-Za-z)]|\.\d)", re.IGNORECASE)


def name_field(name: str) -> tuple[float, float] | None:
    """The scan field (width, height) in nm that a file name states, or None.

    Recognised: ``WxH`` with an optional unit on either number (``100x100``, ``1.5x1.5um``,
    ``20 x 20 nm``), or one length with its unit (``50nm``: a square field); a number without a
    unit is in nm. Only the file's stem is read. A name that states two different fields gives
    None (it is ambiguous), as does one whose numbers are the image's size in pixels (see
    :func:`read_scan`, which checks that).
    """
    found = set()
    for m in _NAME_FIELD.finditer(Path(name).stem):
        if m.group(5) is not None:
            w = h = float(m.group(5)) * _NAME_UNITS[m.group(6).lower()]
        else:
            unit = (m.group(4) or m.group(2) or "nm").lower()
            w = float(m.group(1)) * _NAME_UNITS[(m.group(2) or unit).lower()]
            h = float(m.group(3)) * _NAME_UNITS[unit]
        if w > 0 and h > 0:
            found.add((w, h))
    return found.pop() if len(found) == 1 else None


def pixel_size_error(value: Any, what: str = "pixel size") -> str | None:
    """Why ``value`` (nm per pixel) is not a usable pixel size, or None when it is.

    The reason names the problem: "pixel size is NaN", "... is infinite", "... is negative
    (-0.5 nm/px)", "... is zero", or "... is 2e-05 nm/px, outside the plausible range
    0.0001..10000 nm/px" (:data:`PIXEL_NM_RANGE`). ``what`` is the subject of the sentence.
    """
    why = _positive_number_error(value, what, "nm/px")
    if why:
        return why
    lo, hi = PIXEL_NM_RANGE
    if not lo <= float(value) <= hi:
        return f"{what} is {float(value):.4g} nm/px, outside the plausible range {lo:g}..{hi:g} nm/px"
    return None


def calibration_error(pixel_nm: float | None = None, scan_nm: float | None = None) -> str | None:
    """Why a user-given calibration is unusable, or None when it is fine.

    A pixel size must pass :func:`pixel_size_error`; a scan width must be a finite, positive
    number of nm (the pixel size it gives is range-checked once the image width is known).
    """
    if pixel_nm is not None and scan_nm is not None:
        return "give either a pixel size or a scan width, not both"
    if pixel_nm is not None:
        return pixel_size_error(pixel_nm, "the pixel size")
    if scan_nm is not None:
        return _positive_number_error(scan_nm, "the scan width", "nm")
    return None


def _positive_number_error(value: Any, what: str, unit: str) -> str | None:
    """Why ``value`` is not a finite positive number ("is NaN", "is infinite", ...), or None."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return f"{what} is not a number ({value!r})"
    if math.isnan(v):
        return f"{what} is NaN"
    if math.isinf(v):
        return f"{what} is infinite"
    if v < 0:
        return f"{what} is negative ({v:.4g} {unit})"
    if v == 0:
        return f"{what} is zero"
    return None


def _check_file_pixels(raw: _Raw, spath: str) -> None:
    """Refuse a pixel size (or pixel height) from the file's header that is not usable."""
    for what, value in (("pixel size", raw.pixel_nm), ("pixel height", raw.pixel_y_nm)):
        if value is None:
            continue
        why = pixel_size_error(value, f"the file's {what}")
        if why:
            source = f", from {raw.pixel_source}" if raw.pixel_source else ""
            raise ScanError(spath, f"{why}{source}; give the right pixel size with --pixel-nm or --scan-nm")


def _field_of_name(path: str, shape: tuple[int, int]) -> tuple[float, float] | None:
    """The field its name states for an image of ``shape`` (rows, cols), or None: also when the
    numbers are the image's size in pixels ("scan_512x512.png") or another aspect ratio."""
    named = name_field(path)
    if named is None or (round(named[0]), round(named[1])) in ((shape[1], shape[0]), (shape[0], shape[1])):
        return None
    if abs((named[0] / shape[1]) / (named[1] / shape[0]) - 1.0) > 0.05:
        return None
    return named


def _calibrate(scan: Scan, pixel_nm: float | None, scan_nm: float | None,
               field_from_name: bool = False) -> Scan:
    """``scan`` with the pixel size the caller gave, else the file's (checked in read_scan), else
    (``field_from_name``) the one its name states."""
    meta = dict(scan.meta)
    shape = scan.original_shape or scan.height.shape
    named = _field_of_name(scan.path, shape) if field_from_name else None
    if pixel_nm is not None:
        size, source = float(pixel_nm), "pixel_nm"
    elif scan_nm is not None:
        width = (scan.original_shape or scan.height.shape)[1]
        size, source = float(scan_nm) / width, "scan_nm"
        why = pixel_size_error(size, f"the pixel size from a {scan_nm:g} nm scan width over {width} px")
        if why:
            raise ScanError(scan.path, why)
    elif scan.pixel_nm is not None:
        size, source = scan.pixel_nm, "file"
    elif named is not None:
        size, source = named[0] / shape[1], "file name"
        why = pixel_size_error(size, f"the pixel size from the {named[0]:g} nm field in the file name "
                                     f"over {shape[1]} px")
        if why:
            raise ScanError(scan.path, why + "; give --pixel-nm or --scan-nm")
        meta["field_nm_from_name"] = [named[0], named[1]]
    else:
        size, source = None, None
    meta["pixel_nm_source"] = source
    return dataclasses.replace(scan, pixel_nm=size, meta=meta)


def find_scans(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into a list of scan files.

    Files are returned as given (whatever their extension: :func:`read_scan`
    rejects what it cannot read). Folders are searched recursively for files with
    an extension in :data:`SCAN_EXTENSIONS`; each folder's files come out sorted.
    Hidden files and folders are skipped; Matrix parameter files (``*_0001.mtrx``)
    are never returned from a folder search. Duplicates are dropped.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    seen: set[Path] = set()

    def add(item: Path) -> None:
        if item not in seen:
            seen.add(item)
            out.append(item)

    for entry in paths:
        p = Path(entry)
        if p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in files:
                    if name.startswith("."):
                        continue
                    if Path(name).suffix.lower() in SCAN_EXTENSIONS:
                        found.append(Path(root) / name)
            for item in sorted(found):
                add(item)
        else:
            add(p)
    return out


def require_min_size(scan: Scan, size: int) -> None:
    """Raise :class:`ScanError` when the image cannot hold one ``size`` x ``size`` patch."""
    rows, cols = scan.height.shape[:2]
    if rows < size or cols < size:
        raise ScanError(scan.path, f"image {rows}x{cols} is smaller than one {size}x{size} patch")


def save_gwy(
    path: str | os.PathLike,
    height: np.ndarray,
    pixel_nm: float | None,
    unit: str = "nm",
    meta: dict | None = None,
) -> None:
    """Write ``height`` as a Gwyddion ``.gwy`` file that :func:`read_scan` reads back.

    Heights in nm are stored in metres (SI units, as Gwyddion expects) with the
    lateral size taken from ``pixel_nm``; ``unit="a.u."`` stores raw values with no
    unit. Without a pixel size the lateral unit is left empty (one unit per pixel).
    ``meta`` goes into the channel's metadata container as strings (non-strings
    JSON-encoded).
    """
    from gwyfile.objects import GwyContainer, GwyDataField, GwySIUnit

    arr = np.asarray(height, dtype=np.float64)
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"height must be a non-empty 2-D array, got shape {arr.shape}")
    if unit not in ("nm", "a.u."):
        raise ValueError(f"unit must be 'nm' or 'a.u.', got {unit!r}")
    rows, cols = arr.shape
    if unit == "nm":
        data, z_unit = arr * 1e-9, "m"
    else:
        data, z_unit = arr, ""
    if pixel_nm is not None:
        pixel = float(pixel_nm)
        if not (math.isfinite(pixel) and pixel > 0):
            raise ValueError(f"pixel_nm must be a positive number, got {pixel_nm!r}")
        xreal, yreal, xy_unit = cols * pixel * 1e-9, rows * pixel * 1e-9, "m"
    else:
        xreal, yreal, xy_unit = float(cols), float(rows), ""

    field_ = GwyDataField(
        np.ascontiguousarray(data),
        xreal=xreal,
        yreal=yreal,
        si_unit_xy=GwySIUnit(unitstr=xy_unit),
        si_unit_z=GwySIUnit(unitstr=z_unit),
    )
    container = GwyContainer()
    container["/0/data"] = field_
    container["/0/data/title"] = "Topography"
    container.typecodes["/0/data/title"] = "s"
    if meta:
        meta_container = GwyContainer()
        for key, value in meta.items():
            text = value if isinstance(value, str) else json.dumps(jsonable(value, 64))
            meta_container[str(key)] = text
            meta_container.typecodes[str(key)] = "s"
        container["/0/meta"] = meta_container
    container.tofile(os.fspath(path))


# ---------------------------------------------------------------------------
# shared post-processing
# ---------------------------------------------------------------------------


def _finalise(raw: _Raw, spath: str) -> Scan:
    arr = np.asarray(raw.data)
    if arr.ndim != 2:
        raise ScanError(spath, f"expected a 2-D image, got an array of shape {arr.shape}")
    if 0 in arr.shape:
        raise ScanError(spath, f"image has no pixels (shape {arr.shape})")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ScanError(spath, f"unsupported pixel data type {arr.dtype} (expected numbers)")

    with np.errstate(invalid="ignore", over="ignore"):  # odd dtypes of corrupt files; checked below
        z = arr.astype(np.float64)  # always a copy
    nan = np.isnan(z)
    invalid = nan | np.isinf(z)
    if invalid.all():
        what = "NaN" if nan.all() else ("infinite" if not nan.any() else "NaN or infinite")
        raise ScanError(spath, f"no valid height values: every pixel is {what}")

    # Crop lines that were never scanned: whole rows, then whole columns, of NaN at the edges.
    # (Readers turn a format's own "not scanned" fill into NaN; real zeros are data.)
    good_rows = np.flatnonzero(~nan.all(axis=1))
    r0, r1 = int(good_rows[0]), int(good_rows[-1]) + 1
    good_cols = np.flatnonzero(~nan[r0:r1].all(axis=0))
    c0, c1 = int(good_cols[0]), int(good_cols[-1]) + 1
    z, invalid = z[r0:r1, c0:c1], invalid[r0:r1, c0:c1]
    n_nan = int(invalid.sum())
    if raw.overlay is not None and raw.overlay.any():
        invalid = invalid | raw.overlay[r0:r1, c0:c1]

    meta = dict(raw.meta)
    n_invalid = int(invalid.sum())
    fraction = n_nan / z.size
    if fraction > 0.5:
        raise ScanError(
            spath, f"{fraction:.0%} of the pixels inside the scanned area are missing (NaN) or infinite"
        )
    if raw.to_nm is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            z *= raw.to_nm
        if not np.isfinite(z[~invalid]).all():
            raise ScanError(spath, "height values are too large to convert to nm (corrupt data?)")
    if n_invalid:
        z[invalid] = np.median(z[~invalid])
    meta["nan_filled_fraction"] = float(n_nan / z.size)  # NaN or infinite pixels filled with the median
    if raw.overlay is not None:
        meta["overlay_fraction"] = float((n_invalid - n_nan) / z.size)  # burned-in annotations, filled too

    with np.errstate(over="ignore"):
        height = z.astype(np.float32)
    if not np.isfinite(height).all():
        raise ScanError(spath, "height values are too large for 32-bit floats")
    if float(height.max()) == float(height.min()):
        raise ScanError(
            spath, f"constant image: every pixel is {float(height.flat[0]):g} (no height variation)"
        )

    full_shape = raw.full_shape if raw.full_shape is not None else arr.shape
    origin = (int(raw.origin[0]) + r0, int(raw.origin[1]) + c0)
    return Scan(
        height=height,
        pixel_nm=None if raw.pixel_nm is None else float(raw.pixel_nm),
        unit="nm" if raw.to_nm is not None else "a.u.",
        channel=raw.channel,
        direction=raw.direction,
        path=spath,
        format=raw.format,
        origin=origin,
        original_shape=(int(full_shape[0]), int(full_shape[1])),
        meta=jsonable(meta, 64),
        missing=invalid if n_invalid else None,
    )


# ---------------------------------------------------------------------------
# format readers: (path, horizontal or None, vertical or None) -> _Raw
# ---------------------------------------------------------------------------


def _read_matrix(p: Path, hdir: str | None, vdir: str | None) -> _Raw:
    import access2thematrix

    name = p.name
    if "--" not in name:
        raise ScanError(
            p,
            "cannot locate the Matrix parameter file: data file names look like <name>--<run>_<cycle>.Z_mtrx",
        )
    param = p.with_name(name[: name.rfind("--")] + "_0001.mtrx")
    if not param.is_file():
        raise ScanError(
            p,
            f"Matrix parameter file {param.name} is missing; it must sit in the same folder as the data file",
        )
    want = f"{hdir or 'forward'}/{vdir or 'up'}"

    _check_matrix_blocks(p)
    mtrx = access2thematrix.MtrxData()
    traces, message = mtrx.open(os.fspath(p))
    available = [str(t) for t in dict(traces).values()]
    if not available or mtrx.axis is None:
        reason = str(message).strip().rstrip(".") or "no image data"
        raise ScanError(p, f"cannot read Matrix image ({reason}; corrupt or truncated file?)")
    _check_matrix_count(p, mtrx)
    if want not in available:
        raise ScanError(
            p, f"direction {want} was not recorded in this file (available: {', '.join(available)})"
        )
    image, _ = mtrx.select_image(want)
    data = np.asarray(image.data)

    channel, unit = (list(image.channel_name_and_unit) + ["", ""])[:2]
    to_nm = _length_factor(unit)
    rows, cols = data.shape
    # axis[2] = [x retrace, y retrace, nominal lines, recorded lines (up + down)]
    nominal_lines = int(mtrx.axis[2][2])
    recorded_lines = int(mtrx.axis[2][3])
    if want.endswith("/down"):
        origin = (max(2 * nominal_lines - recorded_lines, 0), 0)
    else:
        origin = (0, 0)
    full_shape = (max(nominal_lines, origin[0] + rows), cols)

    width_m = float(image.width)
    height_m = float(mtrx.axis[1][1])
    # The XY scanner sizes are in metres whatever the channel's unit.
    pixel_nm = width_m * 1e9 / cols
    pixel_y_nm = height_m * 1e9 / nominal_lines if nominal_lines > 0 else math.nan

    params = mtrx.param
    meta: dict[str, Any] = {
        "width_nm": width_m * 1e9,
        "height_nm": height_m * 1e9,
        "pixel_x_nm": pixel_nm,
        "pixel_y_nm": pixel_y_nm,
        "scan_angle_deg": getattr(image, "angle", None),
        "x_offset_nm": float(image.x_offset) * 1e9,
        "y_offset_nm": float(image.y_offset) * 1e9,
        "recorded_lines": recorded_lines,
        "nominal_lines": nominal_lines,
        "z_unit": unit,
        "sample_name": getattr(mtrx, "sample_name", ""),
        "data_set_name": getattr(mtrx, "data_set_name", ""),
        "comment": getattr(mtrx, "creation_comment", ""),
        "parameter_file": param.name,
        "available_directions": available,
    }
    for key, label in (
        ("EEPA::GapVoltageControl.Voltage", "bias"),
        ("EEPA::Regulator.Setpoint_1", "setpoint"),
        ("EEPA::XYScanner.Raster_Time", "raster_time"),
    ):
        if key in params:
            value = params[key]
            meta[label] = value[0] if isinstance(value, (list, tuple)) else value
            if isinstance(value, (list, tuple)) and len(value) > 1:
                meta[f"{label}_unit"] = value[1]
    if params.get("BKLT"):
        meta["date"] = str(params["BKLT"])  # data file time stamp, as access2thematrix formats it
    stamp = re.search(r"(\d{4}[A-Za-z]{3}\d{2}-\d{6})", name)
    if stamp:
        meta["name_stamp"] = stamp.group(1)
    return _Raw(
        data=data,
        to_nm=to_nm,
        pixel_nm=pixel_nm,
        channel=str(channel or "Z"),
        direction=want,
        format="matrix",
        meta=meta,
        origin=origin,
        full_shape=full_shape,
        pixel_y_nm=pixel_y_nm,
        pixel_source="the parameter file's XYScanner.Width/Height over Points/Lines",
    )


_MATRIX_MAGIC = b"ONTMATRX0101"


def _check_matrix_blocks(p: Path) -> None:
    """The data file is the 12-byte magic and one TLKB block that ends exactly at the end of file.

    A Matrix result data file holds one bricklet; access2thematrix reads only the first block,
    so bytes after it (or a block longer than the file) mean a corrupt or concatenated file.
    """
    with open(p, "rb") as f:
        head = f.read(20)
        size = os.fstat(f.fileno()).st_size
    if len(head) < 20 or head[:12] != _MATRIX_MAGIC or head[12:16] != b"TLKB":
        raise ScanError(p, "not a Matrix data file (no ONTMATRX0101 / TLKB header)")
    (length,) = struct.unpack("<L", head[16:20])
    expected = 12 + 8 + 8 + length  # magic, block id + length, time stamp, content
    if size != expected:
        problem = "truncated" if size < expected else "has trailing bytes"
        raise ScanError(
            p, f"Matrix data file {problem}: its data block ends at byte {expected}, the file has {size} bytes"
        )


def _check_matrix_count(p: Path, mtrx: Any) -> None:
    """Refuse more data values than the parameter file's raster holds (fewer: an aborted scan)."""
    params = mtrx.param
    points = int(params["EEPA::XYScanner.Points"][0])
    lines = int(params["EEPA::XYScanner.Lines"][0])
    x_retrace = bool(params["EEPA::XYScanner.X_Retrace"][0])
    y_retrace = bool(params["EEPA::XYScanner.Y_Retrace"][0])
    if points <= 0 or lines <= 0:
        raise ScanError(p, f"the parameter file gives a {lines}x{points} raster (XYScanner.Lines x Points)")
    full = points * (1 + x_retrace) * lines * (1 + y_retrace)
    count = int(mtrx.data_item_count)
    if count > full:
        raise ScanError(
            p,
            f"data block holds {count} values, more than the {full} of the parameter file's raster "
            f"({lines} lines x {points} points x {(1 + x_retrace) * (1 + y_retrace)} traces)",
        )


@functools.lru_cache(maxsize=1)
def _nanonis_scan_class() -> type:
    import nanonispy2.read

    class _SxmScan(nanonispy2.read.Scan):
        """nanonispy2's Scan, with the data block split by each channel's recorded directions.

        nanonispy2 assumes every channel holds forward and backward images; Nanonis
        can record a channel in one direction only ("forward" or "backward").
        """

        def _load_data(self) -> dict:
            info = self.header["data_info"]
            names = list(info["Name"])
            dirs = [str(d).strip().lower() for d in info.get("Direction", ["both"] * len(names))]
            unknown = sorted({d for d in dirs if d not in ("both", "forward", "backward")})
            if unknown:
                raise ScanError(self.fname, f"DATA_INFO gives unknown direction(s) {', '.join(unknown)}")
            pixels = [int(v) for v in self.header["scan_pixels"]]
            if len(pixels) != 2 or min(pixels) <= 0:
                raise ScanError(self.fname, f"SCAN_PIXELS must be two positive numbers, not {pixels}")
            nx, ny = pixels
            n_images = sum(2 if d == "both" else 1 for d in dirs)
            needed = n_images * nx * ny
            # nanonispy2's byte_offset is 4 bytes past the end of the :SCANIT_END: line
            start = _sxm_data_start(self.fname, self.byte_offset - 4)
            itemsize = np.dtype(self.data_format).itemsize
            found, want = os.path.getsize(self.fname) - start, needed * itemsize
            layout = f"{n_images} images of SCAN_PIXELS {nx}x{ny}, {itemsize}-byte values"
            if found < want:
                raise ScanError(self.fname, f"truncated .sxm file: its data block has {found} bytes, "
                                            f"the header needs {want} ({layout})")
            if found > want:
                raise ScanError(self.fname, f"data block has {found} bytes, more than the {want} the "
                                            f"header gives ({layout}); edited SCAN_PIXELS or DATA_INFO?")
            with open(self.fname, "rb") as f:
                f.seek(start)
                values = np.fromfile(f, dtype=self.data_format, count=needed)
            if values.size != needed:  # the file changed under us
                raise ScanError(self.fname, f"data block holds {values.size} values, header needs {needed}")
            images = values.reshape(n_images, ny, nx)
            signals: dict = {}
            k = 0
            for name, d in zip(names, dirs):
                if d == "both":
                    signals[name] = {"forward": images[k], "backward": images[k + 1]}
                    k += 2
                else:
                    signals[name] = {"backward" if d.startswith("back") else "forward": images[k]}
                    k += 1
            return signals

    return _SxmScan


def _sxm_data_start(fname: str, header_end: int) -> int:
    """Byte offset of the data block: just after the \\x1a\\x04 that follows ``:SCANIT_END:``.

    ``header_end`` is where nanonispy2 found the end of the ``:SCANIT_END:`` line.
    """
    with open(fname, "rb") as f:
        head = f.read(header_end + 64)
    end = head.rfind(b":SCANIT_END:", 0, header_end)
    marker = head.find(b"\x1a\x04", end, end + 64) if end >= 0 else -1
    if marker < 0:
        raise ScanError(fname, "no \\x1a\\x04 data marker after :SCANIT_END: (truncated or corrupt header)")
    return marker + 2


def _read_nanonis(p: Path, hdir: str | None, vdir: str | None, channel: str | None = None) -> _Raw:
    if p.suffix != ".sxm":
        raise ScanError(p, "nanonispy2 reads Nanonis files only with a lower-case .sxm extension")
    scan = _nanonis_scan_class()(os.fspath(p))
    header = scan.header
    want = hdir or "forward"

    names = list(scan.signals)
    if channel is not None:
        z_name = next((n for n in names if n.strip().lower() == channel.strip().lower()), None)
        if z_name is None:
            raise ScanError(p, f"no channel {channel!r} in this file (channels: {', '.join(names)})")
    else:
        z_name = next((n for n in names if n.strip().lower() == "z"), None)
        if z_name is None:
            z_name = next((n for n in names if "topo" in n.lower() or "height" in n.lower()), None)
    if z_name is None:
        raise ScanError(p, f"no Z (topography) channel in this file (channels: {', '.join(names)}); "
                           "choose one with --channel")
    images = scan.signals[z_name]
    if want not in images:
        raise ScanError(
            p, f"the {z_name} channel was not recorded in the {want} direction (available: {', '.join(images)})"
        )
    data = np.asarray(images[want], dtype=np.float64)
    if want == "backward":
        # Nanonis stores backward lines in acquisition order (right to left);
        # nanonispy2 does not reverse them, so flip to match the forward image.
        data = data[:, ::-1]

    info = header.get("data_info", {})
    unit = ""
    try:
        unit = str(list(info["Unit"])[list(info["Name"]).index(z_name)])
    except (KeyError, ValueError, IndexError):
        pass
    to_nm = _length_factor(unit)

    nx, ny = (int(v) for v in header["scan_pixels"])
    range_m = [float(v) for v in np.atleast_1d(header.get("scan_range", []))]
    if len(range_m) != 2:
        raise ScanError(p, f"SCAN_RANGE must give a width and a height in m, not {range_m}")
    pixel_nm = range_m[0] * 1e9 / nx
    pixel_y_nm = range_m[1] * 1e9 / ny

    meta: dict[str, Any] = {
        "scan_range_nm": [v * 1e9 for v in range_m],
        "scan_pixels": [nx, ny],
        "pixel_x_nm": pixel_nm,
        "pixel_y_nm": pixel_y_nm,
        "scan_offset_nm": [float(v) * 1e9 for v in header.get("scan_offset", [])],
        "scan_angle_deg": _to_float(header.get("scan_angle")),
        "scan_dir": header.get("scan_dir"),
        "bias_V": _to_float(header.get("bias")),
        "setpoint": _to_float(header.get("z-controller>setpoint")),
        "setpoint_unit": header.get("z-controller>setpoint unit"),
        "date": header.get("rec_date"),
        "time": header.get("rec_time"),
        "temperature_K": _to_float(header.get("rec_temp")),
        "acquisition_time_s": _to_float(header.get("acq_time")),
        "comment": header.get("comment"),
        "z_unit": unit,
        "channels": names,
    }
    return _Raw(
        data=data,
        to_nm=to_nm,
        pixel_nm=pixel_nm,
        channel=z_name,
        direction=want,
        format="nanonis",
        meta=meta,
        pixel_y_nm=pixel_y_nm,
        pixel_source="the header's SCAN_RANGE over SCAN_PIXELS",
    )


@functools.lru_cache(maxsize=1)
def _rhk_module() -> Any:
    spec = importlib.util.find_spec("spym")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("spym is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "io" / "rhksm4" / "_sm4.py"
        if candidate.is_file():
            module_spec = importlib.util.spec_from_file_location("_stm_defects_rhksm4", candidate)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            _bound_rhk_lists(module)
            return module
    raise ImportError("spym does not contain io/rhksm4/_sm4.py")


_RHK_MAX_OBJECTS = 256  # real files list 1 to about 30 objects per header
_RHK_PAGE_ENTRY_BYTES = 32  # a page index entry: 16-byte page id and four uint32 fields


def _bound_rhk_lists(module: Any) -> None:
    """Make this private copy of the RHK reader refuse absurd list lengths before looping.

    The reader reads object lists and the page index one small record at a time until the
    count in the header is reached; a corrupt count makes it crawl through the whole file
    (seconds per megabyte) before it fails. Object lists are capped at `_RHK_MAX_OBJECTS`
    entries, and the page count at what the file could hold.
    """
    read_object_list = module.RHKObjectContainer._read_object_list

    def bounded_object_list(self, sm4):
        count = int(self._object_list_count)
        if count > _RHK_MAX_OBJECTS:
            raise ValueError(f"a header lists {count} objects (corrupt header)")
        return read_object_list(self, sm4)

    index_init = module.RHKPageIndexHeader.__init__

    def bounded_page_index(self, sm4):
        index_init(self, sm4)
        size = os.fstat(sm4._file.fileno()).st_size
        if int(self.page_count) * _RHK_PAGE_ENTRY_BYTES > size:
            raise ValueError(f"the page index lists {int(self.page_count)} pages, more than a "
                             f"{size}-byte file can hold (corrupt header)")

    module.RHKObjectContainer._read_object_list = bounded_object_list
    module.RHKPageIndexHeader.__init__ = bounded_page_index


def _read_rhk(p: Path, hdir: str | None, vdir: str | None) -> _Raw:
    try:
        sm4 = _rhk_module()
    except ImportError as exc:
        raise ScanError(p, f"reading RHK .sm4 files needs the spym package ({exc})") from exc
    # RHKsm4.__init__ opens the file and only closes it on success: build the
    # object in two steps so the file is closed when parsing fails.
    reader = sm4.RHKsm4.__new__(sm4.RHKsm4)
    try:
        reader.__init__(os.fspath(p))
    finally:
        handle = getattr(reader, "_file", None)
        if handle is not None:
            handle.close()
    pages = list(reader)
    want = hdir or "forward"

    def page_direction(page: Any) -> str:
        scan_type = str(page.attrs.get("RHK_ScanTypeName", ""))
        if scan_type.endswith(("LEFT", "UP")):
            return "backward"
        return "forward"

    images = [pg for pg in pages if int(pg.attrs.get("RHK_PageDataType", -1)) == 0]
    if not images:
        raise ScanError(p, "no image pages in this file")
    topo = [
        pg
        for pg in images
        if "TOPOGRAPHIC" in str(pg.attrs.get("RHK_PageTypeName", "")).upper()
        or "topograph" in str(pg.attrs.get("RHK_Label", "")).lower()
    ]
    if not topo:
        labels = sorted({str(pg.label) for pg in images})
        raise ScanError(p, f"no Topography page in this file (image pages: {', '.join(labels)})")
    chosen = [pg for pg in topo if page_direction(pg) == want]
    if not chosen:
        have = sorted({page_direction(pg) for pg in topo})
        raise ScanError(p, f"no {want} Topography page (available: {', '.join(have)})")
    page = chosen[0]
    attrs = page.attrs

    counts = _rhk_image(p, page).astype(np.float64)
    rows = counts.shape[0]
    completed = int(attrs.get("RHK_CompletedLineCount", rows) or 0)
    if 0 < completed < rows:
        # Lines never scanned are stored as zero counts at one end of the image (which end
        # depends on the scan direction); mark them before scaling (the z offset would turn
        # them into a constant height). Zero rows elsewhere are data and stay.
        unscanned = rows - completed
        zero_rows = np.all(counts == 0, axis=1)
        ends = np.zeros(rows, dtype=bool)
        ends[:unscanned] = ends[rows - unscanned:] = True
        counts[zero_rows & ends] = np.nan
    zscale, zoffset = float(attrs["RHK_Zscale"]), float(attrs["RHK_Zoffset"])
    if not (math.isfinite(zscale) and math.isfinite(zoffset) and zscale != 0):
        raise ScanError(p, f"unusable height scale in the page header (RHK_Zscale {zscale:g}, "
                           f"RHK_Zoffset {zoffset:g})")
    data = counts * zscale + zoffset
    z_unit = str(attrs.get("RHK_Zunits", ""))
    to_nm = _length_factor(z_unit)
    xy_factor = _length_factor(str(attrs.get("RHK_Xunits", "")))
    pixel_nm = pixel_y_nm = None
    if xy_factor is not None:
        pixel_nm = abs(float(attrs["RHK_Xscale"])) * xy_factor
        pixel_y_nm = abs(float(attrs["RHK_Yscale"])) * xy_factor
    rows, cols = data.shape
    meta: dict[str, Any] = {
        "page_label": str(page.label),
        "scan_type": str(attrs.get("RHK_ScanTypeName", "")),
        "pixel_x_nm": pixel_nm,
        "pixel_y_nm": pixel_y_nm,
        "width_nm": None if pixel_nm is None else pixel_nm * cols,
        "height_nm": None if pixel_y_nm is None else pixel_y_nm * rows,
        "bias_V": _to_float(attrs.get("RHK_Bias")),
        "setpoint_A": _to_float(attrs.get("RHK_Current")),
        "date": attrs.get("RHK_DateTime") or attrs.get("RHK_Date"),
        "completed_lines": completed,
        "z_unit": z_unit,
        "scan_angle_deg": _to_float(attrs.get("RHK_Angle")),
        "x_offset_nm": _scaled(attrs.get("RHK_Xoffset"), xy_factor),
        "y_offset_nm": _scaled(attrs.get("RHK_Yoffset"), xy_factor),
    }
    return _Raw(
        data=data,
        to_nm=to_nm,
        pixel_nm=pixel_nm,
        channel=str(attrs.get("RHK_Label", "Topography")),
        direction=want,
        format="rhk",
        meta=meta,
        pixel_y_nm=pixel_y_nm,
        pixel_source="the page's RHK_Xscale / RHK_Yscale",
    )


def _rhk_image(p: Path, page: Any) -> np.ndarray:
    """The page's image as (RHK_Ysize lines, RHK_Xsize points), after checking its data size.

    The page header's data size must equal Xsize * Ysize 4-byte values exactly. RHK writes
    Ysize lines of Xsize points (Gwyddion's reader takes them so); spym reshapes the values to
    (Xsize, Ysize), which is that shape only for square images. For other shapes the values are
    taken back to file order (undoing spym's flips for the scale signs), reshaped to
    (Ysize, Xsize) and flipped the same way again.
    """
    attrs = page.attrs
    xsize, ysize = int(attrs["RHK_Xsize"]), int(attrs["RHK_Ysize"])
    if xsize <= 0 or ysize <= 0:
        raise ScanError(p, f"Topography page gives a {ysize}x{xsize} image (RHK_Ysize x RHK_Xsize)")
    declared = int(getattr(page, "_page_data_size", 4 * xsize * ysize))
    if declared != 4 * xsize * ysize:
        raise ScanError(
            p,
            f"Topography page holds {declared} bytes of data, its header's RHK_Xsize x RHK_Ysize "
            f"({xsize}x{ysize}) needs {4 * xsize * ysize}",
        )
    data = np.asarray(page.data)
    if data.size != xsize * ysize:
        raise ScanError(p, f"Topography page has {data.size} values, {xsize}x{ysize} expected (truncated?)")
    flip_x = float(attrs["RHK_Xscale"]) < 0
    flip_y = float(attrs["RHK_Yscale"]) > 0
    if xsize != ysize:
        if flip_x:
            data = data[:, ::-1]
        if flip_y:
            data = data[::-1, :]
        data = np.ascontiguousarray(data).reshape(ysize, xsize)
        if flip_x:
            data = data[:, ::-1]
        if flip_y:
            data = data[::-1, :]
    return data


_HEIGHT_TITLE = re.compile(r"\bz\b|height|topo", re.IGNORECASE)
_BACKWARD_TITLE = re.compile(r"backward|\bbwd\b|retrace|\bbw\b|\bback\b|\[<-\]|<-", re.IGNORECASE)


def _read_gwyddion(p: Path, hdir: str | None, vdir: str | None, channel: str | None = None) -> _Raw:
    from gwyfile.objects import GwyObject

    buf = p.read_bytes()
    if buf[:4] != b"GWYP":
        raise ScanError(p, "not a Gwyddion .gwy file (no GWYP header)")
    try:
        _check_gwy_structure(buf)
    except ValueError as exc:
        raise ScanError(p, f"corrupt or truncated Gwyddion .gwy file ({exc})") from None
    obj = GwyObject.frombuffer(buf[4:])
    if not isinstance(obj, dict):
        raise TypeError("top-level object is not a container")
    channels = []
    for key, value in obj.items():
        m = re.fullmatch(r"/(\d+)/data", str(key))
        if m and getattr(value, "name", "") == "GwyDataField":
            number = int(m.group(1))
            title = obj.get(f"/{number}/data/title", f"channel {number}")
            channels.append((number, str(title), value))
    if not channels:
        raise ScanError(p, "no data channel (GwyDataField) in this Gwyddion file")
    channels.sort(key=lambda c: c[0])
    if channel is not None:
        named = [c for c in channels if c[1].strip().lower() == channel.strip().lower()]
        if not named:
            raise ScanError(p, f"no channel {channel!r} in this file (titles: {', '.join(c[1] for c in channels)})")
        channels = named
    heightish = [c for c in channels if _HEIGHT_TITLE.search(c[1])] or channels
    backward = [c for c in heightish if _BACKWARD_TITLE.search(c[1])]
    forward = [c for c in heightish if not _BACKWARD_TITLE.search(c[1])]
    if hdir == "backward":
        if not backward:
            raise ScanError(
                p, "no backward channel in this file (titles: " + ", ".join(c[1] for c in channels) + ")"
            )
        number, title, datafield = backward[0]
    else:
        number, title, datafield = (forward or heightish)[0]
    direction = "backward" if _BACKWARD_TITLE.search(title) else "forward"

    xres, yres = datafield.get("xres"), datafield.get("yres")
    values = datafield.get("data")
    if not (isinstance(xres, int) and isinstance(yres, int) and xres > 0 and yres > 0):
        raise ScanError(p, f"data field {title!r} has no valid size (xres {xres!r}, yres {yres!r})")
    n_values = -1 if values is None else int(np.size(values))
    if n_values != xres * yres:
        raise ScanError(
            p, f"data field {title!r} holds {max(n_values, 0)} values, its header's xres x yres "
               f"({xres}x{yres}) needs {xres * yres}"
        )
    data = np.asarray(values, dtype=np.float64).reshape(yres, xres)
    z_unit = _unitstr(datafield.get("si_unit_z"))
    xy_unit = _unitstr(datafield.get("si_unit_xy"))
    to_nm = _length_factor(z_unit)
    xy_factor = _length_factor(xy_unit)
    rows, cols = data.shape
    # Gwyddion's defaults when a field leaves its physical size out
    xreal = float(datafield.get("xreal", 1.0))
    yreal = float(datafield.get("yreal", 1.0))
    pixel_nm = pixel_y_nm = None
    if xy_factor is not None:
        pixel_nm = xreal * xy_factor / cols
        pixel_y_nm = yreal * xy_factor / rows
    meta: dict[str, Any] = {}
    stored = obj.get(f"/{number}/meta")
    if isinstance(stored, dict):
        for key, value in stored.items():
            meta[str(key)] = value
    meta.update(
        {
            "title": title,
            "channel_number": number,
            "z_unit": z_unit,
            "xy_unit": xy_unit,
            "pixel_x_nm": pixel_nm,
            "pixel_y_nm": pixel_y_nm,
            "width_nm": None if xy_factor is None else xreal * xy_factor,
            "height_nm": None if xy_factor is None else yreal * xy_factor,
        }
    )
    return _Raw(
        data=data,
        to_nm=to_nm,
        pixel_nm=pixel_nm,
        channel=title,
        direction=direction,
        format="gwyddion",
        meta=meta,
        pixel_y_nm=pixel_y_nm,
        pixel_source="the data field's xreal/yreal over xres/yres",
    )


# GWY serialisation: an object is a NUL-terminated type name, a uint32 byte size and that many
# bytes of components; a component is a NUL-terminated name, a one-character type and its data.
_GWY_FIXED = {"b": 1, "c": 1, "i": 4, "q": 8, "d": 8}
_GWY_ARRAY = {"C": 1, "I": 4, "Q": 8, "D": 8}
_GWY_MAX_DEPTH = 32


def _check_gwy_structure(buf: bytes) -> None:
    """Walk a whole .gwy file and raise ValueError where a size or terminator is out of bounds.

    gwyfile trusts the sizes it reads: on a cut string or a garbage array count it loops for
    ever or reads past the data. After this check every object, component, string and array
    lies inside its parent, and the top-level object ends exactly at the end of the file.
    """
    end = _gwy_object_end(buf, 4, len(buf), 0)
    if end != len(buf):
        raise ValueError(f"{len(buf) - end} bytes after the top-level object")


def _gwy_object_end(buf: bytes, pos: int, limit: int, depth: int) -> int:
    if depth > _GWY_MAX_DEPTH:
        raise ValueError(f"objects nested more than {_GWY_MAX_DEPTH} deep")
    nul = buf.find(b"\0", pos, limit)
    if nul < 0 or nul + 5 > limit:
        raise ValueError(f"object at byte {pos} is cut off")
    (size,) = struct.unpack_from("<I", buf, nul + 1)
    start, end = nul + 5, nul + 5 + size
    if end > limit:
        raise ValueError(f"object at byte {pos} claims {size} bytes, {limit - start} are left")
    q = start
    while q < end:
        q = _gwy_component_end(buf, q, end, depth)
    return end


def _gwy_component_end(buf: bytes, pos: int, limit: int, depth: int) -> int:
    nul = buf.find(b"\0", pos, limit)
    if nul < 0 or nul + 2 > limit:
        raise ValueError(f"component at byte {pos} is cut off")
    kind = chr(buf[nul + 1])
    q = nul + 2
    if kind in _GWY_FIXED:
        q += _GWY_FIXED[kind]
    elif kind == "s":
        q = buf.find(b"\0", q, limit) + 1
        if q == 0:
            raise ValueError(f"string at byte {pos} is not terminated")
    elif kind == "o":
        q = _gwy_object_end(buf, q, limit, depth + 1)
    elif kind in _GWY_ARRAY or kind in ("S", "O"):
        if q + 4 > limit:
            raise ValueError(f"array at byte {pos} is cut off")
        (count,) = struct.unpack_from("<I", buf, q)
        q += 4
        if kind in _GWY_ARRAY:
            q += count * _GWY_ARRAY[kind]
        elif count > limit - q:  # every string or object takes at least one byte
            raise ValueError(f"array at byte {pos} claims {count} items, {limit - q} bytes are left")
        elif kind == "S":
            for _ in range(count):
                q = buf.find(b"\0", q, limit) + 1
                if q == 0:
                    raise ValueError(f"string array at byte {pos} is cut off")
        else:
            for _ in range(count):
                q = _gwy_object_end(buf, q, limit, depth + 1)
    else:
        raise ValueError(f"unknown component type {kind!r} at byte {nul + 1}")
    if q > limit:
        raise ValueError(f"component at byte {pos} runs past the end of its object")
    return q


def _not_a_text_dat(p: Path, raw: bytes) -> None:
    """`.dat` is read as SPIEPy's binary image; a file that starts with text is another kind of
    .dat (Createc's begins with ``[Parameter]``): say which, instead of reading its text as a
    header of absurd dimensions."""
    head = raw[:64]
    if head.startswith(b"[Parameter]") or head.lstrip().startswith(b"[Param"):
        raise ScanError(p, "a Createc .dat file (text header [Parameter]), which is not read yet; "
                           "export the scan from Createc or Gwyddion as .gwy or .sxm")
    if len(head) >= 8 and all(32 <= c < 127 or c in (9, 10, 13) for c in head[:8]):
        text = head[:32].decode("ascii", "replace").splitlines()[0]
        raise ScanError(p, f"starts with text ({text!r}), so it is not a SPIEPy binary .dat image; "
                           "export the scan as .gwy, .sxm or .npy")


def _read_spiepy(p: Path, hdir: str | None, vdir: str | None) -> _Raw:
    _single_image_only(p, hdir, "SPIEPy .dat")
    raw = p.read_bytes()
    _not_a_text_dat(p, raw)
    if len(raw) < 8:
        raise ScanError(p, f"truncated SPIEPy .dat file: {len(raw)} bytes, less than its 8-byte header")
    rows, cols = struct.unpack("<II", raw[:8])
    if rows == 0 or cols == 0:
        raise ScanError(p, f"SPIEPy .dat header gives an empty {rows}x{cols} image")
    expected = 8 + 8 * rows * cols
    if len(raw) < expected:
        raise ScanError(
            p,
            f"truncated SPIEPy .dat file: header says {rows}x{cols} float64 values "
            f"({expected} bytes) but the file has {len(raw)} bytes",
        )
    if len(raw) > expected:
        raise ScanError(
            p,
            f"file size {len(raw)} bytes does not match the SPIEPy .dat header "
            f"({rows}x{cols} -> {expected} bytes); not a SPIEPy image file?",
        )
    data = np.frombuffer(raw, dtype="<f8", offset=8).reshape(rows, cols)
    return _Raw(
        data=data,
        to_nm=1e9,  # SPIEPy stores heights in metres
        pixel_nm=None,
        channel="Z",
        direction="forward",
        format="spiepy",
        meta={"header_shape": [rows, cols]},
    )


def _read_npy(p: Path, hdir: str | None, vdir: str | None) -> _Raw:
    from numpy.lib import format as npy_format

    _single_image_only(p, hdir, ".npy")
    with open(p, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise ScanError(p, "not a NumPy .npy file (no NumPy header)")
        f.seek(0)
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(f)
        else:  # 2.0 and 3.0 share the header layout
            shape, _, dtype = npy_format.read_array_header_2_0(f)
        start = f.tell()
        size = os.fstat(f.fileno()).st_size
    if dtype.hasobject:
        raise ScanError(p, "the .npy file holds Python objects, not a numeric image")
    want = math.prod(shape) * dtype.itemsize
    if size - start != want:
        problem = "truncated .npy file" if size - start < want else "trailing bytes in the .npy file"
        raise ScanError(p, f"{problem}: its header gives a {'x'.join(map(str, shape)) or 'scalar'} "
                           f"{dtype} array ({want} bytes), the data part has {size - start} bytes")
    data = np.load(p, allow_pickle=False)
    return _Raw(
        data=data,
        to_nm=None,
        pixel_nm=None,
        channel="image",
        direction="forward",
        format="npy",
        meta={"dtype": str(data.dtype)},
    )


def _read_tiff(p: Path, hdir: str | None, vdir: str | None) -> _Raw:
    import tifffile

    _single_image_only(p, hdir, "TIFF")
    # tifffile logs a warning per bad tag of a corrupt file; the ScanError says it in one line
    log = logging.getLogger("tifffile")
    was_disabled, log.disabled = log.disabled, True
    try:
        data = np.asarray(tifffile.imread(os.fspath(p)))
    finally:
        log.disabled = was_disabled
    meta = {"dtype": str(data.dtype), "stored_shape": list(data.shape)}
    while data.ndim > 2 and data.shape[0] == 1:
        data = data[0]
    if data.ndim == 3 and data.shape[-1] in (3, 4):
        data = _luminance(data[..., :3])
        meta["converted"] = "RGB to luminance"
    elif data.ndim == 3 and data.shape[-1] == 2:  # grey + alpha
        data = data[..., 0]
    eight_bit = meta["dtype"] == "uint8"     # an exported picture, which may carry a scale bar
    return _Raw(
        data=data, to_nm=None, pixel_nm=None, channel="image", direction="forward", format="tiff", meta=meta,
        overlay=_overlays(data) if eight_bit and data.ndim == 2 else None,
    )


def _read_png(p: Path, hdir: str | None, vdir: str | None) -> _Raw:
    from PIL import Image

    kind = "jpeg" if p.suffix.lower() in (".jpg", ".jpeg") else "png"
    _single_image_only(p, hdir, kind.upper())
    with Image.open(p) as img:
        img.load()
        mode = img.mode
        meta: dict[str, Any] = {"mode": mode}
        if mode in ("L", "I", "F") or mode.startswith("I;16"):
            data = np.array(img)
        elif mode == "1":
            data = np.array(img, dtype=np.uint8)
        elif mode == "LA":
            data = np.array(img.getchannel("L"))
        else:  # palette, RGB(A), CMYK, ...
            colour = np.array(img.convert("RGB"))
            data = _luminance(colour)
            meta["converted"] = f"{mode} to luminance"
    eight_bit = mode in ("L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr")
    drawn = colour if eight_bit and mode not in ("L", "LA") else data   # a bar is looked for per colour channel
    return _Raw(
        data=data, to_nm=None, pixel_nm=None, channel="image", direction="forward", format=kind, meta=meta,
        # a colour JPEG's chroma is usually subsampled 2x2: its compression blocks span 16 px
        overlay=_overlays(drawn, (8 if mode == "L" else 16) if kind == "jpeg" else 1) if eight_bit else None,
    )


def _overlays(data: np.ndarray, block: int = 1) -> np.ndarray | None:
    """The burned-in annotations (scale bar and its label) of an 8-bit exported picture, or None
    when it has none (`image.overlays`; ``block`` 8 for a JPEG's compression blocks)."""
    from stm_defects.image.overlays import burned_in_overlays

    mask = burned_in_overlays(data, block=block)
    return mask if mask.any() else None


#: Readers that choose among several channels by name (``channel=``); the others hold one.
_CHANNEL_READERS = (_read_nanonis, _read_gwyddion)

_READERS: dict[str, tuple[Callable[..., _Raw], str]] = {
    ".z_mtrx": (_read_matrix, "Matrix .Z_mtrx"),
    ".sxm": (_read_nanonis, "Nanonis .sxm"),
    ".sm4": (_read_rhk, "RHK .sm4"),
    ".gwy": (_read_gwyddion, "Gwyddion .gwy"),
    ".dat": (_read_spiepy, "SPIEPy .dat"),
    ".npy": (_read_npy, ".npy"),
    ".tif": (_read_tiff, "TIFF"),
    ".tiff": (_read_tiff, "TIFF"),
    ".png": (_read_png, "PNG"),
    ".jpg": (_read_png, "JPEG"),
    ".jpeg": (_read_png, "JPEG"),
}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _parse_direction(direction: str | None) -> tuple[str | None, str | None]:
    """Split a direction string into (forward|backward|None, up|down|None)."""
    if direction is None:
        return None, None
    text = str(direction).strip().lower()
    if not text:
        return None, None
    horizontal = vertical = None
    for token in re.split(r"[\s/_,;:+\-]+", text):
        if not token:
            continue
        if token in _H_WORDS and horizontal is None:
            horizontal = _H_WORDS[token]
        elif token in _V_WORDS and vertical is None:
            vertical = _V_WORDS[token]
        else:
            raise ValueError(f"unknown direction {direction!r}; {_DIRECTION_HELP}")
    return horizontal, vertical


def _single_image_only(p: Path, hdir: str | None, label: str) -> None:
    if hdir == "backward":
        raise ScanError(p, f"{label} files hold a single image; there is no backward direction")


def _length_factor(unit: Any) -> float | None:
    """Factor from ``unit`` to nanometres, or None when it is not a length unit."""
    if unit is None:
        return None
    # "A" is ampere (not angstrom): lower-cased it is not a key of the table.
    return _LENGTH_TO_NM.get(str(unit).strip().lower())


def _unitstr(unit: Any) -> str:
    if unit is None:
        return ""
    if isinstance(unit, dict):
        return str(unit.get("unitstr", "") or "")
    return str(unit)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    try:
        out = float(str(value).split()[0]) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return out if math.isfinite(out) else None


def _scaled(value: Any, factor: float | None) -> float | None:
    number = _to_float(value)
    if number is None or factor is None:
        return None
    return number * factor


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _describe(exc: BaseException) -> str:
    text = _one_line(exc)
    name = type(exc).__name__
    if not text:
        return name
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{name}: {text}"


def _display_extensions() -> list[str]:
    return [".Z_mtrx" if e == ".z_mtrx" else e for e in SCAN_EXTENSIONS]


