"""Batches of `stm predict`: output names, the models a worker loads, what is already done, a
process pool, and summary.csv built from the per-scan JSONs.

The pieces, in the order `stm predict` uses them:

* `output_names`: each scan's output name is its path relative to the common root of the paths
  the user gave (`common_root`), without the suffix, so ``day1/scan001.sxm`` and
  ``day2/scan001.gwy`` become ``OUT/day1/scan001.json`` and ``OUT/day2/scan001.json``; a single
  file goes to ``OUT/<stem>.json``. Two inputs that would still share a name (``a.sxm`` and
  ``a.gwy`` in one folder) keep their suffix (``a.sxm.json``, ``a.gwy.json``).
* `ModelSpec`: the verified bytes of the model files plus the models' metadata. It is what a
  worker process (or a Ray actor, `mlops.ray_engine`) receives, and `ModelSpec.load` rebuilds the
  `Models` from it with the safe readers only (`torch.load(weights_only=True)`, the `.npz`
  format of `io.safe_models`); nothing is unpickled from disk, and a worker needs no access to
  the model folder or the registry. `ModelSpec.fingerprint` digests the files and metadata.
* `RunKey`: what makes a JSON one of this run's: the same model versions, the same
  ``models_sha256`` fingerprint and the same ``config.values``.
* `already_done`: a scan whose JSON (and pictures) exist for the same `RunKey`, the same input
  path, read options and input bytes (size and sha256) is skipped unless ``--force``.
* `run_pool`: the scans in a process pool, the models loaded once per worker by the
  pool initializer, torch and BLAS at one thread per worker. Workers fork from the fork server
  of `analysis.pool_server` (``spawn`` where there is none), which `stm predict` starts before it
  loads the models, so a worker starts in milliseconds instead of spending seconds on imports;
  results come back as scans finish,
  at most ``2 * workers`` in flight, so memory does not grow with the number of scans. A scan
  that kills its worker (e.g. out of memory) is retried alone, then failed; the others go on.
* `write_summary`: summary.csv rebuilt from every prediction JSON under OUT that has this run's
  `RunKey`, one JSON at a time (streamed to the CSV), never mixed with stale rows.

Every function here writes only inside the output folder, through `io.files`' atomic writers.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from stm_defects.analysis.dispatch import PredictConfig
from stm_defects.analysis.heap import keep_freed_memory
from stm_defects.analysis.predict import Failure, input_identity, try_predict_scan
from stm_defects.errors import StageError
from stm_defects.io.files import atomic_file, jsonable
from stm_defects.results import Models

PICTURES = ("overlay", "classes", "character")
MODEL_KEYS = ("ae1", "kmeans", "ae2", "gmm", "improved")


# ------------------------------------------------------------------------------------- names
def common_root(paths: Iterable[str | os.PathLike]) -> Path:
    """The folder the output tree mirrors: the deepest folder holding every given path (a folder
    counts as itself, a file as its parent). Paths are made absolute, not resolved (symlinks are
    kept as given)."""
    bases = []
    for p in paths:
        a = os.path.abspath(p)
        bases.append(a if os.path.isdir(a) else os.path.dirname(a))
    if not bases:
        raise ValueError("common_root of no paths")
    return Path(os.path.commonpath(bases))


def output_names(files: list[Path], root: str | os.PathLike) -> list[str]:
    """Each file's output name (POSIX, relative to the output folder, no suffix): its path relative
    to ``root`` without the suffix; names that two files would share keep their suffix.

    Raises `StageError` when names still collide (e.g. ``a.sxm`` beside a file ``a.sxm.npy``)."""
    root = os.path.abspath(root)
    names = []
    for f in files:
        rel = os.path.relpath(os.path.abspath(f), root)
        if rel.startswith(os.pardir):
            rel = Path(f).name          # not under root (cannot happen with common_root)
        names.append(Path(rel).with_suffix("").as_posix())
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    names = [Path(os.path.relpath(os.path.abspath(f), root)).as_posix() if seen[n] > 1 else n
             for f, n in zip(files, names)]
    clash: dict[str, list[str]] = {}
    for f, n in zip(files, names):
        clash.setdefault(n, []).append(str(f))
    bad = [v for v in clash.values() if len(v) > 1]
    if bad:
        raise StageError("these scans would write the same outputs: " + "; ".join(" and ".join(v) for v in bad[:3])
                         + " (rename one, or predict them into separate --out folders)")
    return names


# ------------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to rebuild the `Models` of a run: the verified bytes of each model
    file (key -> (file name, bytes)) and the metadata (versions, calibration, class names, the
    stored prediction config). Picklable and self-contained: it travels to worker processes and
    Ray actors, which need no access to the model folder or the registry."""

    files: dict
    versions: dict
    calibration: dict = field(default_factory=dict)
    class_names: dict = field(default_factory=dict)
    config: dict | None = None

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, models: Models) -> ModelSpec:
        """The spec of a local models folder (`io.model_files.load_models`), with the metadata of
        ``models`` (loaded from that folder); each file is checked against its manifest again."""
        from stm_defects.io.safe_models import MODEL_FILES, read_verified

        folder = Path(folder)
        files = {key: (MODEL_FILES[key], read_verified(folder / key, MODEL_FILES[key]))
                 for key in MODEL_KEYS if getattr(models, key) is not None}
        return cls.from_files(files, models)

    @classmethod
    def from_files(cls, files: dict, models: Models) -> ModelSpec:
        """The spec of verified file bytes (key -> (file name, bytes)) and the metadata of ``models``."""
        return cls(files=dict(files), versions=models.versions, calibration=dict(models.calibration),
                   class_names=dict(models.class_names), config=models.config)

    @property
    def fingerprint(self) -> str:
        """sha256 of the model files' hashes, the calibration, the class names and the stored
        config: two specs with the same fingerprint predict the same (recorded in every JSON as
        ``models_sha256``)."""
        from stm_defects.io.safe_models import sha256_hex

        doc = {"files": {k: sha256_hex(data) for k, (_, data) in sorted(self.files.items())},
               "calibration": self.calibration, "class_names": self.class_names, "config": self.config}
        return hashlib.sha256(json.dumps(jsonable(doc), sort_keys=True).encode()).hexdigest()

    def load(self) -> Models:
        """The `Models`, rebuilt from the bytes with the safe readers only (the paper method's
        models `Deferred`: built when it first uses them)."""
        from stm_defects.io.model_files import model_from_bytes

        loaded = {key: model_from_bytes(key, data, f"{key} {name}") for key, (name, data) in self.files.items()}
        return Models(calibration=dict(self.calibration), versions=self.versions,
                      class_names=dict(self.class_names), config=self.config, **loaded)


