import numpy as np
import pytest
import torch

from stm_defects.models import AEConfig, build_autoencoder
from stm_defects.models.training import (
    History,
    TrainConfig,
    d4_augment,
    encode,
    encode_and_reconstruct,
    evaluate_mse,
    fit_autoencoder,
    reconstruct,
    resolve_device,
)
from tiny import blob_patches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# The slim CPU autoencoders of params.yaml's default profile.
AE1_SLIM = AEConfig(widths=(16, 32, 64), kernels=(3, 3, 3), encoder_norm=(True, True, False), latent=32)
AE2_SLIM = AEConfig(widths=(16, 32, 64), kernels=(5, 3, 3), encoder_norm=(True, True, True), latent=8, hidden=64)

FAST = TrainConfig(epochs=3, batch_size=48, lr=2e-3, device="cpu")


def _same_state(a, b) -> bool:
    return all(torch.equal(va, vb) for va, vb in zip(a.values(), b.values(), strict=True))


def test_train_config():
    assert TrainConfig.from_dict({"epochs": 2, "augment": "d4"}).augment == "d4"
    assert TrainConfig().bf16 is False
    with pytest.raises(ValueError, match="unknown TrainConfig key.*'epoch'"):
        TrainConfig.from_dict({"epoch": 2})
    with pytest.raises(ValueError, match="augment"):
        TrainConfig(augment="flip")
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=1.0)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_fit_is_deterministic_and_leaves_global_rng_alone():
    x = blob_patches(106)
    rng_state = torch.get_rng_state()
    runs = []
    for _ in range(2):
        model = build_autoencoder(AE1_SLIM, seed=0)
        calls = []
        hist = fit_autoencoder(model, x, FAST, seed=7, on_epoch=lambda *a, c=calls: c.append(a))
        runs.append((hist, model.state_dict(), calls))
    assert torch.equal(torch.get_rng_state(), rng_state)
    (h1, s1, c1), (h2, s2, c2) = runs
    assert isinstance(h1, History)
    assert h1.train_loss == h2.train_loss and h1.val_loss == h2.val_loss
    assert _same_state(s1, s2)
    assert c1 == c2 and len(c1) == 3
    assert [c[0] for c in c1] == [0, 1, 2]
    assert [c[1:] for c in c1] == list(zip(h1.train_loss, h1.val_loss, h1.lr, strict=True))
    assert h1.train_loss[-1] < h1.train_loss[0]
    assert h1.seconds > 0 and h1.patches_per_s > 0
    assert h1.best_val_loss == min(h1.val_loss) and h1.val_loss[h1.best_epoch] == h1.best_val_loss

    model = build_autoencoder(AE1_SLIM, seed=0)
    h3 = fit_autoencoder(model, x, FAST, seed=8)
    assert h3.train_loss != h1.train_loss


def test_early_stopping_restores_best_weights():
    x = blob_patches(128)
    # an absurd learning rate makes the val loss stop improving after the first epochs
    cfg = TrainConfig(
        epochs=12, batch_size=32, lr=5.0, early_stopping_patience=2, lr_patience=50, device="cpu"
    )
    model = build_autoencoder(AE1_SLIM, seed=0)
    snapshots = []
    hist = fit_autoencoder(
        model,
        x,
        cfg,
        seed=0,
        on_epoch=lambda *a: snapshots.append({k: v.clone() for k, v in model.state_dict().items()}),
    )
    assert hist.stop_reason == "early_stopping"
    assert hist.epochs_run == hist.best_epoch + 1 + cfg.early_stopping_patience < cfg.epochs
    assert hist.best_val_loss == min(hist.val_loss)
    assert _same_state(model.state_dict(), snapshots[hist.best_epoch])
    assert not _same_state(model.state_dict(), snapshots[-1])
    assert not model.training


