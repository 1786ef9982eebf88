"""Per-scan prediction: read -> preprocess -> analyse -> JSON + pictures.

`predict_scan` depends only on its arguments (a path, a `Models` bundle, a `PredictConfig`, an
output folder), so a batch can be spread over processes or machines by any task runner
(`analysis.batch` runs one in a process pool, `mlops.ray_engine` on Ray). Each JSON records the
prediction config, the model versions and the software version that produced it, and what a
later run needs to tell whether it is still up to date: the input file's size and sha256
(``input``), the read options (``options``: direction, pixel_nm, scan_nm) and the digest of
the models' files and metadata (``models_sha256``, `analysis.batch.ModelSpec.fingerprint`).

Output names: ``name`` is the scan's path relative to the batch's common root, without its
suffix (`analysis.batch.output_names`), so ``OUT/day1/scan001.json`` and
``OUT/day2/scan001.json`` never collide; a Matrix file adds its direction
(``scan_forward-up``). Without a name, the file's stem is used.

`try_predict_scan` is the batch form: it never raises for one bad scan (an `Exception`; a
KeyboardInterrupt still stops the batch) and returns a `Failure` instead, naming the stage
(read / analyse / write) and the reason on one line, with the exception kept for a traceback.
`write_failures` writes failures.csv; summary.csv is built from the JSONs in the output folder
(`analysis.batch.write_summary`).

Memory: the default (improved) analysis needs about `PREDICT_BYTES_PER_PIXEL` bytes per scan
pixel on top of `PREDICT_BASE_BYTES` (`predict_memory_bytes`); `check_size` refuses a scan over
a pixel limit up front, before any analysis, with that estimate in the message.
"""

from __future__ import annotations

import re
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stm_defects.analysis.dispatch import PredictConfig, analyse, image_pixel_nm, missing_on, preprocess_scan
from stm_defects.analysis.figures import (
    MAX_CROPS,
    character_figure,
    class_figure,
    defect_crops,
    defect_heights,
    scan_figure,
)
from stm_defects.analysis.report import thumbnail_uri
from stm_defects.io.files import describe_os_error, save_picture, write_csv, write_json
from stm_defects.io.safe_models import file_sha256
from stm_defects.io.scans import Scan, ScanError, read_scan, require_min_size
from stm_defects.results import Analysis, Models

STAGES = ("read", "analyse", "write")

#: Peak resident memory of `stm predict` (default profile, one scan) is about
#: ``PREDICT_BASE_BYTES + PREDICT_BYTES_PER_PIXEL * pixels``: a line at or above the peak RSS of
#: the whole process measured on synthetic scans at 0.1 nm/px (the analysis' working pixel size,
#: so nothing is resampled away; `benchmarks/bench_memory.py --big`): 1024x1024 501 MiB (the line:
#: 509 MiB), 2048x2048 749 MiB (749 MiB), 4096x4096 1568 MiB (1709 MiB, 1.79 GB). The base is
#: mostly the imports (torch) and the models. See `predict_memory_bytes`.
PREDICT_BASE_BYTES = 450_000_000
PREDICT_BYTES_PER_PIXEL = 80

#: The default pixel limit of `stm predict --max-pixels`: 4096 x 4096.
DEFAULT_MAX_PIXELS = 4096 * 4096


def to_original(defect: dict, scale: float, origin: tuple[int, int]) -> dict:
    """Map a defect from the preprocessed grid back to the original scan's pixels."""
    r0, c0 = origin
    x0, y0, x1, y1 = defect["bbox"]
    return dict(defect,
                x=round(defect["x"] / scale + c0, 2), y=round(defect["y"] / scale + r0, 2),
                bbox=[int(np.floor(x0 / scale)) + c0, int(np.floor(y0 / scale)) + r0,
                      int(np.ceil(x1 / scale)) + c0, int(np.ceil(y1 / scale)) + r0],
                area_px=int(round(defect["area_px"] / scale ** 2)))


