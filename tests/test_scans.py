"""Tests for stm_defects.io.scans: real instrument files, round trips and bad input."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from stm_defects.io.scans import (
    SCAN_EXTENSIONS,
    Scan,
    ScanError,
    find_scans,
    read_scan,
    require_min_size,
    save_gwy,
)

MATRIX_FILES = {
    # data file -> scan width in nm (500 x 500 pixels each)
    "default_2011Mar10-162902_STM-STM_Spectroscopy--1_3.Z_mtrx": 20.0,
    "default_2011May27-164015_STM-STM_Spectroscopy--22_4.Z_mtrx": 20.0,
    "default_2022Jan12-130324_STM-STM_Spectroscopy--2_3.Z_mtrx": 50.0,
}
SXM_FILE = "pynxtools-spm/STM_nanonis_generic_4_5.sxm"
RHK_FILES = {
    # file -> field of view in nm (256 x 256 pixels each)
    "hopg_300k_2020_08_11_16_04_06_999.sm4": 100.0,
    "dI-dV_9K_ABC6_2020_07_02_08_50_47_967.sm4": 1.0,
}
SPIEPY_FILES = {
    "image_with_defects.dat": (256, 256),
    "image_with_step_edge.dat": (512, 512),
    "image_with_step_edge_and_atoms.dat": (512, 512),
}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def assert_plausible(scan: Scan, shape: tuple[int, int]) -> None:
    assert isinstance(scan, Scan)
    assert scan.height.shape == shape
    assert scan.height.dtype == np.float32
    assert np.isfinite(scan.height).all()
    assert scan.unit == "nm"
    peak_to_peak = float(scan.height.max() - scan.height.min())
    assert 0.01 < peak_to_peak < 1000.0
    assert scan.origin == (0, 0)
    assert scan.original_shape == shape
    json.dumps(scan.meta)  # metadata must be JSON-serialisable


def assert_scan_error(excinfo: pytest.ExceptionInfo, path: Path, *fragments: str) -> None:
    err = excinfo.value
    message = str(err)
    assert "\n" not in message
    assert message == f"{err.path}: {err.reason}"
    assert path.name in message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), (fragment, message)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean(axis=1, keepdims=True)  # remove line offsets
    b = b - b.mean(axis=1, keepdims=True)
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def write_spiepy(path: Path, heights_m: np.ndarray) -> None:
    rows, cols = heights_m.shape
    path.write_bytes(struct.pack("<II", rows, cols) + heights_m.astype("<f8").tobytes())


def sxm_data_offset(raw: bytes) -> int:
    """Byte offset of the binary data block of a Nanonis .sxm file."""
    end = raw.index(b":SCANIT_END:")
    return raw.index(b"\x1a\x04", end) + 2


# ---------------------------------------------------------------------------
# real files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MATRIX_FILES))
def test_matrix_real_files(real_stm_dir: Path, name: str) -> None:
    scan = read_scan(real_stm_dir / "srsml24-schofield" / name)
    assert_plausible(scan, (500, 500))
    assert scan.format == "matrix"
    assert scan.channel == "Z"
    assert scan.direction == "forward/up"
    assert scan.pixel_nm == pytest.approx(MATRIX_FILES[name] / 500)
    assert scan.meta["width_nm"] == pytest.approx(MATRIX_FILES[name])
    assert scan.meta["bias_unit"] == "Volt"


def test_matrix_pixel_size_is_20nm_over_500px(real_stm_dir: Path) -> None:
    scan = read_scan(real_stm_dir / "srsml24-schofield" / min(MATRIX_FILES))
    assert scan.pixel_nm == pytest.approx(0.04)


def test_matrix_all_four_directions_read_and_differ(real_stm_dir: Path) -> None:
    path = real_stm_dir / "srsml24-schofield" / "default_2011May27-164015_STM-STM_Spectroscopy--22_4.Z_mtrx"
    scans = {d: read_scan(path, d) for d in ("forward/up", "backward/up", "forward/down", "backward/down")}
    for direction, scan in scans.items():
        assert scan.direction == direction
        assert_plausible(scan, (500, 500))
    names = list(scans)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.array_equal(scans[a].height, scans[b].height), (a, b)
    # all four traces show the same area: they correlate
    assert correlation(scans["forward/up"].height, scans["backward/up"].height) > 0.3
    # short forms
    assert read_scan(path, "bwd").direction == "backward/up"
    assert read_scan(path, "fwd-down").direction == "forward/down"


def test_nanonis_real_file(real_stm_dir: Path) -> None:
    path = real_stm_dir / SXM_FILE
    forward = read_scan(path)
    assert_plausible(forward, (256, 256))
    assert forward.format == "nanonis"
    assert forward.channel == "Z"
    assert forward.direction == "forward"
    assert forward.pixel_nm == pytest.approx(4.0 / 256)
    assert forward.meta["bias_V"] == pytest.approx(0.05)
    assert forward.meta["scan_dir"] == "down"

    backward = read_scan(path, "backward")
    assert backward.direction == "backward"
    assert_plausible(backward, (256, 256))
    # backward lines are flipped left-right to line up with the forward image
    aligned = correlation(forward.height, backward.height)
    mirrored = correlation(forward.height, backward.height[:, ::-1])
    assert aligned > 0.5 and aligned > mirrored


@pytest.mark.parametrize("name", sorted(RHK_FILES))
def test_rhk_real_files(real_stm_dir: Path, name: str) -> None:
    path = real_stm_dir / "spym-rhk" / name
    scan = read_scan(path)
    assert_plausible(scan, (256, 256))
    assert scan.format == "rhk"
    assert scan.channel == "Topography"
    assert scan.direction == "forward"
    assert scan.pixel_nm * 256 == pytest.approx(RHK_FILES[name], rel=1e-3)
    backward = read_scan(path, "bwd")
    assert backward.direction == "backward"
    assert not np.array_equal(scan.height, backward.height)


@pytest.mark.parametrize("name", sorted(SPIEPY_FILES))
def test_spiepy_real_files(real_stm_dir: Path, name: str) -> None:
    scan = read_scan(real_stm_dir / "spiepy" / name)
    assert_plausible(scan, SPIEPY_FILES[name])
    assert scan.format == "spiepy"
    assert scan.pixel_nm is None


def test_find_scans_on_real_folder(real_stm_dir: Path) -> None:
    found = find_scans([real_stm_dir])
    suffixes = sorted(p.suffix.lower() for p in found)
    assert suffixes.count(".z_mtrx") == 3
    assert suffixes.count(".sxm") == 1
    assert suffixes.count(".sm4") == 2
    assert suffixes.count(".dat") == 3
    assert len(found) == 9  # no .mtrx parameter files, no PROVENANCE.md
    assert found == sorted(found)


# ---------------------------------------------------------------------------
# round trips on temporary files
# ---------------------------------------------------------------------------


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(40, 48)).astype(np.float32)


def test_npy_round_trip(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "img.npy"
    np.save(path, image)
    scan = read_scan(path)
    np.testing.assert_array_equal(scan.height, image)
    assert (scan.unit, scan.pixel_nm, scan.format) == ("a.u.", None, "npy")
    assert scan.original_shape == image.shape


def test_tiff_float32_round_trip(tmp_path: Path, image: np.ndarray) -> None:
    import tifffile

    path = tmp_path / "img.tif"
    tifffile.imwrite(path, image)
    scan = read_scan(path)
    np.testing.assert_array_equal(scan.height, image)
    assert (scan.unit, scan.format) == ("a.u.", "tiff")


def test_tiff_uint16_round_trip(tmp_path: Path) -> None:
    import tifffile

    data = np.random.default_rng(1).integers(0, 65535, size=(33, 35), dtype=np.uint16)
    path = tmp_path / "img.TIFF"  # extensions are compared case-insensitively
    tifffile.imwrite(path, data)
    scan = read_scan(path)
    assert scan.height.dtype == np.float32
    np.testing.assert_array_equal(scan.height, data.astype(np.float32))


def test_png_grey_and_rgb(tmp_path: Path) -> None:
    from PIL import Image

    grey = np.random.default_rng(2).integers(0, 255, size=(30, 31), dtype=np.uint8)
    grey_path = tmp_path / "grey.png"
    Image.fromarray(grey).save(grey_path)
    scan = read_scan(grey_path)
    np.testing.assert_array_equal(scan.height, grey.astype(np.float32))
    assert (scan.unit, scan.pixel_nm, scan.format) == ("a.u.", None, "png")

    rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1).astype(np.uint8)
    rgb_path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(rgb_path)
    scan = read_scan(rgb_path)
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(scan.height, expected, rtol=1e-6)


def test_gwy_round_trip_nm(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "synthetic.gwy"
    heights = image * 0.2 + 1.5
    save_gwy(path, heights, pixel_nm=0.05, meta={"source": "synthetic", "seed": 3})
    scan = read_scan(path)
    np.testing.assert_allclose(scan.height, heights, rtol=1e-6, atol=1e-6)
    assert scan.unit == "nm"
    assert scan.pixel_nm == pytest.approx(0.05)
    assert scan.format == "gwyddion"
    assert scan.meta["source"] == "synthetic"
    assert scan.meta["seed"] == "3"
    json.dumps(scan.meta)


def test_gwy_round_trip_arbitrary_units(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "raw.gwy"
    save_gwy(path, image, pixel_nm=None, unit="a.u.")
    scan = read_scan(path)
    np.testing.assert_allclose(scan.height, image, rtol=1e-6)
    assert scan.unit == "a.u."
    assert scan.pixel_nm is None


def test_spiepy_dat_round_trip(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "written.dat"
    heights_m = image.astype(np.float64) * 1e-10
    write_spiepy(path, heights_m)
    scan = read_scan(path)
    np.testing.assert_allclose(scan.height, heights_m * 1e9, rtol=1e-6)
    assert scan.unit == "nm"
    assert scan.pixel_nm is None


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "notes.xyz"
    path.write_text("hello")
    with pytest.raises(ScanError) as excinfo:
        read_scan(path)
    assert_scan_error(excinfo, path, "unsupported file type .xyz", ".sxm", ".Z_mtrx", ".png")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.sxm"
    with pytest.raises(ScanError) as excinfo:
        read_scan(path)
    assert_scan_error(excinfo, path, "not found")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.sxm"
    path.touch()
    with pytest.raises(ScanError) as excinfo:
        read_scan(path)
    assert_scan_error(excinfo, path, "empty")


def test_truncated_sxm(real_stm_dir: Path, tmp_path: Path) -> None:
    raw = (real_stm_dir / SXM_FILE).read_bytes()
    path = tmp_path / "cut.sxm"
    path.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ScanError) as excinfo:
        read_scan(path)
    assert_scan_error(excinfo, path, "truncated")


def test_truncated_dat(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "cut.dat"
    write_spiepy(path, image.astype(np.float64))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ScanError) as excinfo:
        read_scan(path)
    assert_scan_error(excinfo, path, "truncated", "40x48")


@pytest.mark.parametrize("suffix", [".gwy", ".png", ".tif", ".npy", ".sm4", ".sxm"])
def test_corrupt_files(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not an image file\n" * 4)
    with pytest.raises(ScanError) as excinfo:
        read_scan(path)
    assert_scan_error(excinfo, path)


def test_matrix_without_parameter_file(real_stm_dir: Path, tmp_path: Path) -> None:
    name = "default_2011Mar10-162902_STM-STM_Spectroscopy--1_3.Z_mtrx"
    path = tmp_path / name
    shutil.copy(real_stm_dir / "srsml24-schofield" / name, path)
    with pytest.raises(ScanError) as excinfo:
        read_scan(path)
    assert_scan_error(excinfo, path, "default_2011Mar10-162902_STM-STM_Spectroscopy_0001.mtrx", "missing")


def test_matrix_parameter_file_is_not_a_scan(real_stm_dir: Path) -> None:
    path = real_stm_dir / "srsml24-schofield" / "default_2011Mar10-162902_STM-STM_Spectroscopy_0001.mtrx"
    with pytest.raises(ScanError) as excinfo:
        read_scan(path)
    assert_scan_error(excinfo, path, "parameter file")


def test_all_nan_image(tmp_path: Path) -> None:
    path = tmp_path / "nan.npy"
    np.save(path, np.full((40, 40), np.nan, dtype=np.float32))
    with pytest.raises(ScanError) as excinfo:
        read_scan(path)
    assert_scan_error(excinfo, path, "NaN")


def test_constant_image(tmp_path: Path) -> None:
    path = tmp_path / "flat.npy"
    np.save(path, np.full((40, 40), 2.5))
    with pytest.raises(ScanError) as excinfo:
        read_scan(path)
    assert_scan_error(excinfo, path, "constant", "no height variation")


def test_non_2d_array(tmp_path: Path) -> None:
    path = tmp_path / "stack.npy"
    np.save(path, np.random.default_rng(3).normal(size=(3, 20, 20)))
    with pytest.raises(ScanError) as excinfo:
        read_scan(path)
    assert_scan_error(excinfo, path, "2-D", "(3, 20, 20)")


def test_unknown_direction(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "img.npy"
    np.save(path, image)
    with pytest.raises(ScanError) as excinfo:
        read_scan(path, "sideways")
    assert_scan_error(excinfo, path, "unknown direction")
    with pytest.raises(ScanError) as excinfo:
        read_scan(path, "backward")
    assert_scan_error(excinfo, path, "single image")


def test_image_smaller_than_patch(tmp_path: Path) -> None:
    path = tmp_path / "tiny.npy"
    np.save(path, np.random.default_rng(4).normal(size=(20, 20)))
    scan = read_scan(path)
    require_min_size(scan, 16)
    with pytest.raises(ScanError) as excinfo:
        require_min_size(scan, 32)
    assert_scan_error(excinfo, path, "image 20x20 is smaller than one 32x32 patch")


def test_aborted_scan_is_cropped(tmp_path: Path, image: np.ndarray) -> None:
    data = image.astype(np.float64)  # 40 x 48
    data[0:2, :] = np.nan  # unfinished lines before the image (scan started from the other end)
    data[30:, :] = np.nan  # aborted: NaN lines at the bottom
    data[:, -3:] = np.nan  # unfinished columns on the right
    data[10, 5] = np.nan  # one interior dropout, filled in
    path = tmp_path / "aborted.npy"
    np.save(path, data)
    scan = read_scan(path)
    assert scan.height.shape == (28, 45)
    assert scan.origin == (2, 0)
    assert scan.original_shape == (40, 48)
    np.testing.assert_array_equal(scan.height[0, :], data[2, :45].astype(np.float32))
    assert np.isfinite(scan.height).all()
    assert scan.meta["nan_filled_fraction"] == pytest.approx(1 / (28 * 45))


def test_rows_and_columns_of_real_zeros_are_kept(tmp_path: Path, image: np.ndarray) -> None:
    data = image.astype(np.float64)  # 40 x 48
    data[:3, :] = 0.0  # a dark band at the top, a dark column at the right: data, not unscanned lines
    data[:, -1] = 0.0
    data[-2:, :] = np.nan  # only these were never scanned
    path = tmp_path / "zeros.npy"
    np.save(path, data)
    scan = read_scan(path)
    assert scan.height.shape == (38, 48)
    assert scan.origin == (0, 0)
    np.testing.assert_array_equal(scan.height[:3], 0.0)
    np.testing.assert_array_equal(scan.height[:, -1], 0.0)


def test_aborted_nanonis_scan_is_cropped(real_stm_dir: Path, tmp_path: Path) -> None:
    raw = bytearray((real_stm_dir / SXM_FILE).read_bytes())
    start = sxm_data_offset(bytes(raw))
    data = np.frombuffer(bytes(raw[start:]), dtype=">f4").reshape(4, 256, 256).copy()
    data[:, 200:, :] = np.nan  # the last 56 lines were never scanned
    raw[start:] = data.astype(">f4").tobytes()
    path = tmp_path / "aborted.sxm"
    path.write_bytes(bytes(raw))
    for direction in ("forward", "backward"):
        scan = read_scan(path, direction)
        assert scan.height.shape == (200, 256)
        assert scan.origin == (0, 0)
        assert scan.original_shape == (256, 256)
        assert scan.pixel_nm == pytest.approx(4.0 / 256)


def test_find_scans_on_folder_tree(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    wanted = [
        tmp_path / "a" / "deep" / "one.SXM",
        tmp_path / "a" / "x--1_1.Z_mtrx",
        tmp_path / "b" / "two.png",
        tmp_path / "top.npy",
    ]
    for p in wanted:
        p.write_bytes(b"x")
    for p in (tmp_path / "a" / "x_0001.mtrx", tmp_path / "b" / "notes.txt", tmp_path / ".hidden" / "h.sxm"):
        p.write_bytes(b"x")
    assert find_scans([tmp_path]) == sorted(wanted)
    assert find_scans(tmp_path) == sorted(wanted)
    # files are taken as given, whatever their extension
    odd = tmp_path / "b" / "notes.txt"
    assert find_scans([odd, tmp_path / "top.npy"]) == [odd, tmp_path / "top.npy"]


def test_scan_extensions_are_lower_case() -> None:
    assert all(e == e.lower() and e.startswith(".") for e in SCAN_EXTENSIONS)
    assert {".z_mtrx", ".sxm", ".sm4", ".gwy", ".dat", ".npy", ".tif", ".tiff", ".png", ".jpg", ".jpeg"} == set(
        SCAN_EXTENSIONS
    )


def test_scan_error_str_and_pickle() -> None:
    import pickle

    err = ScanError(Path("/data/x.sxm"), "broken\nfile")
    assert str(err) == "/data/x.sxm: broken file"
    assert (err.path, err.reason) == ("/data/x.sxm", "broken file")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err)


def write_aborted_matrix(src: Path, dst: Path, n_items: int) -> None:
    """Copy a Matrix data file keeping only its first ``n_items`` values, as an aborted scan leaves it."""
    raw = src.read_bytes()
    csed = raw.index(b"CSED", 12)
    atad = raw.index(b"ATAD", csed)
    count_at = csed + 8 + 24  # data item count in the CSED block
    (old,) = struct.unpack_from("<i", raw, count_at)
    out = bytearray(raw[:atad])
    struct.pack_into("<i", out, count_at, n_items)
    out += b"ATAD" + struct.pack("<L", 4 * n_items) + raw[atad + 8 : atad + 8 + 4 * n_items]
    (block_length,) = struct.unpack_from("<L", out, 16)  # enclosing TLKB block
    struct.pack_into("<L", out, 16, block_length - 4 * (old - n_items))
    dst.write_bytes(bytes(out))


def test_aborted_matrix_scan_keeps_grid_coordinates(real_stm_dir: Path, tmp_path: Path) -> None:
    folder = real_stm_dir / "srsml24-schofield"
    name = "default_2011May27-164015_STM-STM_Spectroscopy--22_4.Z_mtrx"
    shutil.copy(folder / "default_2011May27-164015_STM-STM_Spectroscopy_0001.mtrx", tmp_path)
    path = tmp_path / name
    full = {d: read_scan(folder / name, d).height for d in ("forward/up", "forward/down")}

    # stopped on the way down: 500 up line pairs, then 200 down line pairs (+ a partial line)
    write_aborted_matrix(folder / name, path, 700 * 1000 + 10)
    up = read_scan(path, "forward/up")
    assert (up.height.shape, up.origin, up.original_shape) == ((500, 500), (0, 0), (500, 500))
    down = read_scan(path, "forward/down")
    assert (down.height.shape, down.origin, down.original_shape) == ((200, 500), (300, 0), (500, 500))
    np.testing.assert_array_equal(down.height, full["forward/down"][300:, :])

    # stopped on the way up after 300 lines: no down traces at all
    write_aborted_matrix(folder / name, path, 300 * 1000 + 250)
    up = read_scan(path)
    assert (up.height.shape, up.origin, up.original_shape) == ((300, 500), (0, 0), (500, 500))
    np.testing.assert_array_equal(up.height, full["forward/up"][:300, :])
    with pytest.raises(ScanError) as excinfo:
        read_scan(path, "backward/down")
    assert_scan_error(excinfo, path, "not recorded", "forward/up")


def test_gwy_picks_height_channel_and_direction(tmp_path: Path, image: np.ndarray) -> None:
    from gwyfile.objects import GwyContainer, GwyDataField, GwySIUnit

    def datafield(values: np.ndarray, z_unit: str) -> GwyDataField:
        return GwyDataField(
            np.ascontiguousarray(values, dtype=np.float64),
            xreal=48 * 0.1e-9,
            yreal=40 * 0.1e-9,
            si_unit_xy=GwySIUnit(unitstr="m"),
            si_unit_z=GwySIUnit(unitstr=z_unit),
        )

    container = GwyContainer()
    for number, (title, values, unit) in enumerate(
        [
            ("Current", image * 1e-10, "A"),
            ("Z (Forward)", image * 1e-9, "m"),
            ("Z (Backward)", image * 2e-9, "m"),
        ]
    ):
        container[f"/{number}/data"] = datafield(values, unit)
        container[f"/{number}/data/title"] = title
    path = tmp_path / "multi.gwy"
    container.tofile(str(path))

    forward = read_scan(path)
    assert (forward.channel, forward.direction, forward.unit) == ("Z (Forward)", "forward", "nm")
    np.testing.assert_allclose(forward.height, image, rtol=1e-6, atol=1e-7)
    assert forward.pixel_nm == pytest.approx(0.1)
    backward = read_scan(path, "backward")
    assert (backward.channel, backward.direction) == ("Z (Backward)", "backward")
    np.testing.assert_allclose(backward.height, image * 2, rtol=1e-6, atol=1e-7)


def test_jpeg_is_read_as_luminance(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = (rng.random((40, 50)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(np.stack([arr] * 3, -1)).save(tmp_path / "b.JPEG", quality=95)
    a, b = read_scan(tmp_path / "a.jpg"), read_scan(tmp_path / "b.JPEG")
    assert a.format == b.format == "jpeg" and a.height.shape == (40, 50)
    assert np.abs(a.height - arr).mean() < 8  # lossy, but the same picture
    assert np.abs(a.height - b.height).mean() < 8
    assert find_scans(tmp_path) == [tmp_path / "a.jpg", tmp_path / "b.JPEG"]


def test_user_calibration(tmp_path: Path) -> None:
    arr = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
    np.save(tmp_path / "a.npy", arr)
    assert read_scan(tmp_path / "a.npy").pixel_nm is None
    assert read_scan(tmp_path / "a.npy").meta["pixel_nm_source"] is None
    s = read_scan(tmp_path / "a.npy", scan_nm=10.0)
    assert s.pixel_nm == pytest.approx(0.2) and s.meta["pixel_nm_source"] == "scan_nm"
    s = read_scan(tmp_path / "a.npy", pixel_nm=0.05)
    assert s.pixel_nm == 0.05 and s.meta["pixel_nm_source"] == "pixel_nm"
    for bad in ({"pixel_nm": -1.0}, {"scan_nm": float("nan")}, {"pixel_nm": 0.1, "scan_nm": 5.0}):
        with pytest.raises(ScanError, match="a.npy"):
            read_scan(tmp_path / "a.npy", **bad)


def test_text_dat_files_are_named_not_misread(tmp_path):
    """A Createc .dat (text header) or any text .dat is refused with what it is, not with SPIEPy
    header numbers made of its letters."""
    from stm_defects.io.scans import ScanError, read_scan

    createc = tmp_path / "A200101.120000.dat"
    createc.write_bytes(b"[Parameter]\r\nTitle / Titel=Createc\r\n" + bytes(200))
    with pytest.raises(ScanError, match="Createc"):
        read_scan(createc)
    other = tmp_path / "table.dat"
    other.write_text("x y z\n1 2 3\n" * 20)
    with pytest.raises(ScanError, match="starts with text"):
        read_scan(other)
