import json
import math
from pathlib import Path

import pytest

from stm_defects.analysis.boxes import (
    bin_label,
    load_box_truth,
    load_truth_dir,
    markdown_table,
    match_boxes,
    pair_by_image,
    score_boxes,
    score_scan,
)

TRUTH_DIR = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-labelled"
             / "wse2-dev" / "truth")


def _truth(defects, shape=(100, 100), scan_nm=(20.0, 20.0), image="a.jpg"):
    return {"image": image, "shape": list(shape), "scan_nm": list(scan_nm),
            "pixel_nm": scan_nm[0] / shape[1],
            "defects": [{"x": x, "y": y, "w": w, "h": h, "class": c, "class_name": c}
                        for x, y, w, h, c in defects]}


def _pred(points, shape=(100, 100), image="/scans/a.jpg"):
    return {"image": image, "shape": list(shape), "pixel_size_nm": 0.2,
            "defects": [{"id": i, "x": x, "y": y, "bbox": [0, 0, 1, 1], "class": c}
                        for i, (x, y, c) in enumerate(points)]}


# --------------------------------------------------------------------------- #
# matching rule
# --------------------------------------------------------------------------- #
def test_match_just_inside_and_just_outside():
    box = [[50.0, 50.0, 10.0, 6.0]]  # radius = max(10, 6)/2 + 2 = 7
    assert match_boxes([[57.0, 50.0]], box) == [(0, 0)]  # on the edge: inclusive
    assert match_boxes([[50.0, 56.99]], box) == [(0, 0)]
    assert match_boxes([[57.01, 50.0]], box) == []
    assert match_boxes([[50.0, 57.01]], box) == []  # uses max(w, h), not h
    assert match_boxes([[57.01, 50.0]], box, slack_px=2.1) == [(0, 0)]


def test_match_one_to_one_and_optimal():
    box = [{"x": 10.0, "y": 10.0, "w": 8, "h": 8}]
    assert match_boxes([[13.0, 10.0], [11.0, 10.0]], box) == [(1, 0)]  # closer wins, other is fp
    # maximum matching beats greedy nearest: p0 is near both, p1 only near b1
    boxes = [[0.0, 0.0, 4.0, 4.0], [5.0, 0.0, 4.0, 4.0]]
    assert match_boxes([[3.0, 0.0], [8.5, 0.0]], boxes) == [(0, 0), (1, 1)]


def test_match_normalised_distance_prefers_relative_fit():
    # p sits 4 px from a big box (radius 22) and 3 px from a small one (radius 4): the normalised
    # cost prefers the big box for p, freeing the small one for q.
    boxes = [[0.0, 0.0, 40.0, 40.0], [7.0, 0.0, 4.0, 4.0]]
    assert match_boxes([[4.0, 0.0], [9.0, 0.0]], boxes) == [(0, 0), (1, 1)]


def test_match_empty_sides():
    assert match_boxes([], [[1, 1, 4, 4]]) == []
    assert match_boxes([[1, 1]], []) == []
    assert match_boxes(None, None) == []
    with pytest.raises(ValueError):
        match_boxes([[1, 1]], [[1, 1, 4, 4]], slack_px=-1)


# --------------------------------------------------------------------------- #
# one scan
# --------------------------------------------------------------------------- #
def test_score_scan_counts_and_classes():
    truth = _truth([(10, 10, 6, 6, "A"), (50, 50, 6, 6, "B"), (80, 20, 6, 6, "A")])
    pred = _pred([(11, 10, 3), (50, 52, None), (30, 90, 1)])
    s = score_scan(pred, truth)
    assert (s["tp"], s["fp"], s["fn"], s["n_pred"], s["n_true"]) == (2, 1, 1, 3, 3)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["field_nm"] == 20.0 and s["image"] == "a.jpg"
    assert s["true_classes"] == ["A", "B"] and s["pred_classes"] == [3, None]
    assert not s["rescaled"]


def test_score_scan_empty_conventions():
    s = score_scan(_pred([]), _truth([]))
    assert (s["precision"], s["recall"], s["f1"]) == (1.0, 1.0, 1.0)
    s = score_scan(_pred([]), _truth([(5, 5, 4, 4, "A")]))
    assert s["fn"] == 1 and s["f1"] == 0.0


