"""Result and bundle types shared by both methods: a leaf module (imports nothing of the package).

`Models` is what prediction needs (whatever the method); `Analysis` is what one method returns for
one preprocessed image. Both methods (`paper.method`, `improved.method`) and everything above them
(`analysis`, `mlops`, `cli`) speak these types, so no two methods import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Models:
    """Everything prediction needs. `calibration` holds values fitted on the training scans."""

    ae1: object = None
    kmeans: object = None
    ae2: object | None = None
    gmm: object | None = None
    calibration: dict = field(default_factory=dict)   # error_threshold, target_clusters
    versions: dict = field(default_factory=dict)      # model name -> version/path, for outputs
    class_names: dict = field(default_factory=dict)   # class id (str) -> human name
    improved: dict | None = None                      # fitted state of the improved analysis
    config: dict | None = None                        # resolved prediction config the models were built with


@dataclass
class Analysis:
    char_map: np.ndarray        # (H, W) int: K-means cluster (paper) or terrace label (improved)
    error_map: np.ndarray       # (H, W) float32: reconstruction error (paper) or anomaly score
    mask: np.ndarray            # (H, W) bool
    regions: list[dict]         # defect regions + "class", "probability"
    class_map: np.ndarray       # (H, W) int, class per masked pixel, -1 elsewhere
    display: np.ndarray | None = None   # (H, W) float32: the scan as pictures show it (improved:
                                        # each terrace levelled); None: the preprocessed image
    z_per_unit: float | None = None     # heights (nm) per unit of the display, set by whoever
                                        # preprocessed the scan; None: unknown (a.u.)
