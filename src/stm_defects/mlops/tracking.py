"""MLflow: the only module that imports it. Runs, the model registry, model sets, promotion, loading.

Store: SQLite at `<project>/mlruns/mlflow.db` with artifacts in `<project>/mlruns/artifacts` (the
plain file store is refused by MLflow 3); see `stm_defects.project` for how the project is found.
`MLFLOW_TRACKING_URI` overrides it (tests, shared servers).

Pipeline runs: every stage run is a nested child of one parent run (`kind=pipeline`) per pipeline
execution. Each parent has a unique `pipeline_key` and is found by its `pipeline_base` tag, the base
that `pipeline_base()` derives:
* an `STM_PIPELINE_RUN` that ends in a uuid4 hex (`new_pipeline_key`; `make run` makes one per
  execution and every DVC stage process inherits it) is the base as it is;
* any other `STM_PIPELINE_RUN` (e.g. `train-own-20261201-120000`) is a readable prefix: a uuid is
  added once per process, so two trainings started in the same second never share a parent, while
  the stages of one process (`stm train`) do;
* without it (a direct `dvc repro`), the base is the git commit + params hash (DVC's repository
  lock runs one repro at a time).
A stage joins the newest parent of its base that has not failed; a failed one is never joined again.
Each stage start tags the parent and the stage run with `host`, `pid` and `pid_started`, and sets the
parent RUNNING while the stage runs. Every tracker start (and `pipeline_set`) marks FAILED the
RUNNING runs of this host whose process is gone (a killed `stm train`, a crash), with a `failure`
tag, and their parent `pipeline_state=failed`. The parent's `pipeline_state` is `open`, `complete`
(its model set is registered: tag `model_set`) or `failed`. A process killed in the few milliseconds
between two stages leaves its parent FINISHED and `open`: without a set it cannot be promoted either,
but it is not marked FAILED, since a DVC repro leaves the same state between its stage processes.

Model files: a version is its model's one file (`io.safe_models.MODEL_FILES`: the torch checkpoint
`model.pt`, or a safe `.npz` for the scikit-learn parts) logged as run artifacts under
`registry/<key>/`; the version's `source` is that folder. No pickle-based MLflow flavour is used:
loading downloads only the expected file, checks its sha256 against the version's `sha256` tag, and
reads it with `torch.load(weights_only=True)` or `np.load(allow_pickle=False)`. A version without a
`file` tag (registered with the pickle flavours by an older version) is refused, not loaded.

Lineage: every model version is tagged with `git_commit`, `params_hash`, `data_version`,
`sha256`, `file`, `pipeline_run_id` and `pipeline_key` and, for models built on others,
`<key>_version` (K-means and AE2: `ae1_version`; the GMM: `ae1_`, `kmeans_` and `ae2_version`).
`stm-improved` versions also carry `config`: the prediction config (JSON) of their pipeline run,
which `stm predict` uses instead of the working folder's params.yaml. The parent run records which
versions each stage registered (`registered.<key>`) and read (`uses.<key>`, from the model files
among the stage's deps).

Model sets: what is promoted and served is a model set, a version of the registered model `stm-set`
whose tags pin one version of each of the five models with its sha256 (`members`,
`<key>_version`, `<key>_sha256`), with a `set.json` manifest as its artifact. A pipeline run
registers its set (`Tracker.register_set_if_complete`) only when every one of the five models is
accounted for in that run (registered by it, or read unchanged by one of its stages, as when DVC
reuses an up-to-date model) and the set passes `check_set`: so a run killed before its last model
stage has no set, and its models cannot be promoted. A stage is MLflow alias `production` or
`staging` on `stm-set` (plus a `stage` tag, also `Archived`, since registry stages are deprecated):
promotion moves that one alias, a single database write, so a reader sees the old set or the new
one, never a mix. `load_registered` resolves the set's alias first, then loads exactly the pinned
versions, each checked against the pinned sha256. The five models' own `production`/`staging`
aliases and `stage` tags mirror the set's for `stm models` and the MLflow UI; nothing reads them.

Model cache: `stm predict` and `stm classes` load the set through `load_registered_files(cache=
True)`. The verified files are kept in a local cache (`model_cache_dir`: `$STM_MODEL_CACHE`, else
`~/.cache/stm-defects/models`; `STM_MODEL_CACHE=off` turns it off), content-addressed by the sha256
the set pins. A warm load reads the alias, the set's pins and the members' tags straight from the
SQLite store (read-only; `_fast_serving_set`, with the same pin checks), hashes each cached file
against its pin and reads it with the same safe readers: no MLflow import, about 0.2 s instead of
5+ s (`benchmarks/bench_batch.py`). Any miss or anomaly takes the MLflow path, which refills the
cache. `load_registered` (the library call) does not use the cache unless asked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_NAMES = {"ae1": "stm-ae1", "kmeans": "stm-kmeans", "ae2": "stm-ae2", "gmm": "stm-gmm",
               "improved": "stm-improved"}
STAGES = {"production": "Production", "staging": "Staging", "archived": "Archived"}
SET_NAME = "stm-set"
SET_FILE = "set.json"
# model -> the models it is built on (its `<key>_version` tags); `improved` stands alone
CHAIN = {"kmeans": ("ae1",), "ae2": ("ae1",), "gmm": ("ae1", "kmeans", "ae2")}
ENV_PIPELINE = "STM_PIPELINE_RUN"

_UNIQUE_KEY = re.compile(r"-[0-9a-f]{32}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._:+-]")
_process_keys: dict[str, str] = {}          # STM_PIPELINE_RUN prefix -> this process's unique base


class TrackingError(RuntimeError):
    """A registry problem the user can fix (nothing promoted, unknown version, lineage mismatch)."""


# ------------------------------------------------------------------------------------ store
def _mlflow():
    import mlflow

    for name in ("mlflow", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow


def connect(experiment: str = "stm-defects", root: Path | None = None):
    """Point MLflow at the project store (`project.tracking_uri`); create the experiment."""
    from stm_defects.project import tracking_uri

    mlflow = _mlflow()
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
        mlflow.create_experiment(experiment, artifact_location=artifacts,
                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    elif exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:     # a store made by an older version
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(experiment)
    return mlflow


#: MLflow 3's UI opens an experiment in its GenAI view (traces, assistant) unless the experiment
#: says it is model training: this tag and value select the "Model training" view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def git_commit(root: Path | None = None) -> str:
    try:
        from stm_defects.project import find_project

        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or find_project() or Path.cwd(), capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------- pipeline keys
def new_pipeline_key(prefix: str) -> str:
    """`<prefix>-<uuid4 hex>`: a key no other execution shares. A launcher that runs its stages in
    several processes (`make run`: one per DVC stage) makes one and exports it as STM_PIPELINE_RUN."""
    return f"{_UNSAFE.sub('-', prefix)[:200]}-{uuid.uuid4().hex}"


def is_unique_key(key: str) -> bool:
    """Whether `key` ends in a uuid4 hex, as `new_pipeline_key` makes them."""
    return bool(_UNIQUE_KEY.search(key))


def pipeline_base(params, given: str | None = None) -> str:
    """The base a stage's parent run is found by (see the module docstring).

    `given` (else STM_PIPELINE_RUN): used as it is when it ends in a uuid, else a uuid is added
    once per process and prefix. Neither: the git commit and the params hash.
    """
    given = given or os.environ.get(ENV_PIPELINE)
    if given:
        given = _UNSAFE.sub("-", given)[:250]
        if is_unique_key(given):
            return given
        return _process_keys.setdefault(given, new_pipeline_key(given))
    return f"{git_commit()[:12]}-{params.digest()}"


# ------------------------------------------------------------------- process liveness
def _started(pid: int) -> str:
    """The process's start time (seconds since the epoch, as text), '' when unknown."""
    try:
        import psutil

        return f"{psutil.Process(pid).create_time():.3f}"
    except Exception:  # noqa: BLE001 - psutil missing or the process gone
        return ""