def test_score_scan_rescales_to_truth_grid():
    truth = _truth([(99.5, 49.5, 4, 4, "A"), (9.5, 19.5, 4, 4, "B")], shape=(100, 200))
    # same boxes seen on a grid half the size: x' = (x + 0.5) * 2 - 0.5
    pred = _pred([(49.5, 24.5, 0), (4.5, 9.5, 1)], shape=(50, 100))
    s = score_scan(pred, truth, slack_px=0.0)
    assert s["rescaled"] and s["tp"] == 2 and s["f1"] == 1.0
    unscaled = score_scan(dict(pred, shape=[100, 200]), truth, slack_px=0.0)
    assert unscaled["tp"] == 0


# --------------------------------------------------------------------------- #
# pooling
# --------------------------------------------------------------------------- #
def _pairs():
    """12 scans over three field sizes with mixed hits and misses."""
    pairs = []
    for i in range(12):
        nm = (10.0, 40.0, 500.0)[i % 3]
        boxes = [(10 + 15 * k, 20, 6, 6, "AB"[k % 2]) for k in range(4)]
        hits = [(10 + 15 * k, 21, k % 2) for k in range(1 + i % 4)]  # 1 to 4 of the 4 boxes
        extra = [(90, 90, 0)] if i % 2 else []
        pairs.append((_pred(hits + extra, image=f"/x/s{i}.jpg"),
                      _truth(boxes, scan_nm=(nm, nm), image=f"s{i}.jpg")))
    return pairs


def test_score_boxes_overall_bootstrap_deterministic():
    pairs = _pairs()
    r1 = score_boxes(pairs, n_boot=300, seed=3)
    r2 = score_boxes(pairs, n_boot=300, seed=3)
    o = r1["overall"]
    assert (o["tp"], o["fn"], o["fp"], o["n_scans"]) == (30, 18, 6, 12)
    assert o["recall"] == pytest.approx(30 / 48) and o["precision"] == pytest.approx(30 / 36)
    for k in ("precision", "recall", "f1"):
        lo, hi = o[f"{k}_ci"]
        assert lo <= o[k] <= hi and lo < hi
        assert o[f"{k}_ci"] == r2["overall"][f"{k}_ci"]
    assert r1["bins"] == r2["bins"]
    other = score_boxes(pairs, n_boot=300, seed=4)["overall"]["f1_ci"]
    assert other != o["f1_ci"]
    assert len(r1["scans"]) == 12 and r1["scans"][0]["image"] == "s0.jpg"
    assert set(r1["scans"][0]) == {"image", "field_nm", "n_true", "n_pred", "tp", "fp", "fn", "f1"}


def test_score_boxes_bins():
    r = score_boxes(_pairs(), n_boot=50)
    assert [b["label"] for b in r["bins"]] == ["≤15 nm", "15-60 nm", "60-150 nm", ">150 nm"]
    assert [b["n_scans"] for b in r["bins"]] == [4, 4, 0, 4]
    assert [b["n_true"] for b in r["bins"]] == [16, 16, 0, 16]
    assert math.isnan(r["bins"][2]["f1"]) and math.isnan(r["bins"][2]["f1_ci"][0])
    assert sum(b["tp"] for b in r["bins"]) == r["overall"]["tp"]
    # a field exactly on an edge goes to the lower bin
    edge = score_boxes([(_pred([]), _truth([], scan_nm=(15.0, 15.0)))], n_boot=0)
    assert [b["n_scans"] for b in edge["bins"]] == [1, 0, 0, 0]
    assert bin_label(0, 15) == "≤15 nm" and bin_label(150, math.inf) == ">150 nm"
    with pytest.raises(ValueError):
        score_boxes([], size_bins_nm=(0, 10, 5))


