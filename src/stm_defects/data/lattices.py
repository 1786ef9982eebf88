"""Synthetic STM scans of several surface-lattice families, with ground truth.

Where :mod:`stm_defects.data.synth` models Si(001)-2x1 in detail (five
Si-specific defect classes), this module covers every lattice family STM
users commonly image, with a small set of *generic* defect kinds, so that a
defect detector can be tested across lattices:

==============  ===============================================================
family          surface (what the rendering shows)
==============  ===============================================================
si001_2x1       Si(001)-2x1: dimer rows (0.768 nm) of dimers 0.384 nm apart
si001_h_1x1     Si(001):H 1x1: square lattice, a = 0.384 nm
ge001_c4x2      Ge(001) c(4x2): buckled dimer rows (0.8 nm), zig-zag up atoms
wse2_hex        WSe2: triangular lattice of Se atoms, a = 0.328 nm
graphite        HOPG: triangular lattice of every other atom, a = 0.246 nm
si111_7x7       Si(111)-7x7: 12 adatoms per 2.69 nm cell plus corner holes
==============  ===============================================================

**Rendering.** A family's periodic height is a basis of Gaussian "atoms"
(negative height = hole) on a Bravais lattice, evaluated as its exact Fourier
series. That makes band limiting exact: every Fourier component is weighted by
the pixel footprint (box average, ``sinc``), a small tip blur and a taper that
removes everything at or above the Nyquist frequency, so an unresolved lattice
(e.g. graphite at 0.5 nm/px) fades to a flat surface instead of aliasing into
a moire pattern. Defects are Gaussian-based shapes with a floor of about one
pixel, so they stay visible at any pixel size.

**Acquisition artefacts** (``lattice_scan``): plane tilt, per-line offsets
(jitter, slow random walk, jumps), white plus 1/f noise in raster order. The
SNR is the *intrinsic* lattice corrugation std (independent of pixel size) over
the noise std.

All functions are pure: randomness comes only from ``seed`` (through
:class:`numpy.random.Generator`). Heights are in nanometres; x is the column,
y the row index (0-based); physical position of pixel (row r, col c) is
``(c * pixel_nm, r * pixel_nm)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import special

from stm_defects.data.synth import (
    SI001_DIMER_SPACING_NM,
    SI001_ROW_PERIOD_NM,
    SI001_STEP_HEIGHT_NM,
    _pink_noise_1d,
    _smooth_curve,
)
from stm_defects.io.files import jsonable

__all__ = [
    "DEFECT_KINDS",
    "LATTICES",
    "MIN_DEFECT_DISTANCE_PX",
    "SPECS",
    "LatticeScan",
    "LatticeSpec",
    "get_spec",
    "lattice_height",
    "lattice_scan",
    "truth_points",
]

#: generic defect kinds, in class-id order
DEFECT_KINDS: tuple[str, ...] = ("vacancy", "adatom", "dark_trough", "bright_cluster")
#: defect centres are at least max(this, r1 + r2 + 2) pixels apart
MIN_DEFECT_DISTANCE_PX = 10.0
_BORDER_PX = 2.0  # extra clearance between a defect's extent and the image border
_STEP_KEEPOUT_PX = 3.0  # extra clearance between a defect's extent and a step edge
_MIN_SIGMA_PX = 0.6  # smallest Gaussian sigma of a defect (stays visible, no aliasing)
_TIP_SIGMA_NM = 0.03  # tip blur applied to the lattice (Fourier) and defects (quadrature)
_TILT_NM_PER_NM = 0.01  # max plane-tilt slope per axis
_LINE_OFFSET_REL = 0.3  # per-line offset scale, relative to the corrugation amplitude
_PINK_FRACTION = 0.4  # fraction of the noise variance that is 1/f
_FOURIER_REL_TOL = 1e-4  # drop Fourier terms below this fraction of the largest one


# --- lattice specifications --------------------------------------------------


@dataclass(frozen=True)
class LatticeSpec:
    """A surface-lattice family.

    The periodic height is ``sum_j h_j * exp(-|r - r_j - R|^2 / (2 s_j^2))`` over
    lattice vectors ``R = n1 a1 + n2 a2`` and basis atoms ``(x_j, y_j, h_j, s_j)``
    (Cartesian nm in the lattice frame, relative heights, Gaussian sigma in nm),
    rescaled to zero mean and a peak-to-peak corrugation of ``amplitude_nm``.
    """

    name: str
    a1: tuple[float, float]  #: first lattice vector (nm, lattice frame)
    a2: tuple[float, float]  #: second lattice vector (nm, lattice frame)
    basis: tuple[tuple[float, float, float, float], ...]  #: (x_nm, y_nm, rel. height, sigma_nm)
    amplitude_nm: float  #: peak-to-peak corrugation of the unblurred pattern
    step_nm: float  #: monatomic step height
    site_nm: float  #: spacing of the bright features: the size scale of the defects
    terrace_rotation_deg: float = 0.0  #: lattice rotation from one terrace to the next
    description: str = ""

    @property
    def period_nm(self) -> float:
        """Shortest lattice period (length of the shortest non-zero lattice vector)."""
        a1, a2 = np.asarray(self.a1), np.asarray(self.a2)
        return float(min(np.hypot(*v) for v in (a1, a2, a1 + a2, a1 - a2)))

    @property
    def fringe_nm(self) -> float:
        """Spacing of the strongest lattice fringe: 1 / |G| of the largest Fourier component.

        This is where the strongest FFT peak of a well-resolved rendering lies. It equals
        ``period_nm`` for square lattices and Ge c(4x2), ``period_nm * sqrt(3) / 2`` for the
        triangular ones (row spacing), and the dimer-row period 0.768 nm for Si(001)-2x1.
        """
        g, c = _fourier(self)
        i = int(np.argmax(np.abs(c)))
        return float(1.0 / np.hypot(*g[i]))

    @property
    def corrugation_std_nm(self) -> float:
        """Standard deviation of the unblurred periodic height (nm)."""
        _, c = _fourier(self)
        return float(np.sqrt(2.0 * np.sum(np.abs(c) ** 2)))

    @property
    def hexagonal(self) -> bool:
        """True for lattices with 6-fold symmetric fundamental reciprocal vectors."""
        a1, a2 = np.asarray(self.a1), np.asarray(self.a2)
        l1, l2 = np.hypot(*a1), np.hypot(*a2)
        cos = float(a1 @ a2) / (l1 * l2)
        return abs(l1 - l2) < 1e-6 * l1 and abs(abs(cos) - 0.5) < 1e-6


def _si111_7x7_basis() -> tuple[tuple[float, float, float, float], ...]:
    """Simplified DAS model: 12 adatoms (2x2 local order) per cell plus a corner hole."""
    a = 0.384  # Si(111) 1x1 surface lattice constant
    s3 = math.sqrt(3) / 2

    def xy(i: float, j: float) -> tuple[float, float]:
        return a * (i + 0.5 * j), a * s3 * j

    atoms = []
    # faulted half (triangle (0,0),(7,0),(0,7)): corner adatoms slightly brighter than centre ones
    faulted = (((1, 1), 1.0), ((5, 1), 1.0), ((1, 5), 1.0), ((3, 1), 0.85), ((1, 3), 0.85), ((3, 3), 0.85))
    for ij, h in faulted:
        atoms.append((*xy(*ij), h, 0.17))
    # unfaulted half: point-inverted through the cell centre, a little dimmer
    unfaulted = (((6, 6), 0.9), ((2, 6), 0.9), ((6, 2), 0.9), ((4, 6), 0.75), ((6, 4), 0.75), ((4, 4), 0.75))
    for ij, h in unfaulted:
        atoms.append((*xy(*ij), h, 0.17))
    atoms.append((0.0, 0.0, -1.2, 0.3))  # corner hole
    return tuple(atoms)


def _make_specs() -> dict[str, LatticeSpec]:
    s3 = math.sqrt(3) / 2
    a_si = SI001_DIMER_SPACING_NM
    a_ge = 0.4
    d_ge = 0.1  # lateral offset of a buckled dimer's atoms from the row centre
    a7 = 7 * 0.384
    specs = [
        LatticeSpec(
            "si001_2x1",
            (a_si, 0.0),
            (0.0, SI001_ROW_PERIOD_NM),
            # the two atoms of a dimer merge into one bean per dimer in filled states
            ((0.0, 0.115, 1.0, 0.14), (0.0, -0.115, 1.0, 0.14)),
            amplitude_nm=0.06,
            step_nm=SI001_STEP_HEIGHT_NM,
            site_nm=SI001_ROW_PERIOD_NM,
            terrace_rotation_deg=90.0,
            description="Si(001)-2x1 dimer rows along the lattice x axis",
        ),
        LatticeSpec(
            "si001_h_1x1",
            (a_si, 0.0),
            (0.0, a_si),
            ((0.0, 0.0, 1.0, 0.1),),
            amplitude_nm=0.03,
            step_nm=SI001_STEP_HEIGHT_NM,
            site_nm=a_si,
            terrace_rotation_deg=90.0,
            description="Si(001):H 1x1 square lattice",
        ),
        LatticeSpec(
            "ge001_c4x2",
            (2 * a_ge, 0.0),
            (a_ge, 2 * a_ge),
            # up atoms zig-zag along a row and are out of phase on neighbouring rows
            (
                (0.0, d_ge, 1.0, 0.13),
                (a_ge, -d_ge, 1.0, 0.13),
                (0.0, -d_ge, 0.3, 0.13),
                (a_ge, d_ge, 0.3, 0.13),
            ),
            amplitude_nm=0.06,
            step_nm=0.141,
            site_nm=0.6,
            terrace_rotation_deg=90.0,
            description="Ge(001) c(4x2) buckled dimer rows along the lattice x axis",
        ),
        LatticeSpec(
            "wse2_hex",
            (0.328, 0.0),
            (0.328 / 2, 0.328 * s3),
            ((0.0, 0.0, 1.0, 0.09), (0.328 / 2, 0.328 * s3 / 3, 0.1, 0.08)),
            amplitude_nm=0.04,
            step_nm=0.65,
            site_nm=0.328,
            description="WSe2 triangular Se lattice (faint W in one hollow)",
        ),
        LatticeSpec(
            "graphite",
            (0.246, 0.0),
            (0.246 / 2, 0.246 * s3),
            ((0.0, 0.0, 1.0, 0.065), (0.246 / 2, 0.246 * s3 / 3, 0.15, 0.06)),
            amplitude_nm=0.08,
            step_nm=0.335,
            site_nm=0.246,
            description="HOPG: bright beta atoms (triangular, 0.246 nm), faint alpha atoms",
        ),
        LatticeSpec(
            "si111_7x7",
            (a7, 0.0),
            (a7 / 2, a7 * s3),
            _si111_7x7_basis(),
            amplitude_nm=0.15,
            step_nm=0.314,
            site_nm=2 * 0.384,
            description="Si(111)-7x7 simplified DAS: adatoms + corner holes",
        ),
    ]
    return {s.name: s for s in specs}


SPECS: dict[str, LatticeSpec] = _make_specs()
LATTICES: tuple[str, ...] = tuple(SPECS)


def get_spec(family: str | LatticeSpec) -> LatticeSpec:
    """The :class:`LatticeSpec` of a family name (a spec is returned unchanged)."""
    if isinstance(family, LatticeSpec):
        return family
    try:
        return SPECS[family]
    except KeyError:
        raise ValueError(f"unknown lattice family {family!r}; expected one of {LATTICES}") from None


# --- rendering ---------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _fourier(spec: LatticeSpec) -> tuple[np.ndarray, np.ndarray]:
    """Half-plane Fourier series of the (zero-mean, scaled) periodic height.

    Returns ``(G, c)``: reciprocal vectors (K, 2) in cycles/nm and complex coefficients (K,)
    such that ``h(r) = sum_k 2 Re(c_k exp(2 pi i G_k . r))``.
    """
    A = np.array([spec.a1, spec.a2], float).T  # columns a1, a2
    B = np.linalg.inv(A).T  # columns b1, b2 (a_i . b_j = delta_ij)
    cell_area = abs(np.linalg.det(A))
    basis = np.asarray(spec.basis, float)
    pos, h, s = basis[:, :2], basis[:, 2], basis[:, 3]
    # Gaussian factor decides how far out the series must go
    s_min = float(s.min())
    g_max = math.sqrt(math.log(1.0 / _FOURIER_REL_TOL) / (2 * math.pi**2 * s_min**2))
    m = math.ceil(g_max / min(np.hypot(*B[:, 0]), np.hypot(*B[:, 1])) * 2) + 1
    n1, n2 = np.meshgrid(np.arange(-m, m + 1), np.arange(-m, m + 1), indexing="ij")
    n1, n2 = n1.ravel(), n2.ravel()
    half = (n1 > 0) | ((n1 == 0) & (n2 > 0))  # one of each +-G pair, no DC
    n1, n2 = n1[half], n2[half]
    G = n1[:, None] * B[:, 0] + n2[:, None] * B[:, 1]
    g2 = (G**2).sum(axis=1)
    weight = h * 2 * math.pi * s**2  # integral of each Gaussian
    c = (
        weight[None, :]
        * np.exp(-2 * math.pi**2 * s[None, :] ** 2 * g2[:, None])
        * np.exp(-2j * math.pi * (G @ pos.T))
    ).sum(axis=1) / cell_area
    keep = np.abs(c) > _FOURIER_REL_TOL * np.abs(c).max()
    G, c = G[keep], c[keep]
    # scale to the requested peak-to-peak corrugation (evaluated on a fine grid over one cell)
    u = np.linspace(0.0, 1.0, 64, endpoint=False)
    uu, vv = np.meshgrid(u, u, indexing="ij")
    r = uu.ravel()[:, None] * A[:, 0] + vv.ravel()[:, None] * A[:, 1]
    z = 2 * np.real(np.exp(2j * math.pi * (r @ G.T)) @ c)
    c = c * (spec.amplitude_nm / float(z.max() - z.min()))
    G.setflags(write=False)
    c.setflags(write=False)
    return G, c


def _taper(u: np.ndarray) -> np.ndarray:
    """1 below 0.7, raised-cosine roll-off to 0 at 1 (u = |f| / Nyquist)."""
    t = np.clip((u - 0.7) / 0.3, 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * t))


def lattice_height(
    spec: LatticeSpec | str,
    shape: tuple[int, int],
    pixel_nm: float,
    angle_rad: float,
    offset_nm: tuple[float, float] = (0.0, 0.0),
    tip_sigma_nm: float = 0.0,
) -> np.ndarray:
    """Band-limited periodic height (nm, float32, zero-mean pattern) on a pixel grid.

    The lattice frame is rotated by ``angle_rad`` from +x towards +y (y = row index, so
    clockwise as displayed with row 0 on top) and shifted so that the lattice origin sits at
    ``offset_nm`` (x, y) in image coordinates. Each Fourier component is weighted by the
    pixel-footprint MTF ``sinc(fx p) sinc(fy p)``, an optional Gaussian tip blur, and a taper
    that removes everything at or above the Nyquist frequency (no aliasing).
    """
    spec = get_spec(spec)
    px = float(pixel_nm)
    if px <= 0:
        raise ValueError("pixel_nm must be positive")
    H, W = (int(shape[0]), int(shape[1]))
    G0, c = _fourier(spec)
    ca, sa = math.cos(angle_rad), math.sin(angle_rad)
    G = G0 @ np.array([[ca, sa], [-sa, ca]])  # rows: R(angle) @ G
    fx, fy = G[:, 0], G[:, 1]
    f_nyq = 0.5 / px
    w = (
        np.sinc(fx * px)
        * np.sinc(fy * px)
        * _taper(np.abs(fx) / f_nyq)
        * _taper(np.abs(fy) / f_nyq)
        * np.exp(-2 * math.pi**2 * tip_sigma_nm**2 * (fx**2 + fy**2))
    )
    keep = np.abs(w * c) > 1e-6 * np.abs(c).max()
    if not keep.any():
        return np.zeros((H, W), np.float32)
    fx, fy = fx[keep], fy[keep]
    coef = 2.0 * w[keep] * c[keep] * np.exp(-2j * math.pi * (fx * offset_nm[0] + fy * offset_nm[1]))
    ey = np.exp(2j * math.pi * np.outer(np.arange(H) * px, fy))  # (H, K)
    ex = np.exp(2j * math.pi * np.outer(fx, np.arange(W) * px))  # (K, W)
    return np.real((ey * coef[None, :]) @ ex).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _site_geometry(spec: LatticeSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, A^-1, candidate site positions (S * 9, 2) over the 3x3 neighbouring cells)."""
    A = np.array([spec.a1, spec.a2], float).T
    b = np.asarray(spec.basis, float)
    sites = b[b[:, 2] > 0, :2]  # the bright atoms defects snap to
    d = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], float) @ A.T
    return A, np.linalg.inv(A), (sites[:, None, :] + d[None, :, :]).reshape(-1, 2)


