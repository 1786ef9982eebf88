import math

import numpy as np
import pytest

from stm_defects.analysis.scores import (
    aggregate,
    class_scores,
    detection_scores,
    evaluate_scan,
    match_points,
    pixel_auroc,
    step_edge_false_positives,
    truth_mask,
)


# --------------------------------------------------------------------------- #
# matching and detection
# --------------------------------------------------------------------------- #
def test_match_points_one_to_one():
    true = np.array([[10.0, 10.0]])
    pred = np.array([[11.0, 10.0], [10.0, 12.0]])
    m = match_points(pred, true, radius=6)
    assert m == [(0, 0)]  # the closer prediction wins, the other is left over
    d = detection_scores(pred, true, radius=6)
    assert (d["tp"], d["fp"], d["fn"]) == (1, 1, 0)
    assert d["precision"] == 0.5 and d["recall"] == 1.0
    assert d["f1"] == pytest.approx(2 / 3)


def test_match_points_is_optimal_not_greedy():
    # greedy nearest-first would pair p0-t1 (d=1) and leave p1, t0 unmatched
    true = np.array([[0.0, 0.0], [5.0, 0.0]])
    pred = np.array([[4.0, 0.0], [9.5, 0.0]])
    assert match_points(pred, true, radius=5) == [(0, 0), (1, 1)]


def test_match_points_radius_and_empty():
    assert match_points([[0, 0]], [[10, 0]], radius=6) == []
    assert match_points(np.zeros((0, 2)), [[1, 1]]) == []
    assert match_points([[1, 1]], []) == []
    assert match_points([[0, 0]], [[6, 0]], radius=6) == [(0, 0)]  # inclusive


def test_detection_scores_degenerate():
    d = detection_scores([], [])
    assert (d["tp"], d["fp"], d["fn"]) == (0, 0, 0)
    assert d["precision"] == d["recall"] == d["f1"] == 1.0
    d = detection_scores([], [[1, 1], [5, 5]])
    assert d["fn"] == 2 and d["recall"] == 0.0 and d["f1"] == 0.0
    d = detection_scores([[1, 1]], [])
    assert d["fp"] == 1 and d["precision"] == 0.0 and d["f1"] == 0.0
    perfect = detection_scores([[1, 1], [20, 20]], [[2, 1], [20, 21]])
    assert perfect["f1"] == 1.0


# --------------------------------------------------------------------------- #
# classes
# --------------------------------------------------------------------------- #
def test_class_scores_perfect_and_permuted():
    t = np.array([0, 0, 1, 1, 2, 2, 2])
    for p in (t, np.array([2, 2, 0, 0, 1, 1, 1]), np.array(["b", "b", "c", "c", "a", "a", "a"])):
        s = class_scores(t, p)
        assert s["ari"] == pytest.approx(1.0)
        assert s["nmi"] == pytest.approx(1.0)
        assert s["purity"] == pytest.approx(1.0)
        assert s["hungarian_accuracy"] == pytest.approx(1.0)
        assert s["n"] == 7


def test_class_scores_partial_and_random():
    # one cluster merging two classes: purity counts the majority, hungarian one class only
    t = np.array([0, 0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 0, 0, 0, 1, 1])
    s = class_scores(t, p)
    assert s["purity"] == pytest.approx(5 / 7)
    assert s["hungarian_accuracy"] == pytest.approx(5 / 7)
    over = class_scores([0, 0, 1, 1], [0, 1, 2, 3])  # over-segmentation
    assert over["purity"] == 1.0 and over["hungarian_accuracy"] == 0.5
    rng = np.random.default_rng(0)
    r = class_scores(rng.integers(0, 4, 2000), rng.integers(0, 4, 2000))
    assert abs(r["ari"]) < 0.02
    assert r["hungarian_accuracy"] < 0.35


def test_class_scores_empty():
    s = class_scores([], [])
    assert all(math.isnan(s[k]) for k in ("ari", "nmi", "purity", "hungarian_accuracy"))
    with pytest.raises(ValueError):
        class_scores([0, 1], [0])


