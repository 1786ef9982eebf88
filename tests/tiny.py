"""The repo's params.yaml shrunk to seconds of CPU, shared by the tests that run the pipeline."""

from __future__ import annotations

import contextlib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_raw(size: int) -> dict:
    """params.yaml (default profile) with 6 + 2 scans of `size` px, one-epoch autoencoders,
    minimal model grids, a low mask threshold and a two-point latent study."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["profile"] = "default"
    raw["data"].update(n_scans=6, n_hard=2)
    raw["synth"]["size"] = raw["synth_hard"]["size"] = size
    raw["validate"]["min_passed"] = 3
    raw["ae1_train"]["epochs"] = raw["ae2_train"]["epochs"] = 1
    raw["ae1_train"]["device"] = raw["ae2_train"]["device"] = "cpu"
    raw["kmeans"].update(k_range=[2, 4], k=3, sweep_sample=500)
    raw["gmm"].update(k_range=[2, 3], covariance_types=["diag", "full"], max_samples=500)
    raw["defect_patches"]["max_patches"] = 2000
    raw["mask"]["threshold"] = "p90"       # a low threshold: defect patches are sure to exist
    raw["tune"].update(ae1_latents=[8, 16], ae1_epochs=1, ae1_max_patches=200)
    return raw


def tiny_improved_state(seed: int = 0) -> dict:
    """An improved-analysis state shaped as `improved.method.fit_improved` returns it (a plain
    dict with one GaussianMixture inside `classes`), fitted in milliseconds on random features."""
    import numpy as np
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    z = rng.normal(size=(40, 2))
    return {"version": 1, "n_train_images": 2, "n_train_defects": 40,
            "classes": {"pca_mean": rng.normal(size=9), "pca_components": rng.normal(size=(2, 9)),
                        "pca_scale": np.ones(2), "gmm": GaussianMixture(2, random_state=seed).fit(z),
                        "component_class": np.array([0, 1], np.int64), "n_classes": 2,
                        "loglik_threshold": float("-inf"), "k": 2,
                        "selection": [{"k": 2, "bic": 12.5, "stability": 1.0}]}}


def tiny_models(folder: Path, seed: int = 0, config: dict | None = None) -> dict[str, Path]:
    """A complete model folder as `stm train` writes it (`ae1/ kmeans/ ae2/ gmm/ improved/`, each
    with its manifest, and `calibration.json`), with tiny models; returns key -> model file."""
    import json

    import numpy as np

    from stm_defects.io import safe_models
    from stm_defects.models import AEConfig, build_autoencoder, save_checkpoint
    from stm_defects.models.cluster import GMMSelector, make_kmeans

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    tiny = AEConfig(widths=(4,), kernels=(3,), encoder_norm=(True,), latent=2, patch=4)
    files = {}
    for i, key in enumerate(("ae1", "ae2")):
        (folder / key).mkdir(parents=True, exist_ok=True)
        files[key] = folder / key / "model.pt"
        save_checkpoint(files[key], build_autoencoder(tiny, seed=seed + i), extra={"which": key})
    fitted = {"kmeans": make_kmeans(3, seed=seed).fit(rng.normal(size=(60, 2)).astype(np.float32)),
              "gmm": GMMSelector(k_values=(2,), covariance_types=("diag",), random_state=seed).fit(
                  rng.normal(size=(40, 2))),
              "improved": tiny_improved_state(seed)}
    for key, model in fitted.items():
        files[key] = safe_models.save(folder / key / safe_models.MODEL_FILES[key], model, key)
    (folder / "improved" / "config.json").write_text(json.dumps(config or {"method": "improved"}))
    (folder / "calibration.json").write_text(json.dumps({"error_threshold": 0.1}))
    for key, path in files.items():
        names = [path.name] + (["config.json"] if key == "improved" else [])
        safe_models.write_manifest(path.parent, *names)
    return files


def with_fitted_classes(folder: Path, seed: int = 0) -> Path:
    """A tiny model folder whose improved state classifies real 25x25 canonical patches (fitted on
    random ones), so that predictions carry classes."""
    import numpy as np

    from stm_defects.improved.classify import ClassifyConfig, fit_classes
    from stm_defects.io import safe_models

    tiny_models(folder, seed=seed)
    rng = np.random.default_rng(seed)
    classes = fit_classes(rng.normal(size=(80, 25, 25)), ClassifyConfig(), seed=seed)
    state = {"version": 1, "n_train_images": 2, "n_train_defects": 80, "classes": classes}
    safe_models.save(folder / "improved" / "state.npz", state, "improved")
    safe_models.write_manifest(folder / "improved", "state.npz", "config.json")
    return folder


def blob_patches(n: int = 192, s: int = 32, seed: int = 0):
    """Smooth random blobs in [0, 1], (n, 1, s, s) float32: learnable, unlike white noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    c = rng.uniform(6, s - 6, size=(n, 2, 1, 1)).astype(np.float32)
    w = rng.uniform(2, 6, size=(n, 1, 1)).astype(np.float32)
    img = np.exp(-((yy - c[:, 0]) ** 2 + (xx - c[:, 1]) ** 2) / (2 * w**2))
    img += 0.05 * rng.standard_normal(img.shape).astype(np.float32)
    img = (img - img.min(axis=(1, 2), keepdims=True)) / np.ptp(img, axis=(1, 2), keepdims=True)
    return img[:, None].astype(np.float32)


@contextlib.contextmanager
def tiny_registry(root: Path, pipeline: str):
    """A SQLite store in ``root`` with a tiny model set (safe files) registered and promoted to
    Production; yields ``uri``, ``root``, ``files``, ``params``, ``versions``. While inside,
    MLFLOW_TRACKING_URI points at it and ``root`` is the working folder."""
    import json

    import pytest

    from stm_defects.config import predict_config, resolve
    from stm_defects.mlops.tracking import Tracker, promote

    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("STM_PIPELINE_RUN", pipeline)
        mp.chdir(root)
        params = resolve(yaml.safe_load((REPO / "params.yaml").read_text()))
        config = predict_config(params).to_dict()
        files = tiny_models(root / "models", config=config)
        tags = {"gmm": {"calibration": json.dumps({"error_threshold": 0.1})}, "improved": {"config": config}}
        with Tracker(params, "all") as tr:
            versions = {key: tr.register(key, path, tags.get(key)) for key, path in files.items()}
        promote(versions, "Production", force=True)
        yield {"uri": uri, "root": root, "files": files, "params": params, "versions": versions}
