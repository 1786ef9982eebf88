import numpy as np
from scipy.special import expit

from stm_defects.image.preprocess import remove_scars
from stm_defects.improved.steps import (
    StepConfig,
    detect_steps,
    level_terraces,
    step_edges,
    step_profile,
    terrace_background,
)


def _staircase(n=192, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    edge = 0.5 * n + 0.1 * (xx - n / 2)                      # a slanted step at y ~ n/2
    z = expit((yy - edge) / 0.8)                            # one unit step, lower rows up
    z = z + 0.15 * np.cos(2 * np.pi * (xx * 0.6 + yy * 0.8) / 7.7)   # lattice
    z = z + 0.003 * xx                                       # tilt
    return (z + 0.05 * rng.standard_normal(z.shape)).astype(np.float32), edge


def test_step_found_and_terraces_levelled():
    z, edge = _staircase()
    e = step_edges(z, StepConfig())
    assert e.any()
    ys, xs = np.nonzero(e)
    assert np.median(np.abs(ys - edge[ys, xs])) <= 2.0
    terr = detect_steps(z, StepConfig())
    assert terr.n == 2
    lev = level_terraces(z, terr)
    means = [np.mean(lev[(terr.labels == k) & ~terr.band]) for k in range(2)]
    assert abs(means[0] - means[1]) < 0.05                    # the unit step is gone
    bg = terrace_background(lev, terr, 8.0)
    assert np.std((lev - bg)[~terr.band]) < 0.2


def test_flat_image_has_no_steps():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((128, 128)).astype(np.float32)
    terr = detect_steps(z)
    assert terr.n == 1 and not terr.band.any()
    assert not step_profile(z, terr).any()


def test_remove_scars_keeps_steps():
    z, _ = _staircase()
    scarred = z.copy()
    scarred[40, 20:70] += 2.0
    cfg = StepConfig()  # the detector removes scars with its own k / min_length
    out = remove_scars(scarred, cfg.scar_k, cfg.scar_min_length)
    assert np.abs(out[40, 20:70] - z[40, 20:70]).max() < 0.5
    far = np.ones(z.shape, bool)
    far[37:44] = False
    assert np.allclose(out[far], scarred[far])
