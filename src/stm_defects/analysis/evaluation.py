"""Scoring a method on scans with ground truth: detection, classes, step edges, rotation.

The truth of a synthetic scan `<name>.gwy` lies beside it: `<name>.json` (defects) and
`<name>_steps.npz` (step mask). Used by the `evaluate` stage and the benchmarks alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stm_defects.analysis.dispatch import PredictConfig, analyse, image_pixel_nm, load_image
from stm_defects.analysis.predict import analyse_scan
from stm_defects.analysis.scores import aggregate, evaluate_scan, match_points
from stm_defects.io.files import read_json
from stm_defects.io.scans import read_scan
from stm_defects.results import Models


@dataclass(frozen=True)
class EvaluateConfig:
    match_radius: float = 6.0        # px: a detection within this of a true centre is a match
    step_radius: int = 3             # px around a true step for step-edge false positives


def evaluate_split(raw_dir: Path, names: list[str], models: Models, cfg: PredictConfig,
                   ecfg: EvaluateConfig, progress=None) -> tuple[dict, list[dict]]:
    """(aggregate, per-scan scores) of `cfg`'s method on the scans `raw_dir / name`."""
    per_scan = []
    for name in names:
        path = Path(raw_dir) / name
        truth = read_json(path.with_suffix(".json"))
        steps = np.load(path.with_name(path.stem + "_steps.npz"))["step_mask"]
        _, _, result, defects = analyse_scan(read_scan(path), models, cfg)
        t = truth["defects"]
        res = evaluate_scan(
            pred_xy=[(d["x"], d["y"]) for d in defects], true_xy=[(d["x"], d["y"]) for d in t],
            pred_labels=[-1 if d["class"] is None else d["class"] for d in defects],
            true_labels=[d["class_id"] for d in t], step_mask=steps, score_map=result.error_map,
            truth_radii=[d["radius_px"] for d in t], radius=ecfg.match_radius,
            step_radius=ecfg.step_radius)
        res["scan"] = name
        per_scan.append(res)
        if progress:
            progress(1)
    return aggregate(per_scan), per_scan


def rotation_pairs(img01: np.ndarray, models: Models, cfg: PredictConfig, radius: float,
                   pixel_nm: float | None = None) -> tuple[int, int]:
    """(defects keeping their class, matched defects) between an image and its np.rot90 copy.

    Defects are matched by position, one-to-one within `radius`; the preprocessed image is
    rotated so that scan-line artefacts, which a real rotated scan would not rotate, stay out
    of the comparison.
    """
    a = analyse(img01, models, cfg, pixel_nm).regions
    b = analyse(np.ascontiguousarray(np.rot90(img01)), models, cfg, pixel_nm).regions
    w = img01.shape[1]
    # np.rot90: new[i, j] = old[j, W-1-i], so old (x, y) lands at new (y, W-1-x)
    m = match_points([(r["y"], w - 1 - r["x"]) for r in a], [(r["x"], r["y"]) for r in b], radius)
    return sum(a[i]["class"] == b[j]["class"] for i, j in m), len(m)


def rotation_agreement(raw_dir: Path, names: list[str], models: Models, cfg: PredictConfig,
                       radius: float) -> dict:
    """Share of defects that keep their class when the preprocessed scan is turned by 90 deg."""
    same = pairs = 0
    for name in names:
        scan, img, scale = load_image(Path(raw_dir) / name, cfg.preprocess)
        s, n = rotation_pairs(img, models, cfg, radius, image_pixel_nm(scan, scale))
        same, pairs = same + s, pairs + n
    return {"rotation_agreement": same / pairs if pairs else float("nan"), "rotation_pairs": pairs}
