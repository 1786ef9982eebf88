"""Robust statistics shared by the preprocessing and both detectors."""

from __future__ import annotations

import numpy as np

MAD_TO_SIGMA = 1.4826   # sigma = 1.4826 * median absolute deviation, for Gaussian noise


def robust_location_scale(x: np.ndarray) -> tuple[float, float]:
    """(median, robust sigma) of `x`; sigma is never 0 (a tiny floor keeps divisions finite)."""
    x = np.asarray(x)
    med = float(np.median(x))
    return med, float(MAD_TO_SIGMA * np.median(np.abs(x - med))) + 1e-12


def robust_sigma(x: np.ndarray) -> float:
    """MAD-based standard deviation of `x` (no floor)."""
    x = np.asarray(x)
    return float(MAD_TO_SIGMA * np.median(np.abs(x - np.median(x))))
