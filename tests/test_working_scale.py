"""The default method at a working resolution: the same defect, imaged at different pixel sizes,
is found once at the same place (in nm); scans of unknown pixel size are analysed as they are."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stm_defects.data.lattices import LATTICES, lattice_height
from stm_defects.image.preprocess import preprocess
from stm_defects.improved.method import ImprovedConfig, improved_analyse, working_scale

FIELD_NM = 12.8
DEFECTS_NM = [(6.4, 6.4, +1), (3.2, 9.6, -1), (9.6, 3.0, +1)]   # x, y, bright (+1) or dark (-1)


def _scan(family: str, pixel_nm: float, seed: int = 0) -> np.ndarray:
    n = int(round(FIELD_NM / pixel_nm))
    h = lattice_height(family, (n, n), pixel_nm, np.radians(12.0)).astype(np.float64)
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) * pixel_nm
    for x, y, sign in DEFECTS_NM:
        h += sign * 0.12 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 0.45 ** 2))
    h += np.random.default_rng(seed).normal(0, 0.004, h.shape)
    return h.astype(np.float32)


def _found_nm(family: str, pixel_nm: float, cfg=ImprovedConfig()) -> np.ndarray:
    img, _ = preprocess(_scan(family, pixel_nm), pixel_nm)
    regions = improved_analyse(img, None, cfg, pixel_nm).regions
    return np.array([[(r["x"] + 0.5) * pixel_nm, (r["y"] + 0.5) * pixel_nm] for r in regions]).reshape(-1, 2)


@pytest.mark.parametrize("family", ["wse2_hex", "si001_h_1x1"])
def test_same_defects_found_at_every_pixel_size(family):
    truth = np.array([(x, y) for x, y, _ in DEFECTS_NM])
    for pixel_nm in (0.025, 0.05, 0.1):
        found = _found_nm(family, pixel_nm)
        assert len(found) == len(truth), (family, pixel_nm, found.round(2).tolist())
        d = np.hypot(*(found[:, None, :] - truth[None]).transpose(2, 0, 1)).min(axis=0)
        assert d.max() < 0.4, (family, pixel_nm, d)


def test_lattice_families_are_known():
    assert {"wse2_hex", "si001_h_1x1"} <= set(LATTICES)


def test_working_scale_rules():
    cfg = ImprovedConfig()
    assert cfg.working_pixel_nm == 0.1
    assert working_scale((512, 512), None, cfg) == 1.0          # unknown pixel size: as it is
    assert working_scale((512, 512), 0.2, cfg) == 1.0           # coarser: never upsampled
    assert working_scale((512, 512), 0.05, cfg) == pytest.approx(0.5)
    assert working_scale((256, 256), 0.01, cfg) == pytest.approx(0.5)   # floor: 128 px
    off = dataclasses.replace(cfg, working_pixel_nm=None)
    assert working_scale((512, 512), 0.01, off) == 1.0


def test_results_come_back_on_the_input_grid():
    pixel_nm = 0.025
    img, _ = preprocess(_scan("wse2_hex", pixel_nm), pixel_nm)
    res = improved_analyse(img, None, ImprovedConfig(), pixel_nm)
    assert res.error_map.shape == res.mask.shape == res.char_map.shape == res.class_map.shape == img.shape
    for r in res.regions:
        x0, y0, x1, y1 = r["bbox"]
        assert 0 <= x0 <= r["x"] <= x1 <= img.shape[1] and 0 <= y0 <= r["y"] <= y1 <= img.shape[0]
        assert res.mask[int(round(r["y"])), int(round(r["x"]))]




def _residual_and_rows(pixel_nm: float, sigma_nm: float) -> tuple[np.ndarray, np.ndarray, float]:
    """A 12.8 nm field: (residual with one elongated bright defect at its centre, a row
    lattice at 20 degrees with a 0.77 nm period, the centre in px)."""
    n = int(round(12.8 / pixel_nm))
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) * pixel_nm
    a = np.radians(20.0)
    u = (xx - 6.4) * np.cos(a) + (yy - 6.4) * np.sin(a)      # along the rows
    v = -(xx - 6.4) * np.sin(a) + (yy - 6.4) * np.cos(a)     # across
    residual = np.exp(-(u ** 2 / (2 * (1.6 * sigma_nm) ** 2) + v ** 2 / (2 * sigma_nm ** 2)))
    lattice = np.cos(2 * np.pi * v / 0.77)
    return residual.astype(np.float32), lattice.astype(np.float32), 6.4 / pixel_nm - 0.5


def _class_patch(pixel_nm: float, sigma_nm: float, physical: bool = True) -> np.ndarray:
    from stm_defects.improved.classify import canonical_patches
    from stm_defects.improved.method import patch_step

    cfg = ImprovedConfig()
    k = working_scale((512, 512), pixel_nm, cfg)      # finer scans: the working grid is at 0.1 nm/px
    residual, lattice, c = _residual_and_rows(pixel_nm / k, sigma_nm)
    step = patch_step(pixel_nm, k, cfg) if physical else 1.0
    patches, _ = canonical_patches(residual, lattice, [(c, c)], cfg.classify, 1.0, step)
    return patches[0].ravel()


def test_a_defect_gives_the_same_class_patch_at_every_pixel_size():
    """The classes see a patch of the same nm whatever the pixel size: a defect imaged at
    0.05, 0.1 or 0.2 nm/px gives them the same patch, and a defect twice as big another one."""
    ref = _class_patch(0.1, 0.3)
    for pixel_nm in (0.05, 0.2, 0.25):
        assert np.corrcoef(ref, _class_patch(pixel_nm, 0.3))[0, 1] > 0.98, pixel_nm
    # patches in pixels: at 0.2 nm/px the same defect looks like one half as big at 0.1 nm/px
    assert np.corrcoef(ref, _class_patch(0.2, 0.3, physical=False))[0, 1] < 0.9
    assert np.corrcoef(_class_patch(0.2, 0.3, physical=False), _class_patch(0.1, 0.15))[0, 1] > 0.98
    assert np.corrcoef(ref, _class_patch(0.1, 0.6))[0, 1] < 0.9
