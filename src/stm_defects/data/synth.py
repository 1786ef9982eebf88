"""Synthetic Si(001)-2x1 STM topography with exact ground truth.

The generator builds a scan in two stages:

1. **Geometry** (the ground truth): a staircase of meandering monatomic
   steps (0.136 nm), 2x1 dimer rows whose direction rotates by 90 degrees on
   every terrace (alternating SA/SB steps), and point/extended defects of
   five morphologically distinct classes placed on lattice sites away from
   step edges.
2. **Acquisition artefacts**, as a raw constant-current image would have
   them: a mild tip convolution, an optional tip change from some scan line
   on, plane tilt, per-line offsets (random walk plus jumps), scars along the
   fast scan direction (x), and white plus 1/f noise generated in raster
   (time) order at a sampled lattice-corrugation-to-noise ratio.

All functions are pure: randomness comes only from the ``seed`` argument
(through :class:`numpy.random.Generator`), nothing is printed or written.
Heights are in nanometres; x is the column and y the row index (0-based).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, special

from stm_defects.io.files import jsonable

__all__ = [
    "DEFECT_CLASSES",
    "HARD",
    "SI001_DIMER_SPACING_NM",
    "SI001_ROW_PERIOD_NM",
    "SI001_STEP_HEIGHT_NM",
    "SynthConfig",
    "SynthScan",
    "synth_scan",
    "truth_dict",
]

# --- Si(001) constants -------------------------------------------------------
SI001_ROW_PERIOD_NM = 0.768  #: dimer-row period (2 x 0.384 nm)
SI001_DIMER_SPACING_NM = 0.384  #: dimer spacing along a row
SI001_STEP_HEIGHT_NM = 0.136  #: monatomic step height (a/4)

DEFECT_CLASSES: tuple[str, ...] = (
    "dangling_bond",
    "dimer_vacancy",
    "adsorbate",
    "c_type",
    "cluster",
)

# Appearance of the clean surface (filled-state imaging).
_ROW_AMPLITUDE_NM = 0.06  # peak-to-trough corrugation across the rows
_DIMER_MODULATION = 0.18  # relative modulation along a row (one dimer / period)
_STEP_WIDTH_NM = 0.12  # logistic width of the apparent step edge
_TIP_BLUR_NM = (0.05, 0.08)  # range of the base tip-convolution sigma
_STEP_KEEPOUT_PX = 3.0  # extra clearance between a defect's extent and a step


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the synthetic Si(001) scan generator.

    Ranges are inclusive ``(low, high)`` tuples sampled uniformly per scan.
    """

    size: int = 512
    pixel_nm: float = 0.1
    n_steps: tuple[int, int] = (0, 3)
    defects_per_100nm2: tuple[float, float] = (1.2, 3.0)
    snr: tuple[float, float] = (2.0, 6.0)
    tilt_nm_per_px: float = 0.002
    line_offset_nm: float = 0.02
    scar_prob: float = 0.3
    tip_change_prob: float = 0.15
    min_defect_distance_px: int = 20
    #: relative frequency of each entry of DEFECT_CLASSES
    class_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    #: fraction of the noise variance that is 1/f (rest is white)
    pink_fraction: float = 0.4
    #: dimer-row angle of terrace 0 in degrees from the x axis; None = random
    row_angle_deg: float | None = None


HARD = SynthConfig(
    n_steps=(1, 4),
    snr=(0.8, 2.0),
    tilt_nm_per_px=0.004,
    line_offset_nm=0.05,
    scar_prob=0.8,
    tip_change_prob=0.5,
    pink_fraction=0.5,
)


@dataclass(frozen=True)
class SynthScan:
    """One synthetic scan and its ground truth.

    ``height`` carries all acquisition artefacts; ``defects``, ``step_mask``
    and ``terraces`` describe the underlying geometry only.
    """

    height: np.ndarray
    pixel_nm: float
    defects: list[dict]
    step_mask: np.ndarray
    terraces: np.ndarray
    meta: dict = field(default_factory=dict)


# --- small helpers -----------------------------------------------------------


