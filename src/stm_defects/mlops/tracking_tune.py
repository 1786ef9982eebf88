"""MLflow logging for the Optuna studies (`tuning.py`): one nested run per trial.

Kept apart from `tuning.py` so that MLflow stays out of the library code: `tuning.py` only calls the
`log_trial(params, metrics, step_metrics, *, name=None, tags=None)` hook that `trial_logger`
returns. Study-level logging (parameters, summary metrics, plots) goes through the stage's
`tracking.Tracker` as for every other stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

LogTrial = Callable[..., None]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def trial_logger(tracker) -> LogTrial | None:
    """A `log_trial` hook that logs each trial as a run nested under `tracker`'s stage run.

    Returns None when there is no tracker or it is disabled (the studies then log nothing).
    `params` become run parameters, `metrics` run metrics (non-finite values are dropped, MLflow
    rejects them), `step_metrics` ({name: {step: value}}) per-step metrics (e.g. the validation
    loss per epoch), `tags` run tags.
    """
    if tracker is None or not getattr(tracker, "enabled", False) or tracker.mlflow is None:
        return None
    from stm_defects.mlops.tracking import process_tags

    mlflow = tracker.mlflow
    alive = process_tags()          # a trial left RUNNING by a killed process is marked FAILED later

    def log_trial(params: Mapping, metrics: Mapping, step_metrics: Mapping | None = None, *,
                  name: str | None = None, tags: Mapping | None = None) -> None:
        run_tags = {"kind": "trial", "stage": tracker.stage, **alive,
                    **{k: str(v) for k, v in (tags or {}).items()}}
        with mlflow.start_run(run_name=name, nested=True, parent_run_id=tracker.run_id, tags=run_tags):
            if params:
                mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            clean = {k: float(v) for k, v in (metrics or {}).items() if _finite(v)}
            if clean:
                mlflow.log_metrics(clean)
            by_step: dict[int, dict[str, float]] = {}
            for key, series in (step_metrics or {}).items():
                for step, value in series.items():
                    if _finite(value):
                        by_step.setdefault(int(step), {})[key] = float(value)
            for step in sorted(by_step):
                mlflow.log_metrics(by_step[step], step=step)

    return log_trial
