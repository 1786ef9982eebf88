"""A locally trained model set on disk (`<dir>/{ae1,kmeans,ae2,gmm,improved}`) -> `Models`.

Used by the stages (which read the models they declare as DVC deps) and by
`stm predict --models DIR`. The registry's counterpart is `mlops.tracking.load_registered`.

Each model folder holds its model in one file (`safe_models.MODEL_FILES`: `model.pt` for the
autoencoders, `kmeans.npz`, `gmm.npz`, `improved/state.npz`) and a `manifest.json` with the
sha256 of the files that are read back (`improved/config.json` too). Nothing is loaded from a
folder without a manifest, or from a file whose bytes differ from it; nothing is unpickled (see
`io.safe_models`), and the checkpoints are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path

from stm_defects.io import safe_models
from stm_defects.io.files import read_json
from stm_defects.io.safe_models import MANIFEST, MODEL_FILES, ModelFileError, read_verified
from stm_defects.results import Models

AUTOENCODERS = ("ae1", "ae2")


def autoencoder_from_file(path: str | Path):
    """The autoencoder in checkpoint `path` (weights only), with no hash check: callers verify
    the file first. A file that is not a checkpoint is a ModelFileError."""
    from stm_defects.models.autoencoder import load_checkpoint

    try:
        model, _ = load_checkpoint(path)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such checkpoint") from None
    except Exception as err:  # noqa: BLE001 - truncated zips, foreign pickles, wrong keys: one refusal
        reason = str(err).splitlines()[0].split(". ")[0][:160] if str(err) else type(err).__name__
        raise ModelFileError(f"{path}: not a readable autoencoder checkpoint ({reason})") from None
    return model


def load_autoencoder(path: str | Path):
    """The autoencoder of checkpoint `path` (`<folder>/model.pt`), verified against
    `<folder>/manifest.json`."""
    path = Path(path)
    read_verified(path.parent, path.name)
    return autoencoder_from_file(path)


def load_model(folder: str | Path, key: str):
    """Model `key` ("ae1", "kmeans", "ae2", "gmm" or "improved") from its folder, verified
    against the folder's manifest; the scikit-learn parts from their safe `.npz`."""
    folder = Path(folder)
    name = MODEL_FILES[key]
    if key in AUTOENCODERS:
        return load_autoencoder(folder / name)
    return safe_models.loads(read_verified(folder, name), key, str(folder / name))


def load_models(models_dir: str | Path, calibration_path: str | Path | None = None,
                stage2: bool = True) -> Models:
    """Load `<models_dir>/{ae1,kmeans}` (and `ae2`, `gmm` with `stage2`, `improved` when present).

    `improved/` is optional, but a folder that is there must be complete (have its manifest).
    The prediction config is `config.json` in the folder when present, else the verified
    `improved/config.json` (the config the models were built and evaluated with).
    """
    d = Path(models_dir)
    models = Models(ae1=load_model(d / "ae1", "ae1"), kmeans=load_model(d / "kmeans", "kmeans"),
                    versions={"ae1": str(d / "ae1"), "kmeans": str(d / "kmeans")})
    calibration_path = Path(calibration_path or d / "calibration.json")
    if calibration_path.is_file():
        models.calibration = read_json(calibration_path)
    improved = d / "improved"
    if improved.is_dir():
        models.improved = load_model(improved, "improved")
        models.versions["improved"] = str(improved)
        if (improved / "config.json").is_file():
            try:
                models.config = json.loads(read_verified(improved, "config.json"))
            except ValueError as err:
                raise ModelFileError(f"{improved / 'config.json'}: not JSON ({err})") from None
    if stage2:
        models.ae2 = load_model(d / "ae2", "ae2")
        models.gmm = load_model(d / "gmm", "gmm")
        models.versions |= {"ae2": str(d / "ae2"), "gmm": str(d / "gmm")}
    if (d / "config.json").is_file():
        models.config = read_json(d / "config.json")
    return models


__all__ = ["MANIFEST", "autoencoder_from_file", "load_autoencoder", "load_model", "load_models"]