def process_tags() -> dict[str, str]:
    """`host`, `pid` and `pid_started` of this process: what tells later whether it still runs."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": str(pid), "pid_started": _started(pid)}


def process_alive(pid: int, started: str = "") -> bool:
    """Whether process `pid` of this host still runs (and is the one that started at `started`:
    a reused pid is another process). Unknown counts as alive, so a live run is never failed."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            if started and abs(proc.create_time() - float(started)) > 1.0:
                return False
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except (psutil.Error, ValueError):
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _fail_pipeline(client, parent_id: str, reason: str) -> None:
    """Mark pipeline run `parent_id` failed: it never registers a set and is never joined again.
    A set it registered before (a later stage failed) stays valid."""
    from mlflow.entities import RunTag

    try:
        tags = client.get_run(parent_id).data.tags
    except Exception:  # noqa: BLE001 - the parent was deleted
        return
    if tags.get("pipeline_state") == "failed":
        return
    client.log_batch(parent_id, tags=[RunTag("pipeline_state", "failed"), RunTag("failure", reason[:4000])])
    client.set_terminated(parent_id, "FAILED")


def mark_killed_runs(client, experiment_ids: list[str]) -> list[str]:
    """Mark FAILED every RUNNING run of this host whose process is gone; returns their ids.

    A stage run (or trial run) killed with its process stays RUNNING in MLflow forever; this finds
    it by its `host`/`pid`/`pid_started` tags, tags it `failure` ("killed: ..."), ends it FAILED,
    and fails its pipeline run (`_fail_pipeline`). Runs of other hosts, or without those tags,
    are left alone.
    """
    host = socket.gethostname()
    try:
        runs = client.search_runs(experiment_ids, f"attributes.status = 'RUNNING' and tags.host = '{host}'",
                                  max_results=1000)
    except Exception:  # noqa: BLE001 - an odd host name, or an empty store
        return []
    marked = []
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    for run in runs:
        tags = run.data.tags
        try:
            pid = int(tags.get("pid", ""))
        except ValueError:
            continue
        if process_alive(pid, tags.get("pid_started", "")):
            continue
        stage = tags.get("stage") or tags.get("current_stage") or "?"
        reason = f"killed: process {pid} on {host} ended during stage {stage} (found {when})"
        client.set_tag(run.info.run_id, "failure", reason)
        client.set_terminated(run.info.run_id, "FAILED")
        kind = tags.get("kind")
        if kind == "pipeline":
            _fail_pipeline(client, run.info.run_id, reason)
        elif kind == "stage" and tags.get("mlflow.parentRunId"):
            _fail_pipeline(client, tags["mlflow.parentRunId"], reason)
        marked.append(run.info.run_id)
        log.warning("run %s (%s) was %s; marked FAILED", run.info.run_id, tags.get("mlflow.runName", kind), reason)
    return marked


