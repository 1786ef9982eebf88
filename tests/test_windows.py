import numpy as np
import pytest

from stm_defects.image.windows import extract_windows, mean_map, vote_map, window_origins, windows_at


@pytest.mark.parametrize(
    "shape,size,step", [((50, 70), 16, 5), ((32, 32), 32, 4), ((40, 23), 8, 8), ((17, 30), 5, 1)]
)
def test_origins_cover_every_pixel_without_duplicates(shape, size, step):
    o = window_origins(shape, size, step)
    assert o.ndim == 2 and o.shape[1] == 2 and np.issubdtype(o.dtype, np.integer)
    assert len(np.unique(o, axis=0)) == len(o)
    assert o.min() >= 0 and o[:, 0].max() == shape[0] - size and o[:, 1].max() == shape[1] - size
    cover = np.zeros(shape, int)
    for r, c in o:
        cover[r : r + size, c : c + size] += 1
    assert cover.min() >= 1


def test_extract_windows_patches_match_origins():
    img = np.random.default_rng(0).random((45, 38)).astype(np.float32)
    patches, origins = extract_windows(img, 12, 5)
    assert patches.shape == (len(origins), 1, 12, 12) and patches.dtype == np.float32
    for p, (r, c) in zip(patches, origins):
        np.testing.assert_array_equal(p[0], img[r : r + 12, c : c + 12])


def test_round_trip_extract_mean_map_is_exact():
    img = np.random.default_rng(1).random((61, 77)).astype(np.float32)
    for size, step in [(16, 4), (9, 3), (20, 7)]:
        patches, origins = extract_windows(img, size, step)
        np.testing.assert_array_equal(mean_map(patches, origins, img.shape, size), img)
        perm = np.random.default_rng(2).permutation(len(origins))  # order must not matter
        np.testing.assert_array_equal(mean_map(patches[perm, 0], origins[perm], img.shape, size), img)


def test_mean_map_scalar_values_and_uncovered():
    shape, size = (20, 20), 6
    origins = np.array([[0, 0], [0, 3], [10, 10]])
    out = mean_map(np.array([1.0, 3.0, 5.0]), origins, shape, size)
    assert out.dtype == np.float32
    assert out[0, 0] == 1.0 and out[0, 4] == 2.0 and out[2, 8] == 3.0 and out[12, 12] == 5.0
    assert np.isnan(out[19, 0]) and np.isnan(out[8, 8])


def test_vote_map_constant_labels():
    shape, size = (40, 50), 10
    origins = window_origins(shape, size, 3)
    out = vote_map(np.full(len(origins), 2), origins, shape, size, n_labels=4)
    assert out.shape == shape and (out == 2).all()


def test_vote_map_majority_hand_made():
    # three 4x4 windows on a 6x8 image
    origins = np.array([[0, 0], [0, 2], [2, 2]])
    labels = np.array([1, 0, 1])
    out = vote_map(labels, origins, (6, 8), 4, n_labels=3)
    # A=(0,0) label 1, B=(0,2) label 0, C=(2,2) label 1; ties (A+B, B+C) go to the smaller label 0
    expected = np.array(
        [
            [1, 1, 0, 0, 0, 0, -1, -1],
            [1, 1, 0, 0, 0, 0, -1, -1],
            [1, 1, 1, 1, 0, 0, -1, -1],
            [1, 1, 1, 1, 0, 0, -1, -1],
            [-1, -1, 1, 1, 1, 1, -1, -1],
            [-1, -1, 1, 1, 1, 1, -1, -1],
        ]
    )
    np.testing.assert_array_equal(out, expected)


def test_windows_at_clamps_at_borders():
    img = np.arange(30 * 40, dtype=np.float32).reshape(30, 40)
    centres = np.array([[0, 0], [29, 39], [15, 20], [-5, 100]])
    patches, origins = windows_at(img, centres, 8)
    np.testing.assert_array_equal(origins, [[0, 0], [22, 32], [11, 16], [0, 32]])
    assert patches.shape == (4, 1, 8, 8) and patches.dtype == np.float32
    for p, (r, c) in zip(patches, origins):
        np.testing.assert_array_equal(p[0], img[r : r + 8, c : c + 8])


def test_too_small_image_raises():
    img = np.zeros((10, 40), np.float32)
    with pytest.raises(ValueError):
        window_origins(img.shape, 16, 4)
    with pytest.raises(ValueError):
        extract_windows(img, 16, 4)
    with pytest.raises(ValueError):
        windows_at(img, [[5, 5]], 16)
