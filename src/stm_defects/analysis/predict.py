"""Per-scan prediction: read -> preprocess -> analyse -> JSON + pictures.

`predict_scan` depends only on its arguments (a path, a `Models` bundle, a `PredictConfig`, an
output folder), so a batch can be spread over processes or machines by any task runner. Each JSON
records the prediction config, the model versions and the software version that produced it.

`try_predict_scan` is the batch form: it never raises for one bad scan (an `Exception`; a
KeyboardInterrupt still stops the batch) and returns a `Failure` instead, naming the stage
(read / analyse / write) and the reason on one line, with the exception kept for a traceback.
`write_summary` and `write_failures` then write the two batch tables.

Memory: the default (improved) analysis needs about `PREDICT_BYTES_PER_PIXEL` bytes per scan
pixel on top of `PREDICT_BASE_BYTES` (`predict_memory_bytes`); `check_size` refuses a scan over
a pixel limit up front, before any analysis, with that estimate in the message.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stm_defects.analysis.dispatch import PredictConfig, analyse, image_pixel_nm, preprocess_scan
from stm_defects.analysis.render import character_picture, class_picture, overlay_image
from stm_defects.io.files import atomic_file, describe_os_error, save_png, write_csv, write_json
from stm_defects.io.scans import Scan, ScanError, read_scan, require_min_size
from stm_defects.results import Analysis, Models

STAGES = ("read", "analyse", "write")

#: Peak resident memory of `stm predict` (default profile, one scan) is about
#: ``PREDICT_BASE_BYTES + PREDICT_BYTES_PER_PIXEL * pixels``: a straight line through the peak RSS
#: of the whole process measured on synthetic 1024x1024 (499 MiB) and 4096x4096 (1813 MiB, 1.90 GB)
#: scans at 0.1 nm/px (the analysis' working pixel size, so nothing is resampled away;
#: `benchmarks/bench_memory.py`). The base is mostly the imports (torch) and the models. A
#: 2048x2048 scan peaked at 752 MiB, where the line says 762 MiB: the estimate errs on the high
#: side. The largest single step is the plane fit of `image.preprocess.level_plane` (its exact
#: least squares on every pixel). See `predict_memory_bytes`.
PREDICT_BASE_BYTES = 432_000_000
PREDICT_BYTES_PER_PIXEL = 88

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
    img, scale = preprocess_scan(scan, cfg.preprocess, min_side=cfg.min_scan_px)
    result = analyse(img, models, cfg, image_pixel_nm(scan, scale))
    names = models.class_names
    defects = []
    for r in result.regions:
        d = to_original(r, scale, scan.origin)
        cls = d.get("class")
        defects.append({"id": d["id"], "x": d["x"], "y": d["y"], "bbox": d["bbox"], "class": cls,
                        "name": names.get(str(cls)) if cls is not None else None,
                        "probability": None if d.get("probability") is None else round(d["probability"], 4),
                        "area_px": d["area_px"], "score": d.get("score")})
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


def predict_scan(path: str | Path, models: Models, cfg: PredictConfig, out_dir: str | Path,
                 direction: str | None = None, provenance: dict | None = None,
                 pixel_nm: float | None = None, scan_nm: float | None = None,
                 max_pixels: int | None = None) -> dict:
    """Write `<stem>_overlay.png`, `_classes.png`, `_character.png` and `<stem>.json`; return a
    summary row. Any error propagates as raised (see `try_predict_scan` for the batch form).

    ``pixel_nm`` / ``scan_nm`` calibrate a file that carries no pixel size (`io.scans.read_scan`);
    a scan of more than ``max_pixels`` pixels is refused before analysis (`check_size`).
    """
    path = Path(path)
    scan = read_scan(path, direction=direction, pixel_nm=pixel_nm, scan_nm=scan_nm)
    check_size(scan, max_pixels)
    analysed = analyse_scan(scan, models, cfg)
    return write_prediction(path, scan, analysed, models, cfg, out_dir, provenance)


def write_prediction(path: Path, scan: Scan, analysed: tuple[np.ndarray, float, Analysis, list[dict]],
                     models: Models, cfg: PredictConfig, out_dir: str | Path,
                     provenance: dict | None = None) -> dict:
    """Write the pictures, then the JSON, of one analysed scan (`analyse_scan`'s result); return
    its summary row. Each file is written atomically, and the JSON last: a scan has a JSON only
    when all its pictures were written."""
    out = Path(out_dir)
    img, _, result, defects = analysed
    stem = path.stem if path.suffix.lower() != ".z_mtrx" else f"{path.stem}_{scan.direction.replace('/', '-')}"
    local = [dict(r, name=d["name"]) for r, d in zip(result.regions, defects)]
    _save_picture(out / f"{stem}_overlay.png", overlay_image(img, local))
    save_png(out / f"{stem}_classes.png", class_picture(img, result.class_map))
    save_png(out / f"{stem}_character.png", character_picture(result.char_map))
    write_json(out / f"{stem}.json", {
        "image": str(path), "shape": list(scan.original_shape or scan.height.shape),
        "pixel_size_nm": scan.pixel_nm, "pixel_size_source": scan.meta.get("pixel_nm_source"),
        "channel": scan.channel, "direction": scan.direction,
        "crop_origin": list(scan.origin), "models": models.versions,
        "software": {"stm-defects": software_version()},
        "config": {**(provenance or {}), "values": cfg.to_dict()},
        "defects": defects,
    })
    counts = Counter("unclassified" if d["class"] is None else (d["name"] or f"class_{d['class']}")
                     for d in defects)
    area_nm2 = (scan.height.size * scan.pixel_nm ** 2) if scan.pixel_nm else None
    return {"scan": str(path), "stem": stem, "n_defects": len(defects), "counts": dict(counts),
            "area_nm2": area_nm2, "pixel_nm": scan.pixel_nm}


def _save_picture(path: Path, picture) -> None:
    """A PIL image as PNG, atomically: what `save_png` writes for its pixels, without first
    copying the (upscaled) picture into a numpy array and back."""
    with atomic_file(path, "wb") as fh:
        picture.save(fh, format="PNG")


# ------------------------------------------------------------------------------------ batches
@dataclass(frozen=True)
class Failure:
    """One scan of a batch that failed: its path, the stage (read / analyse / write) and the
    reason on one line. ``error`` keeps the exception, for a traceback on request."""
    scan: str
    stage: str
    reason: str
    error: BaseException | None = field(default=None, compare=False, repr=False)

    def line(self) -> str:
        """``path: stage failed: reason``."""
        return f"{self.scan}: {self.stage} failed: {self.reason}"

    @property
    def expected(self) -> bool:
        """True for a problem of the input itself (`ScanError`) or of the disk (`OSError`), whose
        one line says it all; False for anything else (a bug: the traceback helps)."""
        return isinstance(self.error, (ScanError, OSError))


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
                     max_pixels: int | None = None) -> dict | Failure:
    """`predict_scan` for a batch: the summary row, or the `Failure` of the stage that raised.

    Stages: read (the file, and the size check), analyse (preprocessing and the method), write
    (pictures and JSON). Any `Exception` becomes a `Failure`; the files of other scans are
    untouched.
    """
    path, stage = Path(path), "read"
    try:
        scan = read_scan(path, direction=direction, pixel_nm=pixel_nm, scan_nm=scan_nm)
        check_size(scan, max_pixels)
        stage = "analyse"
        analysed = analyse_scan(scan, models, cfg)
        stage = "write"
        return write_prediction(path, scan, analysed, models, cfg, out_dir, provenance)
    except Exception as err:  # noqa: BLE001 - one bad scan must not end the batch
        return Failure(str(path), stage, failure_reason(err), err)


def write_summary(rows: list[dict], path: str | Path) -> None:
    """summary.csv: defect counts per class per scan, and densities per nm^2 when known; one row
    per scan predicted (none: the header only). Written atomically."""
    classes = sorted({c for r in rows for c in r["counts"]})
    fields = ["scan", "n_defects", "area_nm2", *classes, *(f"{c}_per_nm2" for c in classes),
              "defects_per_nm2"]
    table = []
    for r in rows:
        area = r["area_nm2"]
        row = {"scan": r["scan"], "n_defects": r["n_defects"],
               "area_nm2": round(area, 3) if area else "",
               "defects_per_nm2": round(r["n_defects"] / area, 6) if area else ""}
        for c in classes:
            n = r["counts"].get(c, 0)
            row[c] = n
            row[f"{c}_per_nm2"] = round(n / area, 6) if area else ""
        table.append(row)
    write_csv(path, table, fields)


FAILURE_FIELDS = ["scan", "stage", "reason"]


def write_failures(failures: list[Failure], path: str | Path) -> None:
    """failures.csv: one row per scan that failed (scan, stage, reason); the header only when
    none did. Written atomically."""
    write_csv(path, [{"scan": f.scan, "stage": f.stage, "reason": f.reason} for f in failures],
              FAILURE_FIELDS)
