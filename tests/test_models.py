import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stm_defects.config import load_params
from stm_defects.models import (
    AEConfig,
    ConvAutoencoder,
    SeededDropout,
    build_autoencoder,
    count_parameters,
    keras_parameter_count,
    load_checkpoint,
    save_checkpoint,
    set_dropout_generator,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Report, Appendix A, Table 1 (Keras count, BN moving mean/variance included).
AE1_PAPER_KERAS_PARAMS = 3_488_289
# 768 BN channels (128 + 256 + 256 + 128); torch keeps 2 of Keras' 4 per channel as buffers.
AE1_PAPER_TORCH_PARAMS = AE1_PAPER_KERAS_PARAMS - 2 * 768
# Table 2 as specified (conv 64/128/512, dense 256 -> 8); counted by hand layer by layer.
AE2_PAPER_KERAS_PARAMS = 5_671_945


def _patches(n: int, s: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, s, s, generator=g)


PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
_PAPER = load_params(PARAMS, profile="paper")
_DEFAULT = load_params(PARAMS, profile="default")
# The report's full-width models are params.yaml's `paper` profile; the default profile is slim.
CONFIGS = {
    "ae1_paper": _PAPER.ae1,
    "ae2_paper": _PAPER.ae2,
    "ae1_slim": _DEFAULT.ae1,
    "ae2_slim": _DEFAULT.ae2,
}


def test_paper_profile_configs():
    ae1, ae2 = CONFIGS["ae1_paper"], CONFIGS["ae2_paper"]
    assert isinstance(ae1, AEConfig) and isinstance(ae2, AEConfig)
    assert ae1.widths == (128, 256, 512)
    assert ae1.kernels == (3, 3, 3)
    assert ae1.encoder_norm == (True, True, False)
    assert ae1.hidden is None and ae1.latent == 32
    assert ae2.widths == (64, 128, 512)
    assert ae2.kernels == (5, 3, 3)
    assert ae2.encoder_norm == (True, True, True)
    assert ae2.hidden == 256 and ae2.latent == 8
    # the slim default profile keeps the topology with narrower convs
    assert CONFIGS["ae1_slim"].widths == CONFIGS["ae2_slim"].widths == (16, 32, 64)
    assert CONFIGS["ae2_slim"].hidden == 64


@pytest.mark.parametrize("name", ["ae1_paper", "ae2_paper", "ae1_slim", "ae2_slim"])
def test_shapes(name):
    model = build_autoencoder(CONFIGS[name]).eval()
    cfg = model.cfg
    x = _patches(2)
    with torch.no_grad():
        z = model.encode(x)
        r = model.decode(z)
        y = model(x)
    assert z.shape == (2, cfg.latent)
    assert r.shape == y.shape == (2, 1, 32, 32)
    assert torch.allclose(r, y)
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0


def test_paper_parameter_counts():
    ae1 = build_autoencoder(CONFIGS["ae1_paper"])
    assert keras_parameter_count(ae1) == AE1_PAPER_KERAS_PARAMS
    assert count_parameters(ae1) == AE1_PAPER_TORCH_PARAMS == 3_486_753
    ae2 = build_autoencoder(CONFIGS["ae2_paper"])
    assert keras_parameter_count(ae2) == AE2_PAPER_KERAS_PARAMS


def test_paper_ae1_layer_order():
    enc = build_autoencoder(CONFIGS["ae1_paper"]).encoder
    kinds = [type(m).__name__ for m in enc]
    assert kinds == [
        "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
        "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
        "Conv2d", "MaxPool2d",  # no BN/ReLU after the last encoder conv (Table 1)
        "SeededDropout", "Flatten", "Linear",
    ]  # fmt: skip
    assert enc[-1].in_features == 8192 and enc[-1].out_features == 32


def test_other_patch_size_and_depth():
    cfg = AEConfig(widths=(8, 16), kernels=(3, 5), encoder_norm=(True, True), latent=4, patch=16)
    model = build_autoencoder(cfg).eval()
    x = _patches(3, s=16)
    assert model.encode(x).shape == (3, 4)
    assert model(x).shape == (3, 1, 16, 16)


def test_from_dict():
    cfg = AEConfig.from_dict({"widths": [8, 16, 32], "kernels": [3, 3, 3], "latent": 5})
    assert cfg.widths == (8, 16, 32) and cfg.latent == 5
    assert AEConfig.from_dict(dataclasses.asdict(CONFIGS["ae2_paper"])) == CONFIGS["ae2_paper"]
    assert build_autoencoder({"latent": 7}).cfg.latent == 7
    with pytest.raises(ValueError, match="unknown AEConfig key.*'latnet'"):
        AEConfig.from_dict({"latnet": 8})
    with pytest.raises(ValueError, match="same length"):
        AEConfig(widths=(8, 16), kernels=(3, 3, 3), encoder_norm=(True, True))
    with pytest.raises(ValueError, match="divisible"):
        AEConfig(patch=36)
    with pytest.raises(ValueError, match="odd"):
        AEConfig(kernels=(3, 4, 3))
    with pytest.raises(TypeError, match="cannot build an autoencoder from str"):
        build_autoencoder("ae1_paper")  # profile names are gone: configs come from params.yaml


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = build_autoencoder(CONFIGS["ae1_slim"], seed=3)
    b = build_autoencoder(CONFIGS["ae1_slim"], seed=3)
    c = build_autoencoder(CONFIGS["ae1_slim"], seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for (ka, va), (_, vb), (_, vc) in zip(
        a.state_dict().items(), b.state_dict().items(), c.state_dict().items(), strict=True
    ):
        assert torch.equal(va, vb), ka
    assert not torch.equal(a.encoder[0].weight, c.encoder[0].weight)


def _blobs(n: int, s: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    c = torch.rand(n, 2, 1, 1, generator=g) * (s - 12) + 6
    w = torch.rand(n, 1, 1, generator=g) * 4 + 2
    img = torch.exp(-((yy - c[:, 0]) ** 2 + (xx - c[:, 1]) ** 2) / (2 * w**2))
    img = torch.where(img < 1e-4, 0.0, img)  # no denormals (they make CPU kernels crawl)
    return img[:, None].float()


def test_overfit_one_batch():
    model = build_autoencoder(CONFIGS["ae1_slim"], seed=0)
    x = _blobs(16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_gradients_reach_input():
    model = build_autoencoder(CONFIGS["ae2_slim"], seed=0).train()
    x = _patches(4).requires_grad_(True)
    F.mse_loss(model(x), torch.zeros_like(x)).backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_seeded_dropout():
    drop = SeededDropout(0.5).train()
    x = torch.ones(1000)
    set_dropout_generator(drop, torch.Generator().manual_seed(1))
    a = drop(x)
    set_dropout_generator(drop, torch.Generator().manual_seed(1))
    b = drop(x)
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 2.0} and 350 < int((a == 0).sum()) < 650
    set_dropout_generator(drop, None)
    assert drop.eval()(x).equal(x)


def test_checkpoint_round_trip(tmp_path):
    model = build_autoencoder(CONFIGS["ae2_slim"], seed=1)
    # make BN running statistics non-trivial
    model.train()
    with torch.no_grad():
        model(_patches(8, seed=5))
    model.eval()
    x = _patches(5, seed=2)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "sub" / "ae.pt"
    save_checkpoint(path, model, extra={"epoch": 3, "val_loss": 0.01, "profile": "ae2_slim"})
    loaded, meta = load_checkpoint(path)
    assert isinstance(loaded, ConvAutoencoder)
    assert not loaded.training
    assert loaded.cfg == model.cfg
    assert meta["version"] == 1 and meta["epoch"] == 3 and meta["profile"] == "ae2_slim"
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
        assert torch.equal(loaded.encode(x), model.encode(x))

    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"state_dict", "config", "version"}
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "bad.pt", model, extra={"config": {}})
