"""A locally trained model set on disk (`<dir>/{ae1,kmeans,ae2,gmm,improved}`) -> `Models`.

Used by the stages (which read the models they declare as DVC deps) and by
`stm predict --models DIR`. The registry's counterpart is `mlops.tracking.load_registered`.

Each model folder holds its model in one file (`safe_models.MODEL_FILES`: `model.pt` for the
autoencoders, `kmeans.npz`, `gmm.npz`, `improved/state.npz`) and a `manifest.json` with the
sha256 of the files that are read back (`improved/config.json` too). Nothing is loaded from a
folder without a manifest, or from a file whose bytes differ from it; nothing is unpickled (see
`io.safe_models`), and the checkpoints are read with `torch.load(weights_only=True)`, when a method
first uses them.
"""

from __future__ import annotations

import io
import json
import zipfile
from functools import partial
from pathlib import Path

from stm_defects.io import safe_models
from stm_defects.io.files import read_json
from stm_defects.io.safe_models import MANIFEST, MODEL_FILES, ModelFileError, read_verified
from stm_defects.results import Deferred, Models

AUTOENCODERS = ("ae1", "ae2")


def autoencoder_from_bytes(data: bytes, where: str):
    """The autoencoder in checkpoint bytes ``data`` (weights only, eval mode), with no hash check:
    callers verify the bytes first. Bytes that are not a checkpoint are a ModelFileError naming
    ``where``."""
    from stm_defects.models.autoencoder import load_checkpoint

    try:
        model, _ = load_checkpoint(data)
    except Exception as err:  # noqa: BLE001 - truncated zips, foreign pickles, wrong keys: one refusal
        reason = str(err).splitlines()[0].split(". ")[0][:160] if str(err) else type(err).__name__
        raise ModelFileError(f"{where}: not a readable autoencoder checkpoint ({reason})") from None
    return model.eval()


def deferred_autoencoder(data: bytes, where: str) -> Deferred:
    """The autoencoder of verified checkpoint bytes, built (and torch imported) on first use.
    Bytes that are not even a zip archive (what `torch.save` writes) are refused now."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise ModelFileError(f"{where}: not a readable autoencoder checkpoint (not a torch zip archive)")
    return Deferred(partial(autoencoder_from_bytes, data, where), where)


def load_autoencoder(path: str | Path):
    """The autoencoder of checkpoint `path` (`<folder>/model.pt`), verified against
    `<folder>/manifest.json`."""
    path = Path(path)
    return autoencoder_from_bytes(read_verified(path.parent, path.name), str(path))


def load_model(folder: str | Path, key: str):
    """Model `key` ("ae1", "kmeans", "ae2", "gmm" or "improved") from its folder, verified
    against the folder's manifest; the scikit-learn parts from their safe `.npz`."""
    folder = Path(folder)
    name = MODEL_FILES[key]
    if key in AUTOENCODERS:
        return load_autoencoder(folder / name)
    return safe_models.loads(read_verified(folder, name), key, str(folder / name))


def deferred_estimator(data: bytes, key: str, where: str) -> Deferred:
    """The paper method's K-means or GMM of verified safe-format bytes: every check of the
    safe reader now (a bad or planted file is refused at load), built (and scikit-learn
    imported) on first use."""
    safe_models.check(data, key, where)
    return Deferred(partial(safe_models.loads, data, key, where), where)


def model_from_bytes(key: str, data: bytes, where: str):
    """Model ``key`` from verified file bytes, as a prediction holds it: the paper method's
    models (autoencoders, K-means, GMM) `Deferred`, the default method's state built."""
    if key in AUTOENCODERS:
        return deferred_autoencoder(data, where)
    if key in ("kmeans", "gmm"):
        return deferred_estimator(data, key, where)
    return safe_models.loads(data, key, where)


def _deferred_model(folder: Path, key: str):
    """`load_model`, with the paper method's models read and verified now but built on first use."""
    return model_from_bytes(key, read_verified(folder, MODEL_FILES[key]), str(folder / MODEL_FILES[key]))


def load_models(models_dir: str | Path, calibration_path: str | Path | None = None,
                stage2: bool = True) -> Models:
    """Load `<models_dir>/{ae1,kmeans}` (and `ae2`, `gmm` with `stage2`, `improved` when present).

    The paper method's files are verified now and its autoencoders and estimators built when it
    first asks for them (`results.Models.autoencoder`, `.estimator`): the default method never
    does, and imports neither torch nor scikit-learn.

    `improved/` is optional, but a folder that is there must be complete (have its manifest).
    The prediction config is `config.json` in the folder when present, else the verified
    `improved/config.json` (the config the models were built and evaluated with).
    """
    d = Path(models_dir)
    models = Models(ae1=_deferred_model(d / "ae1", "ae1"), kmeans=_deferred_model(d / "kmeans", "kmeans"),
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
        models.ae2 = _deferred_model(d / "ae2", "ae2")
        models.gmm = _deferred_model(d / "gmm", "gmm")
        models.versions |= {"ae2": str(d / "ae2"), "gmm": str(d / "gmm")}
    if (d / "config.json").is_file():
        models.config = read_json(d / "config.json")
    return models


__all__ = ["MANIFEST", "autoencoder_from_bytes", "deferred_autoencoder", "deferred_estimator", "load_autoencoder",
           "load_model", "load_models", "model_from_bytes"]