# ------------------------------------------------------------------------------------ runs
class Tracker:
    """Logs one stage as a nested run of its pipeline execution. A no-op when `enabled` is False.

    `pipeline`: the pipeline's key base, instead of STM_PIPELINE_RUN (see `pipeline_base`).
    """

    def __init__(self, params, stage: str, enabled: bool = True, pipeline: str | None = None):
        self.params, self.stage, self.enabled, self.pipeline = params, stage, enabled, pipeline
        self.mlflow = None
        self.run_id = None
        self.parent_id = None
        self.pipeline_key = None

    @property
    def registering(self) -> bool:
        return bool(self.enabled and self.mlflow is not None and self.params.tracking.register)

    def __enter__(self):
        if not self.enabled:
            return self
        mlflow = self.mlflow = connect(self.params.tracking.experiment)
        client = mlflow.MlflowClient()
        exp = mlflow.get_experiment_by_name(self.params.tracking.experiment)
        mark_killed_runs(client, [exp.experiment_id])
        self.parent_id, self.pipeline_key = self._parent(client, exp.experiment_id,
                                                         pipeline_base(self.params, self.pipeline))
        from mlflow.entities import RunTag

        alive = process_tags()
        client.update_run(self.parent_id, status="RUNNING")       # RUNNING while one of its stages runs
        client.log_batch(self.parent_id, tags=[RunTag(k, v) for k, v in {**alive, "current_stage": self.stage}.items()])
        run = mlflow.start_run(run_name=self.stage, nested=True, parent_run_id=self.parent_id,
                               tags={"stage": self.stage, "kind": "stage", "pipeline_key": self.pipeline_key,
                                     "profile": self.params.profile, "git_commit": git_commit(),
                                     "params_hash": self.params.digest(), **alive})
        self.run_id = run.info.run_id
        return self

    def _parent(self, client, experiment_id: str, base: str) -> tuple[str, str]:
        """(run id, pipeline key) of the newest parent run of `base` that has not failed; a new one
        (with a unique key) when there is none."""
        found = client.search_runs([experiment_id], f"tags.pipeline_base = '{base}' and tags.kind = 'pipeline'",
                                   order_by=["attributes.start_time DESC"], max_results=100)
        for run in found:
            if run.data.tags.get("pipeline_state") != "failed":
                return run.info.run_id, run.data.tags["pipeline_key"]
        key = base if is_unique_key(base) and not found else new_pipeline_key(base)
        parent = client.create_run(
            experiment_id, run_name=f"pipeline {key}",
            tags={"pipeline_key": key, "pipeline_base": base, "kind": "pipeline", "pipeline_state": "open",
                  "profile": self.params.profile, "git_commit": git_commit(), "params_hash": self.params.digest()})
        from mlflow.entities import Param

        flat = self.params.flat()          # every resolved value, so pipelines compare in the UI
        batch = [Param(k, v) for k, v in sorted(flat.items())]
        for i in range(0, len(batch), 100):
            client.log_batch(parent.info.run_id, params=batch[i:i + 100])
        return parent.info.run_id, key

    def __exit__(self, exc_type, exc, tb):
        if self.enabled and self.mlflow is not None:
            status = "FAILED" if exc_type else "FINISHED"
            self.mlflow.end_run(status)
            client = self.mlflow.MlflowClient()
            # The parent is RUNNING only while a stage runs: its end time is the last stage's.
            client.set_terminated(self.parent_id, status)
            if exc_type is not None:
                _fail_pipeline(client, self.parent_id, f"stage {self.stage} failed: {exc_type.__name__}: {exc}")
        return False

    # -- logging helpers; each ignores calls when disabled
    def stage_params(self, sections) -> None:
        """Log every resolved value of the params sections the stage reads."""
        if self.enabled:
            self.mlflow.log_params(self.params.flat(*sections))

    def params_used(self, values: dict) -> None:
        """Values the stage used instead of params.yaml's (e.g. a tuned latent size)."""
        if self.enabled:
            self.mlflow.set_tags({f"used.{k}": str(v) for k, v in values.items()})

    def parent_metrics(self, metrics: dict, prefix: str = "") -> None:
        """Headline metrics on the pipeline's parent run, so pipelines compare in the UI."""
        if not self.enabled:
            return
        client = self.mlflow.MlflowClient()
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
                client.log_metric(self.parent_id, f"{prefix}{k}", float(v))

    def metrics(self, metrics: dict, prefix: str = "", step: int | None = None) -> None:
        if not self.enabled:
            return
        clean = {}
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if v == v and abs(v) != float("inf"):       # MLflow rejects NaN/inf
                clean[f"{prefix}{k}"] = float(v)
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def history(self, history: dict, prefix: str) -> None:
        if not self.enabled:
            return
        for i, (t, v) in enumerate(zip(history["train_loss"], history["val_loss"])):
            self.mlflow.log_metrics({f"{prefix}train_loss": t, f"{prefix}val_loss": v}, step=i)

    def artifacts(self, *paths: str | Path, folder: str | None = None) -> None:
        if not self.enabled:
            return
        for p in paths:
            if Path(p).is_file():
                self.mlflow.log_artifact(str(p), artifact_path=folder)

    def tags(self, tags: dict) -> None:
        if self.enabled:
            self.mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def register(self, key: str, path: str | Path, extra_tags: dict | None = None) -> int | None:
        """Register the model file `path` as a new version of `MODEL_NAMES[key]`.

        `path` is the model's one file, named as `safe_models.MODEL_FILES[key]` says (`model.pt`,
        `kmeans.npz`, `gmm.npz`, `state.npz`). It is logged as an artifact of this stage's run under
        `registry/<key>/`, and the version is created from that folder with all its tags at once,
        `sha256` (of exactly this file) and `file` included. The parent run records it as
        `registered.<key>`, which is what makes it a member of this pipeline's set. Returns the
        version number.
        """
        if not self.registering:
            return None
        from stm_defects.io.safe_models import MODEL_FILES, file_sha256

        path = Path(path)
        if path.name != MODEL_FILES[key]:
            raise ValueError(f"{key} is registered from its {MODEL_FILES[key]}, not {path.name}")
        mlflow = self.mlflow
        name = MODEL_NAMES[key]
        folder = f"registry/{key}"
        sha256 = file_sha256(path)
        mlflow.log_artifact(str(path), artifact_path=folder)
        client = mlflow.MlflowClient()
        _ensure_model(client, name)
        tags = {"git_commit": git_commit(), "params_hash": self.params.digest(), "sha256": sha256,
                "file": path.name, "pipeline_run_id": self.parent_id, "pipeline_key": self.pipeline_key,
                "run_id": self.run_id, "profile": self.params.profile, **(extra_tags or {})}
        tags = {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)
                for k, v in tags.items()}
        mv = client.create_model_version(name, source=mlflow.get_artifact_uri(folder), run_id=self.run_id,
                                         tags=tags)
        version = int(mv.version)
        self.tags({f"registered.{key}": f"{name}/{version}"})
        client.set_tag(self.parent_id, f"registered.{key}", str(version))
        log.info("registered %s version %d", name, version)
        return version

    def use(self, deps: dict) -> dict[str, int]:
        """Record on the parent run (`uses.<key>`) the registered versions of the model files among a
        stage's `deps` (role -> file or model folder; roles named as `MODEL_NAMES`' keys).

        This is how a model that DVC did not retrain (it was up to date) still counts as a member of
        this pipeline run's set. Files with no registered version are skipped. Returns key -> version.
        """
        if not self.registering:
            return {}
        from stm_defects.io.safe_models import MODEL_FILES, file_sha256

        used = {}
        for key, path in deps.items():
            if key not in MODEL_NAMES or path is None:
                continue
            path = Path(path)
            file = path / MODEL_FILES[key] if path.is_dir() else path
            if not file.is_file():
                continue
            version = version_by_sha(key, file_sha256(file), self.parent_id)
            if version is not None:
                used[key] = version
        if used:
            from mlflow.entities import RunTag

            self.mlflow.MlflowClient().log_batch(
                self.parent_id, tags=[RunTag(f"uses.{k}", str(v)) for k, v in used.items()])
        return used

    def register_set_if_complete(self) -> int | None:
        """Register this pipeline run's model set once every model is accounted for; else None.

        Called after each stage (`mlops.run.run_stage`): the set forms at the end of the first stage
        after which each of the five models was registered by this pipeline run or read by one of
        its stages (`use`), so a run killed before that has none. The set must pass `check_set`
        (lineage of every member, `improved` included); otherwise a warning says why and no set is
        registered. An identical set registered before is reused. The parent gets `model_set` and
        `pipeline_state=complete`. Returns the set's version.
        """
        if not self.registering:
            return None
        client = self.mlflow.MlflowClient()
        tags = client.get_run(self.parent_id).data.tags
        if tags.get("pipeline_state") == "failed":
            return None
        members = {}
        for key in MODEL_NAMES:
            v = tags.get(f"registered.{key}") or tags.get(f"uses.{key}")
            if v is None:
                return None
            members[key] = int(v)
        if tags.get("model_set"):
            current = _get_set(client, tags["model_set"])
            if _pins(current) == members:
                return int(current.version)
        problems, _ = _check_set(client, members, self.parent_id)
        if problems:
            log.warning("pipeline run %s: no model set registered: %s", self.parent_id, "; ".join(problems))
            return None
        version = find_set(client, members)
        if version is None:
            version = _register_set(client, members, run_id=self.run_id, pipeline_run_id=self.parent_id,
                                    origin="pipeline")
        client.log_batch(self.parent_id, tags=[_tag("model_set", str(version)), _tag("pipeline_state", "complete")])
        log.info("pipeline run %s: model set %s v%d (%s)", self.parent_id, SET_NAME, version,
                 ", ".join(f"{k} v{v}" for k, v in members.items()))
        return version


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)