@dataclass(frozen=True)
class RunKey:
    """What a JSON must share with this run to be counted in its summary (and to be skipped):
    the model versions, the ``models_sha256`` fingerprint and the prediction config values."""

    models: dict
    config: dict
    fingerprint: str

    @classmethod
    def of(cls, models: Models, cfg: PredictConfig, fingerprint: str) -> RunKey:
        # through JSON, so that the comparison is with what a JSON holds
        return cls(json.loads(json.dumps(jsonable(models.versions))), json.loads(json.dumps(cfg.to_dict())),
                   fingerprint)

    def made(self, doc: dict) -> bool:
        """True when the prediction JSON ``doc`` was made by these models and settings."""
        config = doc.get("config")
        return (doc.get("models") == self.models and doc.get("models_sha256") == self.fingerprint
                and isinstance(config, dict) and config.get("values") == self.config)


def read_prediction(path: Path) -> dict | None:
    """The prediction JSON at ``path`` (a dict with image, defects, models and config), or None
    for anything else (not a file, not JSON, another kind of JSON)."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    if isinstance(doc, dict) and {"image", "defects", "models", "config"} <= doc.keys():
        return doc
    return None


def _candidates(out: Path, name: str, path: Path) -> list[Path]:
    """The JSONs that may hold the outputs of ``path`` named ``name`` (a Matrix file adds its
    direction to the name, so any ``name_*.json``)."""
    target = out / f"{name}.json"
    if path.suffix.lower() != ".z_mtrx":
        return [target]
    folder, base = (out / name).parent, Path(name).name + "_"
    try:
        return sorted(p for p in folder.iterdir() if p.name.startswith(base) and p.name.endswith(".json"))
    except OSError:
        return []


def already_done(out: Path, name: str, path: Path, key: RunKey, options: dict) -> str | None:
    """The JSON (relative to ``out``, POSIX) that already holds this scan's prediction by the same
    models and settings, or None. Same means: `RunKey.made`, the same ``image`` (the path as
    given), the same read ``options``, the same input size and sha256, and all three pictures
    present. The input is hashed only when a JSON otherwise matches."""
    identity = None
    for candidate in _candidates(out, name, path):
        doc = read_prediction(candidate)
        if doc is None or not key.made(doc) or doc.get("image") != str(path) or doc.get("options") != options:
            continue
        stem = candidate.name[: -len(".json")]
        if not all((candidate.parent / f"{stem}_{s}.png").is_file() for s in PICTURES):
            continue
        if identity is None:
            try:
                identity = input_identity(path)
            except OSError:
                return None
        if doc.get("input") == identity:
            return candidate.relative_to(out).as_posix()
    return None


# ------------------------------------------------------------------------------------- tasks
class Task(NamedTuple):
    """One scan of a batch: its position in the batch, its path (as given), its output name and,
    with `--direction all`, the one direction of the file it reads (None: the run's option)."""
    index: int
    path: str
    name: str
    direction: str | None = None


@dataclass(frozen=True)
class Job:
    """What every scan of a run shares, besides the models."""

    cfg: PredictConfig
    out: str
    provenance: dict
    options: dict                      # read options: direction, pixel_nm, scan_nm (, channel, field_from_name)
    max_pixels: int | None
    fingerprint: str
    config_values: dict | None = None  # cfg.to_dict() in the driver (`predict_task` checks it)
    thumbnails: bool = False           # return the report's thumbnail of each overlay (``thumb``)


CODE_DIFFERS = ("this worker's stm-defects reads the prediction config differently from the command's "
                "(another version, or the code changed during the run): install the same version "
                "everywhere, then run again")


def predict_task(models: Models, job: Job, task: Task) -> dict | Failure:
    """Predict one scan: a small result (``index``, ``scan``, ``json``, ``n_defects``,
    ``calibrated``) or the scan's `Failure`.

    A worker whose code turns the config into other values than the command's did
    (``job.config_values``: another version on a cluster node, or files edited during the run)
    fails each scan with `CODE_DIFFERS` instead of writing JSONs no summary would count."""
    if job.config_values is not None and json.loads(json.dumps(job.cfg.to_dict())) != job.config_values:
        return Failure(task.path, "analyse", CODE_DIFFERS, was_expected=True)
    direction = job.options["direction"] if task.direction is None else task.direction
    if direction == "all":          # a file no direction of which could be read: read the default
        direction = None            # one, so that the failure gives the file's own reason
    got = try_predict_scan(task.path, models, job.cfg, job.out, direction=direction, options=job.options,
                           provenance=job.provenance, pixel_nm=job.options["pixel_nm"],
                           scan_nm=job.options["scan_nm"], max_pixels=job.max_pixels, name=task.name,
                           fingerprint=job.fingerprint, channel=job.options.get("channel"),
                           field_from_name=bool(job.options.get("field_from_name")), thumbnail=job.thumbnails)
    if isinstance(got, Failure):
        if task.direction is not None:      # --direction all: say which one failed
            got = dataclasses.replace(got, scan=f"{got.scan} ({task.direction})")
        return got
    return {"index": task.index, "scan": got["scan"], "json": got["json"], "n_defects": got["n_defects"],
            "calibrated": bool(got["pixel_nm"]), "thumb": got.get("thumb")}


def limit_threads(n: int) -> None:
    """At most ``n`` threads for torch and for the BLAS/OpenMP pools of numpy and scipy in this
    process (one per worker, so N workers do not fight over the cores). Torch is not imported
    for this: where it is not yet (the default method never needs it), the limit is left in
    ``OMP_NUM_THREADS`` for it to take up when the `paper` method first imports it."""
    torch = sys.modules.get("torch")
    if torch is None:
        os.environ["OMP_NUM_THREADS"] = str(n)
    else:
        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:        # only possible before any parallel work started
            pass
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:  # pragma: no cover
        return
    _STATE["thread_limits"] = threadpool_limits(n)


_STATE: dict = {}


def _init_worker(spec: ModelSpec, job: Job, threads: int | None) -> None:
    """Pool initializer: limit the threads, load the models once for this worker. A failure is
    kept and reported for each scan (an initializer that raises would break the whole pool)."""
    try:
        keep_freed_memory()
        if threads:
            limit_threads(threads)
        _STATE["models"], _STATE["job"] = spec.load(), job
    except Exception as err:  # noqa: BLE001 - reported per scan by `_work`
        from stm_defects.analysis.predict import failure_reason

        _STATE["error"] = f"the models could not be loaded in a worker process: {failure_reason(err)}"


def _work(task: Task) -> dict | Failure:
    if "error" in _STATE:
        return Failure(task.path, "analyse", _STATE["error"], was_expected=False)
    got = predict_task(_STATE["models"], _STATE["job"], task)
    return got.portable() if isinstance(got, Failure) else got


WORKER_DIED = ("the worker process died while predicting it (killed by the system, e.g. out of memory; "
               "try fewer --workers or a lower --max-pixels)")


def run_pool(tasks: Iterable[Task], spec: ModelSpec, job: Job, workers: int,
             on_result: Callable[[Task, dict | Failure], None], *, work: Callable = _work,
             initializer: Callable = _init_worker, start_method: str | None = None) -> None:
    """Predict ``tasks`` in a pool of ``workers`` processes; call ``on_result(task, result)`` in
    this process as each scan finishes (in the order they finish).

    Each worker loads the models once (``initializer(spec, job, 1)``: one thread each). At most
    ``2 * workers`` scans are in flight, so the tasks may be a generator of any length. A worker
    that dies (killed for memory, a crash in native code) breaks the pool: the pool is started
    again, and the scans that were in flight are retried one at a time; one that kills its worker
    alone is reported as a `Failure` (stage ``analyse``). ``work``/``initializer`` are for tests.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from stm_defects.analysis.pool_server import pool_start_method, start_pool_server

    start_method = start_method or pool_start_method()
    if start_method == "forkserver":
        start_pool_server()     # a no-op when `stm predict` has started it
    ctx = multiprocessing.get_context(start_method)

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=(spec, job, 1))

    pending: Iterator[Task] = iter(tasks)
    suspects: list[Task] = []
    in_flight: dict = {}
    pool = new_pool()
    try:
        while True:
            while len(in_flight) < 2 * workers:
                task = next(pending, None)
                if task is None:
                    break
                in_flight[pool.submit(work, task)] = task
            if not in_flight:
                break
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            broken = False
            for fut in done:
                task = in_flight.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    suspects.append(task)
                    broken = True
                    continue
                on_result(task, result)
            if broken:              # every scan still in flight is lost with the pool
                for fut, task in in_flight.items():
                    if fut.done() and not fut.cancelled() and fut.exception() is None:
                        on_result(task, fut.result())
                    else:
                        suspects.append(task)
                in_flight.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                pool = new_pool()
        for task in sorted(suspects):   # alone: a scan that breaks the pool now is the culprit
            try:
                result = pool.submit(work, task).result()
            except BrokenProcessPool:
                result = Failure(task.path, "analyse", WORKER_DIED, was_expected=True)
                pool.shutdown(wait=True, cancel_futures=True)
                pool = new_pool()
            on_result(task, result)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------- summary
def class_labels(models: Models, cfg: PredictConfig) -> list[tuple[int | None, str]]:
    """The fixed class columns of summary.csv: (class id, label) for every class the model can
    give, then ``unknown`` (-1) and ``unclassified`` (None).

    The number of classes is the improved state's ``n_classes`` (default method) or the GMM's
    number of components (paper method); a class named with `stm name-class` is labelled
    ``class_<id>_<name>`` (the name with other characters than letters, digits, ``-`` and ``_``
    replaced by ``_``), an unnamed one ``class_<id>``."""
    n = 0
    if cfg.method == "improved":
        state = models.improved if isinstance(models.improved, dict) else {}
        classes = state.get("classes") if isinstance(state.get("classes"), dict) else {}
        n = int(classes.get("n_classes") or 0)
    elif models.gmm is not None and models.ae2 is not None:
        gmm = models.estimator("gmm")
        n = int(getattr(gmm, "n_components_", None) or getattr(gmm, "n_components", 0) or 0)
    named = [int(k) for k in models.class_names if str(k).lstrip("-").isdigit() and int(k) >= 0]
    n = max([n, *(k + 1 for k in named)])
    labels: list[tuple[int | None, str]] = []
    for c in range(n):
        name = models.class_names.get(str(c))
        slug = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_") if name else ""
        labels.append((c, f"class_{c}_{slug}" if slug else f"class_{c}"))
    return labels + [(-1, "unknown"), (None, "unclassified")]


CONDITION_FIELDS = ["bias_V", "setpoint", "setpoint_unit", "date"]


def summary_fields(labels: list[tuple[int | None, str]], model_keys: Iterable[str]) -> list[str]:
    """The columns of summary.csv, in order (see `write_summary`)."""
    names = [label for _, label in labels]
    return ["scan", "n_defects", *names, "area_nm2", "defects_per_100nm2", "defects_per_cm2",
            *(f"{n}_per_100nm2" for n in names), *(f"{n}_per_cm2" for n in names),
            "output", "height_px", "width_px", "pixel_nm", "pixel_nm_source", "direction", "channel",
            *CONDITION_FIELDS, *(f"model_{k}" for k in model_keys)]


NM2_PER_CM2 = 1e14


def _number(x: float | None) -> str:
    """6 significant digits; blank for None (a value the JSON does not have)."""
    return "" if x is None else f"{x:.6g}"


def _model_label(v) -> str:
    if isinstance(v, dict) and "name" in v and "version" in v:
        return f"{v['name']} v{v['version']}"
    return str(v)


def summary_row(doc: dict, json_rel: str, labels: list[tuple[int | None, str]], model_keys: list[str]) -> dict:
    """One row of summary.csv from one prediction JSON (a class id the labels lack counts as
    ``unknown``)."""
    by_id = {c: label for c, label in labels}
    counts = dict.fromkeys(by_id.values(), 0)
    for d in doc.get("defects") or []:
        c = d.get("class")
        counts[by_id.get(c, "unknown")] += 1
    n = sum(counts.values())
    area = doc.get("area_nm2")
    area = float(area) if isinstance(area, (int, float)) and area > 0 else None
    shape = doc.get("shape") or [None, None]
    conditions = doc.get("conditions") or {}
    row = {"scan": doc.get("image"), "n_defects": n, **counts,
           "area_nm2": _number(area) if area else "",
           "defects_per_100nm2": _number(100 * n / area) if area else "",
           "defects_per_cm2": _number(NM2_PER_CM2 * n / area) if area else "",
           "output": json_rel[: -len(".json")], "height_px": shape[0], "width_px": shape[1],
           "pixel_nm": "" if doc.get("pixel_size_nm") is None else doc["pixel_size_nm"],
           "pixel_nm_source": doc.get("pixel_size_source") or "",
           "direction": doc.get("direction") or "", "channel": doc.get("channel") or ""}
    for label, k in counts.items():
        row[f"{label}_per_100nm2"] = _number(100 * k / area) if area else ""
        row[f"{label}_per_cm2"] = _number(NM2_PER_CM2 * k / area) if area else ""
    for f in CONDITION_FIELDS:
        v = conditions.get(f)
        row[f] = "" if v is None else v
    models = doc.get("models") or {}
    for k in model_keys:
        row[f"model_{k}"] = _model_label(models[k]) if k in models else ""
    return row


DEFECT_FIELDS = ("scan", "output", "direction", "id", "x_px", "y_px", "x_nm", "y_nm", "class", "class_label",
                 "class_name", "probability", "typicality", "nearest_class", "score", "area_px", "area_nm2",
                 "height_nm", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")


def defect_rows(doc: dict, json_rel: str, labels: list[tuple[int | None, str]]) -> Iterator[dict]:
    """The rows of defects.csv of one prediction JSON: one per defect, positions in pixels of the
    original image (``x`` column, ``y`` row) and, with a pixel size, in nm; ``class_label`` as in
    summary.csv's columns; the bounding box as x0, y0, x1, y1 (pixels, end exclusive)."""
    by_id = {c: label for c, label in labels}
    px = doc.get("pixel_size_nm")
    px = float(px) if isinstance(px, (int, float)) and px > 0 else None
    for d in doc.get("defects") or []:
        box = list(d.get("bbox") or [None] * 4) + [None] * 4
        cls = d.get("class")
        area = d.get("area_px")
        yield {"scan": doc.get("image"), "output": json_rel[: -len(".json")], "direction": doc.get("direction") or "",
               "id": d.get("id"), "x_px": _number(d.get("x")), "y_px": _number(d.get("y")),
               "x_nm": _number(d["x"] * px) if px and d.get("x") is not None else "",
               "y_nm": _number(d["y"] * px) if px and d.get("y") is not None else "",
               "class": "" if cls is None else cls, "class_label": by_id.get(cls, "unknown"),
               "class_name": d.get("name") or "", "probability": _number(d.get("probability")),
               "typicality": _number(d.get("typicality")),
               "nearest_class": "" if d.get("nearest_class") is None else d["nearest_class"],
               "score": _number(d.get("score")), "area_px": "" if area is None else area,
               "area_nm2": _number(area * px * px) if px and area is not None else "",
               "height_nm": _number(d.get("height_nm")),
               "bbox_x0": box[0], "bbox_y0": box[1], "bbox_x1": box[2], "bbox_y1": box[3]}


def prediction_jsons(out: Path) -> Iterator[Path]:
    """Every ``*.json`` file under ``out``, hidden files and folders left out, in sorted order of
    their relative paths (deterministic)."""
    for root, dirs, files in os.walk(out):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".json") and not name.startswith("."):
                yield Path(root) / name


