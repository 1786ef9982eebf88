"""The `stm` command line. Thin commands that call the library, the stages or the registry.

The project (its params.yaml and MLflow store) is found as `stm_defects.project` describes:
`--project DIR`, else `STM_PROJECT`, else the nearest folder above with a dvc.yaml. Prediction
needs no project when given `--models DIR`.

Heavy imports (torch, mlflow, GX) happen inside the commands so that `stm --help` is instant.
User errors (bad files, bad params, an output path that cannot be written) end with one line on
stderr and exit code 1, no traceback; `stm --verbose COMMAND` adds the traceback.

Commands that loop over scans (`info`, `classes`, `predict`, `evaluate`) isolate each file: any
error while reading, analysing or writing one file becomes one line (`file: stage failed:
reason`), the batch goes on, and the exit code is 1 when anything failed.

The pipeline's stages run through `python -m stm_defects.mlops.run STAGE` (see dvc.yaml).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Find and classify atomic-scale defects in STM images without labels.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
log = logging.getLogger("stm_defects")

ParamsOpt = Annotated[Path | None, typer.Option(
    "--params", "-p", help="params.yaml to read (default: the project's).")]
ProfileOpt = Annotated[str | None, typer.Option(
    "--profile", help="Override the params' profile (default | paper).")]
TrackOpt = Annotated[bool, typer.Option("--track/--no-track", help="Log the run to MLflow (mlruns/).")]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(message)s", stream=sys.stderr, force=True)
    for noisy in ("great_expectations", "mlflow", "alembic", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    project: Annotated[Path | None, typer.Option(
        "--project", help="Project folder (params.yaml, mlruns/); default: $STM_PROJECT or the nearest "
                          "folder above with a dvc.yaml.")] = None,
):
    setup_logging(verbose)
    if project is not None:
        from stm_defects.project import ENV_PROJECT

        os.environ[ENV_PROJECT] = str(project.resolve())


def user_errors(fn):
    """Turn domain and disk errors into one line on stderr and exit code 1 (with `--verbose`,
    the traceback is logged first)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from stm_defects.errors import ConfigError, StageError
        from stm_defects.io.files import describe_os_error
        from stm_defects.io.scans import ScanError
        from stm_defects.mlops.tracking import TrackingError

        try:
            return fn(*args, **kwargs)
        except (ScanError, ConfigError, StageError, TrackingError) as err:
            caught, line = err, str(err)
        except FileNotFoundError as err:
            caught, line = err, f"{err.filename or err}: file not found"
        except OSError as err:          # an output that is a folder, a full disk, no permission
            caught, line = err, describe_os_error(err)
        log.debug("traceback of the error below", exc_info=caught)
        typer.echo(f"error: {line}", err=True)
        raise typer.Exit(1) from None

    return wrapper


def log_failure(failure) -> None:
    """With `--verbose`, the traceback of one failed file (an `analysis.predict.Failure`; one
    from a worker process carries it as text)."""
    if failure.error is not None:
        log.debug("%s", failure.line(), exc_info=failure.error)
    elif getattr(failure, "detail", ""):
        log.debug("%s\n%s", failure.line(), failure.detail.rstrip())


def file_failure(path, stage: str, err: Exception):
    """The `Failure` of one file of a batch (logged for `--verbose`)."""
    from stm_defects.analysis.predict import Failure, failure_reason

    failure = Failure(str(path), stage, failure_reason(err), err)
    log_failure(failure)
    return failure


def _params(path: Path | None, profile: str | None = None):
    """The given params file, else the project's."""
    from stm_defects.config import load_params
    from stm_defects.project import params_path

    return load_params(path or params_path(), profile)


def _experiment() -> str:
    """The MLflow experiment named in the project's params.yaml (default `stm-defects`)."""
    from stm_defects.config import TrackingParams, load_raw
    from stm_defects.project import find_project

    root = find_project()
    if root is None or not (root / "params.yaml").is_file():
        return TrackingParams().experiment
    return (load_raw(root / "params.yaml").get("tracking") or {}).get("experiment", TrackingParams().experiment)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="scan", file=sys.stderr, dynamic_ncols=True)


def scan_files(paths: list[Path]) -> list[Path]:
    """The scans in `paths` (files, folders searched recursively); none at all is a user error."""
    from stm_defects.errors import StageError
    from stm_defects.io.scans import find_scans

    files = find_scans(paths)
    if not files:
        raise StageError(f"no scans found in {', '.join(map(str, paths))}")
    return files


def override_config(override: Path | None, profile: str | None = None):
    """The `PredictConfig` of a params.yaml given to override the models' own (None: none given).
    Every value is checked here, so a bad one fails before any model or scan is read."""
    from stm_defects.config import predict_config

    return None if override is None else predict_config(_params(override, profile))


