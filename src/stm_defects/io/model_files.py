"""A locally trained model set on disk (`<dir>/{ae1,kmeans,ae2,gmm,improved}`) -> `Models`.

Used by the stages (which read the models they declare as DVC deps) and by
`stm predict --models DIR`. The registry's counterpart is `mlops.tracking.load_registered`.
"""

from __future__ import annotations

from pathlib import Path

from stm_defects.io.files import read_json
from stm_defects.models.autoencoder import load_checkpoint
from stm_defects.results import Models


def load_autoencoder(path: str | Path):
    model, _ = load_checkpoint(path)
    return model


def load_models(models_dir: str | Path, calibration_path: str | Path | None = None,
                stage2: bool = True) -> Models:
    """Load `<models_dir>/{ae1,kmeans}` (and `ae2`, `gmm` with `stage2`, `improved` when present).

    `config.json` in the folder (written by `stm train`), when present, is the prediction config
    the models were built with.
    """
    import joblib

    d = Path(models_dir)
    models = Models(ae1=load_autoencoder(d / "ae1" / "model.pt"),
                    kmeans=joblib.load(d / "kmeans" / "kmeans.joblib"),
                    versions={"ae1": str(d / "ae1"), "kmeans": str(d / "kmeans")})
    calibration_path = Path(calibration_path or d / "calibration.json")
    if calibration_path.is_file():
        models.calibration = read_json(calibration_path)
    if (d / "improved" / "state.joblib").is_file():
        models.improved = joblib.load(d / "improved" / "state.joblib")
        models.versions["improved"] = str(d / "improved")
    if stage2:
        models.ae2 = load_autoencoder(d / "ae2" / "model.pt")
        models.gmm = joblib.load(d / "gmm" / "gmm.joblib")
        models.versions |= {"ae2": str(d / "ae2"), "gmm": str(d / "gmm")}
    if (d / "config.json").is_file():
        models.config = read_json(d / "config.json")
    return models
