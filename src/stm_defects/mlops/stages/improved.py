"""The default method's training stage: detect defects on the training scans, fit the classes.

Its output folder also holds `config.json`, the prediction config (`config.predict_config`) of
this run: the registered `stm-improved` version carries the same, so a model set predicts with
the settings it was built and evaluated with.
"""

from __future__ import annotations

from pathlib import Path

from stm_defects.io import safe_models
from stm_defects.io.files import fresh_dir, read_json, save_png, write_json
from stm_defects.mlops.lineage import data_version


def fit_improved(params, deps, outs, tracker, progress) -> dict:
    """Fit the improved analysis (defect classes) on the training scans -> `<model>/state.npz`."""
    import dataclasses

    from stm_defects.analysis.dispatch import image_pixel_nm, load_image, missing_on
    from stm_defects.analysis.gallery import gallery
    from stm_defects.config import predict_config
    from stm_defects.improved.method import fit_improved as fit
    from stm_defects.results import Models

    raw_dir, out = Path(deps["raw"]), fresh_dir(outs["model"])
    cfg = predict_config(params)
    names = read_json(deps["manifest"])["splits"]["train"]
    images, pixel_nms, missing = [], [], []
    with progress(len(names), "fit improved") as step:
        for name in names:
            scan, img, scale = load_image(raw_dir / name, cfg.preprocess, **params.scan_calibration.read_kwargs())
            images.append(img)
            pixel_nms.append(image_pixel_nm(scan, scale))
            missing.append(missing_on(scan, img.shape))
            step(1)
    state = fit(images, cfg.improved, params.seed, pixel_nms, missing)
    safe_models.save(out / "state.npz", state, "improved")
    write_json(out / "config.json", cfg.to_dict())
    # The gallery shows this method's classes whatever detector.method says.
    shown = dataclasses.replace(cfg, method="improved")
    save_png(out / "gallery.png", gallery(images[:8], Models(improved=state), shown, pixel_nms=pixel_nms[:8],
                                              missing=missing[:8]))
    classes = state.get("classes") or {}
    metrics = {"n_train_images": state["n_train_images"], "n_train_defects": state["n_train_defects"],
               "n_classes": classes.get("n_classes"), "k": classes.get("k")}
    write_json(out / "metrics.json", metrics)
    tracker.metrics(metrics, prefix="improved_")
    tracker.artifacts(out / "gallery.png", out / "config.json")
    safe_models.write_manifest(out, "state.npz", "config.json")     # last: the folder is complete
    tracker.register("improved", out / "state.npz",
                     {"data_version": data_version(raw_dir), "config": cfg.to_dict()})
    return metrics
