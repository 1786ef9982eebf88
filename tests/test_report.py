"""report.html: self-contained (no network), the sections a user needs, numbers that add up."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from stm_defects.analysis.figures import defect_crops, defect_heights, scan_figure
from stm_defects.analysis.report import density_table, scan_record, write_report


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _scan_json(out: Path, name: str, n_def: int, px: float | None, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    img = rng.random((128, 128)).astype(np.float32)
    defects = []
    for i in range(n_def):
        x, y = rng.integers(10, 110, 2)
        defects.append({"id": i, "x": float(x), "y": float(y), "bbox": [int(x) - 4, int(y) - 4, int(x) + 4, int(y) + 4],
                        "class": int(i % 3) - 1, "name": None, "area_px": 50})
    for d, hgt in zip(defects, defect_heights(img, defects, 0.2)):
        d["height_nm"] = hgt
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    scan_figure(img, defects, px).save(out / f"{name}_overlay.png")
    strip = defect_crops(img, defects, px)
    if strip is not None:
        strip.save(out / f"{name}_defects.png")
    for i, d in enumerate(defects):
        d["crop"] = i
    doc = {"image": f"/data/{name}.sxm", "shape": [128, 128], "pixel_size_nm": px,
           "models": {"improved": "stm-improved v3"}, "software": {"stm-defects": "0.1"},
           "config": {"source": "registry", "values": {"method": "improved"}}, "defects": defects}
    (out / f"{name}.json").write_text(json.dumps(doc))
    return f"{name}.json"


@pytest.fixture()
def report(tmp_path):
    scans = [_scan_json(tmp_path, f"day{i % 2}/scan{i}", 6 + i, 0.1, i) for i in range(6)]
    scans.append(_scan_json(tmp_path, "raw/uncal", 3, None, 99))
    path = write_report(tmp_path, scans, class_names={"0": "vacancy"},
                        failures=[{"scan": "bad.sxm", "stage": "read", "reason": "truncated file"}])
    return path, scans


def test_report_is_self_contained(report):
    path, _ = report
    p = _Collect()
    p.feed(path.read_text())
    for tag, attrs in p.tags:
        assert tag not in ("script", "link", "iframe")
        if tag == "img":
            assert attrs["src"].startswith("data:image/")
        if tag == "a":
            assert "://" not in attrs["href"] and (path.parent / attrs["href"]).is_file()
    assert "http" not in path.read_text().replace("http-equiv", "")


def test_report_sections_and_numbers(report):
    path, scans = report
    text = path.read_text()
    for heading in ("Densities", "Classes", "Defect sizes and heights", "Scans", "Failed scans", "Run"):
        assert f"<h2>{heading}" in text
    assert "vacancy" in text and "unknown" in text and "truncated file" in text
    assert "stm-improved v3" in text
    p = _Collect()
    p.feed(text)
    thumbs = [a for t, a in p.tags if t == "img" and a.get("class") == "thumb"]
    assert len(thumbs) == len(scans)
    crops = [a for t, a in p.tags if t == "img" and a.get("alt") == "vacancy"]
    assert 0 < len(crops) <= 12


def test_density_table_counts_and_intervals():
    scans = [scan_record({"shape": [100, 100], "pixel_size_nm": 0.1, "defects": [{"class": 0}] * k}, {})
             for k in (1, 2, 3, 4, 5)]
    rows, method = density_table(scans)
    allrow = next(r for r in rows if r["class"] == "all defects")
    assert allrow["count"] == 15
    assert allrow["per_100nm2"] == pytest.approx(100 * 15 / 500)      # 5 scans of 100 nm^2
    assert allrow["lo"] < allrow["per_100nm2"] < allrow["hi"]
    assert "bootstrap" in method
    rows, method = density_table(scans[:2])
    assert "Poisson" in method
    assert all(r["lo"] <= r["per_100nm2"] <= r["hi"] for r in rows)
    assert density_table([scan_record({"shape": [10, 10], "pixel_size_nm": None, "defects": []}, {})])[0] == []


def test_heights_sign_and_scale():
    img = np.zeros((40, 40), np.float32)
    img[18:22, 18:22] = 1.0
    img[5:8, 30:33] = -0.5
    d = [{"bbox": [18, 18, 22, 22]}, {"bbox": [30, 5, 33, 8]}]
    assert defect_heights(img, d, 0.2) == [pytest.approx(0.2), pytest.approx(-0.1)]
    assert defect_heights(img, d, None) == [None, None]


def _chromium() -> str | None:
    import shutil

    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(b)), None)


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium on this machine (apt install chromium)")
def test_report_renders_offline_in_headless_chromium(report, tmp_path):
    """The page renders with the network off: a screenshot comes out, and the DOM Chromium built
    holds the density table, the legends and every embedded picture (none broken)."""
    import subprocess

    path, _ = report
    flags = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
             "--proxy-bypass-list=<-loopback>"]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1280,1600", f"--screenshot={shot}", path.as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
    dom = subprocess.run([*flags, "--dump-dom", path.as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    p = _Collect()
    p.feed(dom)
    imgs = [a for t, a in p.tags if t == "img"]
    assert imgs and all(a.get("src", "").startswith("data:image/") for a in imgs)
    text = " ".join(p.text)
    assert "per 100 nm" in text and "vacancy" in text and "truncated file" in text


def test_thumbnails_made_from_the_drawn_overlays_give_the_same_page(tmp_path):
    """`stm predict` hands the report thumbnails made from the overlays it drew (`thumbnail_uri`);
    a rebuilt report (a resumed run) makes them from the PNGs: the same page, byte for byte."""
    from PIL import Image

    from stm_defects.analysis.report import thumbnail_uri

    scans = [_scan_json(tmp_path, f"s{i}", 4, 0.1, i) for i in range(3)]
    from_png = write_report(tmp_path, scans).read_bytes()
    drawn = {s: thumbnail_uri(Image.open(tmp_path / s.replace(".json", "_overlay.png"))) for s in scans[:2]}
    assert write_report(tmp_path, scans, thumbs=drawn).read_bytes() == from_png
    wrong = {scans[0]: "data:image/jpeg;base64,AAAA"}          # and the ones given are used
    assert b"base64,AAAA" in write_report(tmp_path, scans, thumbs=wrong).read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_stm_predict_hands_the_report_the_thumbnails_its_workers_drew(tmp_path, monkeypatch, workers):
    from typer.testing import CliRunner

    from stm_defects.analysis import report as report_module
    from stm_defects.cli import app
    from tiny import tiny_models

    tiny_models(tmp_path / "models")
    for i in range(3):
        np.save(tmp_path / f"scan{i}.npy", np.random.default_rng(i).normal(size=(96, 96)))
    seen = {}
    real = report_module.write_report

    def spy(*args, **kwargs):
        seen.update(kwargs.get("thumbs") or {})
        return real(*args, **kwargs)

    monkeypatch.setattr(report_module, "write_report", spy)
    r = CliRunner().invoke(app, ["predict", *(str(tmp_path / f"scan{i}.npy") for i in range(3)), "--models",
                                 str(tmp_path / "models"), "--out", str(tmp_path / "out"), "--workers", str(workers)])
    assert r.exit_code == 0, r.output
    assert sorted(seen) == [f"scan{i}.json" for i in range(3)]
    assert all(v.startswith("data:image/jpeg;base64,") for v in seen.values())
    page = (tmp_path / "out" / "report.html").read_bytes()
    assert write_report(tmp_path / "out", sorted(seen)).read_bytes() == page     # as from the PNGs
