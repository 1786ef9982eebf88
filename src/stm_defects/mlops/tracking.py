"""MLflow: the only module that imports it. Runs, the model registry, promotion and loading.

Store: SQLite at `<project>/mlruns/mlflow.db` with artifacts in `<project>/mlruns/artifacts` (the
plain file store is refused by MLflow 3); see `stm_defects.project` for how the project is found.
`MLFLOW_TRACKING_URI` overrides it (tests, shared servers).

Grouping: every stage run is a nested child of one parent run per pipeline execution. The parent
is found by the `pipeline_key` tag: `STM_PIPELINE_RUN` when set (`make run` sets one per
execution), else a hash of the git commit and the resolved params.

Model files: a version is its model's one file (`io.safe_models.MODEL_FILES`: the torch checkpoint
`model.pt`, or a safe `.npz` for the scikit-learn parts) logged as run artifacts under
`registry/<key>/`; the version's `source` is that folder. No pickle-based MLflow flavour is used:
loading downloads only the expected file, checks its sha256 against the version's `sha256` tag, and
reads it with `torch.load(weights_only=True)` or `np.load(allow_pickle=False)`. A version without a
`file` tag (registered with the pickle flavours by an older version) is refused, not loaded.

Lineage: every model version is tagged with `git_commit`, `params_hash`, `data_version`,
`sha256` and `file` (the hash and name of its model file) and, for models built on AE1, `ae1_version`.
`stm-improved` versions also carry `config`: the prediction config (JSON) of their pipeline run,
which `stm predict` uses instead of the working folder's params.yaml.
Stages are MLflow aliases (`production`, `staging`) plus a `stage` tag (also `Archived`), since
registry stages are deprecated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_NAMES = {"ae1": "stm-ae1", "kmeans": "stm-kmeans", "ae2": "stm-ae2", "gmm": "stm-gmm",
               "improved": "stm-improved"}
STAGES = {"production": "Production", "staging": "Staging", "archived": "Archived"}


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
        mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)
    return mlflow


def git_commit(root: Path | None = None) -> str:
    try:
        from stm_defects.project import find_project

        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or find_project() or Path.cwd(), capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------ runs
class Tracker:
    """Logs one stage as a nested run of its pipeline execution. A no-op when `enabled` is False."""

    def __init__(self, params, stage: str, enabled: bool = True):
        self.params, self.stage, self.enabled = params, stage, enabled
        self.mlflow = None
        self.run_id = None
        self.parent_id = None

    def __enter__(self):
        if not self.enabled:
            return self
        mlflow = self.mlflow = connect(self.params.tracking.experiment)
        key = os.environ.get("STM_PIPELINE_RUN") or f"{git_commit()[:12]}-{self.params.digest()}"
        exp = mlflow.get_experiment_by_name(self.params.tracking.experiment)
        found = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.pipeline_key = '{key}' "
                                   "and tags.kind = 'pipeline'", max_results=1, output_format="list")
        if found:
            self.parent_id = found[0].info.run_id
        else:
            client = mlflow.MlflowClient()
            parent = client.create_run(
                exp.experiment_id, run_name=f"pipeline {key}",
                tags={"pipeline_key": key, "kind": "pipeline", "profile": self.params.profile,
                      "git_commit": git_commit(), "params_hash": self.params.digest()})
            self.parent_id = parent.info.run_id
            from mlflow.entities import Param

            flat = self.params.flat()          # every resolved value, so pipelines compare in the UI
            batch = [Param(k, v) for k, v in sorted(flat.items())]
            for i in range(0, len(batch), 100):
                client.log_batch(self.parent_id, params=batch[i:i + 100])
        run = mlflow.start_run(run_name=self.stage, nested=True, parent_run_id=self.parent_id,
                               tags={"stage": self.stage, "kind": "stage", "pipeline_key": key,
                                     "profile": self.params.profile, "git_commit": git_commit(),
                                     "params_hash": self.params.digest()})
        self.run_id = run.info.run_id
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.enabled and self.mlflow is not None:
            status = "FAILED" if exc_type else "FINISHED"
            self.mlflow.end_run(status)
            # The parent stays open only while a stage runs: its end time is the last stage's.
            self.mlflow.MlflowClient().set_terminated(self.parent_id, status)
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
        `sha256` (of exactly this file) and `file` included. Returns the version number.
        """
        if not (self.enabled and self.params.tracking.register):
            return None
        from mlflow.exceptions import MlflowException

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
        try:
            client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {"git_commit": git_commit(), "params_hash": self.params.digest(), "sha256": sha256,
                "file": path.name, "pipeline_run_id": self.parent_id, "run_id": self.run_id,
                "profile": self.params.profile, **(extra_tags or {})}
        tags = {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)
                for k, v in tags.items()}
        mv = client.create_model_version(name, source=mlflow.get_artifact_uri(folder), run_id=self.run_id,
                                         tags=tags)
        version = int(mv.version)
        self.tags({f"registered.{key}": f"{name}/{version}"})
        log.info("registered %s version %d", name, version)
        return version