def _snap(
    spec: LatticeSpec, x_nm: float, y_nm: float, angle: float, offset: np.ndarray
) -> tuple[float, float]:
    """Nearest bright lattice site (image nm) to an image position (nm)."""
    A, Ainv, cand = _site_geometry(spec)
    ca, sa = math.cos(angle), math.sin(angle)
    R = np.array([[ca, -sa], [sa, ca]])
    p = R.T @ (np.array([x_nm, y_nm]) - offset)
    q = A @ np.floor(Ainv @ p) + cand  # candidates around the cell that contains p
    best = q[int(np.argmin(((q - p) ** 2).sum(axis=1)))]
    out = R @ best + offset
    return float(out[0]), float(out[1])


# --- defects -----------------------------------------------------------------


def _defect_params(kind: str, spec: LatticeSpec, px: float, rng: np.random.Generator) -> tuple[float, dict]:
    """Sample one defect's shape (pixel units); return (extent radius px, params)."""
    s = spec.site_nm / px  # site spacing in px
    amp = spec.amplitude_nm
    floor = _MIN_SIGMA_PX

    def sig(v: float) -> float:
        return max(math.hypot(v, _TIP_SIGMA_NM / px), floor)

    if kind == "vacancy":  # dark pit ~1 site across, the lattice missing inside
        sg = sig(rng.uniform(0.35, 0.45) * s)
        return max(1.6 * sg, 1.0), {"sigma": sg, "depth": rng.uniform(0.8, 1.2) * amp}
    if kind == "adatom":  # bright bump, FWHM ~1-1.5 sites
        sg = sig(rng.uniform(0.42, 0.64) * s)
        return max(1.6 * sg, 1.0), {"sigma": sg, "h": rng.uniform(1.5, 2.5) * amp}
    if kind == "dark_trough":  # broad, dim, slightly elongated depression ~2-3 sites
        s1 = sig(rng.uniform(1.0, 1.3) * s)
        s2 = sig(rng.uniform(0.6, 0.9) * s)
        p = {"s1": s1, "s2": s2, "theta": rng.uniform(0, np.pi), "depth": rng.uniform(0.4, 0.7) * amp}
        return max(1.6 * s1, 1.0), p
    if kind == "bright_cluster":  # broad bright blob ~2-4 sites, lumpy
        r = max(rng.uniform(1.0, 2.0) * s, 1.0)
        nb = int(rng.integers(3, 8))
        ang = rng.uniform(0, 2 * np.pi, nb)
        rad = r * 0.5 * np.sqrt(rng.uniform(0, 1, nb))
        p = {
            "bx": rad * np.cos(ang),
            "by": rad * np.sin(ang),
            "bs": np.maximum(rng.uniform(0.3, 0.5, nb) * r, floor),
            "bh": rng.uniform(0.6, 1.0, nb),
            "h": rng.uniform(2.0, 4.0) * amp,
        }
        return r, p
    raise ValueError(f"unknown defect kind {kind!r}")  # pragma: no cover


