"""The `evaluate` stage: both methods scored on the held-out synthetic scans with truth.

The models are scored with the prediction config they carry (`models/improved/config.json`),
as `stm predict` would use them. The configured method's scores go to `reports/evaluation.json`
(and to the pipeline's parent MLflow run as its headline metrics); both methods side by side go
to `reports/ablation.{json,md}`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from stm_defects.io.files import read_json, write_json

ABLATION_COLUMNS = [("F1 test", "test", "f1"), ("F1 hard", "hard", "f1"),
                    ("recall hard", "hard", "recall"),
                    ("step-edge FP/scan test", "test", "step_edge_fp_mean"),
                    ("step-edge FP/scan hard", "hard", "step_edge_fp_mean"),
                    ("ARI test", "test", "ari"), ("NMI test", "test", "nmi"),
                    ("purity test", "test", "purity"), ("rotation agreement", "test", "rotation_agreement")]
HEADLINE = ("f1", "precision", "recall", "ari", "purity", "step_edge_fp_mean")


def evaluate(params, deps, outs, tracker, progress) -> dict:
    """Detection, class, step-edge and rotation scores on the test and hard splits."""
    from stm_defects.analysis.dispatch import PredictConfig
    from stm_defects.analysis.evaluation import evaluate_split, rotation_agreement
    from stm_defects.analysis.predict import predict_scan
    from stm_defects.io.model_files import load_models

    raw_dir = Path(deps["raw"])
    models = load_models(Path(deps["ae1"]).parent)
    cfg = PredictConfig.from_dict(read_json(Path(deps["improved"]) / "config.json"),
                                  f"{deps['improved']}/config.json")
    ecfg = params.evaluate
    splits = read_json(deps["manifest"])["splits"]
    methods = [cfg.method] + [m for m in ("paper", "improved") if m != cfg.method]
    table, rows = {}, []
    with progress(2 * (len(splits["test"]) * 2 + len(splits["hard"])), "evaluate") as step:
        for method in methods:
            c = dataclasses.replace(cfg, method=method)
            res = {}
            for split in ("test", "hard"):
                agg, per_scan = evaluate_split(raw_dir, splits[split], models, c, ecfg, step)
                res[split] = {k: v for k, v in agg.items() if not isinstance(v, (list, dict))}
                if method == cfg.method:
                    rows += [{"split": split, "scan": r["scan"], "tp": r["tp"], "fp": r["fp"], "fn": r["fn"],
                              "f1": r["f1"], "step_edge_fp": r.get("step_edge_fp"), "auroc": r.get("auroc")}
                             for r in per_scan]
            res["test"].update(rotation_agreement(raw_dir, splits["test"], models, c, ecfg.match_radius))
            step(len(splits["test"]))
            table[method] = res
    metrics = {**table[cfg.method], "profile": params.profile, "method": cfg.method}
    write_json(outs["metrics"], metrics)
    write_json(outs["per_scan"], rows)
    write_ablation(table, Path(outs["ablation"]), Path(outs["ablation_md"]))
    for split in ("test", "hard"):
        tracker.metrics(metrics[split], prefix=f"{split}_")
        tracker.parent_metrics({k: metrics[split][k] for k in HEADLINE if k in metrics[split]}, prefix=f"{split}_")
    for method, res in table.items():
        for split in ("test", "hard"):
            tracker.metrics(res[split], prefix=f"ablation_{method}_{split}_")
    tracker.artifacts(outs["ablation"], outs["ablation_md"])
    if tracker.enabled:
        with tempfile.TemporaryDirectory() as pics:     # example pictures go to MLflow only
            predict_scan(raw_dir / splits["test"][0], models, cfg, pics)
            tracker.artifacts(*sorted(Path(pics).glob("*.png")), folder="example")
    return metrics


def write_ablation(table: dict, path: Path, md_path: Path) -> None:
    """`path` (JSON) and `md_path` (markdown): the methods side by side."""
    write_json(path, table)
    lines = ["| method | " + " | ".join(c for c, _, _ in ABLATION_COLUMNS) + " |",
             "|---" * (len(ABLATION_COLUMNS) + 1) + "|"]
    for method, res in table.items():
        cells = []
        for _, split, key in ABLATION_COLUMNS:
            v = res[split].get(key)
            cells.append("n/a" if v is None or v != v else f"{v:.2f}" if key.startswith("step") else f"{v:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
