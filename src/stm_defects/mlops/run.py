"""Run one pipeline stage: `python -m stm_defects.mlops.run STAGE` (what `dvc.yaml` calls).

The stage's paths come from `mlops.dag`, its params from the project's params.yaml, restricted
to the sections the stage declares. Every stage is logged as a nested MLflow run of its pipeline
execution. User errors end with one line on stderr and exit code 1.

`run_stage` is also what `stm train`, the tests and the benchmarks call: they give a project
root and, for a user's own data, the folder that replaces the synthetic scans.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from pathlib import Path

from stm_defects.config import Params, ScopedParams, load_params
from stm_defects.mlops.dag import RAW, STAGES, Stage, stage

log = logging.getLogger("stm_defects")


def stage_paths(st: Stage, root: Path, raw: Path | None = None) -> tuple[dict[str, Path], dict[str, Path]]:
    """(deps, outs) of `st` as absolute paths under `root`; the synthetic scans replaced by `raw`."""
    def where(p: str) -> Path:
        if raw is not None and (p == RAW or p.startswith(RAW + "/")):
            return Path(raw) / p[len(RAW):].lstrip("/")
        return root / p
    return ({k: where(v) for k, v in st.deps.items()}, {k: where(v) for k, v in st.outs.items()})


def _progress_factory(enabled: bool):
    @contextlib.contextmanager
    def progress(total: int, desc: str):
        if not enabled:
            yield lambda n=1: None
            return
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, unit="scan", file=sys.stderr, dynamic_ncols=True) as bar:
            yield bar.update
    return progress


def run_stage(name: str, params: Params, root: Path, *, raw: Path | None = None, track: bool = True,
              show_progress: bool = True, pipeline: str | None = None) -> dict:
    """Run stage `name` of the DAG with `params`, paths under `root`; returns its metrics.

    Tracked, the stage is a nested run of its pipeline run (`pipeline`: the pipeline's key, else
    STM_PIPELINE_RUN; see `tracking.pipeline_base`). Before the stage, the registered versions of the
    model files it reads are recorded on the pipeline run (`Tracker.use`); after it, the pipeline's
    model set is registered if this stage completed it (`Tracker.register_set_if_complete`).
    """
    from stm_defects.mlops.tracking import Tracker

    st = stage(name)
    module, func = st.entry.split(":")
    fn = getattr(importlib.import_module(module), func)
    deps, outs = stage_paths(st, Path(root), raw)
    scoped = ScopedParams(params, st.params, st.name)
    with Tracker(params, st.name, enabled=track, pipeline=pipeline) as tracker:
        tracker.stage_params(st.params)
        tracker.use(deps)
        metrics = fn(scoped, deps, outs, tracker, _progress_factory(show_progress))
        tracker.register_set_if_complete()
    return metrics


def main(argv: list[str] | None = None) -> int:
    from stm_defects.analysis.heap import keep_freed_memory
    from stm_defects.errors import ConfigError, StageError
    from stm_defects.io.scans import ScanError
    from stm_defects.mlops.tracking import TrackingError
    from stm_defects.project import params_path, project_root

    ap = argparse.ArgumentParser(prog="python -m stm_defects.mlops.run", description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=[s.name for s in STAGES])
    ap.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("great_expectations", "mlflow", "alembic", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        root = project_root()
        keep_freed_memory()         # the stages' many scans reuse this process's pages (`analysis.heap`)
        metrics = run_stage(args.stage, load_params(params_path(root)), root, track=not args.no_track)
    except (ScanError, ConfigError, StageError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    print(f"{args.stage}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in list(shown.items())[:8]))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