def _render_defect(
    lat: np.ndarray, add: np.ndarray, kind: str, p: dict, cx: float, cy: float, rad: float
) -> None:
    """Apply one defect in place: multiplicative to the lattice ``lat``, additive to ``add``."""
    H, W = lat.shape
    R = math.ceil(2.5 * rad) + 3
    y0, y1 = max(0, int(cy) - R), min(H, int(cy) + R + 1)
    x0, x1 = max(0, int(cx) - R), min(W, int(cx) + R + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dx, dy = xx - cx, yy - cy
    sl = (slice(y0, y1), slice(x0, x1))
    if kind == "vacancy":
        g = np.exp(-(dx * dx + dy * dy) / (2 * p["sigma"] ** 2))
        m = np.exp(-(dx * dx + dy * dy) / (2 * (1.3 * p["sigma"]) ** 2))
        lat[sl] *= (1.0 - m).astype(np.float32)
        add[sl] -= (p["depth"] * g).astype(np.float32)
    elif kind == "adatom":
        g = np.exp(-(dx * dx + dy * dy) / (2 * p["sigma"] ** 2))
        lat[sl] *= (1.0 - 0.5 * g).astype(np.float32)
        add[sl] += (p["h"] * g).astype(np.float32)
    elif kind == "dark_trough":
        c, s = math.cos(p["theta"]), math.sin(p["theta"])
        u, v = dx * c + dy * s, -dx * s + dy * c
        g = np.exp(-0.5 * ((u / p["s1"]) ** 2 + (v / p["s2"]) ** 2))
        lat[sl] *= (1.0 - 0.5 * g).astype(np.float32)
        add[sl] -= (p["depth"] * g).astype(np.float32)
    elif kind == "bright_cluster":
        z = np.zeros(dx.shape)
        for bx, by, bs, bh in zip(p["bx"], p["by"], p["bs"], p["bh"]):
            z = np.maximum(z, bh * np.exp(-((dx - bx) ** 2 + (dy - by) ** 2) / (2 * bs * bs)))
        lat[sl] *= (1.0 - np.clip(1.5 * z, 0, 1)).astype(np.float32)
        add[sl] += (p["h"] * z).astype(np.float32)
    else:  # pragma: no cover - guarded by _defect_params
        raise ValueError(kind)


# --- steps -------------------------------------------------------------------


def _make_steps(
    rng: np.random.Generator, N: int, px: float, n_steps: int, step_angle: float, site_nm: float
) -> np.ndarray:
    """Signed distances (n_steps, N, N) in nm to meandering step edges, > 0 on the lower side."""
    if n_steps == 0:
        return np.zeros((0, N, N), np.float32)
    L = N * px
    e = np.array([math.cos(step_angle), math.sin(step_angle)])
    nrm = np.array([-e[1], e[0]])
    yy, xx = np.mgrid[0:N, 0:N].astype(np.float64) * px
    u = xx * nrm[0] + yy * nrm[1]
    v = xx * e[0] + yy * e[1]
    corners = np.array([(0, 0), (L, 0), (0, L), (L, L)], float)
    umin, umax = (corners @ nrm).min(), (corners @ nrm).max()
    vmin, vmax = (corners @ e).min() - px, (corners @ e).max() + px
    dv = px
    nv = math.ceil((vmax - vmin) / dv) + 2
    vgrid = vmin + dv * np.arange(nv)
    span = umax - umin
    lo, hi = umin + 0.12 * span, umax - 0.12 * span
    pitch = (hi - lo) / n_steps
    base = lo + pitch * (np.arange(n_steps) + 0.5 + rng.uniform(-0.25, 0.25, n_steps))
    cap = 0.15 * pitch
    curves = np.empty((n_steps, nv))
    for k in range(n_steps):
        slow = min(rng.uniform(0.01, 0.04) * L, cap) * _smooth_curve(rng, nv, rng.uniform(0.1, 0.25) * L / dv)
        rough = min(rng.uniform(0.5, 1.5) * site_nm, 0.3 * cap)
        fast = rough * _smooth_curve(rng, nv, max(2.0 * site_nm / dv, 1.0))
        curves[k] = base[k] + slow + fast
    min_gap = 0.4 * pitch
    for k in range(1, n_steps):
        curves[k] = np.maximum(curves[k], curves[k - 1] + min_gap)
    dist = np.empty((n_steps, N, N), np.float32)
    for k in range(n_steps):
        b = np.interp(v.ravel(), vgrid, curves[k]).reshape(N, N)
        sl = np.interp(v.ravel(), vgrid, np.gradient(curves[k], dv)).reshape(N, N)
        dist[k] = (u - b) / np.sqrt(1.0 + sl * sl)
    return dist


# --- scans -------------------------------------------------------------------


@dataclass(frozen=True)
class LatticeScan:
    """One synthetic scan of a lattice family and its ground truth.

    ``defects``: dicts with ``x``, ``y`` (px: column, row), ``class`` (one of
    :data:`DEFECT_KINDS`), ``class_id``, ``radius_px`` and ``terrace``.
    """

    height: np.ndarray  #: (size, size) float32, nm, with acquisition artefacts
    pixel_nm: float
    family: str
    defects: list[dict]
    angle_deg: float  #: lattice rotation of terrace 0 (deg, from +x towards +y = rows)
    period_nm: float  #: shortest lattice period of the family
    step_mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))
    terraces: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))
    meta: dict = field(default_factory=dict)