def model_bundle(models: Path | None, model_stage: str, override: Path | None = None,
                 profile: str | None = None, with_spec: bool = False):
    """(Models, PredictConfig, provenance) from a local folder or the registry's `model_stage` set
    (registry files come through the local model cache, `mlops.tracking.load_registered_files`).

    The prediction config is the one the models carry; `override` (a params.yaml) replaces it,
    and the provenance says so. The override is read and checked first. ``with_spec`` adds a
    fourth item: the `analysis.batch.ModelSpec` (verified file bytes) that worker processes load.
    """
    from stm_defects.analysis.dispatch import PredictConfig
    from stm_defects.errors import StageError

    cfg_override = override_config(override, profile)
    spec = None
    if models is not None:
        from stm_defects.io.model_files import load_models

        if not (models / "ae1" / "model.pt").is_file():
            raise StageError(f"{models}: not a models folder (no ae1/model.pt); train one with `stm train`")
        bundle = load_models(models)
        where = f"models folder {models.resolve()}"
        stored = bundle.config   # verified against the folder's manifest by load_models
        if with_spec:
            from stm_defects.analysis.batch import ModelSpec

            spec = ModelSpec.from_folder(models, bundle)
    else:
        from stm_defects.mlops.tracking import load_registered_files

        bundle, files = load_registered_files(model_stage, _experiment(), cache=True)
        v = bundle.versions["improved"]
        where = f"registry {v['name']} v{v['version']} ({v['stage']})"
        stored = bundle.config
        if with_spec:
            from stm_defects.analysis.batch import ModelSpec

            spec = ModelSpec.from_files(files, bundle)
    if cfg_override is not None:
        got = bundle, cfg_override, {"source": f"override {override.resolve()}", "models": where}
    elif stored is None:
        raise StageError(f"{where} carries no prediction config: retrain it, or give --params FILE")
    else:
        got = bundle, PredictConfig.from_dict(stored, f"config of {where}"), {"source": where}
    if got[1].method == "paper":    # the method that uses the autoencoders: build them now, so a
        for key in ("ae1", "ae2"):  # checkpoint torch refuses is one error before any scan
            bundle.autoencoder(key)
    return (*got, spec) if with_spec else got


PixelNmOpt = Annotated[float | None, typer.Option(
    "--pixel-nm", help="Pixel size in nm, for files that carry none (PNG, JPEG, TIFF, npy, .dat); "
                       "overrides the file's own.")]
ScanNmOpt = Annotated[float | None, typer.Option(
    "--scan-nm", help="Scan width in nm (the pixel size is this over the image width in pixels).")]
FieldFromNameOpt = Annotated[bool, typer.Option(
    "--field-from-name", help="For files that carry no pixel size: read the field in nm from the file "
                              "name (..._100x100_..., ..._1.5x1.5um..., ..._50nm...; a number without a "
                              "unit is nm). Names that state no field, or two, stay in pixel units.")]


ChannelOpt = Annotated[str | None, typer.Option(
    "--channel", help="Channel to read where a file holds several (a Nanonis signal such as Z or Current, a "
                      "Gwyddion data-field title); default: the topography.")]


def check_calibration(pixel_nm: float | None, scan_nm: float | None, field_from_name: bool = False) -> dict:
    """The read_scan keywords of a user calibration; a bad one is a user error."""
    from stm_defects.errors import StageError
    from stm_defects.io.scans import calibration_error

    why = calibration_error(pixel_nm, scan_nm)
    if why:
        raise StageError(f"--pixel-nm/--scan-nm: {why}")
    if field_from_name and (pixel_nm is not None or scan_nm is not None):
        raise StageError("--field-from-name: give it or --pixel-nm/--scan-nm, not both")
    return {"pixel_nm": pixel_nm, "scan_nm": scan_nm, "field_from_name": field_from_name}


def uncalibrated_hint(names: list[str], field_from_name: bool = False) -> str:
    """What to give for scans analysed in pixel units; --field-from-name is suggested when one of
    ``names`` states a field (``..._100x100_...``) and it is not already on."""
    from stm_defects.io.scans import name_field

    hint = "give --pixel-nm or --scan-nm"
    example = None if field_from_name else next((n for n in names if name_field(n)), None)
    if example is not None:
        hint += f", or --field-from-name (their names look like fields, e.g. {example})"
    return hint


def warn_uncalibrated(names: list[str], total: int | None = None, field_from_name: bool = False) -> None:
    """One warning line for the scans analysed in pixel units (``total`` of them, default
    ``len(names)``; the first three names are shown)."""
    total = len(names) if total is None else total
    if total:
        shown = ", ".join(names[:3]) + (f" and {total - 3} more" if total > 3 else "")
        typer.echo(f"warning: {total} scan(s) carry no pixel size ({shown}): sizes and densities "
                   f"are in pixels; {uncalibrated_hint(names, field_from_name)}", err=True)


# ------------------------------------------------------------------------------------------ info
@app.command()
@user_errors
def info(
    paths: Annotated[list[Path], typer.Argument(help="Scan files or folders (searched recursively).")],
    direction: Annotated[str | None, typer.Option(help="Scan direction, e.g. forward/up, backward.")] = None,
    channel: ChannelOpt = None,
    pixel_nm: PixelNmOpt = None,
    scan_nm: ScanNmOpt = None,
    field_from_name: FieldFromNameOpt = False,
):
    """One line per scan: format, shape, pixel size, channel, direction, height range.

    A file that cannot be read is listed at the end (exit code 1); the others are still shown."""
    from stm_defects.io.scans import read_scan

    failed = []
    calibration = check_calibration(pixel_nm, scan_nm, field_from_name)
    files = scan_files(paths)
    for f in files:
        try:
            s = read_scan(f, direction=direction, channel=channel, **calibration)
        except Exception as err:  # noqa: BLE001 - one bad file must not end the listing
            failed.append(file_failure(f, "read", err))
            continue
        h = s.height
        source = s.meta.get("pixel_nm_source")
        px = (f"{s.pixel_nm:.4g} nm/px" + ("" if source == "file" else " (from the file name)"
                                           if source == "file name" else f" (from --{source.replace('_', '-')})")
              if s.pixel_nm else "pixel size unknown")
        crop = f" cropped from {s.original_shape[0]}x{s.original_shape[1]}" if (
            s.original_shape and tuple(s.original_shape) != h.shape) else ""
        typer.echo(f"{f}: {s.format} {h.shape[0]}x{h.shape[1]}{crop} {px} channel={s.channel} "
                   f"direction={s.direction} height {h.min():.4g}..{h.max():.4g} {s.unit}")
    report_failures(failed, len(files))