def _ensure_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def version_by_sha(key: str, sha256: str, pipeline_run_id: str | None = None) -> int | None:
    """The registered version of `key` whose file hash is `sha256`: the newest registered by
    `pipeline_run_id` when there is one, else the newest of all."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    try:
        found = client.search_model_versions(f"name = '{MODEL_NAMES[key]}' and tags.sha256 = '{sha256}'")
    except Exception:  # noqa: BLE001 - no such model yet
        return None
    same = [v for v in found if pipeline_run_id and v.tags.get("pipeline_run_id") == pipeline_run_id]
    return max((int(v.version) for v in (same or found)), default=None)


# ------------------------------------------------------------------------------- model sets
def _client(experiment: str = "stm-defects"):
    return connect(experiment).MlflowClient()


def stage_of(client, name: str, version: str) -> str:
    v = client.get_model_version(name, version)
    return v.tags.get("stage", "None")


def resolve_version(client, key: str, version: str | int):
    name = MODEL_NAMES.get(key)
    if name is None:
        raise TrackingError(f"unknown model {key!r}; known: {', '.join(MODEL_NAMES)}")
    try:
        return client.get_model_version(name, str(version))
    except Exception:  # noqa: BLE001 - MLflow raises its own RestException
        raise TrackingError(f"{name} has no version {version}") from None


def _get_set(client, version: str | int):
    try:
        return client.get_model_version(SET_NAME, str(version))
    except Exception:  # noqa: BLE001
        raise TrackingError(f"{SET_NAME} has no version {version}") from None


def _members_json(members: dict) -> str:
    return json.dumps({k: int(members[k]) for k in MODEL_NAMES})


def _pins(set_mv) -> dict[str, int]:
    """key -> version pinned by a set version (its `members` tag)."""
    try:
        members = json.loads(set_mv.tags["members"])
        return {k: int(members[k]) for k in MODEL_NAMES}
    except (KeyError, TypeError, ValueError):
        raise TrackingError(f"{SET_NAME} v{set_mv.version} does not pin all of "
                            f"{', '.join(MODEL_NAMES.values())}; refusing it") from None


def _search(client, filter_string: str) -> list:
    try:
        return list(client.search_model_versions(filter_string))
    except Exception:  # noqa: BLE001 - the registered model does not exist yet
        return []


def find_set(client, members: dict) -> int | None:
    """The set version pinning exactly `members` (key -> version): one built without --force and
    by a pipeline run first, then the newest. None when there is none."""
    found = _search(client, f"name = '{SET_NAME}' and tags.members = '{_members_json(members)}'")
    if not found:
        return None
    best = max(found, key=lambda v: ("forced" not in v.tags, v.tags.get("origin") == "pipeline", int(v.version)))
    return int(best.version)


def check_lineage(client, versions: dict) -> list[str]:
    """Problems with the chain of a set of versions (key -> version, all five or some): K-means and
    AE2 built on another AE1 than the set's, a GMM built on another AE1, K-means or AE2.

    Versions built on a version whose file has the same sha256 count as built on the set's.
    """
    mvs = {key: resolve_version(client, key, v) for key, v in versions.items()}
    return _chain_problems(client, mvs)


def _chain_problems(client, mvs: dict) -> list[str]:
    problems = []
    for key, ups in CHAIN.items():
        if key not in mvs:
            continue
        mv = mvs[key]
        for up in ups:
            if up not in mvs:
                continue
            built = mv.tags.get(f"{up}_version")
            if built is None:
                problems.append(f"{mv.name} v{mv.version} has no {up}_version tag")
                continue
            if built == str(mvs[up].version):
                continue
            try:
                same = client.get_model_version(MODEL_NAMES[up], built).tags.get("sha256")
            except Exception:  # noqa: BLE001
                same = None
            if not same or same != mvs[up].tags.get("sha256"):
                problems.append(f"{mv.name} v{mv.version} was built on {MODEL_NAMES[up]} v{built}, "
                                f"not v{mvs[up].version}")
    return problems


def _run_tags(client, run_id: str) -> dict:
    try:
        return client.get_run(run_id).data.tags
    except Exception:  # noqa: BLE001 - deleted or never existed
        return {}


def _in_pipeline(key: str, mv, run_id: str, tags: dict) -> bool:
    """Whether version `mv` of `key` belongs to pipeline run `run_id` (whose tags are `tags`):
    registered by it, or read by one of its stages."""
    v = str(mv.version)
    return (mv.tags.get("pipeline_run_id") == run_id or tags.get(f"registered.{key}") == v
            or tags.get(f"uses.{key}") == v)


def _pipeline_problems(client, mvs: dict, pipeline_run_id: str | None) -> tuple[list[str], str | None]:
    """All five members must belong to one pipeline run that did not fail before completing
    (`pipeline_run_id`, else any of the members' own). Returns (problems, that run's id)."""
    candidates = [pipeline_run_id] if pipeline_run_id else list(dict.fromkeys(
        mvs[k].tags["pipeline_run_id"] for k in ("gmm", "improved", "ae2", "kmeans", "ae1")
        if mvs[k].tags.get("pipeline_run_id")))
    if not candidates:
        return ["no member carries a pipeline_run_id tag (registered by an older version)"], None
    first = None
    for run_id in candidates:
        tags = _run_tags(client, run_id)
        failed = tags.get("pipeline_state") == "failed" and not tags.get("model_set")
        outside = [k for k in MODEL_NAMES if not _in_pipeline(k, mvs[k], run_id, tags)]
        if not outside and not failed:
            return [], run_id
        first = first or (run_id, tags, outside, failed)
    run_id, tags, outside, failed = first
    problems = [f"pipeline run {run_id} did not complete ({tags.get('failure', 'failed')})"] if failed else []
    for k in outside:
        mv = mvs[k]
        problems.append(f"{mv.name} v{mv.version} is not from pipeline run {run_id} (it was registered by "
                        f"pipeline run {mv.tags.get('pipeline_run_id', '?')} and no stage of {run_id} read it)")
    return problems, None


def _check_set(client, members: dict, pipeline_run_id: str | None = None) -> tuple[list[str], str | None]:
    mvs = {key: resolve_version(client, key, v) for key, v in members.items()}
    problems = _chain_problems(client, mvs)
    for key, mv in mvs.items():
        if len(mv.tags.get("sha256", "")) != 64:
            problems.append(f"{mv.name} v{mv.version} has no sha256 tag (registered by an older version)")
    run_id = None
    if len(mvs) == len(MODEL_NAMES):
        more, run_id = _pipeline_problems(client, mvs, pipeline_run_id)
        problems += more
    return problems, run_id


def check_set(client, members: dict, pipeline_run_id: str | None = None) -> list[str]:
    """Problems that keep `members` (key -> version) from being one consistent model set; [] if none.

    * all five models are there, each with a sha256 tag;
    * the chain holds (`check_lineage`): K-means and AE2 on the set's AE1, the GMM on its AE1,
      K-means and AE2;
    * every member, `improved` included, belongs to one pipeline run (`pipeline_run_id`, else one of
      the members' own): registered by it, or read unchanged by one of its stages (a model DVC did
      not need to retrain); and that run did not fail before its set was complete (a killed run).
    A partial set (some of the five) is checked for its chain only.
    """
    return _check_set(client, members, pipeline_run_id)[0]


def _register_set(client, members: dict, *, run_id: str, pipeline_run_id: str | None, origin: str,
                  forced: list[str] = (), derived_from: int | None = None) -> int:
    """Create a version of `stm-set` pinning `members`: tags `members`, `<key>_version`,
    `<key>_sha256`, `pipeline_run_id`, `origin` (pipeline, derived or manual), `forced` (the
    problems --force overrode) and `derived_from`; artifact `set.json` (the same, with each member's
    file, source and pipeline run), logged to run `run_id`."""
    from stm_defects.io.safe_models import sha256_hex

    mvs = {key: resolve_version(client, key, members[key]) for key in MODEL_NAMES}
    for mv in mvs.values():
        if len(mv.tags.get("sha256", "")) != 64:
            raise TrackingError(f"{mv.name} v{mv.version} has no sha256 tag, so no set can pin it")
    manifest = {"name": SET_NAME, "origin": origin, "pipeline_run_id": pipeline_run_id,
                "members": {key: {"name": mv.name, "version": int(mv.version), "file": mv.tags.get("file"),
                                  "sha256": mv.tags["sha256"], "source": mv.source,
                                  "pipeline_run_id": mv.tags.get("pipeline_run_id")} for key, mv in mvs.items()}}
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    with tempfile.TemporaryDirectory(prefix="stm-set-") as tmp:
        path = Path(tmp) / SET_FILE
        path.write_bytes(data)
        client.log_artifact(run_id, str(path), "registry/set")
    _ensure_model(client, SET_NAME)
    tags = {"members": _members_json(members), "origin": origin, "pipeline_run_id": pipeline_run_id or "",
            "file": SET_FILE, "sha256": sha256_hex(data), "git_commit": git_commit(),
            **{f"{k}_version": str(mv.version) for k, mv in mvs.items()},
            **{f"{k}_sha256": mv.tags["sha256"] for k, mv in mvs.items()}}
    if forced:
        tags["forced"] = "; ".join(forced)[:4000]
    if derived_from is not None:
        tags["derived_from"] = str(derived_from)
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/registry/set"
    mv = client.create_model_version(SET_NAME, source=source, run_id=run_id, tags=tags)
    return int(mv.version)


def _promotion_run(client, experiment: str) -> str:
    """A run (`kind=promotion`, ended at once) to hold the manifest of a set built at promotion time."""
    exp = client.get_experiment_by_name(experiment)
    run = client.create_run(exp.experiment_id, run_name="promotion", tags={"kind": "promotion"})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _set_members(client, set_mv, get=None) -> dict:
    """key -> the member versions a set pins, each checked against the sha256 the set pinned.
    ``get(key, version)`` fetches a member version (default: `resolve_version` with ``client``)."""
    out = {}
    for key, version in _pins(set_mv).items():
        mv = get(key, version) if get is not None else resolve_version(client, key, version)
        pinned = set_mv.tags.get(f"{key}_sha256", "")
        if not pinned or mv.tags.get("sha256") != pinned:
            raise TrackingError(f"{mv.name} v{version}: its sha256 tag is not the one {SET_NAME} v{set_mv.version} "
                                "pinned; refusing the set (a tag was changed after registration)")
        out[key] = mv
    return out


def _holder(client, alias: str):
    """The set version holding `alias`, or None."""
    try:
        return client.get_model_version_by_alias(SET_NAME, alias)
    except Exception:  # noqa: BLE001 - no stm-set yet, or no such alias
        return None


# ------------------------------------------------------------------------------- promotion
def _refuse(problems: list[str], force: bool) -> None:
    if problems and not force:
        raise TrackingError("refusing an inconsistent set: " + "; ".join(problems)
                            + " (promote the whole set with --run, or use --force)")


def _retag(client, name: str, versions) -> None:
    """Set the `stage` tag of `versions` of `name` from the aliases they hold: Production, else
    Staging, else Archived (a version in both stages shows Production)."""
    held: dict[str, list[str]] = {}
    for a, v in client.get_registered_model(name).aliases.items():
        held.setdefault(str(v), []).append(a)
    for v in dict.fromkeys(str(v) for v in versions):
        aliases = held.get(v, [])
        stage = next((STAGES[a] for a in ("production", "staging") if a in aliases), STAGES["archived"])
        client.set_model_version_tag(name, v, "stage", stage)


def _mirror(client, members: dict, alias: str) -> None:
    """Give the members the alias of the set they joined, and retag them and the versions that lost
    it (for `stm models` and the UI; readers never use these aliases)."""
    for key, v in members.items():
        name = MODEL_NAMES[key]
        old = client.get_registered_model(name).aliases.get(alias)
        if old is None or str(old) != str(v):
            client.set_registered_model_alias(name, alias, str(v))
        _retag(client, name, [v] + ([old] if old is not None else []))


def promote(versions: dict, stage: str, force: bool = False, experiment: str = "stm-defects") -> dict:
    """Move a model set to `stage` (Production or Staging), or archive one; returns what moved.

    `versions` is key -> version, as `pipeline_set` returns it (all five models), or a few models, or
    `{"set": N}` for a set version. What gets promoted is always one `stm-set` version:
    * all five models: the set pinning exactly those (a pipeline run's), else a new set (`origin`
      manual) once `check_set` passes;
    * some models: a new set (`origin` derived) from the set now holding `stage` with those
      replaced, once `check_set` passes; when no set holds `stage` yet, only those models'
      aliases move (nothing can be served from `stage` until a whole set is promoted);
    * `--force` (`force`) promotes despite lineage problems and records them in the set's `forced`
      tag; it never skips the sha256 pins.
    The switch itself is one write, the `stm-set` alias, so readers (`load_registered`) see the old
    set or the new one. The old set's `stage` tag becomes Archived, and the members' own aliases and
    `stage` tags follow (for `stm models` and the UI). Returns the five versions and `set`.

    Archived: the set pinning `versions` (or the set `N`) loses its aliases, so that stage serves
    nothing until another set is promoted; members still pinned by a set in a stage keep theirs. A
    single model that a set in Production or Staging pins cannot be archived on its own.
    """
    alias = stage.lower()
    if alias not in STAGES:
        raise TrackingError(f"unknown stage {stage!r}; use Production, Staging or Archived")
    client = _client(experiment)
    versions = {k: int(v) for k, v in versions.items()}
    set_version = versions.pop("set", None)
    for key, v in versions.items():
        resolve_version(client, key, v)
    if alias == "archived":
        return _archive(client, versions, set_version)
    holder = _holder(client, alias)
    if set_version is not None:
        target = _get_set(client, set_version)
        pins = _pins(target)
        wrong = [k for k, v in versions.items() if pins[k] != v]
        if wrong:
            raise TrackingError(f"{SET_NAME} v{set_version} pins " + ", ".join(f"{k} v{pins[k]}" for k in wrong))
    else:
        if len(versions) == len(MODEL_NAMES):
            members, base = versions, None
        elif holder is not None:
            members, base = {**_pins(holder), **versions}, int(holder.version)
        else:
            _refuse(check_set(client, versions), force)
            _mirror(client, versions, alias)
            log.warning("no model set is in %s: only the aliases of %s moved, and `stm predict` reads %s "
                        "through a set (promote a whole pipeline run with `stm promote --run latest`)",
                        STAGES[alias], ", ".join(f"{MODEL_NAMES[k]} v{v}" for k, v in versions.items()),
                        STAGES[alias])
            return versions
        found = find_set(client, members)
        if found is None:
            problems, run_id = _check_set(client, members)
            _refuse(problems, force)
            found = _register_set(client, members, run_id=_promotion_run(client, experiment),
                                  pipeline_run_id=run_id, origin="derived" if base else "manual",
                                  forced=problems, derived_from=base)
        target = _get_set(client, found)
    pins = _pins(target)
    _set_members(client, target)                            # the pins still hold
    if not force:
        if target.tags.get("forced"):
            raise TrackingError(f"{SET_NAME} v{target.version} was built with --force ({target.tags['forced']}); "
                                "promote it with --force")
        _refuse(check_set(client, pins, target.tags.get("pipeline_run_id") or None), force)
    client.set_registered_model_alias(SET_NAME, alias, str(target.version))     # the switch readers see
    _retag(client, SET_NAME, [target.version] + ([holder.version] if holder is not None else []))
    _mirror(client, pins, alias)
    log.info("%s: %s v%s (%s)", STAGES[alias], SET_NAME, target.version,
             ", ".join(f"{k} v{v}" for k, v in pins.items()))
    return {**pins, "set": int(target.version)}


def _archive(client, versions: dict, set_version: int | None) -> dict:
    """Archive a set (`set_version`, or the one pinning all five `versions`) or single models."""
    if set_version is None and len(versions) == len(MODEL_NAMES):
        set_version = find_set(client, versions)
    try:
        held = client.get_registered_model(SET_NAME).aliases
    except Exception:  # noqa: BLE001 - no sets yet
        held = {}
    live = {a: (v, _pins(_get_set(client, v))) for a, v in held.items()      # sets that stay in a stage
            if a in ("production", "staging") and str(v) != str(set_version)}
    if set_version is not None:
        target = _get_set(client, set_version)
        for a, v in held.items():
            if str(v) == str(target.version):
                client.delete_registered_model_alias(SET_NAME, a)
        _retag(client, SET_NAME, [target.version])
        members = _pins(target)
        result = {**members, "set": int(target.version)}
    else:
        for key, v in versions.items():
            for a, (s, p) in live.items():
                if p[key] == v:
                    raise TrackingError(f"{MODEL_NAMES[key]} v{v} is part of the {STAGES[a]} set ({SET_NAME} v{s}): "
                                        "archive that set (`stm promote --run RUN --model-stage Archived`) or "
                                        "promote another set first")
        members = result = dict(versions)
    for key, v in members.items():
        name = MODEL_NAMES[key]
        kept = {a for a, (_, p) in live.items() if p[key] == v}       # held through a set still in a stage
        for a, holder in client.get_registered_model(name).aliases.items():
            if str(holder) == str(v) and a not in kept:
                client.delete_registered_model_alias(name, a)
        _retag(client, name, [v])
    return result


def _pipeline_run(client, experiment_id: str, run: str):
    """The pipeline (parent) run named by `run`: its run id, a stage run id of it, or its key."""
    found = None
    if re.fullmatch(r"[A-Za-z0-9._:+-]{1,300}", run):
        try:
            found = client.get_run(run)
        except Exception:  # noqa: BLE001 - not a run id
            found = None
        if found is not None and found.data.tags.get("kind") != "pipeline":
            parent = found.data.tags.get("mlflow.parentRunId")
            found = client.get_run(parent) if parent and found.data.tags.get("kind") == "stage" else None
        if found is None:
            hits = client.search_runs([experiment_id], f"tags.kind = 'pipeline' and tags.pipeline_key = '{run}'",
                                      max_results=1)
            found = hits[0] if hits else None
    if found is None:
        raise TrackingError(f"no pipeline run {run!r}: give `latest`, a pipeline run id (MLflow UI) or its "
                            "pipeline key")
    return found


def _why_no_set(run) -> str:
    tags = run.data.tags
    if tags.get("pipeline_state") == "failed":
        return f"it did not complete ({tags.get('failure', 'failed')})"
    if run.info.status == "RUNNING":
        return "it has not completed (a stage is running)"
    return "it stopped before all five models were registered (or ran before model sets existed)"


def pipeline_set(run: str = "latest", experiment: str = "stm-defects") -> dict:
    """The model set (key -> version) of one pipeline run, for `promote`.

    `run`: `latest` (the newest set a pipeline run registered; a warning names newer pipeline runs
    that registered none) or a pipeline run (its id, a stage run id of it, or its key). A run
    without a set (killed, failed, still running) is refused with one line saying which and why.
    Killed runs are marked FAILED first (`mark_killed_runs`).
    """
    mlflow = connect(experiment)
    client = mlflow.MlflowClient()
    exp_id = mlflow.get_experiment_by_name(experiment).experiment_id
    mark_killed_runs(client, [exp_id])
    if run != "latest":
        parent = _pipeline_run(client, exp_id, run)
        tags = parent.data.tags
        if not tags.get("model_set"):
            raise TrackingError(f"pipeline run {parent.info.run_id} has no model set: {_why_no_set(parent)}; "
                                "its models cannot be promoted (rerun the pipeline: `make run` or `stm train`)")
        if tags.get("pipeline_state") == "failed":
            log.warning("pipeline run %s failed after registering its set: %s", parent.info.run_id, tags.get("failure"))
        return _pins(_get_set(client, tags["model_set"]))
    sets = _search(client, f"name = '{SET_NAME}' and tags.origin = 'pipeline'")
    newest = max(sets, key=lambda v: int(v.version)) if sets else None
    since = 0
    if newest is not None and newest.tags.get("pipeline_run_id"):
        with contextlib.suppress(Exception):
            since = client.get_run(newest.tags["pipeline_run_id"]).info.start_time
    later = [r for r in client.search_runs([exp_id], f"tags.kind = 'pipeline' and attributes.start_time > {since}",
                                           order_by=["attributes.start_time DESC"], max_results=5)
             if not r.data.tags.get("model_set")]
    if newest is None:
        last = f" (the newest pipeline run, {later[0].info.run_id}, has none: {_why_no_set(later[0])})" if later else ""
        raise TrackingError("no model set is registered yet: a pipeline run registers its set when all five models "
                            f"are built (`make run` or `stm train`){last}")
    for r in later:
        log.warning("pipeline run %s has no model set (%s); the latest set is %s v%s of pipeline run %s",
                    r.info.run_id, _why_no_set(r), SET_NAME, newest.version, newest.tags.get("pipeline_run_id"))
    return _pins(newest)


def list_models(experiment: str = "stm-defects") -> list[dict]:
    """Rows for `stm models`: every version of the five models, then every model set.

    Each row: `model`, `version`, `stage` (its `stage` tag), `aliases`, `ae1_version`, `metrics` (of
    the run that registered it); set rows (`model` = stm-set) also carry `members` (key -> version)
    and `pipeline_run_id`. The sets' aliases are what `stm predict` reads; the five models' aliases
    and stages mirror them.
    """
    client = _client(experiment)
    rows = []
    for key, name in [*MODEL_NAMES.items(), ("set", SET_NAME)]:
        versions = _search(client, f"name = '{name}'")
        if not versions:
            continue
        aliases = {}
        try:
            for a, v in client.get_registered_model(name).aliases.items():
                aliases.setdefault(str(v), []).append(a)
        except Exception:  # noqa: BLE001
            pass
        for v in sorted(versions, key=lambda v: int(v.version)):
            metrics = {}
            if v.run_id and key != "set":
                try:
                    metrics = client.get_run(v.run_id).data.metrics
                except Exception:  # noqa: BLE001
                    pass
            row = {"model": name, "version": int(v.version), "stage": v.tags.get("stage", "None"),
                   "aliases": aliases.get(str(v.version), []),
                   "ae1_version": v.tags.get("ae1_version", "") if key != "set" else "",
                   "metrics": {k: metrics[k] for k in sorted(metrics) if not k.startswith("epoch")}}
            if key == "set":
                with contextlib.suppress(TrackingError):
                    row["members"] = _pins(v)
                row["pipeline_run_id"] = v.tags.get("pipeline_run_id", "")
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------- loading
def _serving_set(client, alias: str):
    """(set version, key -> member version) holding `alias`: the one read of the alias, then the
    pinned versions, each checked against the set's sha256 pins."""
    if alias not in ("production", "staging"):
        raise TrackingError(f"can only predict with Production or Staging models, not {alias!r}")
    set_mv = _holder(client, alias)
    if set_mv is None:
        raise TrackingError(f"no model set is in {STAGES[alias]} yet: run `stm promote --run latest "
                            f"--model-stage {STAGES[alias]}` after `make run` or `stm train`")
    return set_mv, _set_members(client, set_mv)


