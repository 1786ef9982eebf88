"""The repo's params.yaml shrunk to seconds of CPU, shared by the tests that run the pipeline."""

from __future__ import annotations

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