def version_by_sha(key: str, sha256: str) -> int | None:
    """The registered version of `key` whose file hash is `sha256` (newest first)."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    try:
        found = client.search_model_versions(f"name = '{MODEL_NAMES[key]}' and tags.sha256 = '{sha256}'")
    except Exception:  # noqa: BLE001 - no such model yet
        return None
    return max((int(v.version) for v in found), default=None)


# ------------------------------------------------------------------------------- promotion
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


def lineage_set(client, gmm_version) -> dict:
    """The (ae1, kmeans, ae2, gmm) versions a GMM version was built on, from its tags."""
    tags = gmm_version.tags
    out = {"gmm": int(gmm_version.version)}
    for key in ("ae1", "kmeans", "ae2"):
        if f"{key}_version" not in tags:
            raise TrackingError(f"{MODEL_NAMES['gmm']} v{gmm_version.version} has no {key}_version tag")
        out[key] = int(tags[f"{key}_version"])
    return out


def check_lineage(client, versions: dict) -> list[str]:
    """Problems with a set of versions: models built on another AE1 than the one in the set."""
    problems = []
    ae1 = str(versions["ae1"])
    for key in ("kmeans", "ae2", "gmm"):
        if key not in versions:
            continue
        v = resolve_version(client, key, versions[key])
        built_on = v.tags.get("ae1_version")
        if built_on != ae1:
            problems.append(f"{MODEL_NAMES[key]} v{versions[key]} was built on {MODEL_NAMES['ae1']} "
                            f"v{built_on}, not v{ae1}")
    return problems


def promote(versions: dict, stage: str, force: bool = False, experiment: str = "stm-defects") -> dict:
    """Move `versions` ({key: version}) to `stage` (Production, Staging or Archived)."""
    alias = stage.lower()
    if alias not in STAGES:
        raise TrackingError(f"unknown stage {stage!r}; use Production, Staging or Archived")
    client = _client(experiment)
    for key, v in versions.items():
        resolve_version(client, key, v)
    if alias != "archived" and not force:
        # The set that will hold the stage: its current holders, with the new versions in.
        resulting = {}
        for key, name in MODEL_NAMES.items():
            try:
                holder = client.get_registered_model(name).aliases.get(alias)
            except Exception:  # noqa: BLE001 - model not registered yet
                holder = None
            if holder is not None:
                resulting[key] = int(holder)
        resulting.update(versions)
        if "ae1" in resulting:
            problems = check_lineage(client, resulting)
            if problems:
                raise TrackingError("refusing an inconsistent set: " + "; ".join(problems)
                                    + " (promote the whole set with --run, or use --force)")
    for key, v in versions.items():
        name = MODEL_NAMES[key]
        if alias != "archived":
            rm = client.get_registered_model(name)
            old = rm.aliases.get(alias)
            if old is not None and str(old) != str(v):
                client.set_model_version_tag(name, str(old), "stage", "Archived")
            client.set_registered_model_alias(name, alias, str(v))
        else:
            for a, holder in client.get_registered_model(name).aliases.items():
                if str(holder) == str(v):
                    client.delete_registered_model_alias(name, a)
        client.set_model_version_tag(name, str(v), "stage", STAGES[alias])
    return versions


def pipeline_set(run: str = "latest", experiment: str = "stm-defects") -> dict:
    """The model set of one pipeline execution: the GMM it registered and that GMM's lineage."""
    mlflow = connect(experiment)
    client = mlflow.MlflowClient()
    try:
        gmms = client.search_model_versions(f"name = '{MODEL_NAMES['gmm']}'")
    except Exception:  # noqa: BLE001
        gmms = []
    if run != "latest":
        gmms = [v for v in gmms if v.tags.get("pipeline_run_id") == run or v.run_id == run]
    if not gmms:
        where = "any pipeline run" if run == "latest" else f"pipeline run {run}"
        raise TrackingError(f"no registered {MODEL_NAMES['gmm']} version from {where} (run `make run` first)")
    newest = max(gmms, key=lambda v: int(v.version))
    versions = lineage_set(client, newest)
    try:   # the improved analysis has no AE1 lineage: take the newest one of the same pipeline run
        improved = client.search_model_versions(f"name = '{MODEL_NAMES['improved']}'")
    except Exception:  # noqa: BLE001
        improved = []
    same_run = [v for v in improved if v.tags.get("pipeline_run_id") == newest.tags.get("pipeline_run_id")]
    if same_run or improved:
        versions["improved"] = max(int(v.version) for v in (same_run or improved))
    return versions


def list_models(experiment: str = "stm-defects") -> list[dict]:
    client = _client(experiment)
    rows = []
    for key, name in MODEL_NAMES.items():
        try:
            versions = client.search_model_versions(f"name = '{name}'")
        except Exception:  # noqa: BLE001
            continue
        aliases = {}
        try:
            for a, v in client.get_registered_model(name).aliases.items():
                aliases.setdefault(str(v), []).append(a)
        except Exception:  # noqa: BLE001
            pass
        for v in sorted(versions, key=lambda v: int(v.version)):
            metrics = {}
            if v.run_id:
                try:
                    metrics = client.get_run(v.run_id).data.metrics
                except Exception:  # noqa: BLE001
                    pass
            rows.append({"model": name, "version": int(v.version), "stage": v.tags.get("stage", "None"),
                         "aliases": aliases.get(str(v.version), []),
                         "ae1_version": v.tags.get("ae1_version", ""),
                         "metrics": {k: metrics[k] for k in sorted(metrics) if not k.startswith("epoch")}})
    return rows


