"""Strict headers: seeded fuzzing of every scan format, and the bad headers that used to pass.

Each mutated file (truncated at several offsets, bytes appended, bytes flipped in the header
region, a dimension field edited) must end in one of two ways:

* a clean read: the header's shape, a finite float32 image, a pixel size that passes
  `pixel_size_error` (or none, for formats without one) and JSON-clean metadata; or
* a `ScanError` whose message is one line naming the file.

Any other exception, or a read that takes longer than `HANG_S` seconds, fails the test; all
mutations of a format run, and the failures are listed together. Real files are copied from
``../shared/data/real-stm/`` into ``tmp_path`` (those tests skip without the shared folder);
the synthetic files are written here with the project's writer (`save_gwy`) or the format's
own library.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stm_defects.analysis.dispatch import preprocess_scan
from stm_defects.image.preprocess import (
    MAX_RESAMPLED_PIXELS,
    PreprocessConfig,
    ResampleError,
    preprocess,
    resample,
)
from stm_defects.io.scans import PIXEL_NM_RANGE, ScanError, pixel_size_error, read_scan, save_gwy

SEED = 20240611
HANG_S = 5.0  # a read of these small files takes well under a second
N_FLIPS = 14  # single-byte flips per format, plus N_FLIPS // 2 three-byte flips

SXM = "pynxtools-spm/STM_nanonis_generic_4_5.sxm"
RHK = "spym-rhk/hopg_300k_2020_08_11_16_04_06_999.sm4"
MATRIX_DIR = "srsml24-schofield"
MATRIX_DATA = "default_2022Jan12-130324_STM-STM_Spectroscopy--2_3.Z_mtrx"
MATRIX_PARAM = "default_2022Jan12-130324_STM-STM_Spectroscopy_0001.mtrx"
SPIEPY = "spiepy/image_with_defects.dat"


# ---------------------------------------------------------------------------------- harness
class Hang(BaseException):
    """A read ran past its deadline (a BaseException, so no reader's except clause eats it)."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def fire(signum, frame):
        raise Hang(f"no answer after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(path: Path, shape: tuple[int, int], **kwargs) -> str:
    """"ok" or "refused" for one file; AssertionError (or the stray exception) otherwise."""
    try:
        with deadline(HANG_S):
            scan = read_scan(path, **kwargs)
    except ScanError as err:
        message = str(err)
        assert "\n" not in message and message == f"{err.path}: {err.reason}", message
        assert err.reason and path.name in message, message
        return "refused"
    assert scan.original_shape == shape, (scan.original_shape, shape)
    rows, cols = scan.height.shape
    assert rows <= shape[0] and cols <= shape[1], (scan.height.shape, shape)
    assert scan.height.dtype == np.float32 and np.isfinite(scan.height).all()
    if scan.pixel_nm is not None:
        assert pixel_size_error(scan.pixel_nm) is None, scan.pixel_nm
    json.dumps(scan.meta, allow_nan=False)
    return "ok"


@dataclass
class Sample:
    """One scan file (plus companions that must sit beside it) and where its header lies."""

    name: str
    data: bytes
    header: list[tuple[int, int]]  # byte ranges to flip in
    shape: tuple[int, int]  # the shape its header gives
    companions: dict[str, bytes]
    edits: list[tuple[str, bytes, tuple[int, int]]]  # (label, edited file, the edited header's shape)
    # For image formats whose decoder follows the header: the shape a (mutated) file's header
    # gives, read with the format's own library without decoding the pixels.
    header_shape: Callable[[Path], tuple[int, int]] | None = None


def mutations(sample: Sample, rng: np.random.Generator) -> Iterator[tuple[str, bytes, tuple[int, int]]]:
    data, n = sample.data, len(sample.data)
    header_end = max(end for _, end in sample.header)
    cuts = {1, 4, header_end // 2, header_end - 1, header_end, header_end + 1, n // 2, n - 1}
    for cut in sorted(c for c in cuts if 0 < c < n):
        yield f"truncated to {cut} bytes", data[:cut], sample.shape
    yield "4 zero bytes appended", data + b"\0\0\0\0", sample.shape
    yield "1 kB appended", data + bytes(rng.integers(0, 256, 1024, dtype=np.uint8)), sample.shape
    positions = np.concatenate([np.arange(a, min(b, n)) for a, b in sample.header])
    for k in range(N_FLIPS + N_FLIPS // 2):
        width = 1 if k < N_FLIPS else 3
        out = bytearray(data)
        where = rng.choice(positions, size=width, replace=False)
        for i in where:
            out[i] ^= int(rng.integers(1, 256))
        yield f"flipped byte(s) {sorted(int(i) for i in where)}", bytes(out), sample.shape
    yield from sample.edits


def run_fuzz(sample: Sample, folder: Path, seed: int) -> dict[str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in sample.companions.items():
        (folder / name).write_bytes(content)
    path = folder / sample.name
    assert outcome(_write(path, sample.data), sample.shape) == "ok", "the unmodified file must read"
    counts = {"ok": 0, "refused": 0}
    failures = []
    for label, content, shape in mutations(sample, np.random.default_rng(seed)):
        _write(path, content)
        if sample.header_shape is not None:
            try:
                shape = sample.header_shape(path)
            except Exception:  # noqa: BLE001, S110 - an unreadable header: the read must be refused anyway
                pass
        try:
            counts[outcome(path, shape)] += 1
        except (Exception, Hang) as exc:  # noqa: BLE001 - every stray exception is a finding, listed below
            failures.append(f"{sample.name}, {label}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)
    return counts


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, (old, data.count(old))
    return data.replace(old, new)


# ----------------------------------------------------------------------------- real samples
def sxm_data_start(raw: bytes) -> int:
    return raw.index(b"\x1a\x04", raw.index(b":SCANIT_END:")) + 2


SXM_PIXELS = b":SCAN_PIXELS:\n       256       256"
SXM_RANGE = b":SCAN_RANGE:\n           4.000000E-9           4.000000E-9"


def sxm_sample(real: Path) -> Sample:
    raw = (real / SXM).read_bytes()
    edits = [
        (f"SCAN_PIXELS {a} {b}", replace_once(raw, SXM_PIXELS, f":SCAN_PIXELS:\n{a:>10}{b:>10}".encode()), shape)
        for a, b, shape in [(128, 128, (128, 128)), (512, 512, (512, 512)), (256, 128, (128, 256)),
                            (0, 0, (0, 0)), (-256, 256, (256, 256)), (256, 1024, (1024, 256))]
    ]
    edits.append(("SCAN_PIXELS not numbers", replace_once(raw, SXM_PIXELS, b":SCAN_PIXELS:\n  abc def"),
                  (256, 256)))
    edits.append(("Z recorded forward only", replace_once(raw, b"\tZ\tm\tboth", b"\tZ\tm\tforward"), (256, 256)))
    edits.append(("no Z channel", replace_once(raw, b"\tZ\tm\tboth", b"\tY\tm\tboth"), (256, 256)))
    return Sample("scan.sxm", raw, [(0, sxm_data_start(raw))], (256, 256), {}, edits)


def rhk_topography_header(raw: bytes) -> int:
    """Offset of the forward Topography page header (page type 1, scan type 0, 256 x 256)."""
    found = []
    for m in re.finditer(re.escape(struct.pack("<II", 256, 256)), raw):
        h = m.start() - 24
        if h >= 0 and struct.unpack_from("<IIII", raw, h + 4)[0] == 1 and struct.unpack_from("<I", raw, h + 36)[0] == 0:
            found.append(h)
    assert len(found) == 1, found
    return found[0]


def rhk_sample(real: Path) -> Sample:
    raw = (real / RHK).read_bytes()
    h = rhk_topography_header(raw)

    def edit(offset: int, fmt: str, *values) -> bytes:
        out = bytearray(raw)
        struct.pack_into(fmt, out, h + offset, *values)
        return bytes(out)

    edits = [
        ("RHK_Xsize 128", edit(24, "<I", 128), (256, 128)),
        ("RHK_Ysize 512", edit(28, "<I", 512), (512, 256)),
        ("RHK_Xsize 0", edit(24, "<I", 0), (256, 0)),
        # the same number of values: read at the header's shape, as for SPIEPy below
        ("RHK_Xsize 128, RHK_Ysize 512", edit(24, "<II", 128, 512), (512, 128)),
        ("page data size halved", edit(44, "<I", 131072), (256, 256)),
        ("page data size doubled", edit(44, "<I", 524288), (256, 256)),
        ("RHK_Zscale NaN", edit(64, "<f", math.nan), (256, 256)),
        ("RHK_Zscale 0", edit(64, "<f", 0.0), (256, 256)),
    ]
    # the file header and page index, and the Topography page header
    return Sample("scan.sm4", raw, [(0, 5242), (h, h + 180)], (256, 256), {}, edits)


def matrix_width_offset(param: bytes) -> int:
    """Offset of the XYScanner.Width value (a float64 after 'BUOD') in a Matrix parameter file."""
    key = "Width".encode("utf-16-le")
    at = param.index(struct.pack("<I", 5) + key + struct.pack("<I", 5) + "Meter".encode("utf-16-le"))
    return param.index(b"BUOD", at) + 4


def matrix_sample(real: Path) -> Sample:
    raw = (real / MATRIX_DIR / MATRIX_DATA).read_bytes()
    param = (real / MATRIX_DIR / MATRIX_PARAM).read_bytes()
    csed = raw.index(b"CSED", 12)
    count_at = csed + 8 + 24

    def edit(offset: int, fmt: str, value) -> bytes:
        out = bytearray(raw)
        struct.pack_into(fmt, out, offset, value)
        return bytes(out)

    edits = [
        ("data item count +1000", edit(count_at, "<i", 1_001_000), (500, 500)),
        ("data item count 0", edit(count_at, "<i", 0), (500, 500)),
        ("data item count -1", edit(count_at, "<i", -1), (500, 500)),
        ("TLKB length +8", edit(16, "<L", struct.unpack_from("<L", raw, 16)[0] + 8), (500, 500)),
    ]
    return Sample(MATRIX_DATA, raw, [(0, 104)], (500, 500), {MATRIX_PARAM: param}, edits)


def spiepy_sample(real: Path) -> Sample:
    raw = (real / SPIEPY).read_bytes()

    def dims(rows: int, cols: int) -> bytes:
        return struct.pack("<II", rows, cols) + raw[8:]

    edits = [
        ("header 128x256", dims(128, 256), (128, 256)),
        ("header 512x512", dims(512, 512), (512, 512)),
        ("header 0x256", dims(0, 256), (0, 256)),
        # the same number of values: a reshape nobody can detect; it reads at the header's shape
        ("header 128x512", dims(128, 512), (128, 512)),
    ]
    return Sample("scan.dat", raw, [(0, 8)], (256, 256), {}, edits)


REAL_SAMPLES: dict[str, Callable[[Path], Sample]] = {
    "nanonis": sxm_sample,
    "rhk": rhk_sample,
    "matrix": matrix_sample,
    "spiepy": spiepy_sample,
}


@pytest.mark.parametrize("kind", sorted(REAL_SAMPLES))
def test_fuzzed_real_files(real_stm_dir: Path, tmp_path: Path, kind: str) -> None:
    sample = REAL_SAMPLES[kind](real_stm_dir)
    counts = run_fuzz(sample, tmp_path / kind, SEED + sorted(REAL_SAMPLES).index(kind))
    assert counts["refused"] > 0  # the truncations at least


# ------------------------------------------------------------------------ synthetic samples
SHAPE = (64, 48)


def synthetic_heights() -> np.ndarray:
    rng = np.random.default_rng(SEED)
    return rng.normal(size=SHAPE) * 0.1 + 1.0  # nm


def gwy_bytes(tmp: Path, pixel_nm: float | None = 0.1, heights: np.ndarray | None = None) -> bytes:
    path = tmp / "written.gwy"
    save_gwy(path, synthetic_heights() if heights is None else heights, pixel_nm=pixel_nm,
             meta={"source": "synthetic"})
    return path.read_bytes()


def gwy_payload(raw: bytes) -> tuple[int, int]:
    """Byte range of the data field's float64 values in a .gwy file."""
    at = raw.index(b"data\0D") + 6
    (count,) = struct.unpack_from("<I", raw, at)
    return at + 4, at + 4 + 8 * count


def gwy_edit(raw: bytes, key: bytes, fmt: str, value, typecode: str | None = None) -> bytes:
    """``raw`` with the value of component ``key`` (of type ``typecode``, default fmt's) replaced."""
    out = bytearray(raw)
    marker = key + b"\0" + (typecode or fmt[-1]).encode()
    struct.pack_into(fmt, out, raw.index(marker) + len(marker), value)
    return bytes(out)


def gwy_sample(tmp: Path) -> Sample:
    raw = gwy_bytes(tmp)
    start, end = gwy_payload(raw)
    edits = [
        ("xres 24", gwy_edit(raw, b"xres", "<i", 24), (64, 24)),
        ("yres 65", gwy_edit(raw, b"yres", "<i", 65), (65, 48)),
        ("xres 0", gwy_edit(raw, b"xres", "<i", 0), (64, 0)),
        ("xres -48", gwy_edit(raw, b"xres", "<i", -48), (64, 48)),
        ("data count +1", gwy_edit(raw, b"data", "<I", SHAPE[0] * SHAPE[1] + 1, "D"), SHAPE),
        ("data count -1", gwy_edit(raw, b"data", "<I", SHAPE[0] * SHAPE[1] - 1, "D"), SHAPE),
        ("yreal NaN", gwy_edit(raw, b"yreal", "<d", math.nan), SHAPE),
    ]
    return Sample("scan.gwy", raw, [(0, start), (end, len(raw))], SHAPE, {}, edits)


def npy_sample(tmp: Path) -> Sample:
    path = tmp / "written.npy"
    np.save(path, synthetic_heights().astype(np.float32))
    raw = path.read_bytes()
    edits = [
        ("shape (32, 48)", replace_once(raw, b"(64, 48)", b"(32, 48)"), (32, 48)),
        ("shape (64, 96)", replace_once(raw, b"(64, 48)", b"(64, 96)"), (64, 96)),
        ("dtype <f8", replace_once(raw, b"'<f4'", b"'<f8'"), SHAPE),
        ("dtype object", replace_once(raw, b"'<f4'", b"'|O' "), SHAPE),
    ]
    return Sample("scan.npy", raw, [(0, 128)], SHAPE, {}, edits)


def tiff_sample(tmp: Path) -> Sample:
    import tifffile

    path = tmp / "written.tif"
    tifffile.imwrite(path, synthetic_heights().astype(np.float32))
    raw = path.read_bytes()
    return Sample("scan.tif", raw, [(0, min(len(raw), 512)), (len(raw) - 256, len(raw))], SHAPE, {}, [],
                  tiff_header_shape)


def tiff_header_shape(path: Path) -> tuple[int, int]:
    import logging

    import tifffile

    log = logging.getLogger("tifffile")
    was_disabled, log.disabled = log.disabled, True
    try:
        with tifffile.TiffFile(path) as tif:
            return tuple(tif.pages[0].shape[:2])
    finally:
        log.disabled = was_disabled


def pil_header_shape(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:  # parses the header only
        return img.height, img.width


def png_sample(tmp: Path) -> Sample:
    from PIL import Image

    path = tmp / "written.png"
    grey = np.clip((synthetic_heights() - 0.7) * 400, 0, 255).astype(np.uint8)
    Image.fromarray(grey).save(path)
    raw = path.read_bytes()
    ihdr = raw.index(b"IHDR")
    edits = [("IHDR width 96", raw[: ihdr + 4] + struct.pack(">I", 96) + raw[ihdr + 8:], (64, 96))]
    return Sample("scan.png", raw, [(0, 64)], SHAPE, {}, edits, pil_header_shape)


def jpeg_sample(tmp: Path) -> Sample:
    from PIL import Image

    path = tmp / "written.jpg"
    grey = np.clip((synthetic_heights() - 0.7) * 400, 0, 255).astype(np.uint8)
    Image.fromarray(grey).save(path, quality=90)
    raw = path.read_bytes()
    # a flipped size in the frame header is decoded at that size (libjpeg pads what is missing)
    return Sample("scan.jpg", raw, [(0, min(len(raw), 700))], SHAPE, {}, [], pil_header_shape)


SYNTHETIC_SAMPLES: dict[str, Callable[[Path], Sample]] = {
    "gwyddion": gwy_sample,
    "npy": npy_sample,
    "tiff": tiff_sample,
    "png": png_sample,
    "jpeg": jpeg_sample,
}


@pytest.mark.parametrize("kind", sorted(SYNTHETIC_SAMPLES))
def test_fuzzed_synthetic_files(tmp_path: Path, kind: str) -> None:
    sample = SYNTHETIC_SAMPLES[kind](tmp_path)
    counts = run_fuzz(sample, tmp_path / kind, SEED + 100 + sorted(SYNTHETIC_SAMPLES).index(kind))
    assert counts["refused"] > 0


def test_gwy_cut_inside_a_string_is_refused_not_a_hang(tmp_path: Path) -> None:
    """gwyfile loops for ever on a string component cut before its NUL; the reader checks first."""
    raw = gwy_bytes(tmp_path)
    title = raw.index(b"Topography")
    path = _write(tmp_path / "cut.gwy", raw[: title + 4])
    with deadline(HANG_S), pytest.raises(ScanError, match="corrupt or truncated Gwyddion"):
        read_scan(path)


# ------------------------------------------------------- the bad headers that used to pass
def assert_refused(path: Path, *fragments: str, **kwargs) -> str:
    with deadline(HANG_S), pytest.raises(ScanError) as excinfo:
        read_scan(path, **kwargs)
    message = str(excinfo.value)
    assert "\n" not in message and path.name in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_nanonis_scan_pixels_edited_to_128_is_refused(real_stm_dir: Path, tmp_path: Path) -> None:
    raw = (real_stm_dir / SXM).read_bytes()
    path = _write(tmp_path / "edited.sxm", replace_once(raw, SXM_PIXELS, b":SCAN_PIXELS:\n       128       128"))
    # 4 images (Z and Current, forward and backward) of 256 x 256 float32 are there; 128 x 128 expected
    assert_refused(path, "1048576 bytes", "262144", "SCAN_PIXELS 128x128")


def test_nanonis_fewer_values_than_the_header_is_truncated(real_stm_dir: Path, tmp_path: Path) -> None:
    raw = (real_stm_dir / SXM).read_bytes()
    path = _write(tmp_path / "short.sxm", raw[:-4])
    assert_refused(path, "truncated", "1048572 bytes", "1048576")


BAD_PIXELS = {  # nm per pixel -> what the message must say
    "nan": (math.nan, "is NaN"),
    "inf": (math.inf, "is infinite"),
    "negative": (-0.1, "is negative"),
    "zero": (0.0, "is zero"),
    "tiny": (PIXEL_NM_RANGE[0] / 10, "is 1e-05 nm/px, outside the plausible range"),
    "huge": (PIXEL_NM_RANGE[1] * 10, "is 1e+05 nm/px, outside the plausible range"),
}


@pytest.mark.parametrize("case", sorted(BAD_PIXELS))
def test_gwy_bad_pixel_size_is_refused(tmp_path: Path, case: str) -> None:
    value, words = BAD_PIXELS[case]
    raw = gwy_bytes(tmp_path)
    width_m = value * SHAPE[1] * 1e-9 if math.isfinite(value) else value
    path = _write(tmp_path / f"{case}.gwy", gwy_edit(raw, b"xreal", "<d", width_m))
    message = assert_refused(path, f"pixel size {words}", "xreal", "--pixel-nm")
    assert (case == "nan") == ("NaN" in message)  # inf is not reported as NaN
    # a user calibration replaces the bad header value
    assert outcome(path, SHAPE, pixel_nm=0.1) == "ok"


@pytest.mark.parametrize("case", sorted(BAD_PIXELS))
def test_nanonis_bad_scan_range_is_refused(real_stm_dir: Path, tmp_path: Path, case: str) -> None:
    value, words = BAD_PIXELS[case]
    width_m = value * 256 * 1e-9 if math.isfinite(value) else value
    text = f":SCAN_RANGE:\n{width_m:>22.6E}{4e-9:>22.6E}".encode()
    raw = replace_once((real_stm_dir / SXM).read_bytes(), SXM_RANGE, text)
    path = _write(tmp_path / f"{case}.sxm", raw)
    assert_refused(path, f"pixel size {words}", "SCAN_RANGE")


@pytest.mark.parametrize("case", ["nan", "inf", "zero", "tiny", "huge"])  # RHK scales are signed
def test_rhk_bad_xscale_is_refused(real_stm_dir: Path, tmp_path: Path, case: str) -> None:
    value, words = BAD_PIXELS[case]
    raw = bytearray((real_stm_dir / RHK).read_bytes())
    struct.pack_into("<f", raw, rhk_topography_header(bytes(raw)) + 56, value * 1e-9)
    path = _write(tmp_path / f"{case}.sm4", bytes(raw))
    assert_refused(path, f"pixel size {words}", "RHK_Xscale")


@pytest.mark.parametrize("case", sorted(BAD_PIXELS))
def test_matrix_bad_width_is_refused(real_stm_dir: Path, tmp_path: Path, case: str) -> None:
    value, words = BAD_PIXELS[case]
    shutil.copy(real_stm_dir / MATRIX_DIR / MATRIX_DATA, tmp_path)
    param = bytearray((real_stm_dir / MATRIX_DIR / MATRIX_PARAM).read_bytes())
    struct.pack_into("<d", param, matrix_width_offset(bytes(param)), value * 500 * 1e-9)
    (tmp_path / MATRIX_PARAM).write_bytes(bytes(param))
    assert_refused(tmp_path / MATRIX_DATA, f"pixel size {words}", "XYScanner.Width")


def test_matrix_width_offset_finds_the_50nm_width(real_stm_dir: Path) -> None:
    param = (real_stm_dir / MATRIX_DIR / MATRIX_PARAM).read_bytes()
    assert struct.unpack_from("<d", param, matrix_width_offset(param))[0] == pytest.approx(50e-9)


def test_user_calibration_outside_the_range_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    np.save(path, synthetic_heights())
    for kwargs, words in (({"pixel_nm": math.inf}, "pixel size is infinite"),
                          ({"pixel_nm": 1e-6}, "outside the plausible range"),
                          ({"scan_nm": math.nan}, "scan width is NaN"),
                          ({"scan_nm": 1e9}, "outside the plausible range")):
        assert_refused(path, words, **kwargs)


@pytest.mark.parametrize(("fill", "words"), [(math.inf, "every pixel is infinite"),
                                             (-math.inf, "every pixel is infinite"),
                                             (math.nan, "every pixel is NaN")])
def test_all_non_finite_image_says_which(tmp_path: Path, fill: float, words: str) -> None:
    path = tmp_path / "flat.npy"
    np.save(path, np.full(SHAPE, fill))
    assert_refused(path, words)


def test_some_infinite_pixels_are_filled_not_cropped(tmp_path: Path) -> None:
    data = synthetic_heights()
    data[0, :] = np.inf  # a whole edge row of inf is bad data, not an unscanned line
    data[5, 5] = -np.inf
    path = tmp_path / "inf.npy"
    np.save(path, data)
    scan = read_scan(path)
    assert scan.height.shape == SHAPE and np.isfinite(scan.height).all()
    assert scan.meta["nan_filled_fraction"] == pytest.approx((SHAPE[1] + 1) / data.size)


def test_genuine_zero_rows_and_columns_are_kept(tmp_path: Path) -> None:
    from PIL import Image

    grey = (np.random.default_rng(SEED).random(SHAPE) * 200 + 20).astype(np.uint8)
    grey[:2, :] = 0  # black rows at the top and a black column at the left: real image content
    grey[:, 0] = 0
    Image.fromarray(grey).save(tmp_path / "dark_edges.png")
    scan = read_scan(tmp_path / "dark_edges.png")
    assert scan.height.shape == SHAPE and scan.origin == (0, 0)

    heights = synthetic_heights()
    heights[-3:, :] = 0.0
    save_gwy(tmp_path / "zeros.gwy", heights, pixel_nm=0.1)
    scan = read_scan(tmp_path / "zeros.gwy")
    assert scan.height.shape == SHAPE
    np.testing.assert_array_equal(scan.height[-3:], 0.0)


def test_rhk_unscanned_zero_lines_are_cropped_and_other_zero_lines_kept(real_stm_dir: Path,
                                                                       tmp_path: Path) -> None:
    """RHK stores never-scanned lines as zero counts and gives RHK_CompletedLineCount."""
    from stm_defects.io import scans

    raw = (real_stm_dir / RHK).read_bytes()
    h = rhk_topography_header(raw)
    reader = scans._rhk_module().RHKsm4(str(real_stm_dir / RHK))
    page = next(p for p in reader if p.label == "Topography_Forward")
    data_at = int(next(o.offset for o in page._object_list if o.name == "RHK_OBJECT_PAGE_DATA"))
    out = bytearray(raw)
    line = 256 * 4
    out[data_at + 200 * line: data_at + 256 * line] = bytes(56 * line)  # the last 56 lines: unscanned
    out[data_at + 100 * line: data_at + 101 * line] = bytes(line)  # a line of zero counts inside
    path = _write(tmp_path / "full.sm4", bytes(out))
    assert read_scan(path).height.shape == (256, 256)  # all 256 lines completed: zeros are data

    count = struct.pack("<H", 4) + "0256".encode("utf-16-le")  # the RHK_CompletedLineCount string
    at = raw.index(count, h, data_at)
    out[at:at + len(count)] = struct.pack("<H", 4) + "0200".encode("utf-16-le")
    path = _write(tmp_path / "aborted.sm4", bytes(out))
    scan = read_scan(path)
    assert (scan.height.shape, scan.origin, scan.original_shape) == ((200, 256), (0, 0), (256, 256))
    assert scan.meta["completed_lines"] == 200
    assert np.ptp(scan.height[100]) == 0.0  # the inner zero line is kept (a flat line of heights)


def test_rhk_non_square_page_is_lines_of_xsize_points(real_stm_dir: Path, tmp_path: Path) -> None:
    """RHK writes Ysize lines of Xsize points (as Gwyddion's reader takes them)."""
    from stm_defects.io import scans

    raw = bytearray((real_stm_dir / RHK).read_bytes())
    h = rhk_topography_header(bytes(raw))
    struct.pack_into("<II", raw, h + 24, 128, 512)  # the same 65536 values as 512 lines of 128
    path = _write(tmp_path / "tall.sm4", bytes(raw))
    scan = read_scan(path)
    assert scan.height.shape == (512, 128)

    reader = scans._rhk_module().RHKsm4(str(real_stm_dir / RHK))
    page = next(p for p in reader if p.label == "Topography_Forward")
    data_at = int(next(o.offset for o in page._object_list if o.name == "RHK_OBJECT_PAGE_DATA"))
    counts = np.frombuffer(bytes(raw), "<i4", 65536, data_at).reshape(512, 128).astype(np.float64)
    xscale, yscale, zscale = struct.unpack_from("<fff", raw, h + 56)
    zoffset = struct.unpack_from("<f", raw, h + 80)[0]
    if xscale < 0:
        counts = counts[:, ::-1]
    if yscale > 0:
        counts = counts[::-1]
    expected = (counts * zscale + zoffset) * 1e9  # m -> nm
    np.testing.assert_allclose(scan.height, expected, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- resampling guard
def test_tiny_pixel_size_would_resample_to_a_few_pixels_and_is_refused() -> None:
    img = np.random.default_rng(SEED).random((256, 256)).astype(np.float32)
    cfg = PreprocessConfig(target_pixel_nm=0.1)
    with pytest.raises(ResampleError, match=r"from 0.004 to 0.1 nm/px .* would give 10x10 px, fewer than 32"):
        preprocess(img, 0.004, cfg, min_side=32)  # the smallest scan `stm predict` analyses
    with pytest.raises(ResampleError, match=r"would give 3x3 px, fewer than 8 per side"):
        preprocess(img, 0.001, cfg)
    with pytest.raises(ResampleError, match="fewer than 32 per side"):
        resample(img, 0.01, 0.1, min_side=32)


def test_huge_pixel_size_is_refused_before_allocating() -> None:
    img = np.zeros((512, 512), np.float32)
    with deadline(HANG_S), pytest.raises(ResampleError, match=f"more than {MAX_RESAMPLED_PIXELS} pixels"):
        resample(img, 1000.0, 0.1)  # 5 120 000 px a side


def test_non_finite_pixel_size_is_refused_by_the_resampler() -> None:
    img = np.zeros((64, 64), np.float32)
    for bad in (math.nan, math.inf, -1.0, 0.0):
        with pytest.raises(ResampleError, match="positive number"):
            resample(img, bad, 0.1)
        with pytest.raises(ResampleError, match="target_pixel_nm"):
            resample(img, 0.1, bad)


def test_preprocess_scan_turns_a_refused_resampling_into_a_scan_error(tmp_path: Path) -> None:
    save_gwy(tmp_path / "fine.gwy", synthetic_heights(), pixel_nm=0.004)
    scan = read_scan(tmp_path / "fine.gwy")
    with pytest.raises(ScanError, match="fine.gwy: resampling the 64x48 px image"):
        preprocess_scan(scan, PreprocessConfig(target_pixel_nm=0.1), min_side=32)
    img, scale = preprocess_scan(scan, PreprocessConfig(target_pixel_nm=0.002))
    assert img.shape == (128, 96) and scale == pytest.approx(2.0)


# ------------------------------------------------------------------------------------ the CLI
def test_stm_info_prints_one_line_per_bad_file_and_goes_on(real_stm_dir: Path, tmp_path: Path) -> None:
    from stm_defects.cli import app

    shutil.copy(real_stm_dir / SXM, tmp_path / "good.sxm")
    raw = (real_stm_dir / SXM).read_bytes()
    _write(tmp_path / "edited.sxm", replace_once(raw, SXM_PIXELS, b":SCAN_PIXELS:\n       128       128"))
    _write(tmp_path / "nan.gwy", gwy_edit(gwy_bytes(tmp_path), b"xreal", "<d", math.nan))
    (tmp_path / "written.gwy").unlink()
    result = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "good.sxm: nanonis 256x256" in result.stdout
    assert "2 of 3 file(s) failed" in result.stderr
    bad = [line for line in result.stderr.splitlines() if line.startswith("  ")]
    assert len(bad) == 2
    assert any("edited.sxm" in line and "SCAN_PIXELS 128x128" in line for line in bad)
    assert any("nan.gwy" in line and "pixel size is NaN" in line for line in bad)