def _smooth_curve(rng: np.random.Generator, n: int, corr: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random 1-D signal with correlation length ``corr`` samples."""
    pad = int(4 * corr) + 1
    x = rng.standard_normal(n + 2 * pad)
    x = ndimage.gaussian_filter1d(x, corr, mode="wrap")[pad : pad + n]
    x -= x.mean()
    s = x.std()
    return x / s if s > 0 else x


def _pink_noise_1d(rng: np.random.Generator, n: int, f_min: float) -> np.ndarray:
    """Unit-std noise with a 1/f power spectrum above ``f_min`` (cycles/sample)."""
    spec = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)
    f = np.fft.rfftfreq(n)
    amp = np.zeros_like(f)
    ok = f >= f_min
    amp[ok] = 1.0 / np.sqrt(f[ok])
    x = np.fft.irfft(spec * amp, n)
    s = x.std()
    return x / s if s > 0 else x


# --- geometry ----------------------------------------------------------------


@dataclass
class _Steps:
    dist_nm: np.ndarray  # (n_steps, H, W) signed distance, >0 on the lower side
    is_sa: list[bool]


def _make_steps(
    rng: np.random.Generator,
    xx_nm: np.ndarray,
    yy_nm: np.ndarray,
    n_steps: int,
    step_angle: float,
    parity0: int,
    pixel_nm: float,
) -> _Steps:
    """Meandering step edges running on average along ``step_angle``.

    Step k separates terrace k (upper) from terrace k+1 (lower). Terrace j has
    rows along the step direction when (j + parity0) is even; the step below
    such a terrace is an SA step (smooth), otherwise SB (rough, larger
    meander), as on real Si(001).
    """
    H, W = xx_nm.shape
    if n_steps == 0:
        return _Steps(np.zeros((0, H, W), np.float32), [])
    e = np.array([math.cos(step_angle), math.sin(step_angle)])
    nrm = np.array([-e[1], e[0]])
    u = xx_nm * nrm[0] + yy_nm * nrm[1]
    v = xx_nm * e[0] + yy_nm * e[1]
    corners_u = [
        c[0] * nrm[0] + c[1] * nrm[1]
        for c in ((0, 0), (xx_nm[0, -1], 0), (0, yy_nm[-1, 0]), (xx_nm[0, -1], yy_nm[-1, 0]))
    ]
    corners_v = [
        c[0] * e[0] + c[1] * e[1]
        for c in ((0, 0), (xx_nm[0, -1], 0), (0, yy_nm[-1, 0]), (xx_nm[0, -1], yy_nm[-1, 0]))
    ]
    umin, umax = min(corners_u), max(corners_u)
    vmin, vmax = min(corners_v) - 1.0, max(corners_v) + 1.0
    span = umax - umin
    # sample the meander on a fine 1-D grid along v (0.05 nm)
    dv = 0.05
    nv = math.ceil((vmax - vmin) / dv) + 2
    vgrid = vmin + dv * np.arange(nv)
    lo, hi = umin + 0.12 * span, umax - 0.12 * span
    pitch = (hi - lo) / n_steps
    base = lo + pitch * (np.arange(n_steps) + 0.5 + rng.uniform(-0.3, 0.3, n_steps))
    curves = []
    is_sa = []
    for k in range(n_steps):
        sa = (k + parity0) % 2 == 0
        is_sa.append(sa)
        cap = 0.18 * pitch  # meander std never exceeds ~1/5 of the terrace width
        if sa:  # SA: smooth, gently undulating
            m = min(rng.uniform(0.3, 0.8), cap) * _smooth_curve(rng, nv, rng.uniform(4.0, 8.0) / dv)
        else:  # SB: rough, kinked, larger excursions
            m = min(rng.uniform(0.8, 1.6), cap) * _smooth_curve(rng, nv, rng.uniform(1.5, 3.0) / dv)
            m += rng.uniform(0.15, 0.3) * _smooth_curve(rng, nv, 0.4 / dv)
        curves.append(base[k] + m)
    curves_arr = np.array(curves)
    # keep steps ordered with at least ~1.5 nm between neighbours
    min_gap = min(1.5, 0.5 * pitch)
    for k in range(1, n_steps):
        curves_arr[k] = np.maximum(curves_arr[k], curves_arr[k - 1] + min_gap)
    dist = np.empty((n_steps, H, W), np.float32)
    vflat = v.ravel()
    for k in range(n_steps):
        c = curves_arr[k]
        slope = np.gradient(c, dv)
        b = np.interp(vflat, vgrid, c).reshape(H, W)
        sl = np.interp(vflat, vgrid, slope).reshape(H, W)
        dist[k] = (u - b) / np.sqrt(1.0 + sl * sl)
    return _Steps(dist, is_sa)


def _lattice(
    xx_nm: np.ndarray,
    yy_nm: np.ndarray,
    row_angle: np.ndarray,
    phase_t: np.ndarray,
    phase_s: np.ndarray,
) -> np.ndarray:
    """Filled-state 2x1 dimer-row corrugation (0 = trough level).

    ``row_angle``, ``phase_t`` and ``phase_s`` are per-pixel arrays (per
    terrace values looked up by terrace index).
    """
    f32 = np.float32
    c, s_ = np.cos(row_angle).astype(f32), np.sin(row_angle).astype(f32)
    s = xx_nm * c + yy_nm * s_  # along the row
    t = -xx_nm * s_ + yy_nm * c  # across the rows
    across = f32(0.5) * (f32(1.0) + np.cos(f32(2 * np.pi) * (t * f32(1 / SI001_ROW_PERIOD_NM) - phase_t)))
    across = across * np.sqrt(across)  # ~cos^3: slightly narrower, darker troughs
    along = f32(1.0) + f32(_DIMER_MODULATION) * np.cos(
        f32(2 * np.pi) * (s * f32(1 / SI001_DIMER_SPACING_NM) - phase_s)
    )
    return (f32(_ROW_AMPLITUDE_NM / (1.0 + _DIMER_MODULATION)) * across * along).astype(f32)


# --- defects -----------------------------------------------------------------


def _defect_radius_nm(cls: str, rng: np.random.Generator) -> tuple[float, dict]:
    """Sample per-defect shape parameters; return (extent radius in nm, params)."""
    if cls == "dangling_bond":
        p = {"sigma": rng.uniform(0.30, 0.36), "h": rng.uniform(0.14, 0.20), "side": rng.choice([-1.0, 1.0])}
        return 0.65, p
    if cls == "dimer_vacancy":
        n = int(rng.choice([1, 2, 2, 3]))
        p = {"n": n, "depth": rng.uniform(0.03, 0.05)}
        return 0.5 * (n * SI001_DIMER_SPACING_NM + 0.35) + 0.3, p
    if cls == "adsorbate":
        p = {
            "len": rng.uniform(1.1, 1.6),
            "wid": rng.uniform(0.20, 0.26),
            "h": rng.uniform(0.10, 0.15),
            "in_trough": bool(rng.random() < 0.5),
        }
        return 0.5 * p["len"] + 0.3, p
    if cls == "c_type":
        p = {"side": rng.choice([-1.0, 1.0]), "h": rng.uniform(0.08, 0.11), "d": rng.uniform(0.05, 0.07)}
        return 0.8, p
    if cls == "cluster":
        r = rng.uniform(1.0, 1.4)  # blob radius (2-3 nm across with tails)
        nb = int(rng.integers(5, 10))
        ang = rng.uniform(0, 2 * np.pi, nb)
        rad = r * 0.55 * np.sqrt(rng.uniform(0, 1, nb))
        p = {
            "r": r,
            "bx": rad * np.cos(ang),
            "by": rad * np.sin(ang),
            "bs": rng.uniform(0.3, 0.5, nb) * r,
            "bh": rng.uniform(0.6, 1.0, nb),
            "h": rng.uniform(0.2, 0.35),
        }
        return r + 0.3, p
    raise ValueError(f"unknown defect class {cls!r}")


def _render_defect(
    lat: np.ndarray,
    add: np.ndarray,
    cls: str,
    p: dict,
    cx: float,
    cy: float,
    row_angle: float,
    pixel_nm: float,
    rad_px: float,
) -> None:
    """Apply one defect in place: multiplicative changes to ``lat``, additive to ``add``."""
    H, W = lat.shape
    R = math.ceil(rad_px * 1.8) + 2
    y0, y1 = max(0, int(cy) - R), min(H, int(cy) + R + 1)
    x0, x1 = max(0, int(cx) - R), min(W, int(cx) + R + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dx = (xx - cx) * pixel_nm
    dy = (yy - cy) * pixel_nm
    c, s_ = math.cos(row_angle), math.sin(row_angle)
    s = dx * c + dy * s_  # along the local row
    t = -dx * s_ + dy * c  # across the local rows
    sl = (slice(y0, y1), slice(x0, x1))
    if cls == "dangling_bond":
        tt = t - p["side"] * 0.08
        g = np.exp(-(s * s + tt * tt) / (2 * p["sigma"] ** 2))
        add[sl] += p["h"] * g
    elif cls == "dimer_vacancy":
        half = 0.5 * (p["n"] * SI001_DIMER_SPACING_NM + 0.35)
        ms = special.expit((half - np.abs(s)) / 0.07)
        mt = np.exp(-(t * t) / (2 * 0.21**2))
        m = (ms * mt).astype(np.float32)
        lat[sl] *= 1.0 - m
        add[sl] -= p["depth"] * m
    elif cls == "adsorbate":
        tt = t - (0.5 * SI001_ROW_PERIOD_NM if p["in_trough"] else 0.0)
        a = (2.0 * s / p["len"]) ** 2
        g = np.exp(-(a**2)) * np.exp(-(tt * tt) / (2 * p["wid"] ** 2))  # flat-topped bar
        if p["in_trough"]:
            lat[sl] *= 1.0 - 0.3 * g.astype(np.float32)
        add[sl] += p["h"] * g
    elif cls == "c_type":
        sd = p["side"]
        gb = np.exp(-((s / 0.30) ** 2 + ((t - sd * 0.34) / 0.24) ** 2) / 2)
        gd = np.exp(-((s / 0.30) ** 2 + ((t + sd * 0.12) / 0.22) ** 2) / 2)
        lat[sl] *= 1.0 - 0.7 * gd.astype(np.float32)
        add[sl] += p["h"] * gb - p["d"] * gd
    elif cls == "cluster":
        z = np.zeros_like(dx)
        for bx, by, bs, bh in zip(p["bx"], p["by"], p["bs"], p["bh"]):
            z = np.maximum(z, bh * np.exp(-((dx - bx) ** 2 + (dy - by) ** 2) / (2 * bs * bs)))
        lat[sl] *= (1.0 - np.clip(2.0 * z, 0, 1)).astype(np.float32)
        add[sl] += p["h"] * z
    else:  # pragma: no cover - guarded by _defect_radius_nm
        raise ValueError(cls)


def _snap_to_lattice(
    cls: str, p: dict, x: float, y: float, row_angle: float, ph_t: float, ph_s: float, pixel_nm: float
) -> tuple[float, float]:
    """Move a tentative centre onto the nearest sensible lattice site of its terrace."""
    c, s_ = math.cos(row_angle), math.sin(row_angle)
    X, Y = x * pixel_nm, y * pixel_nm
    s = X * c + Y * s_
    t = -X * s_ + Y * c
    a, b = SI001_ROW_PERIOD_NM, SI001_DIMER_SPACING_NM
    t_row = (np.round(t / a - ph_t) + ph_t) * a  # nearest row centre
    s_dim = (np.round(s / b - ph_s) + ph_s) * b  # nearest dimer
    if cls == "dimer_vacancy" and p["n"] % 2 == 0:
        s_dim += 0.5 * b  # even number of dimers: centre between two dimers
    if cls == "cluster":
        return x, y
    t_new, s_new = t_row, s_dim
    Xn = s_new * c - t_new * s_
    Yn = s_new * s_ + t_new * c
    return float(Xn / pixel_nm), float(Yn / pixel_nm)


# --- main entry point --------------------------------------------------------


def synth_scan(cfg: SynthConfig, seed: int) -> SynthScan:
    """Generate one synthetic raw Si(001) STM scan and its ground truth."""
    if len(cfg.class_weights) != len(DEFECT_CLASSES):
        raise ValueError("class_weights must have one entry per DEFECT_CLASSES")
    rng = np.random.default_rng(seed)
    N = int(cfg.size)
    px = float(cfg.pixel_nm)
    yy, xx = np.mgrid[0:N, 0:N].astype(np.float32)
    xx_nm, yy_nm = xx * px, yy * px

    # ---- geometry: steps and terraces ----
    n_steps = int(rng.integers(cfg.n_steps[0], cfg.n_steps[1] + 1))
    if cfg.row_angle_deg is None:
        phi0 = float(rng.uniform(0.0, np.pi))
    else:
        phi0 = math.radians(cfg.row_angle_deg)
    parity0 = int(rng.integers(0, 2))
    step_angle = phi0 + math.radians(rng.uniform(-6.0, 6.0))  # steps along <110>, small misorientation
    steps = _make_steps(rng, xx_nm, yy_nm, n_steps, step_angle, parity0, px)
    if n_steps:
        terraces = (steps.dist_nm > 0).sum(axis=0).astype(np.int32)
        step_height = SI001_STEP_HEIGHT_NM * special.expit(steps.dist_nm / _STEP_WIDTH_NM).sum(axis=0)
        dmin_px = np.abs(steps.dist_nm).min(axis=0) / px
        step_mask = dmin_px <= 2.0
    else:
        terraces = np.zeros((N, N), np.int32)
        step_height = np.zeros((N, N), np.float32)
        dmin_px = np.full((N, N), np.inf, np.float32)
        step_mask = np.zeros((N, N), bool)
    n_terr = n_steps + 1
    terr_angle = phi0 + (np.pi / 2) * ((np.arange(n_terr) + parity0) % 2)
    terr_pht = rng.uniform(0, 1, n_terr)  # row shift per terrace
    terr_phs = rng.uniform(0, 1, n_terr)
    lat = _lattice(
        xx_nm,
        yy_nm,
        terr_angle.astype(np.float32)[terraces],
        terr_pht.astype(np.float32)[terraces],
        terr_phs.astype(np.float32)[terraces],
    )
    corrugation_std = float(lat.std())

    # ---- defects ----
    area_100nm2 = (N * px) ** 2 / 100.0
    density = float(rng.uniform(*cfg.defects_per_100nm2))
    n_target = round(density * area_100nm2)
    w = np.asarray(cfg.class_weights, float)
    w = w / w.sum()
    defects: list[dict] = []
    add = np.zeros((N, N), np.float32)
    placed: list[tuple[float, float, float]] = []
    attempts = 0
    while len(defects) < n_target and attempts < 60 * max(n_target, 1):
        attempts += 1
        cid = int(rng.choice(len(DEFECT_CLASSES), p=w))
        cls = DEFECT_CLASSES[cid]
        rad_nm, prm = _defect_radius_nm(cls, rng)
        rad_px = rad_nm / px
        margin = rad_px + 2.0
        x = float(rng.uniform(margin, N - 1 - margin))
        y = float(rng.uniform(margin, N - 1 - margin))
        ti = int(terraces[round(y), round(x)])
        x, y = _snap_to_lattice(
            cls, prm, x, y, float(terr_angle[ti]), float(terr_pht[ti]), float(terr_phs[ti]), px
        )
        if not (margin <= x <= N - 1 - margin and margin <= y <= N - 1 - margin):
            continue
        iy, ix = round(y), round(x)
        if int(terraces[iy, ix]) != ti:
            continue
        if dmin_px[iy, ix] < rad_px + _STEP_KEEPOUT_PX:
            continue
        ok = True
        for qx, qy, qr in placed:
            if math.hypot(qx - x, qy - y) < max(cfg.min_defect_distance_px, qr + rad_px + 2.0):
                ok = False
                break
        if not ok:
            continue
        _render_defect(lat, add, cls, prm, x, y, float(terr_angle[ti]), px, rad_px)
        placed.append((x, y, rad_px))
        defects.append(
            {
                "x": x,
                "y": y,
                "class": cls,
                "class_id": cid,
                "radius_px": float(rad_px),
                "terrace": ti,
                "row_angle_deg": float(math.degrees(terr_angle[ti]) % 180.0),
            }
        )

    # clean topography (tip-convolved)
    z = (lat + add - step_height).astype(np.float32)
    tip_sigma_px = float(rng.uniform(*_TIP_BLUR_NM)) / px
    z = ndimage.gaussian_filter(z, tip_sigma_px, mode="nearest")

    # ---- artefacts ----
    tip_change_row = None
    tip_change = None
    if rng.random() < cfg.tip_change_prob:
        tip_change_row = int(rng.integers(N // 8, N - N // 8))
        extra_sigma = float(rng.uniform(0.06, 0.14)) / px
        dz = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.03, 0.12))
        worse_after = bool(rng.random() < 0.7)  # usually the tip degrades
        zb = ndimage.gaussian_filter(z, extra_sigma, mode="nearest")
        if worse_after:
            z[tip_change_row:] = zb[tip_change_row:] + dz
        else:
            z[:tip_change_row] = zb[:tip_change_row] - dz
        tip_change = {"row": tip_change_row, "blur_px": extra_sigma, "dz_nm": dz, "worse_after": worse_after}

    snr = float(rng.uniform(*cfg.snr))
    noise_std = corrugation_std / snr if snr > 0 else 0.0
    pf = float(np.clip(cfg.pink_fraction, 0.0, 1.0))
    white = rng.standard_normal(N * N)
    pink = _pink_noise_1d(rng, N * N, f_min=1.0 / N)
    noise = noise_std * (math.sqrt(1 - pf) * white + math.sqrt(pf) * pink)
    z += noise.reshape(N, N).astype(np.float32)

    # plane tilt
    ax, ay = rng.uniform(-cfg.tilt_nm_per_px, cfg.tilt_nm_per_px, 2)
    z += (ax * (xx - N / 2) + ay * (yy - N / 2)).astype(np.float32)
    z += float(rng.uniform(-1.0, 1.0))  # arbitrary absolute z offset

    # per-line offsets: independent jitter + slow random walk + a few jumps
    lo = cfg.line_offset_nm
    offs = lo * (0.5 * rng.standard_normal(N) + np.cumsum(0.3 * rng.standard_normal(N)))
    n_jumps = int(rng.poisson(1.5))
    for _ in range(n_jumps):
        r = int(rng.integers(1, N))
        offs[r:] += lo * rng.standard_normal() * 3.0
    z += offs[:, None].astype(np.float32)

    # scars along the fast scan direction
    scars = []
    if rng.random() < cfg.scar_prob:
        for _ in range(int(rng.integers(1, 5))):
            r = int(rng.integers(0, N))
            length = int(rng.integers(10, 61))
            c0 = int(rng.integers(0, max(1, N - length)))
            amp = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.05, 0.25))
            thick = int(rng.integers(1, 3))
            prof = np.ones(length)
            ramp = min(3, length // 2)
            prof[:ramp] = np.linspace(0.3, 1.0, ramp)
            jitter = 1.0 + 0.2 * rng.standard_normal(length)
            for rr in range(r, min(N, r + thick)):
                z[rr, c0 : c0 + length] += (amp * prof * jitter).astype(np.float32)
            scars.append({"row": r, "col": c0, "length": length, "rows": thick, "amp_nm": amp})

    meta = {
        "seed": int(seed),
        "snr": snr,
        "n_steps": n_steps,
        "tip_change_row": tip_change_row,
        "tip_change": tip_change,
        "scars": scars,
        "row_angle_deg": float(math.degrees(phi0) % 180.0),
        "terrace_row_angles_deg": [float(math.degrees(a) % 180.0) for a in terr_angle],
        "step_types": ["SA" if sa else "SB" for sa in steps.is_sa],
        "density_per_100nm2": density,
        "n_defects_target": n_target,
        "corrugation_std_nm": corrugation_std,
        "noise_std_nm": float(noise_std),
        "tip_sigma_px": tip_sigma_px,
        "tilt_nm_per_px": [float(ax), float(ay)],
        "config": jsonable(dataclasses.asdict(cfg)),
    }
    return SynthScan(
        height=np.ascontiguousarray(z, dtype=np.float32),
        pixel_nm=px,
        defects=defects,
        step_mask=step_mask,
        terraces=terraces,
        meta=jsonable(meta),
    )


def truth_dict(scan: SynthScan) -> dict:
    """JSON-ready ground truth of a scan (no arrays)."""
    return jsonable(
        {
            "pixel_nm": scan.pixel_nm,
            "shape": list(scan.height.shape),
            "defects": [dict(d) for d in scan.defects],
            "n_steps": scan.meta.get("n_steps", 0),
            "meta": scan.meta,
        }
    )