def software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stm-defects")
    except PackageNotFoundError:
        return "unknown"


def analyse_scan(scan: Scan, models: Models, cfg: PredictConfig
                 ) -> tuple[np.ndarray, float, Analysis, list[dict]]:
    """(img01, scale, analysis, defects in original coordinates) of one scan.

    Raises `ScanError` for a scan too small for the method, before or after resampling."""
    require_min_size(scan, cfg.min_scan_px)
    span: dict = {}
    img, scale = preprocess_scan(scan, cfg.preprocess, min_side=cfg.min_scan_px, span_out=span)
    result = analyse(img, models, cfg, image_pixel_nm(scan, scale), missing_on(scan, img.shape))
    if result.display is None:        # the paper method: each terrace levelled for the pictures
        from stm_defects.improved.anomaly import terrace_levelled

        result.display = terrace_levelled(img, cfg.improved.anomaly)[0]
    # heights in the scan's unit per unit of img01 / the display (None: not a height in nm)
    result.z_per_unit = span.get("z_span") if scan.unit == "nm" and span.get("z_span") else None
    heights = defect_heights(result.display, result.regions, result.z_per_unit)
    names = models.class_names
    defects = []
    for i, (r, height) in enumerate(zip(result.regions, heights)):
        d = to_original(r, scale, scan.origin)
        cls = d.get("class")
        row = {"id": d["id"], "x": d["x"], "y": d["y"], "bbox": d["bbox"], "class": cls,
               "name": names.get(str(cls)) if cls is not None and cls >= 0 else None,
               "probability": None if d.get("probability") is None else round(d["probability"], 4),
               "area_px": d["area_px"], "score": d.get("score"), "height_nm": height,
               "crop": i if i < MAX_CROPS else None}
        if d.get("typicality") is not None:
            row["typicality"] = round(d["typicality"], 4)
        if d.get("nearest_class") is not None:
            row["nearest_class"] = d["nearest_class"]
        defects.append(row)
    return img, scale, result, defects


def predict_memory_bytes(n_pixels: int) -> int:
    """Roughly the peak memory (bytes) predicting one scan of ``n_pixels`` pixels takes with the
    default profile; scans finer than the analysis' working pixel size are shrunk first and take
    less."""
    return int(PREDICT_BASE_BYTES + PREDICT_BYTES_PER_PIXEL * n_pixels)


def check_size(scan: Scan, max_pixels: int | None) -> None:
    """Refuse a scan of more than ``max_pixels`` pixels (None: no limit) with a `ScanError` that
    gives its size and the memory predicting it would need."""
    rows, cols = scan.height.shape[:2]
    n = rows * cols
    if max_pixels is not None and n > max_pixels:
        raise ScanError(scan.path, f"{rows}x{cols} px ({n / 1e6:.1f} Mpx) is over the limit of {max_pixels} px "
                                   f"(--max-pixels); predicting it would need about "
                                   f"{predict_memory_bytes(n) / 2**30:.1f} GiB of memory. Crop or "
                                   "downsample it, or raise --max-pixels if the machine has the memory")


def input_identity(path: str | Path) -> dict:
    """``{"bytes": size, "sha256": hex}`` of an input file, recorded in its JSON (``input``) so that
    a later run can tell whether the file changed (`analysis.batch.already_done`)."""
    path = Path(path)
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def read_options(direction: str | None = None, pixel_nm: float | None = None,
                 scan_nm: float | None = None, channel: str | None = None,
                 field_from_name: bool = False) -> dict:
    """The options that change what is read from a file, as recorded in its JSON (``options``);
    ``channel`` only when one was chosen, ``field_from_name`` only when on."""
    out = {"direction": direction, "pixel_nm": pixel_nm, "scan_nm": scan_nm}
    if channel is not None:
        out["channel"] = channel
    if field_from_name:
        out["field_from_name"] = True
    return out