def report_failures(failed: list, n_files: int, listed_in: Path | None = None, then_exit: bool = True) -> None:
    """One line for a single bad file; for a batch, the list of bad files at the end. Exit 1
    (unless ``then_exit`` is False).

    ``failed`` holds `analysis.predict.Failure`s (or ready lines); ``listed_in`` names the file
    that lists them too. When one of them is not a plain input or disk problem, a last line says
    how to see its traceback."""
    if not failed:
        return
    lines = [f.line() if hasattr(f, "line") else str(f) for f in failed]
    if n_files == 1:
        typer.echo(f"error: {lines[0]}", err=True)
    else:
        where = f" (listed in {listed_in})" if listed_in else ""
        typer.echo(f"{len(failed)} of {n_files} file(s) failed{where}:", err=True)
        for line in lines:
            typer.echo(f"  {line}", err=True)
    if not all(getattr(f, "expected", True) for f in failed) and not log.isEnabledFor(logging.DEBUG):
        typer.echo("run `stm --verbose ...` to see the traceback", err=True)
    if then_exit:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------------------- train
TRAIN_STAGES = ("validate", "prepare", "tune_ae1", "train_ae1", "kmeans", "defects", "train_ae2", "gmm",
                "fit_improved")


@app.command()
@user_errors
def train(
    data: Annotated[Path, typer.Argument(help="Folder of your own scans (any supported format).")],
    out: Annotated[Path, typer.Option(help="Working folder for this training run.")] = Path("runs/own"),
    params: ParamsOpt = None,
    profile: ProfileOpt = None,
    track: TrackOpt = True,
    pixel_nm: PixelNmOpt = None,
    scan_nm: ScanNmOpt = None,
    field_from_name: FieldFromNameOpt = False,
):
    """Train the whole pipeline on a folder of scans: the stages of dvc.yaml, outside DVC."""
    import dataclasses
    import time

    from stm_defects.config import ScanCalibration
    from stm_defects.errors import StageError
    from stm_defects.io.scans import find_scans
    from stm_defects.mlops.run import run_stage

    if not data.is_dir():
        raise StageError(f"{data}: not a folder of scans")
    calibration = check_calibration(pixel_nm, scan_nm, field_from_name)
    p = _params(params, profile)
    if pixel_nm is not None or scan_nm is not None or field_from_name:   # recorded with the models (params digest)
        p = dataclasses.replace(p, scan_calibration=ScanCalibration(**calibration))
    from stm_defects.mlops.tracking import new_pipeline_key

    # one unique key for this training's stages (two trainings started together never mix)
    pipeline = os.environ.get("STM_PIPELINE_RUN") or new_pipeline_key(
        f"train-{data.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_STAGES:
        log.info("stage %s", name)
        m = run_stage(name, p, out, raw=data, track=track, pipeline=pipeline)
        if name == "validate":
            typer.echo(f"validated: {m['n_passed']} passed, {m['n_quarantined']} quarantined")
            if m.get("n_uncalibrated"):
                typer.echo(f"warning: {m['n_uncalibrated']} training scan(s) carry no pixel size: they are "
                           "analysed in pixel units; "
                           + uncalibrated_hint([f.name for f in find_scans(data)[:200]], field_from_name),
                           err=True)
    models = out / "models"
    typer.echo(f"models in {models}: predict with `stm predict SCANS --models {models}`"
               + (" or promote them with `stm promote --run latest`" if track else ""))


@app.command()
@user_errors
def classes(
    paths: Annotated[list[Path], typer.Argument(help="Scan files or folders to take examples from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("outputs/classes.png"),
    model_stage: Annotated[str, typer.Option(help="Registry stage: Production or Staging.")] = "Production",
    models: Annotated[Path | None, typer.Option(help="Local models folder instead of the registry.")] = None,
    per_class: Annotated[int, typer.Option(help="Examples per class.")] = 8,
):
    """Per-class gallery of example defects, to decide what each class is (then `stm name-class`).

    A scan that cannot be read or analysed is skipped and listed at the end (exit code 1); the
    gallery is made from the others."""
    from stm_defects.analysis.dispatch import image_pixel_nm, missing_on, preprocess_scan
    from stm_defects.analysis.gallery import defect_examples
    from stm_defects.analysis.render import class_gallery
    from stm_defects.errors import StageError
    from stm_defects.io.files import save_png
    from stm_defects.io.scans import read_scan

    if out.is_dir():
        raise StageError(f"--out {out}: is a folder; give the PNG file to write, e.g. {out / 'classes.png'}")
    files = scan_files(paths)
    bundle, cfg, _ = model_bundle(models, model_stage)
    examples: dict[int, list] = {}
    failed, n_used = [], 0
    for f in files:
        stage = "read"
        try:
            scan = read_scan(f)
            stage = "analyse"
            img, scale = preprocess_scan(scan, cfg.preprocess)
            found = defect_examples(img, bundle, cfg, cfg.paper.patch, image_pixel_nm(scan, scale),
                                    missing_on(scan, img.shape))
        except Exception as err:  # noqa: BLE001 - one bad scan must not end the gallery
            failed.append(file_failure(f, stage, err))
            continue
        n_used += 1
        for cls, patches in found.items():
            examples.setdefault(cls, []).extend(patches)
    if n_used:
        save_png(out, class_gallery(examples, bundle.class_names, per_class))
        typer.echo(f"gallery of {n_used} scan(s) -> {out}")
    report_failures(failed, len(files))


# ---------------------------------------------------------------------------------- predict
ENGINES = ("local", "ray")


@app.command()
@user_errors
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Scan files or folders.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("outputs/predict"),
    model_stage: Annotated[str, typer.Option(
        help="Registry stage to predict with: Production or Staging.")] = "Production",
    models: Annotated[Path | None, typer.Option(
        help="Use models from this local folder (ae1/, kmeans/, ae2/, gmm/, improved/) instead of the "
             "registry.")] = None,
    direction: Annotated[str | None, typer.Option(
        help="Scan direction, e.g. forward/up, backward; all: every direction each file holds, "
             "as <name>_<direction> outputs.")] = None,
    channel: ChannelOpt = None,
    params: Annotated[Path | None, typer.Option(
        "--params", "-p", help="Override the models' own prediction config with this params.yaml "
                               "(recorded in every JSON).")] = None,
    profile: ProfileOpt = None,
    pixel_nm: PixelNmOpt = None,
    scan_nm: ScanNmOpt = None,
    field_from_name: FieldFromNameOpt = False,
    max_pixels: Annotated[int, typer.Option(
        min=1, help="Refuse scans of more pixels (rows x columns) than this before analysing them, saying "
                    "roughly how much memory one would need (a scan of 4096x4096, the default, needs about "
                    "2.5 GB).")
    ] = 4096 * 4096,
    workers: Annotated[int, typer.Option(
        min=1, help="Scans predicted at once: worker processes (each loads the models once and uses one "
                    "thread), or Ray actors with --engine ray. Each needs the memory of one scan "
                    "(see --max-pixels).")] = 1,
    force: Annotated[bool, typer.Option(
        "--force/--skip-existing", help="--force predicts again the scans whose outputs in OUT are up to "
                                        "date; --skip-existing (the default) skips them.")] = False,
    engine: Annotated[str, typer.Option(
        help="local (this machine: in this process, or a process pool with --workers) or ray "
             "(Ray Data; needs the package's `ray` extra installed).")] = "local",
    ray_address: Annotated[str | None, typer.Option(
        help="With --engine ray: the Ray cluster to join (e.g. ray://head:10001 or auto); default: a "
             "local Ray with --workers CPUs, started and stopped by this command.")] = None,
):
    """Find and classify defects: per scan a JSON, an overlay, a class map and a character map.

    The detector and preprocessing settings are the ones stored with the models, so a model
    version gives the same result from any folder.

    Outputs mirror the input tree: each scan's files are named by its path relative to the
    common folder of PATHS, without the suffix (`day1/scan001.sxm` -> `OUT/day1/scan001.json`,
    `_overlay.png`, `_classes.png`, `_character.png`); a single file gives `OUT/<stem>.json`.

    Resumable: a scan whose outputs in OUT were made by the same models, the same settings and
    from the same file (size and sha256) is skipped, unless --force; the count is shown.

    Each scan is isolated: one that fails (read, analyse or write) is skipped, and the batch
    goes on. OUT always gets summary.csv, rebuilt from every JSON under OUT made by these models
    and settings (others are left out, with a warning; see `analysis.batch.write_summary` for the
    columns) with defects.csv (one row per defect: position in px and nm, class, probability,
    size, height), and failures.csv (scan, stage, reason; the header only when none failed); the exit
    code is 1 when any scan failed. Every file is written whole (a temporary file, then a
    rename), a scan's JSON last. A second `stm predict` into the same OUT while one runs is
    refused. The outputs are the same byte for byte whatever --workers or --engine.
    """
    from stm_defects.analysis.heap import keep_freed_memory
    from stm_defects.errors import StageError
    from stm_defects.io.files import check_unlocked, output_folder, output_lock

    calibration = check_calibration(pixel_nm, scan_nm, field_from_name)
    keep_freed_memory()             # a scan's temporaries reuse this process's pages (`analysis.heap`)
    if engine not in ENGINES:
        raise StageError(f"--engine {engine}: use one of {', '.join(ENGINES)}")
    if ray_address is not None and engine != "ray":
        raise StageError("--ray-address needs --engine ray")
    if engine == "ray":
        from stm_defects.mlops.ray_engine import require_ray

        require_ray()
    files = _inputs_outside(scan_files(paths), out)
    check_unlocked(out)         # a run into OUT is under way: stop before loading anything
    if engine == "local" and workers > 1 and len(files) > 1:
        from stm_defects.analysis.pool_server import start_pool_server

        start_pool_server()     # the workers' imports run on another core while the models load
    # the override is checked first, then the models load; only then is anything written
    bundle, cfg, provenance, spec = model_bundle(models, model_stage, params, profile, with_spec=True)
    with output_lock(output_folder(out)):
        _predict_batch(files, paths, bundle, cfg, provenance, spec, out, direction,
                       {**calibration, "channel": channel}, max_pixels,
                       workers=workers, force=force, engine=engine, ray_address=ray_address)


def _inputs_outside(files: list[Path], out: Path) -> list[Path]:
    """`files` less those inside OUT (pictures of an earlier run are not scans to predict); a
    warning says how many were left out, and none left is a user error."""
    from stm_defects.errors import StageError

    root = os.path.abspath(out)
    keep = [f for f in files if os.path.commonpath([os.path.abspath(f), root]) != root]
    if len(keep) < len(files):
        typer.echo(f"warning: {len(files) - len(keep)} file(s) inside --out {out} are outputs, not scans: "
                   "left out", err=True)
        if not keep:
            raise StageError(f"no scans found outside --out {out}")
    return keep


def _write_config_used(path: Path, cfg, options: dict, provenance: dict, bundle) -> None:
    """The prediction settings of the run into OUT (YAML): where the config came from, the model
    versions, the read options and every value of the prediction config (`PredictConfig`)."""
    import yaml

    from stm_defects.io.files import atomic_file, jsonable

    doc = {"config_from": provenance.get("source"), "models": jsonable(bundle.versions),
           "options": jsonable(options), "prediction_config": jsonable(cfg.to_dict())}
    with atomic_file(path, "w") as fh:
        fh.write("# The settings of the `stm predict` run whose outputs are in this folder (summary.csv)\n")
        yaml.safe_dump(doc, fh, sort_keys=False, default_flow_style=None, width=100)


def _each_direction(files, names, direction, calibration):
    """(file, output name, direction to read or None) per scan to predict: one per file, or with
    `--direction all` one per direction each file holds, named `<name>_<direction>` (Matrix
    outputs carry their direction anyway). A file that cannot be read in any direction keeps one
    entry, whose read then fails with the reason."""
    from stm_defects.io.scans import directions_in

    if not is_all_directions(direction):
        for f, name in zip(files, names):
            yield f, name, None
        return
    read = {k: calibration.get(k) for k in ("pixel_nm", "scan_nm", "field_from_name")}
    with _progress(len(files), "directions") as bar:
        for f, name in zip(files, names):
            found = directions_in(f, calibration.get("channel"), **read)
            for one in found or [None]:
                own = one is None or Path(f).suffix.lower() == ".z_mtrx"
                yield f, (name if own else f"{name}_{one.replace('/', '-')}"), one
            bar.update(1)


def is_all_directions(direction: str | None) -> bool:
    return direction is not None and direction.strip().lower() == "all"


@functools.cache
def _import_report_meanwhile() -> None:
    """Import what the report needs at the end (matplotlib's figure and Agg canvas) in a thread,
    while this process only waits for workers; the import lock makes a later import wait for it.
    Once per process."""
    import threading

    def imports() -> None:
        try:
            import matplotlib.backends.backend_agg  # noqa: F401
            import matplotlib.figure  # noqa: F401
        except Exception:  # noqa: BLE001 - the report's own import says what is wrong, in one line
            pass

    threading.Thread(target=imports, name="import-report", daemon=True).start()


def _predict_batch(files, roots, bundle, cfg, provenance, spec, out: Path, direction, calibration, max_pixels,
                   *, workers: int = 1, force: bool = False, engine: str = "local",
                   ray_address: str | None = None) -> None:
    """`stm predict`'s batch into `out` (locked by the caller): skip what is up to date, predict the
    rest (in this process, a process pool or Ray), then rebuild summary.csv and failures.csv.

    Memory stays flat in the number of scans: results are counted as they come and not kept
    (failures excepted); summary.csv is built from the JSONs on disk, one at a time."""
    from stm_defects.analysis import batch
    from stm_defects.analysis.predict import Failure, read_options, write_failures

    if is_all_directions(direction):
        direction = "all"
    options = read_options(direction, calibration["pixel_nm"], calibration["scan_nm"], calibration.get("channel"),
                           calibration.get("field_from_name", False))
    key = batch.RunKey.of(bundle, cfg, spec.fingerprint)
    names = batch.output_names(files, batch.common_root(roots))
    produced: set[str] = set()          # the JSONs (relative to OUT) this run wrote or found up to date
    tasks, n_skipped = [], 0
    for f, name, one in _each_direction(files, names, direction, calibration):
        done = None if force else batch.already_done(out, name, f, key, options)
        if done is None:
            tasks.append(batch.Task(len(tasks) + n_skipped, str(f), name, one))
        else:
            produced.add(done)
            n_skipped += 1
    from stm_defects.analysis.report import MAX_THUMBS

    # the report shows MAX_THUMBS thumbnails: a batch of at most that many scans has its workers
    # make them from the overlays they draw (~30 kB each, kept here), a larger one leaves them to
    # the report (from the PNGs of the scans it shows)
    job = batch.Job(cfg, str(out), provenance, options, max_pixels, spec.fingerprint, key.config,
                    thumbnails=len(tasks) <= MAX_THUMBS)
    failed: list[tuple[int, Failure]] = []
    tally = {"done": 0, "defects": 0, "uncalibrated": 0}
    uncalibrated: list[str] = []

    on_ray = engine == "ray" and bool(tasks)
    in_pool = not on_ray and workers > 1 and len(tasks) > 1
    thumbs: dict[str, str] = {}       # JSON -> its overlay's report thumbnail, made by the workers

    with _progress(len(tasks), "predict") as bar:
        def on_result(task, got) -> None:
            if on_ray or in_pool:     # this process waits: import the report's needs meanwhile,
                _import_report_meanwhile()   # once the workers run (not competing with their start)
            if isinstance(got, Failure):
                log_failure(got)
                failed.append((task.index, got))
            else:
                produced.add(got["json"])
                if got.get("thumb"):
                    thumbs[got["json"]] = got["thumb"]
                tally["done"] += 1
                tally["defects"] += got["n_defects"]
                if not got["calibrated"]:
                    tally["uncalibrated"] += 1
                    if len(uncalibrated) < 3:
                        uncalibrated.append(Path(got["scan"]).name)
            bar.update(1)

        if on_ray:
            from stm_defects.mlops.ray_engine import predict_with_ray

            predict_with_ray(tasks, spec, job, workers, on_result, address=ray_address)
        elif in_pool:
            batch.run_pool(tasks, spec, job, min(workers, len(tasks)), on_result)
        else:
            for task in tasks:
                on_result(task, batch.predict_task(bundle, job, task))
    failures = [f for _, f in sorted(failed, key=lambda x: x[0])]
    warn_uncalibrated(uncalibrated, tally["uncalibrated"], bool(options.get("field_from_name")))
    if n_skipped:
        typer.echo(f"skipped {n_skipped} scan(s) already predicted into {out} with these models and settings "
                   "(--force predicts them again)")
    table_errors, report = [], None
    try:            # each table is tried, whatever became of the other
        report = batch.write_summary(out, out / "summary.csv", key, bundle, cfg, produced, {str(f) for f in files},
                                     options, defects_path=out / "defects.csv")
    except OSError as err:
        table_errors.append(err)
    try:
        write_failures(failures, out / "failures.csv")
    except OSError as err:
        table_errors.append(err)
    try:            # the settings behind summary.csv, for whoever reads the results later
        _write_config_used(out / "config_used.yaml", cfg, options, provenance, bundle)
    except OSError as err:
        table_errors.append(err)
    if report is not None:
        from stm_defects.analysis.report import write_report

        try:            # the page a person opens: densities, gallery, histograms, every scan
            write_report(out, report.jsons, bundle.class_names, load=batch.read_prediction, thumbs=thumbs,
                         failures=[{"scan": f.scan, "stage": f.stage, "reason": f.reason} for f in failures])
        except OSError as err:
            table_errors.append(err)
    if report is not None and report.stale:
        typer.echo(f"warning: {report.stale} prediction JSON(s) under {out} were made by other models or settings "
                   "and are left out of summary.csv; predict into a fresh --out to keep runs apart", err=True)
    if report is not None and report.superseded:
        typer.echo(f"warning: {report.superseded} older JSON(s) of scans of this run (a failed scan's, or "
                   "under an older output name) are left out of summary.csv", err=True)
    rows = f": {report.rows} scan(s)" if report is not None else ""
    typer.echo(f"{tally['done']} of {len(tasks) + n_skipped} scan(s) predicted, {tally['defects']} defects -> {out} "
               f"(summary {out / 'summary.csv'}{rows}; report {out / 'report.html'}; "
               f"config from {provenance['source']})")
    report_failures(failures, len(tasks) + n_skipped, listed_in=out / "failures.csv", then_exit=False)
    if table_errors:
        raise table_errors[0]          # one line, by `user_errors`
    if failures:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------- evaluate
@app.command()
@user_errors
def evaluate(
    predictions: Annotated[Path, typer.Argument(help="Folder of `stm predict` outputs (one JSON per scan).")],
    truth: Annotated[Path, typer.Option(help="Folder of box-truth JSONs, one per image (see README).")],
    out: Annotated[Path | None, typer.Option(
        help="Folder for evaluation.json and evaluation.md (default: PREDICTIONS).")] = None,
    slack_px: Annotated[float, typer.Option(help="A detection matches a box within max(w, h)/2 + this.")] = 2.0,
):
    """Score predictions against human-drawn boxes: P/R/F1 per field size with 95% intervals,
    ARI/NMI of the classes against the annotators'. The boxes are for measuring only."""
    from stm_defects.analysis.boxes import load_truth_dir, markdown_table, pair_by_image, score_boxes
    from stm_defects.errors import StageError
    from stm_defects.io.files import output_folder, read_json, write_json, write_text_atomic

    if not predictions.is_dir():
        raise StageError(f"{predictions}: not a folder of predictions")
    try:
        truths = load_truth_dir(truth)
    except (OSError, ValueError) as err:
        raise StageError(f"{truth}: {err}") from None
    preds, failed = [], []
    from stm_defects.analysis.batch import prediction_jsons

    files = list(prediction_jsons(predictions))    # the whole tree: `stm predict` mirrors input folders
    for f in files:
        try:
            d = read_json(f)
        except Exception as err:  # noqa: BLE001 - one unreadable JSON must not end the scoring
            failed.append(file_failure(f, "read", err))
            continue
        if isinstance(d, dict) and "defects" in d and "image" in d:
            preds.append(d)
    pairs = pair_by_image(preds, truths)
    if not pairs:
        report_failures(failed, len(files), then_exit=False)
        raise StageError(f"no prediction in {predictions} is of an image in {truth}")
    result = score_boxes(pairs, slack_px=slack_px)
    out = output_folder(out or predictions)
    write_json(out / "evaluation.json", result)
    table = markdown_table(result)
    write_text_atomic(out / "evaluation.md", table + "\n")
    typer.echo(table)
    missing = len(truths) - len(pairs)
    typer.echo(f"{len(pairs)} scan(s) scored -> {out / 'evaluation.md'}"
               + (f"; {missing} image(s) of the truth have no prediction" if missing else ""))
    report_failures(failed, len(files))


# -------------------------------------------------------------------------- registry / UI
@app.command()
@user_errors
def promote(
    model: Annotated[str | None, typer.Argument(help="ae1, kmeans, ae2, gmm or improved (with VERSION).")] = None,
    version: Annotated[int | None, typer.Argument(help="Version of MODEL to promote.")] = None,
    run: Annotated[str | None, typer.Option(
        help="Promote the model set of a pipeline run: `latest` or a parent RUN_ID.")] = None,
    model_stage: Annotated[str, typer.Option(help="Production, Staging or Archived.")] = "Production",
    force: Annotated[bool, typer.Option(help="Promote even if the set's lineage does not match.")] = False,
):
    """Promote a model set to a stage: the set of a pipeline run (`--run latest|RUN_ID`), or one
    model version swapped into the set the stage holds (`MODEL VERSION`). The stage moves as one
    unit, so `stm predict` never sees a mix. Inconsistent lineage is refused unless `--force`; a
    pipeline run without a set (killed, failed, still running) is refused. `--model-stage
    Archived` takes a set out of its stage."""
    from stm_defects.mlops.tracking import TrackingError, pipeline_set
    from stm_defects.mlops.tracking import promote as do_promote

    experiment = _experiment()
    if run is not None and model is None:
        versions = pipeline_set(run, experiment)
    elif model is not None and version is not None and run is None:
        versions = {model: version}
    else:
        raise TrackingError("give either --run latest|RUN_ID, or MODEL VERSION (e.g. `stm promote ae1 3`)")
    done = do_promote(versions, model_stage, force=force, experiment=experiment)
    typer.echo(f"{model_stage}: " + ", ".join(f"{k} v{v}" for k, v in done.items()))


@app.command("models")
@user_errors
def list_models_cmd():
    """Registered models: versions, stage, lineage and key metrics, then the model sets
    (`stm-set`). The Production or Staging set is what `stm predict` uses."""
    from stm_defects.mlops.tracking import list_models

    rows = list_models(_experiment())
    if not rows:
        typer.echo("no registered models yet (run `make run`)")
        return
    for r in rows:
        if r["model"] == "stm-set":
            members = " ".join(f"{k} v{v}" for k, v in r.get("members", {}).items())
            typer.echo(f"{r['model']:11s} v{r['version']:<3d} {r['stage']:10s} {members}")
            continue
        keys = [k for k in r["metrics"] if k.endswith(("best_val_loss", "silhouette", "bic", "_k"))][:4]
        metrics = "  ".join(f"{k}={r['metrics'][k]:.4g}" for k in keys)
        built = f" on ae1 v{r['ae1_version']}" if r["ae1_version"] else ""
        typer.echo(f"{r['model']:11s} v{r['version']:<3d} {r['stage']:10s}{built:12s} {metrics}")


@app.command()
@user_errors
def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
):
    """Start the MLflow UI on 127.0.0.1 against the project's mlruns/ (Ctrl-C or SIGTERM stops it
    and its workers). The experiment opens in MLflow's "Model training" view."""
    import signal
    import socket
    import subprocess

    from stm_defects.errors import StageError
    from stm_defects.mlops.tracking import connect
    from stm_defects.project import tracking_uri

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise StageError(f"port {port} on 127.0.0.1 is in use (another `stm ui`?); stop it or give "
                             "--port") from None
    uri = tracking_uri()
    connect(_experiment())            # the experiment exists and is tagged for the training view
    typer.echo(f"MLflow UI on http://127.0.0.1:{port} (store {uri})")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers
    # its own process group, so a signal to `stm ui` stops the server and every worker it started
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    # stopped by a signal: a clean end; the server failing on its own: its exit code
    raise typer.Exit(0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code)


@app.command("name-class")
@user_errors
def name_class(
    class_id: Annotated[int | None, typer.Argument(help="Defect class id (as in predictions).")] = None,
    name: Annotated[str | None, typer.Argument(help="A name, e.g. dimer_vacancy.")] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Remove the name of CLASS_ID.")] = False,
    list_names: Annotated[bool, typer.Option("--list", help="List the names the classifier carries.")] = False,
    version: Annotated[int | None, typer.Option(help="Classifier version (default: Production).")] = None,
    classifier: Annotated[str | None, typer.Option(
        help="improved or gmm (default: the one the Production models' method uses).")] = None,
):
    """Name a defect class, remove a name (--remove) or list the names (--list).

    Names are stored with the classifier version in the registry (the improved analysis' classes
    for the default profile, the GMM's for the paper profile) and appear in every later
    prediction, picture and report. The id must be one of the classifier's classes; -1
    (unknown) keeps its name.
    """
    from stm_defects.errors import StageError
    from stm_defects.mlops.tracking import MODEL_NAMES, edit_class_names, production_method

    if not list_names and (class_id is None or (name is None) != remove):
        raise StageError("give CLASS_ID NAME to name a class, CLASS_ID --remove to remove a name, "
                         "or --list")
    if classifier not in (None, "improved", "gmm"):
        raise StageError(f"--classifier must be improved or gmm, not {classifier!r}")
    experiment = _experiment()
    key = classifier or ("improved" if production_method(experiment) == "improved" else "gmm")
    if list_names:
        v, names, n = edit_class_names({}, version, experiment, key=key)
        typer.echo(f"{MODEL_NAMES[key]} v{v}" + (f", {n} classes" if n >= 0 else "") + ":")
        for cid in sorted(names, key=int):
            typer.echo(f"  {cid}: {names[cid]}")
        if not names:
            typer.echo("  (no names yet: stm name-class ID NAME)")
        return
    v, _, _ = edit_class_names({class_id: None if remove else name}, version, experiment, key=key)
    typer.echo(f"class {class_id} of {MODEL_NAMES[key]} v{v} "
               + ("has no name now" if remove else f"is now named {name.strip()!r}"))


@app.command()
@user_errors
def results():
    """Where `make run` left its results, with the evaluation numbers."""
    from stm_defects.io.files import read_json
    from stm_defects.project import project_root

    root = project_root()
    ev = root / "reports/evaluation.json"
    typer.echo(f"results (in {root}):")
    typer.echo("  synthetic data + montage : data/raw/synthetic/ (montage.png)")
    typer.echo("  validation               : data/validated/summary.json, data/validated/datadocs/index.html")
    typer.echo("  models                   : models/{ae1,kmeans,ae2,gmm,improved}/ (loss.png, elbow.png, bic.png,"
               " gallery.png)")
    typer.echo("  evaluation               : reports/evaluation.json, reports/ablation.md")
    typer.echo("  MLflow                   : make ui  ->  http://127.0.0.1:5000")
    if ev.is_file():
        m = read_json(ev)
        for split in ("test", "hard"):
            s = m.get(split, {})
            typer.echo(f"  {split:5s} F1 {s.get('f1', float('nan')):.3f}  ARI {s.get('ari', float('nan')):.3f}  "
                       f"purity {s.get('purity', float('nan')):.3f}  "
                       f"step-edge FP/scan {s.get('step_edge_fp_mean', float('nan')):.2f}")


@app.command("create-config")
@user_errors
def create_config(
    path: Annotated[Path, typer.Argument(help="File to write.")] = Path("stm-config.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite PATH if it exists.")] = False,
):
    """Write the default configuration, every value commented, to edit and give to `stm train
    --params` or `stm predict --params`. Values are checked when a command reads the file: a wrong
    type or range is one line naming the key."""
    from stm_defects.config import load_params
    from stm_defects.errors import StageError
    from stm_defects.io.files import atomic_file
    from stm_defects.project import params_path

    if path.is_dir():
        raise StageError(f"{path}: is a folder; give a file name")
    if path.exists() and not force:
        raise StageError(f"{path}: exists; give --force to overwrite it, or another path")
    source = params_path()
    text = source.read_text()
    load_params(source)                 # the defaults themselves are valid
    with atomic_file(path, "w") as fh:
        fh.write(f"# stm-defects configuration, written by `stm create-config` from {source}\n"
                 "# Edit, then: stm predict SCANS --params THIS_FILE  /  stm train FOLDER --params THIS_FILE\n"
                 + text)
    typer.echo(f"wrote {path}: edit it, then give it with --params to `stm predict` or `stm train`")


