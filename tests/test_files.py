"""io.files: strict JSON (never NaN or Infinity) written atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from stm_defects.io.files import jsonable, write_json


def strict_load(path: Path):
    """json.loads that refuses the NaN/Infinity extensions Python's encoder can emit."""

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_non_finite_floats_become_null(tmp_path: Path) -> None:
    path = tmp_path / "out" / "scan.json"
    write_json(path, {
        "nan": math.nan, "inf": math.inf, "ninf": -math.inf,
        "np_nan": np.float32("nan"), "np_inf": np.float64("inf"), "np_ok": np.float32(0.5),
        "array": np.array([1.0, np.nan, np.inf, -np.inf]), "zero_d": np.array(np.nan),
        "nested": [{"pixel_size_nm": np.float64("nan")}, (np.int64(3), np.bool_(True))],
    })
    data = strict_load(path)
    assert data == {
        "nan": None, "inf": None, "ninf": None, "np_nan": None, "np_inf": None, "np_ok": 0.5,
        "array": [1.0, None, None, None], "zero_d": None,
        "nested": [{"pixel_size_nm": None}, [3, True]],
    }
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_jsonable_output_is_strict_json() -> None:
    value = jsonable({"a": np.full((2, 2), np.nan), "b": {1: np.float16("inf")}})
    assert json.dumps(value, allow_nan=False) == '{"a": [[null, null], [null, null]], "b": {"1": null}}'


def test_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "scan.json"
    write_json(path, {"version": 1})
    write_json(path, {"version": 2})
    assert strict_load(path) == {"version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "scan.json"
    write_json(path, {"version": 1})

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"version": 2})
    monkeypatch.undo()
    assert strict_load(path) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.json"]


def test_written_file_has_the_usual_mode(tmp_path: Path) -> None:
    path = tmp_path / "scan.json"
    write_json(path, {})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_folder_where_the_file_should_go_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "scan.json").mkdir()
    with pytest.raises(OSError):
        write_json(tmp_path / "scan.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.json"]