def _n_range(n: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(n, (int, np.integer)):
        return int(n), int(n)
    lo, hi = (int(v) for v in n)
    if lo < 0 or hi < lo:
        raise ValueError(f"bad n_defects range {n!r}")
    return lo, hi


def lattice_scan(
    family: str,
    size: int = 256,
    pixel_nm: float = 0.05,
    n_defects: int | tuple[int, int] = (3, 8),
    snr: float = 4.0,
    seed: int = 0,
    angle_deg: float | None = None,
    n_steps: int = 0,
    *,
    artefacts: bool = True,
) -> LatticeScan:
    """Generate one synthetic raw STM scan of a lattice family and its ground truth.

    ``n_defects`` is a count or an inclusive range; fewer are placed when the field of view is
    too small to hold them at the required spacing. ``snr`` is the intrinsic lattice
    corrugation std over the noise std (``inf`` = no noise). ``angle_deg`` is the lattice
    rotation (random in [0, 180) when None). ``artefacts=False`` skips tilt, line offsets and
    noise (the clean, tip-blurred topography).
    """
    spec = get_spec(family)
    N = int(size)
    px = float(pixel_nm)
    if N < 16:
        raise ValueError("size must be at least 16")
    if not px > 0:
        raise ValueError("pixel_nm must be positive")
    if not snr > 0:
        raise ValueError("snr must be positive")
    n_lo, n_hi = _n_range(n_defects)
    rng = np.random.default_rng(seed)

    angle0 = math.radians(float(rng.uniform(0.0, 180.0)) if angle_deg is None else float(angle_deg))

    # ---- steps and terraces ----
    n_steps = int(n_steps)
    step_angle = angle0 + math.radians(rng.uniform(-8.0, 8.0))
    dist = _make_steps(rng, N, px, n_steps, step_angle, spec.site_nm)
    edge_w = max(0.12, 0.5 * px)  # logistic width of the apparent step edge (nm)
    if n_steps:
        terraces = (dist > 0).sum(axis=0).astype(np.int32)
        s = special.expit(dist / edge_w)  # (n_steps, N, N): 1 on the lower side of step k
        step_height = spec.step_nm * s.sum(axis=0)
        dmin_px = np.abs(dist).min(axis=0) / px
        step_mask = dmin_px <= 2.0
        member = np.empty((n_steps + 1, N, N), np.float32)  # soft terrace membership
        member[0] = 1.0 - s[0]
        for k in range(1, n_steps):
            member[k] = np.clip(s[k - 1] - s[k], 0.0, 1.0)
        member[n_steps] = s[n_steps - 1]
    else:
        terraces = np.zeros((N, N), np.int32)
        step_height = np.zeros((N, N))
        dmin_px = np.full((N, N), np.inf)
        step_mask = np.zeros((N, N), bool)
        member = np.ones((1, N, N), np.float32)
    n_terr = n_steps + 1
    terr_angle = angle0 + math.radians(spec.terrace_rotation_deg) * np.arange(n_terr)
    cell = np.array([spec.a1, spec.a2], float).T
    terr_offset = [cell @ rng.uniform(0, 1, 2) for _ in range(n_terr)]
    lat = np.zeros((N, N), np.float32)
    for k in range(n_terr):
        lk = lattice_height(spec, (N, N), px, float(terr_angle[k]), tuple(terr_offset[k]), _TIP_SIGMA_NM)
        lat += member[k] * lk

    # ---- defects ----
    n_target = int(rng.integers(n_lo, n_hi + 1))
    defects: list[dict] = []
    add = np.zeros((N, N), np.float32)
    attempts = 0
    while len(defects) < n_target and attempts < 50 * max(n_target, 1):
        attempts += 1
        cid = int(rng.integers(0, len(DEFECT_KINDS)))
        kind = DEFECT_KINDS[cid]
        rad, prm = _defect_params(kind, spec, px, rng)
        margin = rad + _BORDER_PX
        if N - 1 - 2 * margin <= 0:
            continue
        x = float(rng.uniform(margin, N - 1 - margin))
        y = float(rng.uniform(margin, N - 1 - margin))
        ti = int(terraces[round(y), round(x)])
        xn, yn = _snap(spec, x * px, y * px, float(terr_angle[ti]), terr_offset[ti])
        x, y = xn / px, yn / px
        if not (margin <= x <= N - 1 - margin and margin <= y <= N - 1 - margin):
            continue
        iy, ix = round(y), round(x)
        if int(terraces[iy, ix]) != ti or dmin_px[iy, ix] < rad + _STEP_KEEPOUT_PX:
            continue
        if any(
            math.hypot(d["x"] - x, d["y"] - y) < max(MIN_DEFECT_DISTANCE_PX, d["radius_px"] + rad + 2.0)
            for d in defects
        ):
            continue
        _render_defect(lat, add, kind, prm, x, y, rad)
        defects.append(
            {"x": x, "y": y, "class": kind, "class_id": cid, "radius_px": float(rad), "terrace": ti}
        )

    z = (lat + add - step_height).astype(np.float32)

    # ---- acquisition artefacts ----
    noise_std = spec.corrugation_std_nm / snr if math.isfinite(snr) else 0.0
    tilt = (0.0, 0.0)
    if artefacts:
        if noise_std > 0:
            white = rng.standard_normal(N * N)
            pink = _pink_noise_1d(rng, N * N, f_min=1.0 / N)
            noise = noise_std * (math.sqrt(1 - _PINK_FRACTION) * white + math.sqrt(_PINK_FRACTION) * pink)
            z += noise.reshape(N, N).astype(np.float32)
        ax, ay = rng.uniform(-_TILT_NM_PER_NM, _TILT_NM_PER_NM, 2)
        tilt = (float(ax), float(ay))
        c = px * (np.arange(N) - N / 2)
        z += (ax * c[None, :] + ay * c[:, None]).astype(np.float32)
        z += float(rng.uniform(-1.0, 1.0))  # arbitrary absolute z offset
        lo = _LINE_OFFSET_REL * spec.amplitude_nm
        offs = lo * (0.5 * rng.standard_normal(N) + np.cumsum(0.3 * rng.standard_normal(N)))
        for _ in range(int(rng.poisson(1.5))):
            offs[int(rng.integers(1, N)) :] += 3.0 * lo * rng.standard_normal()
        z += offs[:, None].astype(np.float32)

    meta = {
        "seed": int(seed),
        "family": spec.name,
        "snr": float(snr),
        "n_steps": n_steps,
        "n_defects_target": n_target,
        "terrace_angles_deg": [float(math.degrees(a) % 360.0) for a in terr_angle],
        "fringe_nm": spec.fringe_nm,
        "site_nm": spec.site_nm,
        "corrugation_std_nm": spec.corrugation_std_nm,
        "noise_std_nm": float(noise_std),
        "tilt_nm_per_nm": list(tilt),
        "artefacts": bool(artefacts),
        "min_defect_distance_px": MIN_DEFECT_DISTANCE_PX,
    }
    return LatticeScan(
        height=np.ascontiguousarray(z, dtype=np.float32),
        pixel_nm=px,
        family=spec.name,
        defects=defects,
        angle_deg=float(math.degrees(angle0)),
        period_nm=spec.period_nm,
        step_mask=step_mask,
        terraces=terraces,
        meta=jsonable(meta),
    )


def truth_points(scan: LatticeScan) -> np.ndarray:
    """Defect centres as an (N, 2) float array of (x, y) pixel coordinates."""
    if not scan.defects:
        return np.zeros((0, 2), float)
    return np.array([[d["x"], d["y"]] for d in scan.defects], float)
