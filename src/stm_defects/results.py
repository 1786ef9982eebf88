"""Result and bundle types shared by both methods: a leaf module (imports nothing of the package).

`Models` is what prediction needs (whatever the method); `Analysis` is what one method returns for
one preprocessed image. Both methods (`paper.method`, `improved.method`) and everything above them
(`analysis`, `mlops`, `cli`) speak these types, so no two methods import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


class Deferred:
    """A model whose file is already read and verified, built on first use (`Models.autoencoder`,
    `Models.estimator`).

    The loaders hold the paper method's models this way: the default method never uses them, so
    a prediction with it neither imports torch (2-3 s) nor scikit-learn (0.6 s) nor builds them.
    ``build`` is a picklable callable (a `functools.partial` of a module-level function)
    returning the model."""

    __slots__ = ("build", "what")

    def __init__(self, build: Callable[[], object], what: str):
        self.build, self.what = build, what

    def __repr__(self) -> str:
        return f"Deferred({self.what})"


@dataclass
class Models:
    """Everything prediction needs. `calibration` holds values fitted on the training scans."""

    ae1: object = None          # autoencoders: a torch module, or `Deferred` (use `autoencoder`)
    kmeans: object = None       # the paper method's estimators: fitted, or `Deferred` (use `estimator`)
    ae2: object | None = None
    gmm: object | None = None
    calibration: dict = field(default_factory=dict)   # error_threshold, target_clusters
    versions: dict = field(default_factory=dict)      # model name -> version/path, for outputs
    class_names: dict = field(default_factory=dict)   # class id (str) -> human name
    improved: dict | None = None                      # fitted state of the improved analysis
    config: dict | None = None                        # resolved prediction config the models were built with

    def autoencoder(self, key: str):
        """The autoencoder ``key`` ("ae1" or "ae2"), built now if it was loaded `Deferred`
        (then kept); None when the set has none."""
        if key not in ("ae1", "ae2"):
            raise KeyError(f"no autoencoder {key!r} in a model set (ae1, ae2)")
        return self._built(key)

    def estimator(self, key: str):
        """The paper method's fitted ``key`` ("kmeans" or "gmm"), built now if it was loaded
        `Deferred` (then kept); None when the set has none."""
        if key not in ("kmeans", "gmm"):
            raise KeyError(f"no estimator {key!r} in a model set (kmeans, gmm)")
        return self._built(key)

    def _built(self, key: str):
        model = getattr(self, key)
        if isinstance(model, Deferred):
            model = model.build()
            setattr(self, key, model)
        return model


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
