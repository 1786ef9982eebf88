"""The fast default analysis finds the same defects as the code before it was made fast.

`tests/data/fast_path_reference.json` holds the detections (x, y, class) of the default
(improved) analysis at the commit it names (the streak filter; the file was first written at
759e300, before the speed work of the detector: the normal-equation plane fit, the
selection-network scar median, slice-based block means and upsampling, a sparse notch dilation,
a sort-based NaN median and k-d-tree region owners), on six fixed synthetic scans
(`benchmarks/fast_path_reference.py` writes it, with the improved state it used beside it). The
current code must find >= 99% of those defects within 1 px, one to one, with the same classes.

A change of the default method's results (params.yaml's `improved` or `preprocess` sections,
the synthetic generators) changes these scans' detections on purpose: then regenerate the file
at the commit before the change you want to hold the next one to, as the script's docstring says.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def reference():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import fast_path_reference as ref
    finally:
        sys.path.pop(0)
    from stm_defects.config import load_params
    from stm_defects.io import safe_models

    params = load_params(ROOT / "params.yaml")
    state = safe_models.load(DATA / "fast_path_state.npz", "improved")
    want = json.loads((DATA / "fast_path_reference.json").read_text())["scans"]
    got = {name: ref.detections(h, px, state, params) for name, h, px in ref.reference_scans()}
    return want, got


def _match(a: np.ndarray, b: np.ndarray, radius: float = 1.0) -> list[tuple[int, int]]:
    """One-to-one pairs (i, j) of points of a and b within ``radius`` px (Hungarian)."""
    if not len(a) or not len(b):
        return []
    d = np.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1])
    i, j = linear_sum_assignment(np.where(d <= radius, d, 1e6))
    return [(int(p), int(q)) for p, q in zip(i, j) if d[p, q] <= radius]


def test_reference_covers_every_scan(reference):
    want, got = reference
    assert set(want) == set(got)
    assert sum(len(v) for v in want.values()) >= 150      # enough defects for a 1% tolerance


def test_same_defects_within_one_pixel(reference):
    want, got = reference
    n_want = n_got = n_matched = 0
    for name in want:
        a, b = np.array(want[name], float).reshape(-1, 3), np.array(got[name], float).reshape(-1, 3)
        n_want, n_got = n_want + len(a), n_got + len(b)
        n_matched += len(_match(a[:, :2], b[:, :2]))
    assert n_matched >= 0.99 * max(n_want, n_got), (n_matched, n_want, n_got)


def test_same_classes(reference):
    want, got = reference
    for name in want:
        a, b = want[name], got[name]
        pairs = _match(np.array(a, float).reshape(-1, 3)[:, :2], np.array(b, float).reshape(-1, 3)[:, :2])
        assert all(a[i][2] == b[j][2] for i, j in pairs), name
