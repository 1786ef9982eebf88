"""Data validation: per-scan statistics checked by a Great Expectations suite.

`scan_stats` is pure (a Scan in, a row out). `run_suite` is the one place that talks to Great
Expectations: it builds an ephemeral context (no files besides the Data Docs we ask for), runs
the suite over the table and returns, per scan, the expectations it failed. Nothing is dropped
silently: every failing scan is listed with its reasons.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np

from stm_defects.io.scans import Scan

SUITE_NAME = "stm_scans"


def scan_stats(name: str, scan: Scan) -> dict:
    """One row of the validation table."""
    h = scan.height
    finite = np.isfinite(h)
    vals = h[finite]
    lo, hi = (np.percentile(vals, [0.5, 99.5]) if vals.size else (np.nan, np.nan))
    digest = hashlib.sha256(np.ascontiguousarray(h, dtype=np.float32).tobytes()).hexdigest()[:16]
    return {
        "scan": name,
        "path": scan.path,
        "format": scan.format,
        "rows": int(h.shape[0]),
        "cols": int(h.shape[1]),
        "finite_fraction": float(finite.mean()),
        "dynamic_range": float(hi - lo),
        "pixel_nm": float(scan.pixel_nm) if scan.pixel_nm else math.nan,
        "unit": scan.unit,
        "content_hash": digest,
        "duplicate_of": None,
    }


def mark_duplicates(rows: list[dict]) -> None:
    """Fill `duplicate_of` with the first scan that has identical content."""
    first: dict[str, str] = {}
    for row in rows:
        row["duplicate_of"] = first.setdefault(row["content_hash"], row["scan"])
        if row["duplicate_of"] == row["scan"]:
            row["duplicate_of"] = None


def _expectations(cfg) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=cfg.min_size),
        gxe.ExpectColumnValuesToBeBetween(column="cols", min_value=cfg.min_size),
        gxe.ExpectColumnValuesToBeBetween(column="finite_fraction", min_value=cfg.min_finite_fraction),
        gxe.ExpectColumnValuesToBeBetween(column="dynamic_range", min_value=cfg.min_dynamic_range),
        # NaN pixel sizes (formats without calibration) are skipped by GX, as intended.
        gxe.ExpectColumnValuesToBeBetween(column="pixel_nm", min_value=cfg.min_pixel_nm,
                                          max_value=cfg.max_pixel_nm),
        gxe.ExpectColumnValuesToBeNull(column="duplicate_of"),
        gxe.ExpectColumnValuesToBeUnique(column="scan"),
    ]


_RUN_TIME = "20000101T000000.000000Z"   # the Data Docs' run time: a constant, see `run_suite`
_CACHE_BUST = re.compile(r"\?d=\d{8}T\d{6}\.\d{6}Z")
_TIME = re.compile(r"\d{8}T\d{6}\.\d{6}Z")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _normalise_pages(docs: Path) -> None:
    """Make GX's rendered pages a function of the validation alone: its HTML renderer adds the
    wall-clock time to asset URLs (``?d=...``, against browser caches) and prints when the
    validation ran, and it gives collapsible blocks random ids. The URLs lose the time, the
    times shown become the run's constant time, and the ids are numbered in order of
    appearance in each page."""
    for page in sorted(docs.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        clean = _TIME.sub(_RUN_TIME, _CACHE_BUST.sub("", text))
        ids: dict[str, str] = {}
        clean = _UUID.sub(lambda m: ids.setdefault(m.group(0), f"block-{len(ids)}"), clean)
        if clean != text:
            page.write_text(clean, encoding="utf-8")


def run_suite(rows: list[dict], cfg, docs_dir: str | Path | None = None) -> dict:
    """Validate the table; return {"success", "failures": {scan: [reason, ...]}, "results": [...]}.

    `cfg` is a `config.ValidateParams`. When `docs_dir` is given, GX Data Docs HTML is written there.
    """
    import great_expectations as gx
    import pandas as pd
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    df = pd.DataFrame(rows)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    actions = []
    if docs_dir is not None:
        ctx.add_data_docs_site(
            site_name="stm_scans_site",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(Path(docs_dir).resolve())},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        actions.append(UpdateDataDocsAction(name="update_data_docs", site_names=["stm_scans_site"]))
    source = ctx.data_sources.add_pandas("scans")
    asset = source.add_dataframe_asset("scan_stats")
    batch_def = asset.add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name=SUITE_NAME))
    for exp in _expectations(cfg):
        suite.add_expectation(exp)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="scans", data=batch_def, suite=suite))
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name="validate_scans", validation_definitions=[vd], actions=actions,
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["scan"]},
    ))
    # a fixed run id: the Data Docs are a DVC output, so the same table must give the same
    # files (GX would name the run after the clock); the run is named after the table instead
    from great_expectations.core.run_identifier import RunIdentifier

    digest = hashlib.sha256(df.to_json(orient="records").encode()).hexdigest()[:12]
    run_id = RunIdentifier(run_name=f"scans-{digest}", run_time=_RUN_TIME)
    run = checkpoint.run(batch_parameters={"dataframe": df}, run_id=run_id)
    if docs_dir is not None:
        _normalise_pages(Path(docs_dir))
    failures: dict[str, list[str]] = {}
    results = []
    for vres in run.run_results.values():
        for res in vres.results:
            cfg_e = res.expectation_config
            column = cfg_e.kwargs.get("column")
            label = f"{cfg_e.type}({column})"
            results.append({"expectation": label, "success": bool(res.success)})
            for item in (res.result or {}).get("unexpected_index_list") or []:
                scan = item["scan"] if isinstance(item, dict) else df.iloc[int(item)]["scan"]
                value = df.loc[df["scan"] == scan, column].iloc[0]
                failures.setdefault(scan, []).append(f"{label} failed (value {value})")
    return {"success": bool(run.success), "failures": failures, "results": results}