def registered_versions(stage: str = "Production", experiment: str = "stm-defects") -> dict:
    """key -> version of the set in `stage`, and `set`: its version (what `load_registered` loads)."""
    client = _client(experiment)
    set_mv, mvs = _serving_set(client, stage.lower())
    return {**{k: int(mv.version) for k, mv in mvs.items()}, "set": int(set_mv.version)}


def _download_verified(key: str, mv, dst: Path) -> tuple[Path, bytes]:
    """(local path, bytes) of model `key`'s one file of registry version `mv`, downloaded into `dst`
    and checked against the version's `sha256` tag.

    Only `safe_models.MODEL_FILES[key]` is downloaded (whatever else lies in the artifact folder).
    Refusals are one line naming the model, the version and the file.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from stm_defects.io import safe_models

    file = safe_models.MODEL_FILES[key]
    where = f"{mv.name} v{mv.version}"
    _check_file_tags(key, mv)
    expected = mv.tags["sha256"]
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # no tqdm bars on stderr
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source.rstrip('/')}/{file}",
                                                         dst_path=str(dst)))
        data = local.read_bytes()
    except (MlflowException, OSError):
        raise TrackingError(f"{where}: {file} is missing from its artifacts ({mv.source})") from None
    actual = safe_models.sha256_hex(data)
    if actual != expected:
        raise TrackingError(f"{where}: {file} has sha256 {actual[:12]}..., not the registered "
                            f"{expected[:12]}...; refusing to load it (the artifact changed after registration)")
    return local, data


def _check_file_tags(key: str, mv) -> None:
    """Refuse a version without the `file` tag of the safe format, or without a valid sha256 tag."""
    from stm_defects.io import safe_models

    file = safe_models.MODEL_FILES[key]
    where = f"{mv.name} v{mv.version}"
    if mv.tags.get("file") != file:
        raise TrackingError(f"{where} was registered in the old pickle-based format (no `file` tag); it is "
                            "not loaded, since such files can run code: retrain with `make run` and promote "
                            "the new set")
    if len(mv.tags.get("sha256", "")) != 64:
        raise TrackingError(f"{where}: no valid sha256 tag, so {file} cannot be verified; refusing to load it")


def _model_from(key: str, data: bytes, where: str):
    """The model in verified file bytes `data`, as `io.model_files.model_from_bytes` holds it:
    the paper method's `Deferred` (checkpoints built with `torch.load(weights_only=True)`, the
    estimators with the safe `.npz` reader, on first use), the default method's state built."""
    from stm_defects.io import safe_models
    from stm_defects.io.model_files import model_from_bytes

    return model_from_bytes(key, data, f"{where} {safe_models.MODEL_FILES[key]}")


