"""`stm predict --engine ray`: a batch of scans on Ray Data, on a local Ray or a cluster.

The only module that imports ray (lazily, inside the functions: `stm --help` and the other
engines never pay for it). Install it with ``pip install 'stm-defects[ray]'``.

    ray.data.from_items(scans).map_batches(PredictActor, concurrency=N, batch_size=1)

`PredictActor` is the counterpart of the process pool's initializer (`analysis.batch.run_pool`):
each actor receives the same `analysis.batch.ModelSpec` (the verified bytes of the model files;
nothing read from a model folder or the registry on the worker, nothing unpickled from disk),
loads the models once, limits torch and BLAS to one thread, moves to the driver's working folder,
and predicts its scans with `analysis.batch.predict_task`, which writes each scan's pictures and
JSON exactly as the serial path does (byte for byte). The actors return one small JSON result per
scan (the row, or the scan's `Failure`), which the driver consumes as they finish, for the
progress bar and the summary; summary.csv and failures.csv are written by the driver afterwards.

Local: without an address, `predict_with_ray` starts a Ray of ``workers`` CPUs
(``ray.init(num_cpus=..., include_dashboard=False)``) and stops it at the end. A cluster
(``--ray-address ray://head:10001``, or ``auto`` on a cluster node): the workers need this
package installed (the same version) and the scans and the output folder at the same paths as
on the driver (a shared file system), since they read the scans and write the outputs
themselves.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable

from stm_defects.analysis.batch import Job, ModelSpec, Task, limit_threads, predict_task
from stm_defects.analysis.heap import keep_freed_memory
from stm_defects.analysis.predict import Failure, failure_reason
from stm_defects.errors import StageError

log = logging.getLogger(__name__)

RAY_HINT = "pip install 'stm-defects[ray]'"


def require_ray() -> None:
    """Refuse at once, with one line, when Ray Data is not installed."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as err:
        raise StageError(f"--engine ray needs Ray Data, which is not installed ({err}); {RAY_HINT}") from None


class PredictActor:
    """A Ray Data callable class: loads the models once per actor, then predicts batches of scans
    (columns ``index``, ``path``, ``name``, ``direction``) into the output folder; returns per scan ``index``
    and ``result``, a JSON text: the small row of `predict_task`, or ``{"failure": ...}``.
    ``spec`` is a `ModelSpec`, or a one-item list holding an ObjectRef of one."""

    def __init__(self, spec: ModelSpec | list, job: Job, cwd: str):
        self.error = None
        try:
            os.chdir(cwd)                   # relative scan and output paths resolve as on the driver
        except OSError as err:
            self.error = (f"a Ray worker cannot enter the driver's folder {cwd} ({err.strerror or err}): the "
                          "scans and --out must be on a file system shared at the same paths")
            return
        try:
            if isinstance(spec, list):      # [ObjectRef] of the spec
                import ray

                spec = ray.get(spec[0])
            keep_freed_memory()
            limit_threads(1)
            self.models, self.job = spec.load(), job
        except Exception as err:  # noqa: BLE001 - reported per scan, as the process pool does
            self.error = f"the models could not be loaded in a Ray actor: {failure_reason(err)}"

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        out = []
        for index, path, name, direction in zip(batch["index"], batch["path"], batch["name"], batch["direction"]):
            task = Task(int(index), str(path), str(name), str(direction) or None)
            if self.error is not None:
                got = Failure(task.path, "analyse", self.error, was_expected=False)
            else:
                got = predict_task(self.models, self.job, task)
            out.append(json.dumps({"failure": got.to_dict()} if isinstance(got, Failure) else got))
        return {"index": np.asarray(batch["index"]), "result": np.asarray(out, dtype=object)}


def _quiet(ray) -> None:
    """No progress bars or INFO lines from Ray Data on the terminal (the command has its own)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    for attr in ("print_on_execution_start", "enable_operator_progress_bars"):
        if hasattr(ctx, attr):
            setattr(ctx, attr, False)
    for name in ("ray", "ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.ERROR)


def predict_with_ray(tasks: list[Task], spec: ModelSpec, job: Job, workers: int,
                     on_result: Callable[[Task, dict | Failure], None], address: str | None = None) -> None:
    """Predict ``tasks`` with ``workers`` `PredictActor`s; ``on_result(task, result)`` runs in this
    process as each scan's result arrives. Joins the Ray at ``address`` when given (left
    running), else starts a local one and shuts it down at the end. A Ray failure (not one of a
    scan, which is a `Failure` like any other) is a `StageError` with one line."""
    import ray

    require_ray()
    started = False
    for name in ("ray", "ray.data"):            # no INFO/WARNING chatter at start-up (auth token, ...)
        logging.getLogger(name).setLevel(logging.ERROR)
    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=workers, **kwargs)
        except Exception as err:  # noqa: BLE001 - ConnectionError, RuntimeError, ...: one line
            where = f"at {address}" if address else "locally"
            raise StageError(f"--engine ray: cannot start or reach Ray {where} ({failure_reason(err)})") from None
        started = not address
    _quiet(ray)
    by_index = {t.index: t for t in tasks}
    try:
        # blocks of a few scans, so that every actor gets work and results come back as they finish
        ds = ray.data.from_items([{"index": t.index, "path": t.path, "name": t.name,
                                   "direction": t.direction or ""} for t in tasks],
                                 override_num_blocks=min(len(tasks), 64 * workers))
        # the spec (a few MB of model bytes) goes to the object store once, held here for the run;
        # the actors get a reference to it (inside a list, so that Ray passes the reference itself)
        spec_ref = ray.put(spec)
        with warnings.catch_warnings():
            # max_restarts=0 (a remote argument Ray 2.60 still takes, with a deprecation warning): an
            # actor that dies (e.g. killed for memory) ends the run with one line, and the next run
            # resumes; restarting it would need constructor arguments Ray may have released
            warnings.simplefilter("ignore")
            ds = ds.map_batches(PredictActor, fn_constructor_kwargs={"spec": [spec_ref], "job": job,
                                                                      "cwd": os.getcwd()},
                                compute=ray.data.ActorPoolStrategy(size=workers), batch_size=1, num_cpus=1,
                                max_restarts=0)
        for row in ds.iter_rows():
            doc = json.loads(row["result"])
            task = by_index[int(row["index"])]
            on_result(task, Failure.from_dict(doc["failure"]) if "failure" in doc else doc)
    except (KeyboardInterrupt, StageError):
        raise
    except Exception as err:  # noqa: BLE001 - a Ray error (actor died, cluster lost): one line
        log.debug("Ray failed", exc_info=err)
        raise StageError(f"--engine ray: the Ray run failed ({failure_reason(err)}); the scans finished "
                         "so far are in the output folder, run again to do the rest") from None
    finally:
        if started:
            ray.shutdown()
