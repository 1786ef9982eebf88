"""Per-scan prediction: read -> preprocess -> analyse -> JSON + pictures.

`predict_scan` depends only on its arguments (a path, a `Models` bundle, a `PredictConfig`, an
output folder), so a batch can be spread over processes or machines by any task runner. Each JSON
records the prediction config, the model versions and the software version that produced it.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np

from stm_defects.analysis.dispatch import PredictConfig, analyse, image_pixel_nm, preprocess_scan
from stm_defects.analysis.render import character_picture, class_picture, overlay
from stm_defects.io.files import save_png, write_json
from stm_defects.io.scans import Scan, read_scan, require_min_size
from stm_defects.results import Analysis, Models


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


def predict_scan(path: str | Path, models: Models, cfg: PredictConfig, out_dir: str | Path,
                 direction: str | None = None, provenance: dict | None = None,
                 pixel_nm: float | None = None, scan_nm: float | None = None) -> dict:
    """Write `<stem>.json`, `_overlay.png`, `_classes.png`, `_character.png`; return a summary row.

    ``pixel_nm`` / ``scan_nm`` calibrate a file that carries no pixel size (`io.scans.read_scan`).
    """
    path, out = Path(path), Path(out_dir)
    scan = read_scan(path, direction=direction, pixel_nm=pixel_nm, scan_nm=scan_nm)
    img, scale, result, defects = analyse_scan(scan, models, cfg)
    stem = path.stem if path.suffix.lower() != ".z_mtrx" else f"{path.stem}_{scan.direction.replace('/', '-')}"
    write_json(out / f"{stem}.json", {
        "image": str(path), "shape": list(scan.original_shape or scan.height.shape),
        "pixel_size_nm": scan.pixel_nm, "pixel_size_source": scan.meta.get("pixel_nm_source"),
        "channel": scan.channel, "direction": scan.direction,
        "crop_origin": list(scan.origin), "models": models.versions,
        "software": {"stm-defects": software_version()},
        "config": {**(provenance or {}), "values": cfg.to_dict()},
        "defects": defects,
    })
    local = [dict(r, name=d["name"]) for r, d in zip(result.regions, defects)]
    save_png(out / f"{stem}_overlay.png", overlay(img, local))
    save_png(out / f"{stem}_classes.png", class_picture(img, result.class_map))
    save_png(out / f"{stem}_character.png", character_picture(result.char_map))
    counts = Counter("unclassified" if d["class"] is None else (d["name"] or f"class_{d['class']}")
                     for d in defects)
    area_nm2 = (scan.height.size * scan.pixel_nm ** 2) if scan.pixel_nm else None
    return {"scan": str(path), "stem": stem, "n_defects": len(defects), "counts": dict(counts),
            "area_nm2": area_nm2, "pixel_nm": scan.pixel_nm}


def write_summary(rows: list[dict], path: str | Path) -> None:
    """summary.csv: defect counts per class per scan, and densities per nm^2 when known."""
    classes = sorted({c for r in rows for c in r["counts"]})
    fields = ["scan", "n_defects", "area_nm2", *classes, *(f"{c}_per_nm2" for c in classes),
              "defects_per_nm2"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            area = r["area_nm2"]
            row = {"scan": r["scan"], "n_defects": r["n_defects"],
                   "area_nm2": round(area, 3) if area else "",
                   "defects_per_nm2": round(r["n_defects"] / area, 6) if area else ""}
            for c in classes:
                n = r["counts"].get(c, 0)
                row[c] = n
                row[f"{c}_per_nm2"] = round(n / area, 6) if area else ""
            w.writerow(row)