def _load_version(key: str, mv, dst: Path):
    """Model `key` of registry version `mv`: download its one file, check the sha256 tag, load it
    without pickle (see `_download_verified`, `_model_from`)."""
    local, data = _download_verified(key, mv, dst)
    return _model_from(key, data, f"{mv.name} v{mv.version}")


# ------------------------------------------------------------------------------ model cache
ENV_CACHE = "STM_MODEL_CACHE"
_CACHE_OFF = ("0", "off", "no", "false", "none")


def model_cache_dir() -> Path | None:
    """The local cache of registry model files: `$STM_MODEL_CACHE` (``off`` or ``0`` turns it
    off: None), else `$XDG_CACHE_HOME/stm-defects/models`, else `~/.cache/stm-defects/models`.

    Entries are content-addressed: `<cache>/<sha256[:2]>/<sha256>/<file>`, one per model file,
    named by the sha256 the registry pinned. A model set is found in it through its pins (so the
    set version, read from the registry, keys it); every entry is hashed again before use, and a
    wrong one is ignored (and replaced by the next cold load). Nothing is evicted; delete the
    folder to empty it."""
    value = os.environ.get(ENV_CACHE)
    if value is not None and value.strip().lower() in _CACHE_OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stm-defects" / "models"


def _cache_entry(cache: Path, sha256: str, file: str) -> Path:
    return cache / sha256[:2] / sha256 / file


