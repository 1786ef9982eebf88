import numpy as np

from stm_defects.analysis.render import class_colour, class_gallery, class_picture, overlay


def test_overlay_draws_a_box_in_the_class_colour():
    img = np.zeros((40, 40), np.float32)
    pic = overlay(img, [{"bbox": [10, 12, 20, 22], "class": 3}], scale=1)
    assert pic.shape == (40, 40, 3) and pic.dtype == np.uint8
    assert tuple(pic[12, 15]) == class_colour(3)          # top edge of the box
    assert tuple(pic[30, 30]) != class_colour(3)          # outside


def test_class_picture_colours_only_defect_pixels():
    img = np.full((8, 8), 0.5, np.float32)
    cmap = np.full((8, 8), -1)
    cmap[2:4, 2:4] = 1
    pic = class_picture(img, cmap)
    assert (pic[0, 0] == pic[0, 0, 0]).all()              # grey where there is no defect
    assert not (pic[2, 2] == pic[2, 2, 0]).all()          # coloured on the defect


def test_gallery_has_one_row_per_class():
    rng = np.random.default_rng(0)
    examples = {0: [rng.random((32, 32))] * 3, 2: [rng.random((32, 32))], -1: [rng.random((32, 32))]}
    one = class_gallery({0: examples[0]}, per_class=4, scale=1)
    three = class_gallery(examples, names={"0": "adsorbate"}, per_class=4, scale=1)
    assert three.shape[1] == one.shape[1]
    assert three.shape[0] > 2.5 * one.shape[0]
