"""Per-class gallery of defect patches, to see (and then name) what each class is."""

from __future__ import annotations

import numpy as np

from stm_defects.analysis.dispatch import PredictConfig, analyse
from stm_defects.analysis.render import class_gallery
from stm_defects.image.windows import windows_at
from stm_defects.results import Models


def defect_examples(img: np.ndarray, models: Models, cfg: PredictConfig, patch: int = 32,
                    pixel_nm: float | None = None, missing: np.ndarray | None = None) -> dict[int, list[np.ndarray]]:
    """Class id -> the `patch`-px (s, s) patches of the classified defects found on one
    preprocessed image (of ``pixel_nm`` nm per pixel, where known; ``missing``: see `analyse`)."""
    examples: dict[int, list] = {}
    regions = analyse(img, models, cfg, pixel_nm, missing).regions
    if not regions:
        return examples
    centres = np.array([[int(round(r["y"])), int(round(r["x"]))] for r in regions])
    patches, _ = windows_at(img, centres, patch)
    for r, p in zip(regions, patches):
        if r["class"] is not None:
            examples.setdefault(int(r["class"]), []).append(p[0])
    return examples


def gallery(images: list[np.ndarray], models: Models, cfg: PredictConfig, per_class: int = 8,
            patch: int = 32, pixel_nms: list[float | None] | None = None,
            missing: list[np.ndarray | None] | None = None) -> np.ndarray:
    """Per-class montage (RGB uint8) of `patch`-px defect patches found on preprocessed `images`
    (of `pixel_nms` nm per pixel, where known; `missing`: their pixels without a measurement)."""
    examples: dict[int, list] = {}
    for i, img in enumerate(images):
        for cls, found in defect_examples(img, models, cfg, patch, pixel_nms[i] if pixel_nms else None,
                                          missing[i] if missing else None).items():
            examples.setdefault(cls, []).extend(found)
    return class_gallery(examples, models.class_names, per_class)
