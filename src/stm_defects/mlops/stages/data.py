"""Data stages: synthetic scans with truth -> validation (GX) -> split and training patches.

Each stage is `fn(params, deps, outs, tracker, progress) -> metrics` (see `mlops.dag`): it reads
only `deps`, rewrites `outs` completely and is deterministic given `params.seed`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from stm_defects.errors import StageError
from stm_defects.io.files import fresh_dir, read_json, write_json
from stm_defects.io.scans import ScanError, find_scans, read_scan

log = logging.getLogger(__name__)

SPLITS_SYNTH = {"default": ("synth", "n_scans", 0), "hard": ("synth_hard", "n_hard", 1_000_000)}


def synth(params, deps, outs, tracker, progress) -> dict:
    """The embedded synthetic data: `<raw>/<split>/<name>.gwy` + truth JSON + step mask, montage."""
    from stm_defects.data.synth import synth_scan, truth_dict
    from stm_defects.io.scans import save_gwy

    out = fresh_dir(outs["raw"])
    counts = {}
    with progress(params.data.n_scans + params.data.n_hard, "synth") as step:
        for split, (section, count_key, offset) in SPLITS_SYNTH.items():
            cfg = getattr(params, section)
            n = getattr(params.data, count_key)
            folder = out / split
            folder.mkdir()
            for i in range(n):
                seed = params.seed * 10_000_019 + offset + i
                s = synth_scan(cfg, seed)
                name = f"{split}_{i:03d}"
                save_gwy(folder / f"{name}.gwy", s.height, s.pixel_nm, unit="nm",
                         meta={"source": "stm-defects synth", "seed": seed, "split": split})
                write_json(folder / f"{name}.json", truth_dict(s))
                np.savez_compressed(folder / f"{name}_steps.npz", step_mask=s.step_mask)
                step(1)
            counts[f"n_{split}"] = n
    montage(out, out / "montage.png")
    tracker.metrics(counts)
    tracker.artifacts(out / "montage.png")
    return counts


def montage(raw_dir: Path, path: Path, n_default: int = 6, n_hard: int = 3) -> None:
    """A picture of a few levelled synthetic scans, so people can see what the data looks like."""
    from stm_defects.image.preprocess import PreprocessConfig, preprocess
    from stm_defects.mlops.plots import synth_montage

    files = sorted((raw_dir / "default").glob("*.gwy"))[:n_default]
    files += sorted((raw_dir / "hard").glob("*.gwy"))[:n_hard]
    if not files:
        return
    images, truths, titles = [], [], []
    for f in files:
        scan = read_scan(f)
        images.append(preprocess(scan.height, scan.pixel_nm, PreprocessConfig())[0])
        truth = read_json(f.with_suffix(".json"))
        truths.append(truth)
        titles.append(f"{f.stem}: {len(truth['defects'])} defects, {truth.get('n_steps', 0)} steps")
    synth_montage(images, truths, titles, path)


def scan_folders(raw_dir: Path) -> list[Path]:
    """The synthetic data's split folders when present (not its montage), else the folder itself."""
    split_dirs = [raw_dir / s for s in SPLITS_SYNTH if (raw_dir / s).is_dir()]
    return split_dirs or [raw_dir]


def validate(params, deps, outs, tracker, progress) -> dict:
    """Per-scan statistics + GX suite. Failing scans are quarantined, with their reasons."""
    from stm_defects.data.validate import mark_duplicates, run_suite, scan_stats

    raw_dir, out = Path(deps["raw"]), fresh_dir(outs["validated"])
    rows, quarantined = [], {}
    files = find_scans(scan_folders(raw_dir))
    with progress(len(files), "validate") as step:
        for path in files:
            name = str(path.relative_to(raw_dir))
            try:
                row = scan_stats(name, read_scan(path, **params.scan_calibration.read_kwargs()))
                # relative to the project (the stage's working directory): the output must not
                # depend on where the project was cloned
                row["path"] = os.path.relpath(path)
                rows.append(row)
            except ScanError as err:
                quarantined[name] = [err.reason]
            step(1)
    mark_duplicates(rows)
    result = run_suite(rows, params.validate, docs_dir=out / "datadocs") if rows else {
        "success": False, "failures": {}, "results": []}
    for name, reasons in result["failures"].items():
        quarantined.setdefault(name, []).extend(reasons)
    passed = sorted(r["scan"] for r in rows if r["scan"] not in quarantined)
    summary = {
        "n_scans": len(files),
        "n_passed": len(passed),
        "n_quarantined": len(quarantined),
        "passed": passed,
        "quarantined": {k: quarantined[k] for k in sorted(quarantined)},
        "expectations": result["results"],
    }
    write_json(out / "summary.json", summary)
    write_json(out / "scan_stats.json", rows)
    for name, reasons in summary["quarantined"].items():
        log.warning("quarantined %s: %s", name, "; ".join(reasons))
    metrics = {"n_passed": len(passed), "n_quarantined": len(quarantined),
               "n_uncalibrated": sum(1 for r in rows if r["scan"] in passed and not r["pixel_nm"] > 0)}
    tracker.metrics(metrics)
    tracker.artifacts(out / "summary.json")
    if len(passed) < params.validate.min_passed:
        raise StageError(f"only {len(passed)} scans passed validation (need validate.min_passed = "
                         f"{params.validate.min_passed} in params.yaml); see {out / 'summary.json'}")
    return metrics


def prepare(params, deps, outs, tracker, progress) -> dict:
    """Split the validated scans and extract non-overlapping training patches with origins."""
    from stm_defects.analysis.dispatch import load_image
    from stm_defects.data.splits import split_scans
    from stm_defects.image.windows import extract_windows

    raw_dir, out = Path(deps["raw"]), fresh_dir(outs["prepared"])
    passed = read_json(deps["summary"])["passed"]
    default = [p for p in passed if not p.startswith("hard/")]
    splits = split_scans(default, params.prepare.fractions, params.seed)
    splits["hard"] = sorted(p for p in passed if p.startswith("hard/"))
    patches, origins, owners = [], [], []
    with progress(len(splits["train"]), "prepare") as step:
        for idx, name in enumerate(splits["train"]):
            _, img, _ = load_image(raw_dir / name, params.preprocess, **params.scan_calibration.read_kwargs())
            p, o = extract_windows(img, params.prepare.patch, params.prepare.stride)
            patches.append(p)
            origins.append(o)
            owners.append(np.full(len(p), idx, dtype=np.int32))
            step(1)
    patches = np.concatenate(patches).astype(np.float32)          # (N, 1, s, s)
    np.savez(out / "train_patches.npz", patches=patches, origins=np.concatenate(origins),
             scan_index=np.concatenate(owners))
    manifest = {"splits": splits, "n_patches": len(patches), "patch": params.prepare.patch,
                "stride": params.prepare.stride}
    write_json(out / "manifest.json", manifest)
    metrics = {f"n_{k}": len(v) for k, v in splits.items()} | {"n_patches": len(patches)}
    tracker.metrics(metrics)
    return metrics