def _cache_get(cache: Path, sha256: str, file: str) -> tuple[Path, bytes] | None:
    """(path, bytes) of a cached file whose bytes hash to `sha256`; None when absent or wrong."""
    from stm_defects.io.safe_models import sha256_hex

    path = _cache_entry(cache, sha256, file)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if sha256_hex(data) != sha256:
        log.info("model cache: %s does not match its sha256; ignoring it", path)
        return None
    return path, data


def _cache_put(cache: Path, sha256: str, file: str, data: bytes) -> None:
    """Store verified bytes (atomically); a cache that cannot be written is skipped, not an error."""
    from stm_defects.io.files import atomic_file

    path = _cache_entry(cache, sha256, file)
    try:
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        with atomic_file(path, "wb") as fh:
            fh.write(data)
    except OSError as err:
        log.debug("model cache: cannot write %s (%s)", path, err)


class _Version:
    """A registry model version read straight from the SQLite store (what `_fast_serving_set`
    returns): the attributes of MLflow's `ModelVersion` that loading uses."""

    __slots__ = ("name", "version", "tags", "source")

    def __init__(self, name: str, version, tags: dict, source: str):
        self.name, self.version, self.tags, self.source = name, str(version), tags, source


def _sqlite_path(uri: str) -> str | None:
    """The database file of a `sqlite:///PATH` tracking URI; None for any other store."""
    if not uri.startswith("sqlite:///") or "?" in uri:
        return None
    path = uri[len("sqlite:///"):]
    return path if path and os.path.isfile(path) else None


