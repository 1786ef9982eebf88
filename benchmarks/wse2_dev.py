"""Detection F1 on the labelled real WSe2 dev scans, with prediction-config overrides to compare.

    python benchmarks/wse2_dev.py --models models --params params.yaml
    python benchmarks/wse2_dev.py --models models improved.anomaly.threshold=4.5
    python benchmarks/wse2_dev.py --models runs/wse2/models --calibration name   # after
        stm train ../shared/data/real-labelled/wse2-dev/images --out runs/wse2 --field-from-name

Each JPEG of `../shared/data/real-labelled/wse2-dev/` is read with its field (``scan_nm`` of its
truth file, as `stm predict --scan-nm` would; or from its name, or none: ``--calibration``), analysed with the models' method and the given
overrides, and scored against the people's boxes (`analysis.boxes.score_boxes`: a prediction
matches a box when its centre is within max(w, h)/2 + 2 px, one to one; 95% bootstrap intervals
over scans; ARI and purity of the classes against the annotators' 8). The same numbers as `stm predict` per field + `stm evaluate`, in one process. A dev
set: look at it while changing the detector, never train on it, and confirm a gain on the
synthetic test splits (`benchmarks/generalisation.py --split test`) before believing it.
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

from stm_defects.analysis.boxes import score_boxes
from stm_defects.analysis.dispatch import analyse, image_pixel_nm, missing_on, preprocess_scan
from stm_defects.config import load_params, predict_config
from stm_defects.io.model_files import load_models
from stm_defects.io.scans import read_scan

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--models", default="models")
ap.add_argument("--params", default="params.yaml")
ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/real-labelled/wse2-dev"))
ap.add_argument("--calibration", choices=("truth", "name", "none"), default="truth",
                help="each scan's field from its truth file (as --scan-nm per field), from its name "
                     "(--field-from-name), or none (pixel units, as an uncalibrated JPEG)")
ap.add_argument("overrides", nargs="*", help="dotted.config.key=value")
args = ap.parse_args()
D = Path(args.data)
params = load_params(args.params)
cfg = predict_config(params)
for kv in args.overrides:
    k, v = kv.split("=")
    path = k.split(".")
    def rep(obj, path, val):
        if len(path) == 1:
            old = getattr(obj, path[0])
            if isinstance(old, bool):   # bool("false") is True
                if val.lower() not in ("true", "false", "1", "0"):
                    raise SystemExit(f"{k}: true or false, not {val!r}")
                new = val.lower() in ("true", "1")
            elif isinstance(old, tuple):
                new = tuple(float(x) for x in val.split(","))
            else:
                new = type(old)(val)
            return dataclasses.replace(obj, **{path[0]: new})
        return dataclasses.replace(obj, **{path[0]: rep(getattr(obj, path[0]), path[1:], val)})
    cfg = rep(cfg, path, v)
models = load_models(args.models)
pairs = []
t0 = time.time()
for tj in sorted((D / "truth").glob("*.json")):
    truth = json.loads(tj.read_text())
    how = {"truth": {"scan_nm": float(truth["scan_nm"][1])}, "name": {"field_from_name": True},
           "none": {}}[args.calibration]
    scan = read_scan(D / "images" / truth["image"], **how)
    img, scale = preprocess_scan(scan, cfg.preprocess)
    res = analyse(img, models, cfg, image_pixel_nm(scan, scale), missing_on(scan, img.shape))
    defects = [{"x": r["x"] / scale, "y": r["y"] / scale, "class": r.get("class")} for r in res.regions]
    pairs.append(({"image": truth["image"], "shape": list(scan.height.shape), "defects": defects}, truth))
out = score_boxes(pairs)
o = out["overall"]
print(" ".join(args.overrides) or "as configured", f"F1 {o['f1']:.3f} [{o['f1_ci'][0]:.2f},{o['f1_ci'][1]:.2f}] P {o['precision']:.3f} R {o['recall']:.3f}",
      "bins", " ".join(f"{b['label']}:{b['f1']:.2f}" for b in out["bins"]),
      "classes ARI {ari:.2f} purity {purity:.2f}".format(**out["classes"]), f"({time.time()-t0:.0f}s)")