def scan_conditions(meta: dict) -> dict:
    """Tunnelling conditions and date from a scan's metadata, where its reader put them:
    ``bias_V``, ``setpoint`` with ``setpoint_unit`` (as the file gives it, usually A), ``date``.

    Nanonis (``bias_V``, ``setpoint``/``setpoint_unit``, ``date`` + ``time``), Omicron Matrix
    (``bias`` in ``bias_unit`` V, ``setpoint``/``setpoint_unit``, ``date``) and RHK (``bias_V``,
    ``setpoint_A``, ``date``) carry them; other formats give None."""
    bias = meta.get("bias_V")
    if bias is None and meta.get("bias") is not None and meta.get("bias_unit", "V") == "V":
        bias = meta.get("bias")
    setpoint, unit = meta.get("setpoint"), meta.get("setpoint_unit")
    if setpoint is None and meta.get("setpoint_A") is not None:
        setpoint, unit = meta.get("setpoint_A"), "A"
    date = meta.get("date")
    if date is not None and meta.get("time"):
        date = f"{date} {meta['time']}"

    def number(v):
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return {"bias_V": number(bias), "setpoint": number(setpoint),
            "setpoint_unit": None if number(setpoint) is None else (str(unit) if unit else None),
            "date": None if date is None else str(date)}


def predict_scan(path: str | Path, models: Models, cfg: PredictConfig, out_dir: str | Path,
                 direction: str | None = None, provenance: dict | None = None,
                 pixel_nm: float | None = None, scan_nm: float | None = None,
                 max_pixels: int | None = None, name: str | None = None,
                 fingerprint: str | None = None, channel: str | None = None,
                 field_from_name: bool = False) -> dict:
    """Write `<name>_overlay.png`, `_classes.png`, `_character.png` and `<name>.json` (``name``:
    the path relative to the output folder, default the file's stem); return a summary row.
    Any error propagates as raised (see `try_predict_scan` for the batch form).

    ``pixel_nm`` / ``scan_nm`` / ``field_from_name`` calibrate a file that carries no pixel size
    (`io.scans.read_scan`); a scan of more than ``max_pixels`` pixels is refused before analysis (`check_size`).
    ``fingerprint`` is recorded as the JSON's ``models_sha256``.
    """
    path = Path(path)
    scan = read_scan(path, direction=direction, pixel_nm=pixel_nm, scan_nm=scan_nm, channel=channel,
                     field_from_name=field_from_name)
    source = input_identity(path)
    check_size(scan, max_pixels)
    analysed = analyse_scan(scan, models, cfg)
    return write_prediction(path, scan, analysed, models, cfg, out_dir, provenance, name=name, source=source,
                            options=read_options(direction, pixel_nm, scan_nm, channel, field_from_name),
                            fingerprint=fingerprint)


def output_stem(path: Path, scan: Scan, name: str | None = None) -> str:
    """The output name of a scan (relative to the output folder, no suffix): ``name`` (default the
    file's stem), plus the direction for a Matrix file, which holds several."""
    stem = name if name is not None else path.stem
    if path.suffix.lower() == ".z_mtrx":
        stem = f"{stem}_{scan.direction.replace('/', '-')}"
    return stem