def _fast_serving_set(uri: str, alias: str):
    """`_serving_set` without MLflow (whose import alone takes seconds): the set holding `alias`
    and its members read from the SQLite store, read-only, with the same checks (the pins, each
    member's sha256 tag against its pin). None whenever anything is not as expected (another
    store, another schema, no set, a check failing): the caller then takes the MLflow path,
    which gives the authoritative error."""
    import sqlite3
    from urllib.parse import quote

    db = _sqlite_path(uri)
    if db is None:
        return None
    try:
        con = sqlite3.connect(f"file:{quote(os.path.abspath(db))}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return None
    try:
        def version(name: str, number) -> _Version:
            row = con.execute("SELECT source, current_stage FROM model_versions WHERE workspace = 'default' "
                              "AND name = ? AND version = ?", (name, int(number))).fetchone()
            if row is None or row[1] == "Deleted_Internal":
                raise LookupError(f"{name} v{number}")
            tags = dict(con.execute("SELECT key, value FROM model_version_tags WHERE workspace = 'default' "
                                    "AND name = ? AND version = ?", (name, int(number))).fetchall())
            return _Version(name, number, tags, row[0] or "")

        row = con.execute("SELECT version FROM registered_model_aliases WHERE workspace = 'default' "
                          "AND name = ? AND alias = ?", (SET_NAME, alias)).fetchone()
        if row is None:
            return None
        set_mv = version(SET_NAME, row[0])
        members = _set_members(None, set_mv, lambda key, v: version(MODEL_NAMES[key], v))
        return set_mv, members
    except (sqlite3.Error, LookupError, TrackingError, ValueError):
        return None
    finally:
        con.close()


# ---------------------------------------------------------------------------------- loading
def _registered_models(alias: str, mvs: dict, loaded: dict):
    """The `results.Models` of the loaded members `loaded` of versions `mvs` (see `load_registered`)."""
    from stm_defects.results import Models

    versions = {key: {"name": mv.name, "version": int(mv.version), "stage": STAGES[alias]}
                for key, mv in mvs.items()}
    tags = {key: mv.tags for key, mv in mvs.items()}
    calibration = json.loads(tags["gmm"].get("calibration", "{}"))
    config = json.loads(tags["improved"]["config"])
    classifier = "improved" if config.get("method", "improved") == "improved" else "gmm"
    class_names = {"-1": "unknown", **json.loads(tags[classifier].get("class_names", "{}"))}
    return Models(ae1=loaded["ae1"], kmeans=loaded["kmeans"], ae2=loaded["ae2"],
                  gmm=loaded["gmm"], calibration=calibration, versions=versions, class_names=class_names,
                  improved=loaded.get("improved"), config=config)


def _check_alias(stage: str) -> str:
    alias = stage.lower()
    if alias not in ("production", "staging"):
        raise TrackingError(f"can only predict with Production or Staging models, not {alias!r}")
    return alias


def _load_warm(alias: str, cache: Path):
    """(Models, files) of the set holding `alias` from the cache alone (no MLflow import), or None
    on any miss: every member's file must be cached and hash to the set's pin."""
    from stm_defects.io.safe_models import MODEL_FILES
    from stm_defects.project import tracking_uri

    found = _fast_serving_set(tracking_uri(), alias)
    if found is None:
        return None
    _, mvs = found
    if "config" not in mvs["improved"].tags:
        return None
    hits = {}
    for key, mv in mvs.items():
        try:
            _check_file_tags(key, mv)
        except TrackingError:
            return None
        hit = _cache_get(cache, mv.tags["sha256"], MODEL_FILES[key])
        if hit is None:
            return None
        hits[key] = hit
    loaded = {key: _model_from(key, data, f"{mvs[key].name} v{mvs[key].version}")
              for key, (_, data) in hits.items()}
    files = {key: (MODEL_FILES[key], data) for key, (_, data) in hits.items()}
    log.debug("model set of %s loaded from the cache %s", alias, cache)
    return _registered_models(alias, mvs, loaded), files


def load_registered_files(stage: str = "Production", experiment: str = "stm-defects", cache: bool = True):
    """(Models, files) of the model set holding `stage`'s alias: `load_registered`'s models, and
    the verified bytes of each model file (key -> (file name, bytes)), e.g. for
    `analysis.batch.ModelSpec`.

    With ``cache`` (and `model_cache_dir` not turned off), a warm load reads the alias, the set's
    pins and the members' tags straight from the SQLite store (read-only, no MLflow import) and
    the files from the cache, each hashed against the set's pin: about a second instead of the
    several seconds MLflow's import alone takes. Anything missing or unexpected falls back to the
    MLflow path below, which then fills the cache with the files it verified.
    """
    alias = _check_alias(stage)
    cache_dir = model_cache_dir() if cache else None
    if cache_dir is not None:
        warm = _load_warm(alias, cache_dir)
        if warm is not None:
            return warm
    from stm_defects.io.safe_models import MODEL_FILES

    client = _client(experiment)
    set_mv, mvs = _serving_set(client, alias)
    if "config" not in mvs["improved"].tags:
        raise TrackingError(f"{MODEL_NAMES['improved']} v{mvs['improved'].version} carries no "
                            "prediction config (registered by an older version): retrain with `make run`")
    loaded, files = {}, {}
    with tempfile.TemporaryDirectory(prefix="stm-registry-") as tmp:
        for key, mv in mvs.items():
            local, data = _download_verified(key, mv, Path(tmp) / key)
            loaded[key] = _model_from(key, data, f"{mv.name} v{mv.version}")
            files[key] = (MODEL_FILES[key], data)
            if cache_dir is not None:
                _cache_put(cache_dir, mv.tags["sha256"], MODEL_FILES[key], data)
    return _registered_models(alias, mvs, loaded), files


def load_registered(stage: str = "Production", experiment: str = "stm-defects", cache: bool = False):
    """A `results.Models` from the model set that holds `stage`'s alias.

    The set's alias is read once; then exactly the versions it pins are loaded, each checked against
    the sha256 the set pinned, and each file against its version's `sha256` tag before it is read
    without pickle (see `_download_verified`). The five models' own aliases are not read, so a
    promotion running meanwhile cannot give a mixed set.
    `Models.config` is the prediction config stored with the `stm-improved` version (the last
    model every pipeline registers, with the resolved params of that pipeline run).
    ``cache``: use and fill the local model cache (`load_registered_files`; `stm predict` and
    `stm classes` do); off by default, so that a library call always reads the registry's files.
    """
    return load_registered_files(stage, experiment, cache)[0]


def _production_member(client, key: str):
    """The `key` member of the Production set."""
    set_mv = _holder(client, "production")
    if set_mv is None:
        raise TrackingError("no model set is in Production; give --classifier and --version")
    return resolve_version(client, key, _pins(set_mv)[key])


def number_of_classes(model, key: str) -> int:
    """How many classes a classifier gives: the improved state's ``n_classes`` (0 without
    fitted classes), the GMM's number of components."""
    if key == "improved":
        classes = (model or {}).get("classes") if isinstance(model, dict) else None
        return int(classes["n_classes"]) if classes else 0
    from stm_defects.results import Deferred

    if isinstance(model, Deferred):                     # as a prediction loads it: build it now
        model = model.build()
    n = getattr(model, "n_components_", None)          # the GMM selector: its chosen k
    return int(n if n is not None else getattr(model, "n_components", 0))


def edit_class_names(changes: dict, version: str | int | None = None, experiment: str = "stm-defects",
                     key: str = "improved") -> tuple[int, dict, int]:
    """Apply ``changes`` (class id -> name, or None to remove the name) to a classifier version
    (default: the Production set's) after checking every id is one of its classes; return
    (version, all names now, number of classes). Empty ``changes`` only reads them. A bad id or
    name raises `TrackingError` naming what is allowed."""
    client = _client(experiment)
    name = MODEL_NAMES[key]
    if version is None:
        version = _production_member(client, key).version
    mv = resolve_version(client, key, version)
    current = json.loads(mv.tags.get("class_names", "{}"))
    if changes:
        with tempfile.TemporaryDirectory() as d:
            n = number_of_classes(_load_version(key, mv, Path(d)), key)
    else:
        n = int(mv.tags.get("n_classes", -1)) if mv.tags.get("n_classes") else -1
    for cid, new in changes.items():
        if not 0 <= int(cid) < n:
            allowed = f"0 to {n - 1}" if n > 0 else "none (this classifier has no classes)"
            raise TrackingError(f"{name} v{mv.version} has no class {cid}: its classes are {allowed} "
                                "(-1, unknown, cannot be renamed)")
        if new is None:
            current.pop(str(cid), None)
        else:
            new = str(new).strip()
            if not new or len(new) > 64 or not new.isprintable() or "," in new:
                raise TrackingError(f"class name {new!r}: give 1-64 printable characters, no comma")
            current[str(cid)] = new
    if changes:
        client.set_model_version_tag(name, str(mv.version), "class_names", json.dumps(current, sort_keys=True))
        client.set_model_version_tag(name, str(mv.version), "n_classes", str(n))
    return int(mv.version), current, n


@contextlib.contextmanager
def temporary_store():
    """A throwaway MLflow store (tests, `stm train` without tracking)."""
    with tempfile.TemporaryDirectory() as d:
        old = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d}/mlflow.db"
        try:
            yield d
        finally:
            if old is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = old


def production_method(experiment: str = "stm-defects") -> str:
    """The method ("improved" or "paper") of the Production set's prediction config."""
    mv = _production_member(_client(experiment), "improved")
    return json.loads(mv.tags.get("config", "{}")).get("method", "improved")