# --------------------------------------------------------------------------- #
# step edges, pixels
# --------------------------------------------------------------------------- #
def test_step_edge_false_positives():
    step = np.zeros((50, 50), bool)
    step[:, 25] = True  # vertical step edge at x = 25
    pred = np.array(
        [
            [24.0, 10.0],  # near the edge, matched -> not counted
            [27.0, 20.0],  # near the edge, unmatched -> counted
            [28.0, 30.0],  # 3 px away, unmatched -> counted (inclusive)
            [40.0, 30.0],  # far, unmatched -> not counted
            [25.0, 99.0],  # outside the image -> ignored
        ]
    )
    assert step_edge_false_positives(pred, [0], step, radius=3) == 2
    assert step_edge_false_positives(pred, [0, 1, 2], step, radius=3) == 0
    assert step_edge_false_positives(pred, [], step, radius=1) == 1
    assert step_edge_false_positives(pred, [], np.zeros_like(step)) == 0
    assert step_edge_false_positives(np.zeros((0, 2)), [], step) == 0


def test_truth_mask_and_auroc():
    shape = (40, 50)
    tm = truth_mask(shape, [[10, 5], [30, 20]], [3, 4.5])
    assert tm.shape == shape and tm.dtype == bool
    assert tm[5, 10] and tm[20, 30] and tm[20, 34] and not tm[20, 36]
    assert not tm[0, 0]
    assert truth_mask(shape, [[10, 5]], 0.5).sum() == 1  # at least the centre
    assert not truth_mask(shape, [], 3).any()

    rng = np.random.default_rng(0)
    score = rng.random(shape) + 1.0 * tm  # every defect pixel above every background pixel
    assert pixel_auroc(score, tm) == pytest.approx(1.0)
    assert pixel_auroc(-score, tm) == pytest.approx(0.0)
    assert math.isnan(pixel_auroc(score, np.zeros(shape, bool)))
    assert math.isnan(pixel_auroc(score, np.ones(shape, bool)))
    assert abs(pixel_auroc(rng.random(shape), tm) - 0.5) < 0.15
    with_nan = score.copy()
    with_nan[0, :] = np.nan  # ignored
    assert pixel_auroc(with_nan, tm) == pytest.approx(1.0)


# --------------------------------------------------------------------------- #
# per scan and aggregate
# --------------------------------------------------------------------------- #
def test_evaluate_scan_and_aggregate():
    step = np.zeros((64, 64), bool)
    step[:, 40] = True
    true_xy = np.array([[10, 10], [30, 50], [50, 20]])
    true_lab = np.array(["a", "b", "a"])
    pred_xy = np.array([[11, 10], [29, 51], [42, 5], [60, 60]])
    pred_lab = np.array([1, 0, 1, 0])
    yy, xx = np.mgrid[:64, :64]
    score = np.zeros((64, 64))
    for x, y in true_xy:
        score = np.maximum(score, np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0))
    s1 = evaluate_scan(pred_xy, true_xy, pred_lab, true_lab, step_mask=step, score_map=score, truth_radii=3)
    assert (s1["tp"], s1["fp"], s1["fn"]) == (2, 2, 1)
    assert s1["matches"] == [(0, 0), (1, 1)]
    assert s1["true_labels_matched"] == ["a", "b"] and s1["pred_labels_matched"] == [1, 0]
    assert s1["step_edge_fp"] == 1  # (42, 5) is 2 px from the step; (60, 60) is not
    assert s1["auroc"] == pytest.approx(1.0)

    s2 = evaluate_scan([[5, 5]], [[5, 6]], [1], ["a"], step_mask=np.zeros((64, 64), bool))
    assert "auroc" not in s2 and s2["step_edge_fp"] == 0

    agg = aggregate([s1, s2])
    assert agg["n_scans"] == 2
    assert (agg["tp"], agg["fp"], agg["fn"]) == (3, 2, 1)
    assert agg["precision"] == pytest.approx(3 / 5)
    assert agg["recall"] == pytest.approx(3 / 4)
    # pooled matched labels: true a, b, a vs pred 1, 0, 1 -> a perfect relabelling
    assert agg["ari"] == pytest.approx(1.0) and agg["hungarian_accuracy"] == pytest.approx(1.0)
    assert agg["n_matched_labelled"] == 3
    assert agg["step_edge_fp_mean"] == pytest.approx(0.5)
    assert agg["auroc_mean"] == pytest.approx(1.0)

    empty = aggregate([])
    assert empty["n_scans"] == 0 and empty["f1"] == 1.0
    assert math.isnan(empty["ari"]) and math.isnan(empty["auroc_mean"])
    assert math.isnan(empty["step_edge_fp_mean"])


def test_match_points_takes_one_radius_per_truth():
    pred = np.array([[0.0, 5.0], [20.0, 5.0]])
    true = np.array([[0.0, 0.0], [20.0, 0.0]])
    assert match_points(pred, true, radius=[6.0, 4.0]) == [(0, 0)]
    assert match_points(pred, true, radius=[4.0, 6.0]) == [(1, 1)]
