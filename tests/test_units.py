"""Unit tests on small synthetic arrays for pieces of the reorganised package that had none:
coordinates back to the original scan, the paper method's region classes and calibration, the
improved method end to end on a few synthetic scans, the scan split, the GX validation suite and
the prediction config a model version carries.
"""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from stm_defects.errors import ConfigError, StageError
from stm_defects.results import Analysis, Models


# ============================================================================ analysis.predict
class TestToOriginal:
    """x = column, y = row, in pixels of the original scan; scale = preprocessed / original;
    origin = (row, col) of the crop in the original scan."""

    @staticmethod
    def defect(**kw):
        d = {"id": 3, "x": 10.0, "y": 6.0, "bbox": [3, 5, 9, 11], "area_px": 40, "score": 1.5,
             "class": 2, "probability": 0.9}
        d.update(kw)
        return d

    def test_scale_one_shifts_by_the_crop_origin(self):
        from stm_defects.analysis.predict import to_original

        d = self.defect(x=5.5, y=3.25, bbox=[2, 1, 9, 6], area_px=30)
        out = to_original(d, 1.0, (10, 20))           # crop starts at row 10, column 20
        assert out["x"] == pytest.approx(25.5)        # column + column origin
        assert out["y"] == pytest.approx(13.25)       # row + row origin
        assert out["bbox"] == [22, 11, 29, 16]        # [x0 + c0, y0 + r0, x1 + c0, y1 + r0]
        assert out["area_px"] == 30

    def test_zero_origin_and_scale_one_is_identity_on_coordinates(self):
        from stm_defects.analysis.predict import to_original

        d = self.defect()
        out = to_original(d, 1.0, (0, 0))
        assert (out["x"], out["y"], out["bbox"], out["area_px"]) == (d["x"], d["y"], d["bbox"], d["area_px"])

    def test_upsampled_scale_two(self):
        from stm_defects.analysis.predict import to_original

        out = to_original(self.defect(), 2.0, (0, 0))
        assert (out["x"], out["y"]) == (5.0, 3.0)
        # 3/2 = 1.5 -> 1 and 5/2 = 2.5 -> 2 (floor); 9/2 = 4.5 -> 5 and 11/2 = 5.5 -> 6 (ceil)
        assert out["bbox"] == [1, 2, 5, 6]
        assert out["area_px"] == 10                   # 40 / 2**2

    def test_downsampled_scale_half_with_origin(self):
        from stm_defects.analysis.predict import to_original

        out = to_original(self.defect(), 0.5, (100, 7))
        assert (out["x"], out["y"]) == (20.0 + 7, 12.0 + 100)
        assert out["bbox"] == [6 + 7, 10 + 100, 18 + 7, 22 + 100]
        assert out["area_px"] == 160                  # 40 / 0.5**2

    def test_bbox_rounds_outward_and_contains_the_centre(self):
        from stm_defects.analysis.predict import to_original

        d = self.defect(x=2.5, y=3.5, bbox=[1, 2, 4, 5], area_px=9)
        out = to_original(d, 3.0, (4, 8))
        # 1/3 -> 0, 2/3 -> 0 (floor); 4/3 -> 2, 5/3 -> 2 (ceil); then + (c0, r0)
        assert out["bbox"] == [0 + 8, 0 + 4, 2 + 8, 2 + 4]
        x0, y0, x1, y1 = out["bbox"]
        assert x0 <= out["x"] <= x1 and y0 <= out["y"] <= y1
        assert out["area_px"] == 1                    # round(9 / 9)
        for scale in (0.3, 0.75, 1.7, 2.5):
            o = to_original(d, scale, (0, 0))
            ox0, oy0, ox1, oy1 = o["bbox"]
            assert ox0 <= d["bbox"][0] / scale and oy0 <= d["bbox"][1] / scale
            assert ox1 >= d["bbox"][2] / scale and oy1 >= d["bbox"][3] / scale
            assert o["area_px"] == round(d["area_px"] / scale**2)

    def test_other_keys_kept_and_input_untouched(self):
        from stm_defects.analysis.predict import to_original

        d = self.defect()
        before = json.loads(json.dumps(d))
        out = to_original(d, 2.0, (1, 1))
        assert d == before
        for key in ("id", "score", "class", "probability"):
            assert out[key] == d[key]
        assert all(isinstance(v, int) for v in out["bbox"]) and isinstance(out["area_px"], int)