@dataclass
class SummaryReport:
    """What `write_summary` counted: rows written, JSONs of other models or settings left out
    (``stale``), older JSONs of scans this run predicted, under another name, left out
    (``superseded``)."""

    rows: int = 0
    stale: int = 0
    superseded: int = 0
    jsons: list[str] = field(default_factory=list)   # the JSONs summarised, relative to OUT


def write_summary(out: Path, path: Path, key: RunKey, models: Models, cfg: PredictConfig,
                  produced: set[str] | None = None, claimed: set[str] | None = None,
                  options: dict | None = None, defects_path: Path | None = None) -> SummaryReport:
    """Rewrite summary.csv (at ``path``) from the prediction JSONs under ``out``; one row per
    JSON made by this run's models and settings (`RunKey`), in the sorted order of their paths.
    Written atomically, streamed: one JSON in memory at a time. With ``defects_path``, the same
    JSONs also give defects.csv there: one row per defect (`defect_rows`, `DEFECT_FIELDS`).

    Left out: JSONs of other model versions, fingerprints or config values (``stale``), and
    JSONs of scans of this run (``image`` in ``claimed``, same read ``options``) that are not
    the ones this run wrote or found up to date (``produced``): a failed scan's old JSON, or one
    under an older output name (``superseded``). Other JSON files are ignored.

    Columns, in order:

    * ``scan``: the input path as given to `stm predict`; ``n_defects``;
    * one count per class of the models (`class_labels`): ``class_0`` ... ``class_<n-1>`` (with
      ``_<name>`` for named classes), ``unknown`` (class -1) and ``unclassified`` (no class);
    * ``area_nm2`` (of the analysed image), ``defects_per_100nm2``, ``defects_per_cm2`` and, per
      class, ``<label>_per_100nm2`` and ``<label>_per_cm2`` (1 cm^2 = 1e14 nm^2); blank without a
      pixel size;
    * ``output``: the scan's outputs under OUT (add ``.json`` or ``_overlay.png``);
      ``height_px``, ``width_px`` (the original image), ``pixel_nm`` and ``pixel_nm_source``
      (file, pixel_nm, scan_nm), ``direction``, ``channel``;
    * ``bias_V``, ``setpoint``, ``setpoint_unit``, ``date``: where the file carries them
      (Nanonis, Omicron Matrix, RHK; `analysis.predict.scan_conditions`), else blank;
    * ``model_<key>`` per model of the set: ``stm-ae1 v3`` for registry models, the folder for
      a local models folder.

    Numbers are written with 6 significant digits.
    """
    labels = class_labels(models, cfg)
    model_keys = list(models.versions)
    fields = summary_fields(labels, model_keys)
    report = SummaryReport()
    produced, claimed = produced or set(), claimed or set()
    with contextlib.ExitStack() as stack:
        fh = stack.enter_context(atomic_file(path, "w", newline=""))
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        per_defect = None
        if defects_path is not None:
            per_defect = csv.DictWriter(stack.enter_context(atomic_file(defects_path, "w", newline="")),
                                        fieldnames=list(DEFECT_FIELDS))
            per_defect.writeheader()
        for f in prediction_jsons(out):
            doc = read_prediction(f)
            if doc is None:
                continue
            rel = f.relative_to(out).as_posix()
            if not key.made(doc):
                report.stale += 1
                continue
            if rel not in produced and doc.get("image") in claimed and doc.get("options") == options:
                report.superseded += 1
                continue
            writer.writerow(summary_row(doc, rel, labels, model_keys))
            if per_defect is not None:
                per_defect.writerows(defect_rows(doc, rel, labels))
            report.rows += 1
            report.jsons.append(rel)
    return report