# ---------------------------------------------------------------------------------- loading
def _load_version(key: str, mv, dst: Path):
    """Model `key` of registry version `mv`: download its one file, check the sha256 tag, load it.

    Only `safe_models.MODEL_FILES[key]` is downloaded (whatever else lies in the artifact folder),
    and it is read only when its bytes hash to the version's `sha256` tag; checkpoints with
    `torch.load(weights_only=True)`, the rest with the safe `.npz` reader. Refusals are one line
    naming the model, the version and the file.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from stm_defects.io import safe_models
    from stm_defects.io.model_files import AUTOENCODERS, autoencoder_from_file

    file = safe_models.MODEL_FILES[key]
    where = f"{mv.name} v{mv.version}"
    if mv.tags.get("file") != file:
        raise TrackingError(f"{where} was registered in the old pickle-based format (no `file` tag); it is "
                            "not loaded, since such files can run code: retrain with `make run` and promote "
                            "the new set")
    expected = mv.tags.get("sha256", "")
    if len(expected) != 64:
        raise TrackingError(f"{where}: no valid sha256 tag, so {file} cannot be verified; refusing to load it")
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
    if key in AUTOENCODERS:
        return autoencoder_from_file(local).eval()
    return safe_models.loads(data, key, f"{where} {file}")


def load_registered(stage: str = "Production", experiment: str = "stm-defects"):
    """A `results.Models` from the registry versions that hold `stage`'s alias.

    Each model's file is verified against its version's `sha256` tag before it is read, and read
    without pickle (see `_load_version`).
    `Models.config` is the prediction config stored with the `stm-improved` version (the last
    model every pipeline registers, with the resolved params of that pipeline run).
    """
    from stm_defects.results import Models

    alias = stage.lower()
    if alias not in ("production", "staging"):
        raise TrackingError(f"can only predict with Production or Staging models, not {stage!r}")
    connect(experiment)
    import mlflow

    client = mlflow.MlflowClient()
    mvs = {}
    for key, name in MODEL_NAMES.items():
        try:
            mvs[key] = client.get_model_version_by_alias(name, alias)
        except Exception:  # noqa: BLE001
            raise TrackingError(f"no {name} version is in {STAGES[alias]} yet: run `stm promote --run latest "
                                f"--model-stage {STAGES[alias]}` after `make run`") from None
    versions = {key: {"name": mv.name, "version": int(mv.version), "stage": STAGES[alias]}
                for key, mv in mvs.items()}
    tags = {key: mv.tags for key, mv in mvs.items()}
    if "config" not in tags["improved"]:
        raise TrackingError(f"{MODEL_NAMES['improved']} v{versions['improved']['version']} carries no "
                            "prediction config (registered by an older version): retrain with `make run`")
    loaded = {}
    with tempfile.TemporaryDirectory(prefix="stm-registry-") as tmp:
        for key, mv in mvs.items():
            loaded[key] = _load_version(key, mv, Path(tmp) / key)
    calibration = json.loads(tags["gmm"].get("calibration", "{}"))
    config = json.loads(tags["improved"]["config"])
    classifier = "improved" if config.get("method", "improved") == "improved" else "gmm"
    class_names = {"-1": "unknown", **json.loads(tags[classifier].get("class_names", "{}"))}
    models = Models(ae1=loaded["ae1"].eval(), kmeans=loaded["kmeans"], ae2=loaded["ae2"].eval(),
                    gmm=loaded["gmm"], calibration=calibration, versions=versions, class_names=class_names,
                    improved=loaded.get("improved"), config=config)
    return models


def set_class_names(names: dict, version: str | int | None = None, experiment: str = "stm-defects",
                    key: str = "improved") -> int:
    """Store class id -> name on a classifier version (`improved` or `gmm`; default: Production)."""
    client = _client(experiment)
    name = MODEL_NAMES[key]
    if version is None:
        try:
            version = client.get_model_version_by_alias(name, "production").version
        except Exception:  # noqa: BLE001
            raise TrackingError(f"no {name} version in Production; give --version") from None
    mv = resolve_version(client, key, version)
    current = json.loads(mv.tags.get("class_names", "{}"))
    current.update({str(k): v for k, v in names.items()})
    client.set_model_version_tag(name, str(version), "class_names", json.dumps(current))
    return int(version)


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
    client = _client(experiment)
    try:
        mv = client.get_model_version_by_alias(MODEL_NAMES["improved"], "production")
    except Exception:  # noqa: BLE001
        raise TrackingError(f"no {MODEL_NAMES['improved']} version in Production; give --classifier "
                            "and --version") from None
    return json.loads(mv.tags.get("config", "{}")).get("method", "improved")