def write_prediction(path: Path, scan: Scan, analysed: tuple[np.ndarray, float, Analysis, list[dict]],
                     models: Models, cfg: PredictConfig, out_dir: str | Path,
                     provenance: dict | None = None, *, name: str | None = None, source: dict | None = None,
                     options: dict | None = None, fingerprint: str | None = None, thumbnail: bool = False) -> dict:
    """Write the pictures, then the JSON, of one analysed scan (`analyse_scan`'s result); return
    its summary row (with ``thumbnail``, also the report's thumbnail of the overlay: ``thumb``).
    Each file is written atomically, and the JSON last: a scan has a JSON only when all its
    pictures were written.

    The JSON: ``image`` (the path as given), ``shape``, ``pixel_size_nm`` and its source,
    ``channel``, ``direction``, ``crop_origin``, ``area_nm2`` (the measured area of the analysed,
    cropped image; null without a pixel size), ``missing_fraction`` (its pixels without a
    measurement: NaN in the file or a burned-in scale bar, where nothing was looked for),
    ``conditions`` (`scan_conditions`), ``input`` (`input_identity`),
    ``options`` (`read_options`), ``models`` (versions), ``models_sha256``, ``software``,
    ``config`` (where it came from, and ``values``) and ``defects``.

    The row: ``scan``, ``stem``, ``json`` (the JSON's path relative to ``out_dir``, POSIX),
    ``n_defects``, ``counts`` (per class label), ``area_nm2``, ``pixel_nm``.
    """
    out = Path(out_dir)
    img, scale, result, defects = analysed
    stem = output_stem(path, scan, name)
    local = [dict(r, name=d["name"]) for r, d in zip(result.regions, defects)]
    px = image_pixel_nm(scan, scale)
    display = result.display if result.display is not None else img
    names = models.class_names
    overlay = scan_figure(display, local, px, getattr(result, "z_per_unit", None), scan.unit, names,
                          title=f"{path.name}: {len(local)} defect{'s' if len(local) != 1 else ''}")
    save_picture(out / f"{stem}_overlay.png", overlay)
    thumb = None                        # the report's, made here from the picture in memory
    if thumbnail:
        try:
            thumb = thumbnail_uri(overlay)
        except (OSError, ValueError):   # the report then makes it from the PNG, or shows none
            thumb = None
    save_picture(out / f"{stem}_classes.png", class_figure(display, result.class_map, local, px, names))
    save_picture(out / f"{stem}_character.png",
                  character_figure(result.char_map, result.error_map, px, cfg.improved.anomaly.threshold,
                                   method=cfg.method))
    crops = defect_crops(display, local, px)
    if crops is not None:
        save_picture(out / f"{stem}_defects.png", crops)
    else:                      # no defects now: no strip left from an earlier run
        (out / f"{stem}_defects.png").unlink(missing_ok=True)
    missing = float(scan.missing.mean()) if scan.missing is not None else 0.0
    area_nm2 = float(scan.height.size * (1.0 - missing) * scan.pixel_nm ** 2) if scan.pixel_nm else None
    write_json(out / f"{stem}.json", {
        "image": str(path), "shape": list(scan.original_shape or scan.height.shape),
        "pixel_size_nm": scan.pixel_nm, "pixel_size_source": scan.meta.get("pixel_nm_source"),
        "channel": scan.channel, "direction": scan.direction,
        "crop_origin": list(scan.origin), "area_nm2": area_nm2, "missing_fraction": missing,
        "conditions": scan_conditions(scan.meta),
        "input": source if source is not None else input_identity(path),
        "options": options if options is not None else read_options(),
        "models": models.versions, "models_sha256": fingerprint,
        "software": {"stm-defects": software_version()},
        "config": {**(provenance or {}), "values": cfg.to_dict()},
        "defects": defects,
    })
    counts = Counter("unclassified" if d["class"] is None else (d["name"] or f"class_{d['class']}")
                     for d in defects)
    return {"scan": str(path), "stem": stem, "json": f"{stem}.json", "n_defects": len(defects),
            "counts": dict(counts), "area_nm2": area_nm2, "pixel_nm": scan.pixel_nm, "thumb": thumb}