# ============================================================================ paper.method
P = 32   # patch side of the paper method (PaperConfig().patch)


class CentrePixelEncoder:
    """Stand-in for AE2 whose latent is the patch's centre pixel (built lazily on torch)."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        class _Enc(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.ones(1))
                self.cfg = SimpleNamespace(latent=1)

            def encode(self, x):
                return x[:, :, P // 2, P // 2] * self.w          # windows_at: centre at size // 2

            def decode(self, z):
                return z[:, :, None, None].expand(-1, 1, P, P)

        return _Enc()


class FixedGMM:
    """`predict_proba` giving the same distribution to every latent; records what it got."""

    def __init__(self, p):
        self.p = np.asarray(p, float)
        self.seen = []

    def predict_proba(self, z):
        z = np.asarray(z)
        self.seen.append(z.shape)
        return np.tile(self.p, (len(z), 1))


class BrightDarkGMM:
    """Class 2 (p 0.7) for a bright latent, class 0 (p 0.6) for a dark one."""

    def predict_proba(self, z):
        z = np.asarray(z)[:, 0]
        return np.where(z[:, None] > 0.5, [0.1, 0.2, 0.7], [0.6, 0.3, 0.1])


def _two_blobs():
    """A 96x96 image and mask with two square regions: a bright one and a dark one."""
    img = np.full((96, 96), 0.2, np.float32)
    mask = np.zeros((96, 96), bool)
    mask[30:42, 30:42] = True          # region 0 (sorted by y): bright
    img[26:46, 26:46] = 0.9
    mask[60:70, 62:74] = True          # region 1: dark
    img[56:74, 58:78] = 0.05
    return img, mask


def _tiny_ae(latent: int = 4):
    from stm_defects.models import AEConfig, build_autoencoder

    return build_autoencoder(AEConfig(widths=(4,), kernels=(3,), encoder_norm=(True,), latent=latent,
                                      hidden=None, dropout=0.0, patch=P), seed=0)


def test_classify_regions_without_stage_two_gives_no_class():
    from stm_defects.paper.masks import defect_regions
    from stm_defects.paper.method import PaperConfig, classify_regions

    img, mask = _two_blobs()
    regions = defect_regions(mask)
    for models in (Models(), Models(ae2=None, gmm=FixedGMM([0.5, 0.5])), Models(ae2=object(), gmm=None)):
        out, class_map = classify_regions(img, mask, regions, models, PaperConfig())
        assert len(out) == len(regions) == 2
        for r, o in zip(regions, out):
            assert o["class"] is None and o["probability"] is None
            assert {k: o[k] for k in r} == r                 # the region's own keys are kept
        assert class_map.shape == mask.shape and (class_map == -1).all()
    out, class_map = classify_regions(img, mask, [], Models(ae2=_tiny_ae(), gmm=FixedGMM([1.0])), PaperConfig())
    assert out == [] and (class_map == -1).all()


def test_classify_regions_with_a_real_tiny_ae2_and_a_fixed_gmm(one_torch_thread):
    from stm_defects.paper.masks import defect_regions
    from stm_defects.paper.method import PaperConfig, classify_regions

    img, mask = _two_blobs()
    regions = defect_regions(mask)
    gmm = FixedGMM([0.2, 0.5, 0.3])
    out, class_map = classify_regions(img, mask, regions, Models(ae2=_tiny_ae(latent=4), gmm=gmm), PaperConfig())
    assert len(gmm.seen) == 1 and gmm.seen[0][1] == 4           # AE2 latents went to the GMM
    assert gmm.seen[0][0] >= len(regions)                       # at least one patch per region
    assert [o["class"] for o in out] == [1, 1]                  # argmax of the distribution
    assert [o["probability"] for o in out] == pytest.approx([0.5, 0.5])
    assert all(isinstance(o["class"], int) and isinstance(o["probability"], float) for o in out)
    assert class_map.dtype.kind == "i" and class_map.shape == mask.shape
    assert (class_map[~mask] == -1).all()
    assert set(np.unique(class_map[mask])) <= {1, -1} and (class_map[mask] == 1).mean() > 0.9


def test_classify_regions_each_region_gets_its_own_patches_class(one_torch_thread):
    from stm_defects.paper.masks import defect_regions
    from stm_defects.paper.method import PaperConfig, classify_regions

    img, mask = _two_blobs()
    # a thin region (one pixel wide, off the 4-px grid): classified from the patch at its centroid
    mask[85, 10:30] = True
    img[80:90, 5:35] = 0.95
    regions = defect_regions(mask)
    assert len(regions) == 3
    models = Models(ae2=CentrePixelEncoder.build(), gmm=BrightDarkGMM())
    out, class_map = classify_regions(img, mask, regions, models, PaperConfig())
    bright, dark, line = out                             # regions are sorted by (y, x)
    assert (bright["y"], dark["y"], line["y"]) == (35.5, 64.5, 85.0)
    assert (bright["class"], bright["probability"]) == (2, pytest.approx(0.7))
    assert (dark["class"], dark["probability"]) == (0, pytest.approx(0.6))
    assert line["class"] == 2 and line["probability"] == pytest.approx(0.7)
    assert (class_map[30:42, 30:42] == 2).all()
    assert (class_map[60:70, 62:74] == 0).all()
    assert (class_map[~mask] == -1).all()


@pytest.mark.xfail(strict=True, reason="BUG paper/method.py:113-123: a region is found by the label at "
                                       "its centroid, which lies outside a non-convex (ring/C-shaped) region")
def test_classify_regions_ring_region_is_classified_by_its_own_patches(one_torch_thread):
    from stm_defects.paper.masks import defect_regions
    from stm_defects.paper.method import PaperConfig, classify_regions

    yy, xx = np.mgrid[:96, :96]
    r = np.hypot(yy - 40, xx - 40)
    mask = (r >= 8) & (r <= 12)             # a ring: its centroid is in the (dark) hole
    img = mask.astype(np.float32)           # every patch centred on the ring is bright -> class 2
    regions = defect_regions(mask)
    models = Models(ae2=CentrePixelEncoder.build(), gmm=BrightDarkGMM())
    out, class_map = classify_regions(img, mask, regions, models, PaperConfig())
    assert (class_map[mask] == 2).all()     # the per-pixel map agrees ...
    assert out[0]["class"] == 2             # ... the region's class does not (it is 0: the hole's)


def test_calibrate_percentile_threshold_over_pooled_maps():
    from stm_defects.paper.method import calibrate

    rng = np.random.default_rng(0)
    # large enough that calibrate subsamples (every e.size // 50_000-th value of each map). The maps
    # have one size, as the training scans do: subsampling per map weighs each map about equally.
    emaps = [rng.uniform(0, 1, (400, 400)), rng.uniform(0, 2, (400, 400)), rng.exponential(0.5, (400, 400))]
    calib = calibrate(emaps, [0.5, 0.5], "p90", 0.05)
    exact = np.percentile(np.concatenate([e.ravel() for e in emaps]), 90)
    assert calib["error_threshold"] == pytest.approx(exact, rel=0.02)
    assert isinstance(calib["error_threshold"], float)
    # one threshold for all scans: between the maps' own p90s
    own = [np.percentile(e, 90) for e in emaps]
    assert min(own) < calib["error_threshold"] < max(own)
    assert calibrate(emaps, [0.5, 0.5], "p50", 0.05)["error_threshold"] < calib["error_threshold"]
    assert calibrate(emaps, [1.0], 0.37, 0.05)["error_threshold"] == pytest.approx(0.37)   # absolute
    mad = calibrate(emaps, [1.0], "mad:3", 0.05)["error_threshold"]
    pooled = np.concatenate([e.ravel() for e in emaps])
    med = np.median(pooled)
    assert mad == pytest.approx(med + 3 * 1.4826 * np.median(np.abs(pooled - med)), rel=0.03)


def test_calibrate_without_threshold_and_rare_clusters():
    from stm_defects.paper.method import calibrate

    emaps = [np.linspace(0, 1, 100).reshape(10, 10)]
    calib = calibrate(emaps, [0.5, 0.03, 0.42, 0.05, 0.0], None, 0.05)
    assert "error_threshold" not in calib
    assert calib["target_clusters"] == [1, 4]          # strictly rarer than 5 %
    assert calibrate(emaps, [0.4, 0.6], None, 0.05)["target_clusters"] == []
    assert calibrate(emaps, np.array([0.01, 0.99]), "p90", 0.05)["target_clusters"] == [0]
    json.dumps(calibrate(emaps, np.array([0.01, 0.99]), "p90", 0.05))        # JSON-ready (calibration.json)


def test_mask_config_fills_in_the_calibration():
    from stm_defects.paper.masks import MaskConfig
    from stm_defects.paper.method import mask_config

    cfg = MaskConfig(threshold="p97", target_clusters=(), min_area=12)
    out = mask_config(cfg, {"error_threshold": 0.25, "target_clusters": [3, 1]})
    assert isinstance(out, MaskConfig)
    assert out.threshold == 0.25 and isinstance(out.threshold, float)
    assert out.target_clusters == (3, 1)
    assert out.min_area == 12 and out.dilation_radius == cfg.dilation_radius
    assert cfg.threshold == "p97" and cfg.target_clusters == ()          # not modified
    # no calibration: unchanged
    assert mask_config(cfg, {}) == cfg
    # only the clusters
    only = mask_config(cfg, {"target_clusters": [0]})
    assert only.threshold == "p97" and only.target_clusters == (0,)
    # threshold None disables the error component: calibration does not switch it back on
    off = mask_config(MaskConfig(threshold=None), {"error_threshold": 0.25, "target_clusters": [2]})
    assert off.threshold is None and off.target_clusters == (2,)


# ============================================================================ improved.method
# 192 px: on 128 px scans with three steps the step bands leave no terrace, so nothing is found.
IMPROVED_SIZE = 192
RECALL_FLOOR = 0.8      # measured 0.963 (26 of 27 defects on the 3 held-out scans), precision 0.839


@pytest.fixture(scope="module")
def improved_data():
    from stm_defects.data.synth import SynthConfig, synth_scan
    from stm_defects.image.preprocess import PreprocessConfig, preprocess
    from stm_defects.improved.method import ImprovedConfig, fit_improved

    scans = [synth_scan(SynthConfig(size=IMPROVED_SIZE, defects_per_100nm2=(2.5, 2.5)), seed=s) for s in range(8)]
    images = []
    for s in scans:
        img, scale = preprocess(s.height, s.pixel_nm, PreprocessConfig())
        assert scale == 1.0
        images.append(img)
    cfg = ImprovedConfig()
    state = fit_improved(images[:5], cfg, seed=0)
    return scans, images, cfg, state


def test_fit_improved_state(improved_data):
    from stm_defects.improved.method import ImprovedConfig, fit_improved

    _, images, cfg, state = improved_data
    assert state["n_train_images"] == 5
    assert state["n_train_defects"] >= cfg.min_train_defects
    assert state["classes"] is not None and state["classes"]["n_classes"] >= 2
    # too few defects for the configured minimum: no classes
    few = fit_improved(images[:1], dataclasses.replace(ImprovedConfig(), min_train_defects=10_000), seed=0)
    assert few["classes"] is None and few["n_train_images"] == 1 and few["n_train_defects"] > 0
    empty = fit_improved([], cfg, seed=0)
    assert empty["classes"] is None and empty["n_train_defects"] == 0


def test_improved_analyse_regions_and_class_map(improved_data):
    from stm_defects.improved.method import improved_analyse

    _, images, cfg, state = improved_data
    n_classes = state["classes"]["n_classes"]
    for img in images[5:]:
        res = improved_analyse(img, state, cfg)
        assert isinstance(res, Analysis)
        for arr in (res.char_map, res.error_map, res.mask, res.class_map):
            assert arr.shape == img.shape
        assert res.mask.dtype == bool and res.class_map.dtype.kind == "i"
        assert res.regions
        for r in res.regions:
            assert {"id", "x", "y", "bbox", "area_px", "score", "class", "probability"} <= set(r)
            assert isinstance(r["class"], int) and -1 <= r["class"] < n_classes
            if r["class"] >= 0:
                assert isinstance(r["probability"], float) and 0.0 <= r["probability"] <= 1.0 + 1e-9
            else:        # unknown: no class probability, its typicality and nearest class instead
                assert r["probability"] is None and 0 <= r["nearest_class"] < n_classes
            assert 0.0 <= r["typicality"] <= 1.0
            assert 0 <= r["x"] < img.shape[1] and 0 <= r["y"] < img.shape[0]
        assert (res.class_map[~res.mask] == -1).all()
        assert set(np.unique(res.class_map[res.mask])) <= {r["class"] for r in res.regions} | {-1}


def test_improved_analyse_without_state_has_no_classes(improved_data):
    from stm_defects.improved.method import improved_analyse

    _, images, cfg, state = improved_data
    with_state = improved_analyse(images[6], state, cfg)
    for st in (None, {"classes": None}):
        res = improved_analyse(images[6], st, cfg)
        assert res.regions and all(r["class"] is None and r["probability"] is None for r in res.regions)
        assert (res.class_map == -1).all()
        # detection does not depend on the classes
        assert [(r["x"], r["y"]) for r in res.regions] == [(r["x"], r["y"]) for r in with_state.regions]


def test_improved_finds_most_true_defects(improved_data):
    from stm_defects.analysis.scores import detection_scores
    from stm_defects.improved.method import improved_analyse

    scans, images, cfg, state = improved_data
    tp = fn = fp = 0
    for s, img in zip(scans[5:], images[5:]):
        res = improved_analyse(img, state, cfg)
        sc = detection_scores([(r["x"], r["y"]) for r in res.regions], [(d["x"], d["y"]) for d in s.defects], 6.0)
        tp, fn, fp = tp + sc["tp"], fn + sc["fn"], fp + sc["fp"]
    recall, precision = tp / (tp + fn), tp / max(1, tp + fp)
    print(f"improved on {len(scans) - 5} held-out {IMPROVED_SIZE}px scans: recall {recall:.3f} "
          f"precision {precision:.3f} ({tp} tp, {fn} fn, {fp} fp)")
    assert tp + fn >= 15
    assert recall >= RECALL_FLOOR
    assert precision >= 0.7                  # measured 0.839


# ============================================================================ data.splits
NAMES = [f"scan_{i:02d}" for i in range(20)]


def test_split_scans_disjoint_complete_sorted_and_sized():
    from stm_defects.data.splits import split_scans

    s = split_scans(NAMES, (0.6, 0.25, 0.15), seed=1)
    assert set(s) == {"train", "test", "predict"}
    parts = [set(v) for v in s.values()]
    assert sum(len(p) for p in parts) == len(NAMES) and set().union(*parts) == set(NAMES)
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert (len(s["train"]), len(s["test"]), len(s["predict"])) == (12, 5, 3)
    assert all(v == sorted(v) for v in s.values())
    # the input order does not matter for the sizes, and the input is not modified
    names = list(reversed(NAMES))
    s2 = split_scans(names, (0.6, 0.25, 0.15), seed=1)
    assert names == list(reversed(NAMES))
    assert [len(v) for v in s2.values()] == [12, 5, 3]


def test_split_scans_deterministic_by_seed():
    from stm_defects.data.splits import split_scans

    a = split_scans(NAMES, (0.7, 0.2, 0.1), seed=5)
    assert a == split_scans(list(NAMES), (0.7, 0.2, 0.1), seed=5)
    others = [split_scans(NAMES, (0.7, 0.2, 0.1), seed=s) for s in range(6, 10)]
    assert any(o != a for o in others)


def test_split_scans_small_counts():
    from stm_defects.data.splits import split_scans

    s = split_scans(["c", "a", "b"], (0.806, 0.167, 0.027), 0)
    assert [len(s[k]) for k in ("train", "test", "predict")] == [1, 1, 1]   # predict: at least one
    two = split_scans(["a", "b"], (0.5, 0.5, 0.0), 0)
    assert [len(two[k]) for k in ("train", "test", "predict")] == [1, 1, 0]  # < 3 scans: no predict
    one = split_scans(["a"], (0.8, 0.2, 0.0), 0)
    assert one == {"train": ["a"], "test": [], "predict": []}


@pytest.mark.parametrize("names, fractions", [([], (0.8, 0.1, 0.1)), (["a"], (0.0, 1.0, 0.0)),
                                              (["a", "b", "c"], (0.0, 0.67, 0.33))])
def test_split_scans_too_few_scans(names, fractions):
    from stm_defects.data.splits import split_scans

    with pytest.raises(StageError, match="too few"):
        split_scans(names, fractions, 0)


# ============================================================================ data.validate
def _scan(name, height, pixel_nm=0.1):
    from stm_defects.io.scans import Scan

    return Scan(height=height, pixel_nm=pixel_nm, unit="nm", channel="Z", direction="forward",
                path=f"/data/{name}.npy", format="npy")


@pytest.fixture(scope="module")
def stats_rows():
    from stm_defects.data.validate import mark_duplicates, scan_stats

    rng = np.random.default_rng(0)
    good = {f"good_{i}": rng.normal(0, 0.1, (96, 80)) for i in range(3)}
    holes = rng.normal(0, 0.1, (96, 96))
    holes[:10, :] = np.nan                                   # ~10 % non-finite
    bad = {"small": rng.normal(0, 0.1, (32, 96)), "holes": holes, "copy": good["good_0"].copy()}
    rows = [scan_stats(n, _scan(n, h)) for n, h in {**good, **bad}.items()]
    mark_duplicates(rows)
    return rows


def test_scan_stats_rows(stats_rows):
    rows = {r["scan"]: r for r in stats_rows}
    assert set(rows["good_0"]) == {"scan", "path", "format", "rows", "cols", "finite_fraction", "dynamic_range",
                                   "pixel_nm", "unit", "content_hash", "duplicate_of"}
    assert (rows["good_0"]["rows"], rows["good_0"]["cols"]) == (96, 80)
    assert rows["good_0"]["finite_fraction"] == 1.0 and rows["good_0"]["dynamic_range"] > 0
    assert rows["holes"]["finite_fraction"] == pytest.approx(86 / 96)
    assert math.isfinite(rows["holes"]["dynamic_range"])
    assert rows["copy"]["duplicate_of"] == "good_0" and rows["good_1"]["duplicate_of"] is None
    assert rows["copy"]["content_hash"] == rows["good_0"]["content_hash"] != rows["good_1"]["content_hash"]


def test_run_suite_good_table_passes(stats_rows):
    from stm_defects.config import ValidateParams
    from stm_defects.data.validate import run_suite

    good = [r for r in stats_rows if r["scan"].startswith("good_")]
    res = run_suite(good, ValidateParams())
    assert res["success"] is True
    assert res["failures"] == {}
    assert len(res["results"]) == 7 and all(r["success"] for r in res["results"])


def test_run_suite_data_docs_are_the_same_files_every_run(stats_rows, tmp_path):
    """The Data Docs are a DVC output: the same table must render the same files (no clock
    times, no random ids), wherever and whenever it runs."""
    import time

    from stm_defects.config import ValidateParams
    from stm_defects.data.validate import run_suite

    def tree(d):
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    run_suite(stats_rows, ValidateParams(), docs_dir=tmp_path / "a")
    time.sleep(0.01)
    run_suite(stats_rows, ValidateParams(), docs_dir=tmp_path / "b")
    a, b = tree(tmp_path / "a"), tree(tmp_path / "b")
    assert any(k.endswith(".html") and "validations" in k for k in a), "a validation page was written"
    assert a == b


def test_run_suite_reports_each_failing_scan_with_a_reason(stats_rows):
    from stm_defects.config import ValidateParams
    from stm_defects.data.validate import run_suite

    res = run_suite(stats_rows, ValidateParams())
    assert res["success"] is False
    assert set(res["failures"]) == {"small", "holes", "copy"}
    small, holes, copy = (" ".join(res["failures"][k]) for k in ("small", "holes", "copy"))
    assert "(rows)" in small and "value 32" in small and "(cols)" not in small
    assert "finite_fraction" in holes and "0.89" in holes
    assert "duplicate_of" in copy
    failed = {r["expectation"] for r in res["results"] if not r["success"]}
    assert failed == {"expect_column_values_to_be_between(rows)",
                      "expect_column_values_to_be_between(finite_fraction)",
                      "expect_column_values_to_be_null(duplicate_of)"}


# ============================================================================ analysis.dispatch
def test_predict_config_round_trip():
    from stm_defects.analysis.dispatch import PredictConfig
    from stm_defects.image.preprocess import PreprocessConfig
    from stm_defects.improved.anomaly import AnomalyConfig
    from stm_defects.improved.method import ImprovedConfig
    from stm_defects.paper.masks import MaskConfig
    from stm_defects.paper.method import PaperConfig

    default = PredictConfig()
    assert PredictConfig.from_dict(default.to_dict()) == default
    custom = PredictConfig(
        method="paper",
        preprocess=PreprocessConfig(align_rows=False, clip_percentiles=(1.0, 99.0), target_pixel_nm=0.08),
        paper=PaperConfig(patch=16, mask=MaskConfig(threshold=0.3, target_clusters=(1, 4))),
        improved=ImprovedConfig(anomaly=AnomalyConfig(threshold=3.0, scales=(2.0,)), min_train_defects=5))
    data = custom.to_dict()
    assert json.loads(json.dumps(data)) == data                      # plain JSON (a registry tag)
    back = PredictConfig.from_dict(json.loads(json.dumps(data)))
    assert back == custom
    assert back.paper.mask.target_clusters == (1, 4) and back.preprocess.clip_percentiles == (1.0, 99.0)
    assert back.min_scan_px == 16 and default.min_scan_px == default.improved.classify.patch
    # a partial dict takes the defaults for the rest
    assert PredictConfig.from_dict({"method": "paper"}) == dataclasses.replace(default, method="paper")


@pytest.mark.parametrize("data", [{"bogus": 1}, {"preprocess": {"align_row": False}},
                                  {"improved": {"anomaly": {"treshold": 3}}}, {"paper": {"mask": {"x": 1}}}])
def test_predict_config_unknown_key(data):
    from stm_defects.analysis.dispatch import PredictConfig

    key = next(iter(data))
    with pytest.raises(ConfigError, match="unknown key") as err:
        PredictConfig.from_dict(data, "stored config")
    assert "stored config" in str(err.value) and key in str(err.value)


def test_predict_config_bad_method():
    from stm_defects.analysis.dispatch import PredictConfig

    with pytest.raises(ConfigError, match="method"):
        PredictConfig(method="magic")
    with pytest.raises(ConfigError, match="magic"):
        PredictConfig.from_dict({"method": "magic"})
    assert issubclass(ConfigError, ValueError)
