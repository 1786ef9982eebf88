"""`models.dense.encode_windows` returns the latents of window-by-window encoding.

The reference is `models.training.encode` on the extracted windows. Models are randomly
initialised with random BatchNorm statistics (so BatchNorm is not the identity), in eval mode.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from stm_defects.data.synth import SynthConfig, synth_scan
from stm_defects.image.windows import extract_windows, window_origins
from stm_defects.models import AEConfig, build_autoencoder
from stm_defects.models.cluster import make_kmeans
from stm_defects.models.dense import encode_windows, split_encoder
from stm_defects.models.training import encode
from stm_defects.paper.maps import character_map

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-4   # max |dense - per window| relative to the largest |latent|

AE1 = AEConfig.from_dict(yaml.safe_load((REPO / "params.yaml").read_text())["ae1"])   # slim AE1
ARCHS = {
    "ae1": AE1,
    # tests/tiny.py's model: one conv, 4 px windows (a 2x2 bottleneck: no interior class)
    "tiny": AEConfig(widths=(4,), kernels=(3,), encoder_norm=(True,), latent=2, patch=4),
    # AE2-shaped: 5x5 first kernel, BN+ReLU after every conv, a hidden dense layer
    "tiny_ae2": AEConfig(widths=(4, 8), kernels=(5, 3), encoder_norm=(True, True), latent=3,
                         hidden=6, patch=8),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(cfg: AEConfig, seed: int = 0) -> nn.Module:
    model = build_autoencoder(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.3, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.normal_(1.0, 0.3, generator=g)
                m.bias.normal_(0.0, 0.3, generator=g)
    return model.eval()


def _per_window(model, img, size, stride):
    patches, origins = extract_windows(img, size, stride)
    return encode(model, patches, device="cpu"), origins


def _rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def scan01() -> np.ndarray:
    """A synthetic Si(001) scan scaled to [0, 1] (odd size: the last windows are flush)."""
    h = synth_scan(SynthConfig(size=97), seed=3).height.astype(np.float32)
    return (h - h.min()) / (h.max() - h.min())


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("stride", [4, 8, 3])
@pytest.mark.parametrize("shape", [(67, 53), (45, 81)])
def test_dense_equals_per_window_random_images(arch, stride, shape):
    cfg = ARCHS[arch]
    model = _model(cfg)
    img = np.random.default_rng(sum(shape) + stride).random(shape, dtype=np.float32)
    ref, origins = _per_window(model, img, cfg.patch, stride)
    got = encode_windows(model, img, origins, cfg.patch, device="cpu")
    assert got.shape == ref.shape and got.dtype == np.float32
    assert _rel_err(got, ref) < RTOL


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("stride", [4, 8])
def test_dense_equals_per_window_synthetic_scan(arch, stride, scan01):
    cfg = ARCHS[arch]
    model = _model(cfg, seed=5)
    ref, origins = _per_window(model, scan01, cfg.patch, stride)
    got = encode_windows(model, scan01, origins, cfg.patch, device="cpu")
    assert _rel_err(got, ref) < RTOL


@pytest.mark.parametrize("stride", [4, 8])
def test_same_character_map_on_a_synthetic_scan(stride, scan01):
    model = _model(AE1, seed=2)
    enc = lambda p: encode(model, p, device="cpu")                      # noqa: E731
    dense = lambda img, org: encode_windows(model, img, org, AE1.patch, device="cpu")  # noqa: E731
    km = make_kmeans(6, seed=0)
    cmap, labels, origins = character_map(scan01, enc, km, size=AE1.patch, stride=stride)
    cmap_d, labels_d, origins_d = character_map(scan01, enc, km, size=AE1.patch, stride=stride,
                                                encode_windows_fn=dense)
    assert len(np.unique(labels)) > 1
    np.testing.assert_array_equal(origins_d, origins)
    np.testing.assert_array_equal(labels_d, labels)
    np.testing.assert_array_equal(cmap_d, cmap)


def test_tiles_and_arbitrary_origins_give_the_same_latents():
    """Few windows per tile (many tiles), and an origin list that is not a full grid, with
    repeats and out of order."""
    model = _model(AE1, seed=4)
    img = np.random.default_rng(0).random((90, 70), dtype=np.float32)
    rng = np.random.default_rng(1)
    origins = np.stack([rng.integers(0, 90 - 32 + 1, 16), rng.integers(0, 70 - 32 + 1, 16)], 1)
    origins = np.concatenate([origins, origins[:5]])
    patches = np.stack([img[r:r + 32, c:c + 32] for r, c in origins])[:, None]
    ref = encode(model, patches, device="cpu")
    for max_windows in (1, 50, 10_000):
        got = encode_windows(model, img, origins, 32, device="cpu", max_windows=max_windows)
        assert _rel_err(got, ref) < RTOL


def test_restores_train_mode_and_checks_windows():
    model = _model(ARCHS["tiny"]).train()
    img = np.random.default_rng(0).random((12, 12), dtype=np.float32)
    encode_windows(model, img, window_origins(img.shape, 4, 2), 4, device="cpu")
    assert model.training
    with pytest.raises(ValueError, match="inside the image"):
        encode_windows(model, img, np.array([[9, 0]]), 4, device="cpu")


def test_unsupported_trunk_falls_back_to_per_window():
    """A convolution that pads by reflection cannot be shared: windows are encoded one by one."""
    model = _model(ARCHS["tiny"])
    model.encoder[0] = nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")
    assert split_encoder(model) is None
    img = np.random.default_rng(0).random((20, 17), dtype=np.float32)
    ref, origins = _per_window(model, img, 4, 3)
    np.testing.assert_array_equal(encode_windows(model, img, origins, 4, device="cpu"), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dense_on_cuda_equals_per_window(scan01):
    """TF32 is switched off: with it, cuDNN's convolutions are only good to ~1e-3."""
    model = _model(AE1, seed=6)
    ref, origins = _per_window(model, scan01, AE1.patch, 4)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        got = encode_windows(model, scan01, origins, AE1.patch, device="cuda")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert _rel_err(got, ref) < RTOL