def test_class_agreement_perfect_relabelling_and_null_excluded():
    truth = _truth([(10, 10, 6, 6, "SBT"), (30, 10, 6, 6, "LDP"), (50, 10, 6, 6, "SBT"),
                    (70, 10, 6, 6, "LDP"), (90, 10, 6, 6, "SDT")])
    pred = _pred([(10, 10, 7), (30, 10, 2), (50, 10, 7), (70, 10, 2), (90, 10, -1), (90, 90, None)])
    c = score_boxes([(pred, truth)], n_boot=10)["classes"]
    assert c["ari"] == pytest.approx(1.0) and c["nmi"] == pytest.approx(1.0)
    assert c["purity"] == pytest.approx(1.0) and c["n"] == 5 and c["n_unclassified"] == 0
    # a matched prediction without class is left out; a merged cluster lowers purity
    pred2 = _pred([(10, 10, 7), (30, 10, 7), (50, 10, 7), (70, 10, 2), (90, 10, None)])
    c2 = score_boxes([(pred2, truth)], n_boot=10)["classes"]
    assert c2["n"] == 4 and c2["n_unclassified"] == 1
    assert c2["purity"] == pytest.approx(0.75) and c2["ari"] < 1.0


def test_markdown_table():
    r = score_boxes(_pairs(), n_boot=100)
    md = markdown_table(r)
    for label in ("≤15 nm", "15-60 nm", "60-150 nm", ">150 nm", "| all |", "ARI", "NMI", "purity"):
        assert label in md
    o = r["overall"]
    assert f"{o['f1']:.2f} [{o['f1_ci'][0]:.2f}, {o['f1_ci'][1]:.2f}]" in md


def test_pair_by_image():
    t = {"a.jpg": _truth([]), "b.jpg": _truth([], image="b.jpg")}
    preds = [_pred([], image="/s/b.jpg"), _pred([], image="/s/c.jpg")]
    pairs = pair_by_image(preds, t)
    assert len(pairs) == 1 and pairs[0][1]["image"] == "b.jpg"


# --------------------------------------------------------------------------- #
# loading
# --------------------------------------------------------------------------- #
def test_load_truth_and_errors(tmp_path):
    good = _truth([(1, 2, 3, 4, "A")])
    (tmp_path / "a.json").write_text(json.dumps(good))
    t = load_box_truth(tmp_path / "a.json")
    assert t["shape"] == [100, 100] and t["defects"][0]["w"] == 3.0
    assert list(load_truth_dir(tmp_path)) == ["a.jpg"]

    bad = {
        "b1.json": "{not json",
        "b2.json": json.dumps([1, 2]),
        "b3.json": json.dumps({k: v for k, v in good.items() if k != "scan_nm"}),
        "b4.json": json.dumps(dict(good, shape=[100])),
        "b5.json": json.dumps(dict(good, defects=[{"x": 1, "y": 2, "w": 3, "class": "A"}])),
        "b6.json": json.dumps(dict(good, defects=[{"x": 1, "y": 2, "w": -3, "h": 1, "class": "A"}])),
        "b7.json": json.dumps(dict(good, defects=[{"x": 1, "y": 2, "w": 3, "h": 1}])),
        "b8.json": json.dumps(dict(good, pixel_nm=0)),
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load_box_truth(tmp_path / name)
    with pytest.raises(ValueError, match="b1.json"):
        load_truth_dir(tmp_path)


def test_load_truth_dir_duplicates_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_truth_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="no"):
        load_truth_dir(tmp_path)
    for n in ("a.json", "b.json"):
        (tmp_path / n).write_text(json.dumps(_truth([])))
    with pytest.raises(ValueError, match="already"):
        load_truth_dir(tmp_path)


def test_real_truth_scored_against_itself_is_perfect():
    if not TRUTH_DIR.is_dir():
        pytest.skip(f"{TRUTH_DIR} not found: needs ../shared/data/real-labelled beside the repo")
    truths = load_truth_dir(TRUTH_DIR)
    assert len(truths) >= 50
    preds = [{"image": f"/scans/{name}", "shape": t["shape"],
              "defects": [{"x": d["x"], "y": d["y"], "class": d["class"]} for d in t["defects"]]}
             for name, t in truths.items()]
    pairs = pair_by_image(preds, truths)
    assert len(pairs) == len(truths)
    r = score_boxes(pairs, n_boot=200)
    o = r["overall"]
    assert o["f1"] == 1.0 and o["fp"] == 0 and o["fn"] == 0
    assert o["n_true"] == sum(len(t["defects"]) for t in truths.values())
    assert o["f1_ci"] == [1.0, 1.0]
    assert r["classes"]["ari"] == pytest.approx(1.0)
    assert sum(b["n_scans"] for b in r["bins"]) == len(truths)
    assert "≤15 nm" in markdown_table(r)