# ------------------------------------------------------------------------------ help layout
#: `stm --help` groups the commands by what a user is doing, each with a one-line summary (the
#: docstrings keep the detail for `stm COMMAND --help`).
HELP_PANELS = {
    "Your scans": {
        "info": "What is in files or folders: format, size, pixel size, channel, height range.",
        "predict": "Find and classify defects: pictures, JSON per scan, summary.csv, report.html.",
        "classes": "A gallery of example defects per class, to decide what each class is.",
        "name-class": "Name a class, remove a name (--remove) or list the names (--list).",
        "evaluate": "Score predictions against boxes drawn by people (P/R/F1 with intervals).",
        "create-config": "Write the default configuration, commented, to edit and give with --params.",
    },
    "Models": {
        "train": "Train the whole pipeline on your own folder of scans.",
        "models": "Registered model versions and model sets, with their lineage.",
        "promote": "Promote a run's model set (or swap one model into it) to Production/Staging.",
    },
    "Tracking": {
        "ui": "The MLflow UI on 127.0.0.1 for this project's runs.",
        "results": "Where `make run` left its results, with the evaluation numbers.",
    },
}


def _layout_help() -> None:
    where = {name: (panel, text) for panel, cmds in HELP_PANELS.items() for name, text in cmds.items()}
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        if name in where:
            info.rich_help_panel, info.short_help = where[name]


_layout_help()


if __name__ == "__main__":  # pragma: no cover
    app()