# ------------------------------------------------------------------------------------ batches
@dataclass(frozen=True)
class Failure:
    """One scan of a batch that failed: its path, the stage (read / analyse / write) and the
    reason on one line. ``error`` keeps the exception, for a traceback on request.

    A failure that crosses a process boundary (`portable`) drops the exception, which may not be
    picklable, and keeps its traceback as text (``detail``) and whether it was ``expected``."""
    scan: str
    stage: str
    reason: str
    error: BaseException | None = field(default=None, compare=False, repr=False)
    detail: str = field(default="", compare=False, repr=False)
    was_expected: bool | None = field(default=None, compare=False, repr=False)

    def line(self) -> str:
        """``path: stage failed: reason``."""
        return f"{self.scan}: {self.stage} failed: {self.reason}"

    @property
    def expected(self) -> bool:
        """True for a problem of the input itself (`ScanError`) or of the disk (`OSError`), whose
        one line says it all; False for anything else (a bug: the traceback helps)."""
        if self.error is None and self.was_expected is not None:
            return self.was_expected
        return isinstance(self.error, (ScanError, OSError))

    def portable(self) -> Failure:
        """This failure without the exception object (safe to pickle and send to another process):
        its traceback as text in ``detail``, ``expected`` kept."""
        if self.error is None:
            return self
        text = "".join(traceback.format_exception(type(self.error), self.error, self.error.__traceback__))
        return Failure(self.scan, self.stage, self.reason, None, text, self.expected)

    def to_dict(self) -> dict:
        """A plain-JSON form of `portable` (for engines that carry results as JSON)."""
        p = self.portable()
        return {"scan": p.scan, "stage": p.stage, "reason": p.reason, "detail": p.detail,
                "expected": p.expected}

    @classmethod
    def from_dict(cls, d: dict) -> Failure:
        return cls(d["scan"], d["stage"], d["reason"], None, d.get("detail", ""), d.get("expected"))


def failure_reason(err: BaseException) -> str:
    """One line saying why: a `ScanError`'s reason, ``path: system reason`` for a disk error,
    else ``ExceptionType: message`` (shortened to 300 characters)."""
    if isinstance(err, ScanError):
        return err.reason
    if isinstance(err, OSError) and (err.filename is not None or err.strerror):
        return describe_os_error(err)
    if isinstance(err, MemoryError):
        return f"out of memory{': ' + str(err) if str(err) else ''}"
    text = re.sub(r"\s+", " ", str(err)).strip()
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def try_predict_scan(path: str | Path, models: Models, cfg: PredictConfig, out_dir: str | Path,
                     direction: str | None = None, provenance: dict | None = None,
                     pixel_nm: float | None = None, scan_nm: float | None = None,
                     max_pixels: int | None = None, name: str | None = None,
                     fingerprint: str | None = None, channel: str | None = None,
                     field_from_name: bool = False, options: dict | None = None,
                     thumbnail: bool = False) -> dict | Failure:
    """`predict_scan` for a batch: the summary row, or the `Failure` of the stage that raised.

    Stages: read (the file, its sha256, and the size check), analyse (preprocessing and the
    method), write (pictures and JSON). Any `Exception` becomes a `Failure`; the files of other
    scans are untouched. ``options`` are the run's read options recorded in the JSON (default:
    those of this call; `stm predict --direction all` records "all" and reads one direction).
    """
    path, stage = Path(path), "read"
    try:
        scan = read_scan(path, direction=direction, pixel_nm=pixel_nm, scan_nm=scan_nm, channel=channel,
                         field_from_name=field_from_name)
        source = input_identity(path)
        check_size(scan, max_pixels)
        stage = "analyse"
        analysed = analyse_scan(scan, models, cfg)
        stage = "write"
        return write_prediction(path, scan, analysed, models, cfg, out_dir, provenance, name=name,
                                source=source,
                                options=options if options is not None else
                                read_options(direction, pixel_nm, scan_nm, channel, field_from_name),
                                fingerprint=fingerprint, thumbnail=thumbnail)
    except Exception as err:  # noqa: BLE001 - one bad scan must not end the batch
        return Failure(str(path), stage, failure_reason(err), err)


FAILURE_FIELDS = ["scan", "stage", "reason"]


def write_failures(failures: list[Failure], path: str | Path) -> None:
    """failures.csv: one row per scan that failed (scan, stage, reason); the header only when
    none did. Written atomically."""
    write_csv(path, [{"scan": f.scan, "stage": f.stage, "reason": f.reason} for f in failures],
              FAILURE_FIELDS)
