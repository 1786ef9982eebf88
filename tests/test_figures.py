"""Pictures: sizes capped and readable, scale bar, colour bar and legend present, terrace display."""

from __future__ import annotations

import numpy as np
import pytest

from stm_defects.analysis.figures import (
    FigureStyle,
    character_figure,
    class_figure,
    display_range,
    nice_length,
    scan_figure,
)


@pytest.mark.parametrize("target, want", [(23.0, 20.0), (7.0, 5.0), (1.0, 1.0), (0.34, 0.2), (1999, 1000)])
def test_nice_length(target, want):
    assert nice_length(target) == pytest.approx(want)


def _scan(n=256, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    img = 0.5 + 0.1 * np.sin(xx / 3.0) + 0.02 * rng.standard_normal((n, n))
    img[n // 2 - 4:n // 2 + 4, n // 2 - 4:n // 2 + 4] += 0.4
    return img.astype(np.float32)


def _defects(n=256):
    c = n // 2
    return [{"bbox": [c - 6, c - 6, c + 6, c + 6], "class": 0, "name": None},
            {"bbox": [10, 10, 20, 20], "class": -1, "name": None}]


def test_scan_figure_layout_and_legend():
    img = _scan()
    fig = scan_figure(img, _defects(), pixel_nm=0.1, z_per_unit=0.3, names={"0": "vacancy"})
    a = np.asarray(fig)
    # enlarged to at least min_side, plus a colour bar to the right and a legend below
    assert fig.size[0] > FigureStyle().min_side and fig.size[1] > FigureStyle().min_side
    # the scale bar: a run of pure white pixels near the bottom left of the picture
    style = FigureStyle()
    s = style.min_side // 256
    title_h = int(1.8 * int(np.clip(256 * s / 40, 12, 40)))
    pic = a[title_h:title_h + 256 * s, :256 * s]
    bottom = pic[-60:, :400]
    white_rows = [(row == 255).all(axis=1).sum() for row in bottom]
    assert max(white_rows) >= 100          # 20% of a 25.6 nm field rounds to a 5 nm bar = 150 px
    # the class colour of class 0 (tab20's first colour) and the unknown colour are drawn
    assert ((a == (31, 119, 180)).all(axis=2)).any()
    assert ((a == (0, 255, 255)).all(axis=2)).any()


def test_big_scans_are_capped_and_small_ones_enlarged():
    big = np.zeros((3000, 2500), np.float32)
    big[::7] = 1.0
    fig = scan_figure(big, [], pixel_nm=1.0, style=FigureStyle(max_side=1024))
    assert fig.size[0] < 1024 + 300 and fig.size[1] < 1024 + 200
    small = scan_figure(_scan(64), [], pixel_nm=0.05)
    assert small.size[0] >= FigureStyle().min_side


def test_no_calibration_means_pixel_scale_bar_and_arbitrary_heights():
    fig = scan_figure(_scan(), [], pixel_nm=None, z_per_unit=None)
    assert fig.size[0] > 0     # renders; the units are px and a.u. (text, checked by eye)


def test_character_figure_shows_the_score_on_one_terrace():
    one_terrace = np.zeros((200, 200), np.int64)
    score = np.abs(np.random.default_rng(1).standard_normal((200, 200))).astype(np.float32)
    score[100, 100] = 12.0
    a = np.asarray(character_figure(one_terrace, score, 0.1, threshold=5.0))
    assert a.std() > 10          # not one flat colour


def test_class_figure_colours_the_defect_pixels():
    img = _scan(128)
    cm = np.full(img.shape, -1, np.int64)
    cm[60:70, 60:70] = 2
    a = np.asarray(class_figure(img, cm, [{"bbox": [60, 60, 70, 70], "class": 2}], pixel_nm=0.1))
    assert a.shape[0] > 128


def test_display_range_ignores_outliers():
    a = np.zeros((100, 100))
    a[0, 0] = 1e6
    lo, hi = display_range(a + np.linspace(0, 1, 100)[None, :])
    assert hi < 2.0
