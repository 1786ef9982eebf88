"""`dvc plots show` renders offline: the project's page template inlines vega instead of loading
it from a CDN, and DVC is configured to use it."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / ".dvc" / "plots" / "offline.html"


def test_dvc_config_points_at_the_offline_template():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc" / "config")
    assert (ROOT / ".dvc" / cfg["plots"]["html_template"]).resolve() == TEMPLATE.resolve()


def test_template_inlines_every_script_and_loads_nothing():
    text = TEMPLATE.read_text()
    assert "{plot_divs}" in text and "{scripts}" not in text      # DVC's CDN tags have nowhere to go
    assert not re.search(r"<script[^>]*\ssrc=", text)
    for lib in ("vega 5.20.2", "vega-lite 5.2.0", "vega-embed 6.18.2"):
        assert f"/* {lib} (BSD-3-Clause) */" in text


def test_dvc_render_page_has_no_cdn(tmp_path):
    """What `dvc plots show` does with a vega plot, through dvc-render with this template."""
    from dvc_render import VegaRenderer
    from dvc_render.html import render_html

    renderer = VegaRenderer([{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.3}], "loss",
                            template="linear", x="epoch", y="loss")
    page = Path(render_html([renderer], tmp_path / "index.html", html_template=TEMPLATE)).read_text()
    assert "vegaEmbed" in page and "cdn.jsdelivr" not in page
