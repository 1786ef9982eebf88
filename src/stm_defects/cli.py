"""The `stm` command line. Thin commands that call stages or the library.

Heavy imports (torch, mlflow, GX) happen inside the commands so that `stm --help` is instant.
User errors (bad files, bad params) end with one line on stderr and exit code 1, no traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Find and classify atomic-scale defects in STM images without labels.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
log = logging.getLogger("stm_defects")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read.")]
ProfileOpt = Annotated[str | None, typer.Option(
    "--profile", help="Override the params' profile (default | paper).")]
TrackOpt = Annotated[bool, typer.Option("--track/--no-track", help="Log the run to MLflow (mlruns/).")]
TunedOpt = Annotated[Path | None, typer.Option(
    "--tuned", help="tuned.json from `stm tune`: its values override params.yaml (when tune.use_tuned).")]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(message)s", stream=sys.stderr, force=True)
    for noisy in ("great_expectations", "mlflow", "alembic", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False):
    setup_logging(verbose)


def user_errors(fn):
    """Turn domain errors into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .config import ConfigError
        from .scans import ScanError
        from .stages import StageError
        from .tracking import TrackingError

        try:
            return fn(*args, **kwargs)
        except (ScanError, ConfigError, StageError, TrackingError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        except FileNotFoundError as err:
            typer.echo(f"error: {err.filename or err}: file not found", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _params(path: Path, profile: str | None = None):
    from .config import load_params

    return load_params(path, profile)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="scan", file=sys.stderr, dynamic_ncols=True)


def scan_files(paths: list[Path]) -> list[Path]:
    """The scans in `paths` (files, folders searched recursively); none at all is a user error."""
    from .scans import find_scans
    from .stages import StageError

    files = find_scans(paths)
    if not files:
        raise StageError(f"no scans found in {', '.join(map(str, paths))}")
    return files


def model_bundle(models: Path | None, model_stage: str, params):
    """Models from a local folder when given, else the registry versions holding `model_stage`."""
    if models is not None:
        from .stages import load_models

        return load_models(models)
    from .tracking import load_registered

    return load_registered(model_stage, params.tracking.experiment, params.detector.method)


# ------------------------------------------------------------------------------------------ info
@app.command()
@user_errors
def info(
    paths: Annotated[list[Path], typer.Argument(help="Scan files or folders (searched recursively).")],
    direction: Annotated[str | None, typer.Option(help="Scan direction, e.g. forward/up, backward.")] = None,
):
    """One line per scan: format, shape, pixel size, channel, direction, height range."""
    from .scans import ScanError, read_scan

    failed = []
    files = scan_files(paths)
    for f in files:
        try:
            s = read_scan(f, direction=direction)
        except ScanError as err:
            failed.append(str(err))
            continue
        h = s.height
        px = f"{s.pixel_nm:.4g} nm/px" if s.pixel_nm else "pixel size unknown"
        crop = f" cropped from {s.original_shape[0]}x{s.original_shape[1]}" if (
            s.original_shape and tuple(s.original_shape) != h.shape) else ""
        typer.echo(f"{f}: {s.format} {h.shape[0]}x{h.shape[1]}{crop} {px} channel={s.channel} "
                   f"direction={s.direction} height {h.min():.4g}..{h.max():.4g} {s.unit}")
    report_failures(failed, len(files))


def report_failures(failed: list[str], n_files: int) -> None:
    """One line for a single bad file; for a batch, the list of bad files at the end. Exit 1."""
    if not failed:
        return
    if n_files == 1:
        typer.echo(f"error: {failed[0]}", err=True)
    else:
        typer.echo(f"{len(failed)} of {n_files} file(s) failed:", err=True)
        for line in failed:
            typer.echo(f"  {line}", err=True)
    raise typer.Exit(1)


# ---------------------------------------------------------------------------------- data stages
@app.command()
@user_errors
def synth(
    out: Annotated[Path, typer.Option(help="Output folder (rewritten).")] = Path("data/raw/synthetic"),
    params: ParamsOpt = Path("params.yaml"),
):
    """Generate the synthetic Si(001) scans with ground truth (the embedded default data)."""
    from . import stages

    p = _params(params)
    with _progress(p.data.n_scans + p.data.n_hard, "synth") as bar:
        counts = stages.synth(p, out, progress=bar.update)
    typer.echo(f"wrote {counts} scans to {out} (montage: {out / 'montage.png'})")


@app.command()
@user_errors
def validate(
    raw: Annotated[Path, typer.Option(help="Folder of scans.")] = Path("data/raw/synthetic"),
    out: Annotated[Path, typer.Option(help="Output folder (rewritten).")] = Path("data/validated"),
    params: ParamsOpt = Path("params.yaml"),
):
    """Validate scans with a Great Expectations suite; quarantine failures with reasons."""
    from . import stages

    m = stages.validate(_params(params), raw, out)
    typer.echo(f"{m['n_passed']} scans passed, {m['n_quarantined']} quarantined "
               f"(summary {out / 'summary.json'}, Data Docs {out / 'datadocs' / 'index.html'})")


@app.command()
@user_errors
def prepare(
    raw: Annotated[Path, typer.Option(help="Folder of scans.")] = Path("data/raw/synthetic"),
    summary: Annotated[Path, typer.Option(help="Validation summary.")] = Path("data/validated/summary.json"),
    out: Annotated[Path, typer.Option(help="Output folder (rewritten).")] = Path("data/prepared"),
    params: ParamsOpt = Path("params.yaml"),
):
    """Split scans into train/test/predict and extract training patches."""
    from . import stages

    m = stages.prepare(_params(params), raw, summary, out)
    typer.echo(f"prepared {m}")


# --------------------------------------------------------------------------------- model stages
@app.command()
@user_errors
def tune(
    out: Annotated[Path, typer.Option(help="Output folder (rewritten): tuned.json, metrics, trials, plots.")],
    patches: Annotated[Path | None, typer.Option(help="Training patches npz: tune AE1's latent size.")] = None,
    defect_patches: Annotated[Path | None, typer.Option(
        help="Defect patches npz: tune the GMM's k x covariance type by BIC (with --ae2).")] = None,
    ae2: Annotated[Path | None, typer.Option(help="AE2 checkpoint that encodes the defect patches.")] = None,
    storage: Annotated[str | None, typer.Option(
        help="Optuna storage URL (default sqlite:///<repo>/mlruns/optuna.db, outside DVC).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    track: TrackOpt = True,
):
    """Optuna: AE1's latent size (pruned on validation loss) and/or the GMM's k x covariance (BIC)."""
    from .stages import StageError
    from .tracking import Tracker
    from .tuning import tune_stage

    if patches is None and defect_patches is None:
        raise StageError("give --patches (AE1 study) and/or --defect-patches with --ae2 (GMM study)")
    p = _params(params, profile)
    name = "tune_" + "_".join(k for k, v in (("ae1", patches), ("gmm", defect_patches)) if v is not None)
    with Tracker(p, name, enabled=track) as tr:
        m = tune_stage(p, patches, defect_patches, out, tracker=tr, ae2_path=ae2, storage=storage)
    if "ae1_latent" in m:
        typer.echo(f"AE1 latent {m['ae1_latent']} (val MSE {m['ae1_val_loss']:.5f}; lowest "
                   f"{m['ae1_min_val_loss']:.5f} at {m['ae1_min_loss_latent']}; "
                   f"{m['ae1_trials_complete']} complete, {m['ae1_trials_pruned']} pruned)")
    if "gmm_k" in m:
        typer.echo(f"GMM k={m['gmm_k']} covariance={m['gmm_covariance_type']} BIC {m['gmm_bic']:.1f} "
                   f"({m['gmm_trials_complete']} trials)")
    typer.echo(f"-> {out / 'tuned.json'}")


def _epoch_logger(name: str):
    def on_epoch(epoch, train_loss, val_loss, lr):
        log.info("%s epoch %3d  train %.5f  val %.5f  lr %.1e", name, epoch + 1, train_loss, val_loss, lr)
    return on_epoch


@app.command("train-ae")
@user_errors
def train_ae(
    which: Annotated[str, typer.Argument(help="ae1 (general patches) or ae2 (defect patches).")],
    patches: Annotated[Path, typer.Option(help="npz with a `patches` array (N, 1, 32, 32).")],
    out: Annotated[Path, typer.Option(help="Output folder (rewritten).")],
    ae1: Annotated[Path | None, typer.Option(
        help="AE2 only: the AE1 checkpoint the defect patches came from (lineage).")] = None,
    tuned: TunedOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    track: TrackOpt = True,
):
    """Train an autoencoder (per-epoch losses are logged)."""
    from . import stages
    from .tracking import Tracker
    from .tuning import load_tuned

    p = _params(params, profile)
    used = load_tuned(p, tuned) if tuned else p
    with Tracker(p, f"train_{which}", enabled=track) as tr:
        tr.params = used   # log the values used; the pipeline grouping (set on enter) stays params.yaml's
        m = stages.train_autoencoder(used, which, patches, out, on_epoch=_epoch_logger(which.upper()),
                                     tracker=tr, ae1_path=ae1)
    typer.echo(f"{which}: best val MSE {m['best_val_loss']:.5f} after {m['epochs_run']} epochs "
               f"({m['patches_per_s']:.0f} patches/s) -> {out}")


@app.command()
@user_errors
def kmeans(
    ae1: Annotated[Path, typer.Option(help="AE1 checkpoint.")],
    patches: Annotated[Path, typer.Option(help="Training patches npz.")],
    out: Annotated[Path, typer.Option(help="Output folder (rewritten).")],
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    track: TrackOpt = True,
):
    """K-means on AE1 latents: inertia / derivative / silhouette over k, fit the chosen k."""
    from . import stages
    from .tracking import Tracker

    p = _params(params, profile)
    with Tracker(p, "kmeans", enabled=track) as tr:
        m = stages.cluster_general(p, ae1, patches, out, tracker=tr)
    typer.echo(f"k-means: k={m['k']} silhouette {m['silhouette']:.3f} -> {out}")


@app.command()
@user_errors
def defects(
    raw: Annotated[Path, typer.Option(help="Folder of scans.")],
    manifest: Annotated[Path, typer.Option(help="prepare's manifest.json.")],
    models: Annotated[Path, typer.Option(help="Folder with ae1/ and kmeans/.")],
    out: Annotated[Path, typer.Option(help="Output folder for defect patches (rewritten).")],
    calibration: Annotated[Path, typer.Option(help="Where to write the mask calibration.")],
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    track: TrackOpt = True,
):
    """Defect masks on the training scans -> AE2's training patches."""
    from . import stages
    from .tracking import Tracker

    p = _params(params, profile)
    n = len(read_manifest(manifest)["splits"]["train"])
    with Tracker(p, "defects", enabled=track) as tr, _progress(n, "defect masks") as bar:
        m = stages.defects(p, raw, manifest, models, out, calibration, progress=bar.update, tracker=tr)
    typer.echo(f"{m['n_defect_patches']} defect patches (mean mask fraction "
               f"{m['mean_mask_fraction']:.3f}) -> {out}")


@app.command()
@user_errors
def gmm(
    ae2: Annotated[Path, typer.Option(help="AE2 checkpoint.")],
    patches: Annotated[Path, typer.Option(help="Defect patches npz.")],
    out: Annotated[Path, typer.Option(help="Output folder (rewritten).")],
    ae1: Annotated[Path | None, typer.Option(help="AE1 checkpoint behind the patches (lineage).")] = None,
    kmeans: Annotated[Path | None, typer.Option(help="K-means model behind the mask (lineage).")] = None,
    calibration: Annotated[Path | None, typer.Option(
        help="Mask calibration behind the patches; stored with the GMM version.")] = None,
    tuned: TunedOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    track: TrackOpt = True,
):
    """Gaussian mixtures over covariance type x k on AE2 latents, chosen by BIC."""
    from . import stages
    from .tracking import Tracker
    from .tuning import load_tuned

    p = _params(params, profile)
    used = load_tuned(p, tuned) if tuned else p
    with Tracker(p, "gmm", enabled=track) as tr:
        tr.params = used
        m = stages.cluster_defects(used, ae2, patches, out, tracker=tr,
                                   lineage={"ae1": ae1, "kmeans": kmeans, "calibration": calibration})
    typer.echo(f"GMM: k={m['k']} covariance={m['covariance_type']} BIC {m['bic']:.1f} -> {out}")


def read_manifest(path: Path) -> dict:
    from .io import read_json
    from .stages import StageError

    if not Path(path).is_file():
        raise StageError(f"{path}: manifest not found (run `stm prepare` first)")
    return read_json(path)


@app.command()
@user_errors
def evaluate(
    raw: Annotated[Path, typer.Option(help="Folder of synthetic scans with truth.")] = Path("data/raw/synthetic"),
    manifest: Annotated[Path, typer.Option(help="prepare's manifest.json.")] = Path("data/prepared/manifest.json"),
    models: Annotated[Path, typer.Option(help="Folder of trained models.")] = Path("models"),
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write.")] = Path("reports/evaluation.json"),
    per_scan: Annotated[Path, typer.Option(help="Per-scan scores JSON.")] = Path("reports/evaluation_per_scan.json"),
    ablation: Annotated[Path | None, typer.Option(
        help="Also score the other method and write this ablation JSON.")] = None,
    ablation_md: Annotated[Path | None, typer.Option(
        help="Markdown table of the ablation (default: the JSON path with .md).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    track: TrackOpt = True,
):
    """Score detection, classes, step edges and rotation against the synthetic ground truth."""
    from . import stages
    from .tracking import Tracker

    p = _params(params, profile)
    splits = read_manifest(manifest)["splits"]
    n = (len(splits["test"]) + len(splits["hard"])) * (2 if ablation else 1)
    with Tracker(p, "evaluate", enabled=track) as tr, _progress(n, "evaluate") as bar:
        m = stages.evaluate(p, raw, manifest, models, metrics, per_scan, ablation_path=ablation,
                            progress=bar.update, tracker=tr, ablation_md=ablation_md)
    for split in ("test", "hard"):
        s = m[split]
        typer.echo(f"{split} ({m['method']}): F1 {s['f1']:.3f} (P {s['precision']:.3f} R {s['recall']:.3f})  "
                   f"ARI {s['ari']:.3f}  NMI {s['nmi']:.3f}  purity {s['purity']:.3f}  "
                   f"step-edge FP/scan {s['step_edge_fp_mean']:.2f}  AUROC {s['auroc_mean']:.3f}")
    typer.echo(f"rotation agreement {m['test']['rotation_agreement']:.3f} "
               f"({m['test']['rotation_pairs']} defect pairs)")
    if ablation:
        md = ablation_md or ablation.with_suffix(".md")
        typer.echo(f"ablation ({md}):")
        typer.echo(md.read_text().rstrip())


@app.command()
@user_errors
def train(
    data: Annotated[Path, typer.Argument(help="Folder of your own scans (any supported format).")],
    out: Annotated[Path, typer.Option(help="Working folder for this training run.")] = Path("runs/own"),
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    track: TrackOpt = True,
):
    """Train the whole pipeline on a folder of scans, outside DVC (same code as the stages)."""
    import os
    import time

    from . import stages
    from .tracking import Tracker

    p = _params(params, profile)
    os.environ.setdefault("STM_PIPELINE_RUN", f"train-{data.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    m = out / "models"
    steps = []
    with Tracker(p, "validate", enabled=track) as tr:
        v = stages.validate(p, data, out / "validated")
        tr.metrics(v)
    steps.append(f"validated: {v['n_passed']} passed, {v['n_quarantined']} quarantined")
    prep = stages.prepare(p, data, out / "validated" / "summary.json", out / "prepared")
    steps.append(f"prepared: {prep}")
    patches, manifest = out / "prepared" / "train_patches.npz", out / "prepared" / "manifest.json"
    with Tracker(p, "train_ae1", enabled=track) as tr:
        stages.train_autoencoder(p, "ae1", patches, m / "ae1", on_epoch=_epoch_logger("AE1"), tracker=tr)
    with Tracker(p, "kmeans", enabled=track) as tr:
        stages.cluster_general(p, m / "ae1" / "model.pt", patches, m / "kmeans", tracker=tr)
    with Tracker(p, "defects", enabled=track) as tr, _progress(prep["train"], "defect masks") as bar:
        d = stages.defects(p, data, manifest, m, out / "defects", m / "calibration.json",
                           progress=bar.update, tracker=tr)
    with Tracker(p, "train_ae2", enabled=track) as tr:
        stages.train_autoencoder(p, "ae2", out / "defects" / "patches.npz", m / "ae2",
                                 on_epoch=_epoch_logger("AE2"), tracker=tr, ae1_path=m / "ae1" / "model.pt")
    with Tracker(p, "gmm", enabled=track) as tr:
        g = stages.cluster_defects(p, m / "ae2" / "model.pt", out / "defects" / "patches.npz", m / "gmm",
                                   tracker=tr, lineage={"ae1": m / "ae1" / "model.pt",
                                                        "kmeans": m / "kmeans" / "kmeans.joblib",
                                                        "calibration": m / "calibration.json"})
    with Tracker(p, "fit_improved", enabled=track) as tr:
        stages.fit_improved_stage(p, data, manifest, m / "improved", tracker=tr)
    for line in steps:
        typer.echo(line)
    typer.echo(f"{d['n_defect_patches']} defect patches; GMM k={g['k']} ({g['covariance_type']})")
    typer.echo(f"models in {m}: predict with `stm predict SCANS --models {m}`"
               + (" or promote them with `stm promote --run latest`" if track else ""))


@app.command()
@user_errors
def classes(
    paths: Annotated[list[Path], typer.Argument(help="Scan files or folders to take examples from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("outputs/classes.png"),
    model_stage: Annotated[str, typer.Option(help="Registry stage: Production or Staging.")] = "Production",
    models: Annotated[Path | None, typer.Option(help="Local models folder instead of the registry.")] = None,
    per_class: Annotated[int, typer.Option(help="Examples per class.")] = 8,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
):
    """Per-class gallery of example defects, to decide what each class is (then `stm name-class`)."""
    from . import stages
    from .io import save_png

    p = _params(params, profile)
    bundle = model_bundle(models, model_stage, p)
    files = scan_files(paths)
    images = [stages.load_image(f, p)[1] for f in files]
    save_png(out, stages.gallery(images, bundle, p, per_class))
    typer.echo(f"gallery of {len(files)} scan(s) -> {out}")


@app.command("fit-improved")
@user_errors
def fit_improved_cmd(
    raw: Annotated[Path, typer.Option(help="Folder of scans.")],
    manifest: Annotated[Path, typer.Option(help="prepare's manifest.json.")],
    out: Annotated[Path, typer.Option(help="Output folder (rewritten).")],
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    track: TrackOpt = True,
):
    """Fit the improved analysis (stable defect classes) on the training scans."""
    from . import stages
    from .tracking import Tracker

    p = _params(params, profile)
    n = len(read_manifest(manifest)["splits"]["train"])
    with Tracker(p, "fit_improved", enabled=track) as tr, _progress(n, "fit improved") as bar:
        m = stages.fit_improved_stage(p, raw, manifest, out, progress=bar.update, tracker=tr)
    typer.echo(f"improved: {m['n_train_defects']} training defects, {m['n_classes']} classes -> {out}")


# ---------------------------------------------------------------------------------- predict
@app.command()
@user_errors
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Scan files or folders.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("outputs/predict"),
    model_stage: Annotated[str, typer.Option(
        help="Registry stage to predict with: Production or Staging.")] = "Production",
    models: Annotated[Path | None, typer.Option(
        help="Use models from this local folder (ae1/, kmeans/, ae2/, gmm/) instead of the registry.")] = None,
    direction: Annotated[str | None, typer.Option(help="Scan direction, e.g. forward/up, backward.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
):
    """Find and classify defects: per scan a JSON, an overlay, a class map and a character map."""
    from .predict import predict_scan, write_summary
    from .scans import ScanError

    p = _params(params, profile)
    files = scan_files(paths)
    bundle = model_bundle(models, model_stage, p)
    out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    with _progress(len(files), "predict") as bar:
        for f in files:
            try:
                rows.append(predict_scan(f, bundle, p, out, direction=direction))
            except ScanError as err:
                failed.append(str(err))
            bar.update(1)
    if rows:
        write_summary(rows, out / "summary.csv")
        typer.echo(f"{len(rows)} scan(s), {sum(r['n_defects'] for r in rows)} defects -> {out} "
                   f"(summary {out / 'summary.csv'})")
    report_failures(failed, len(files))


# -------------------------------------------------------------------------- registry / UI
@app.command()
@user_errors
def promote(
    model: Annotated[str | None, typer.Argument(help="ae1, kmeans, ae2 or gmm (with VERSION).")] = None,
    version: Annotated[int | None, typer.Argument(help="Version of MODEL to promote.")] = None,
    run: Annotated[str | None, typer.Option(
        help="Promote the model set of a pipeline run: `latest` or a parent RUN_ID.")] = None,
    model_stage: Annotated[str, typer.Option(help="Production, Staging or Archived.")] = "Production",
    force: Annotated[bool, typer.Option(help="Promote even if the set's lineage does not match.")] = False,
    params: ParamsOpt = Path("params.yaml"),
):
    """Promote one model version, or the consistent set of one pipeline run, to a stage."""
    from .tracking import TrackingError, pipeline_set
    from .tracking import promote as do_promote

    experiment = _params(params).tracking.experiment
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
def list_models_cmd(params: ParamsOpt = Path("params.yaml")):
    """Registered models: versions, stage, lineage and key metrics."""
    from .tracking import list_models

    rows = list_models(_params(params).tracking.experiment)
    if not rows:
        typer.echo("no registered models yet (run `make run`)")
        return
    for r in rows:
        keys = [k for k in r["metrics"] if k.endswith(("best_val_loss", "silhouette", "bic", "_k"))][:4]
        metrics = "  ".join(f"{k}={r['metrics'][k]:.4g}" for k in keys)
        built = f" on ae1 v{r['ae1_version']}" if r["ae1_version"] else ""
        typer.echo(f"{r['model']:11s} v{r['version']:<3d} {r['stage']:10s}{built:12s} {metrics}")


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
):
    """Start the MLflow UI on 127.0.0.1 against mlruns/ (Ctrl-C stops it)."""
    import os
    import subprocess

    from .tracking import tracking_uri

    uri = tracking_uri()
    typer.echo(f"MLflow UI on http://127.0.0.1:{port} (store {uri})")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers
    try:
        raise typer.Exit(subprocess.call(cmd, env=env))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@app.command("name-class")
@user_errors
def name_class(
    class_id: Annotated[int, typer.Argument(help="Defect class id (as in predictions).")],
    name: Annotated[str, typer.Argument(help="A name, e.g. dimer_vacancy.")],
    version: Annotated[int | None, typer.Option(help="Classifier version (default: Production).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
):
    """Attach a name to a defect class; stored with the classifier version in the registry.

    The classifier is the improved analysis' (default profile) or the GMM (paper profile).
    """
    from .tracking import MODEL_NAMES, set_class_names

    p = _params(params, profile)
    key = "improved" if p.detector.method == "improved" else "gmm"
    v = set_class_names({class_id: name}, version, p.tracking.experiment, key=key)
    typer.echo(f"class {class_id} of {MODEL_NAMES[key]} v{v} is now named {name!r}")


@app.command()
def results():
    """Where `make run` left its results, with the evaluation numbers."""
    from .io import read_json

    ev = Path("reports/evaluation.json")
    typer.echo("results:")
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


if __name__ == "__main__":  # pragma: no cover
    app()