def test_should_stop_and_lr_schedule():
    x = blob_patches(96)
    seen = []

    def should_stop(epoch, val_loss):
        seen.append((epoch, val_loss))
        return epoch == 1

    cfg = TrainConfig(epochs=10, batch_size=32, device="cpu", lr_patience=0, lr_factor=0.5)
    hist = fit_autoencoder(build_autoencoder(AE1_SLIM, seed=0), x, cfg, seed=0, should_stop=should_stop)
    assert hist.stop_reason == "should_stop"
    assert hist.epochs_run == 2 and [e for e, _ in seen] == [0, 1]
    assert [v for _, v in seen] == hist.val_loss
    assert hist.lr[0] == cfg.lr


def test_no_validation_split():
    x = blob_patches(64)
    cfg = TrainConfig(epochs=2, batch_size=32, val_fraction=0.0, device="cpu")
    hist = fit_autoencoder(build_autoencoder(AE2_SLIM, seed=0), x, cfg, seed=0)
    assert hist.val_loss == hist.train_loss


def test_d4_augment():
    x = torch.arange(6 * 16, dtype=torch.float32).reshape(6, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    y = d4_augment(x, g)
    assert y.shape == x.shape and y.dtype == x.dtype
    for xi, yi in zip(x, y, strict=True):
        images = [torch.rot90(v, k, (-2, -1)) for v in (xi, xi.flip(-1)) for k in range(4)]
        assert any(torch.equal(yi, im) for im in images)
    assert torch.equal(y, d4_augment(x, torch.Generator().manual_seed(0)))
    big = torch.rand(64, 1, 8, 8)
    assert not torch.equal(d4_augment(big, g), big)

    cfg = TrainConfig(epochs=2, batch_size=32, augment="d4", device="cpu")
    h1 = fit_autoencoder(build_autoencoder(AE1_SLIM, seed=0), blob_patches(96), cfg, seed=1)
    h2 = fit_autoencoder(build_autoencoder(AE1_SLIM, seed=0), blob_patches(96), cfg, seed=1)
    assert h1.train_loss == h2.train_loss and np.isfinite(h1.train_loss).all()


def test_inference_helpers():
    x = blob_patches(70)
    model = build_autoencoder(AE2_SLIM, seed=0)
    model.train()
    z = encode(model, x, batch_size=32, device="cpu")
    r = reconstruct(model, x, batch_size=32, device="cpu")
    z2, r2 = encode_and_reconstruct(model, x, batch_size=1000, device="cpu", channels_last=False)
    assert model.training  # mode restored
    conv = model.encoder[4].weight  # (32, 16, 3, 3): NCHW again after channels_last inference
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
    assert z.shape == (70, 8) and z.dtype == np.float32
    assert r.shape == (70, 1, 32, 32) and r.dtype == np.float32
    np.testing.assert_allclose(z, z2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r, r2, rtol=1e-4, atol=1e-5)
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(r, expected, rtol=1e-4, atol=1e-5)
    mse = evaluate_mse(model, x, device="cpu")
    assert mse == pytest.approx(float(((r - x) ** 2).mean()), rel=1e-4)
    assert encode(model, x[:0], device="cpu").shape == (0, 8)

    zb = encode(model, x[:16], device="cpu", bf16=True)
    rel = np.linalg.norm(zb - z[:16], axis=1) / np.linalg.norm(z[:16], axis=1)
    assert rel.max() < 0.05


def test_trained_model_checkpoint_round_trip(tmp_path):
    from stm_defects.models import load_checkpoint, save_checkpoint

    x = blob_patches(64)
    model = build_autoencoder(AE1_SLIM, seed=0)
    hist = fit_autoencoder(model, x, TrainConfig(epochs=1, batch_size=32, device="cpu"), seed=0)
    save_checkpoint(tmp_path / "ae.pt", model, extra={"history": hist.to_dict()})
    loaded, meta = load_checkpoint(tmp_path / "ae.pt")
    assert meta["history"]["train_loss"] == hist.train_loss
    np.testing.assert_array_equal(encode(loaded, x, device="cpu"), encode(model, x, device="cpu"))
