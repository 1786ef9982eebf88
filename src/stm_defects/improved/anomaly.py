"""A lattice-aware anomaly detector for STM scans, as pure functions.

1. scars removed, steps found and terraces levelled (`steps`);
2. a local background of each terrace (normalised convolution that never crosses a step)
   is subtracted;
   (steps are looked for in the image without its lattice, from a first notch as in 3, so the
   lattice's own gradients never pass for steps whatever its symmetry and pixel size);
3. the periodic lattice is removed by notching the peaks of the power spectrum (peaks that
   stand ``notch_k`` (log units) above a median-smoothed spectrum, beyond ``min_freq``);
4. scan-line streaks are taken out of the residual before it is scored (``streak_filter``,
   `remove_streaks`): the spectrum's two axes, where line-to-line offsets and tip-change
   streaks put their power, are brought down to the power of the other directions;
5. that is smoothed at a few blob scales; each scale is divided by its robust noise
   level (MAD over the scan, step band excluded) and the score is the maximum |z| over scales;
6. defects are local maxima of the score above ``threshold`` that also pass ``threshold``
   against the noise of their own scan row and column (``line_noise``: real scans carry lines
   hit by tip changes and feedback ringing); each gets the region of score > ``low_threshold``
   around it and a score-weighted centre; a peak surrounded by a ring of the opposite sign
   (a charged defect's core and its screening halo) is one defect with the ring's peaks.
   No defect is looked for within ``step_lattice_periods`` lattice periods of a step line: each
   terrace carries the lattice with its own phase, and a notch, which removes the lattice of
   the whole scan, leaves a wall of lattice-like residual along every step. (The noise is still
   estimated there: left out, it made the scores of small scans with steps less conservative.)

Everything is deterministic; no randomness, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.fft as sfft
from scipy import ndimage as ndi
from skimage.measure import label

from stm_defects.image.filters import GaussianBank
from stm_defects.image.peaks import local_peaks
from stm_defects.image.preprocess import remove_scars
from stm_defects.image.robust import robust_location_scale
from stm_defects.improved.steps import (
    StepConfig,
    Terraces,
    detect_steps,
    fill_from_nearest,
    level_terraces,
    step_profile,
    terrace_background,
)

__all__ = ["AnomalyConfig", "AnomalyResult", "detect", "lattice_notch", "lattice_period", "remove_streaks", "score_map", "score_maps",
           "terrace_levelled"]



@dataclass(frozen=True)
class AnomalyConfig:
    steps: StepConfig = field(default_factory=StepConfig)
    background_sigma: float = 10.0       # px, local terrace background
    notch_k: float = 2.5                 # spectral peak: log power above median-smoothed spectrum
    notch_window: int = 9                # median window (bins) of the smoothed spectrum
    notch_radius: int = 2                # dilation (bins) of each notch
    notch_pad: int = 32                  # reflect padding before the FFT (border artefacts)
    min_freq: float = 0.06               # cycles/px; lower frequencies are never notched
    scales: tuple[float, ...] = (1.5, 2.5, 4.0)   # blob scales (Gaussian sigma, px)
    lattice_floor: float = 0.1           # noise floor of the score: this x std of the removed lattice
    threshold: float = 5.0               # peak score (robust z) of a defect ...
    line_noise: int = 9                  # ... also against its own row's and column's noise (robust std,
                                         # median over this many neighbouring lines; 0: scan-wide only)
    line_min_px: int = 200               # valid pixels a line needs for its own noise estimate
    streak_filter: bool = True           # score the residual without its scan-line streaks (`remove_streaks`);
                                         # class patches keep the residual as it is
    low_threshold: float = 3.5           # region of a defect
    min_distance: int = 5                # px between score maxima
    merge_distance: float = 16.0         # peaks closer than this are one defect
    halo_distance: float = 30.0          # px: a peak's opposite-sign neighbours closer than this are
                                         # part of its defect when they ring it (a charged defect's
                                         # core in its screening halo); 0: off
    halo_coverage: float = 0.75          # ... ring it: fill this part of all directions (`halo_groups`)
    halo_ring_max: float = 3.0           # ... and score at most this many times the core's score
    centre_radius: int = 6               # px, window of the score-weighted centre
    row_median: bool = False             # remove what is left of scan-line offsets from the residual
    border: int = 8                      # px ignored at the image border
    step_lattice_periods: float = 1.0    # no defect is looked for within this many lattice periods
                                         # of a step line (`lattice_period`): the lattice's phase
                                         # changes across a step and the notch leaves a wall of
                                         # residual there; 0: only the step band is left out
    profile_dist: int = 14               # px, step-profile correction beside the step lines
    profile_tile: int = 32               # px, length of the step pieces of that correction


@dataclass
class AnomalyResult:
    score: np.ndarray          # (H, W) float32 robust z-score
    residual: np.ndarray       # (H, W) float32 lattice-free residual (terrace levelled)
    levelled: np.ndarray       # (H, W) float32 per-terrace levelled image (lattice kept)
    lattice: np.ndarray        # (H, W) float32 the removed periodic component
    terraces: Terraces
    mask: np.ndarray           # (H, W) bool defect regions
    regions: list[dict]        # id, x, y, bbox, area_px, score, peak, sign
    region_map: np.ndarray     # (H, W) int32: 1 + id of the region of each mask pixel, 0 elsewhere


_SIGN_SIGMA = 2.0   # px: a defect's sign (and the halo rings) from the residual smoothed this much


def lattice_notch(r: np.ndarray, cfg: AnomalyConfig) -> tuple[np.ndarray, np.ndarray]:
    """(r without its spectral peaks, the removed periodic part)."""
    pad = int(cfg.notch_pad)
    h, w = r.shape
    rp = np.pad(np.asarray(r, np.float32), pad, mode="reflect") if pad else np.asarray(r, np.float32)
    shape = rp.shape
    F = sfft.rfft2(rp)            # single precision (complex64): the float32 residual's own precision
    del rp
    # in place where it gives the same numbers: temporaries are spectrum-sized
    P = np.abs(F)
    np.square(P, out=P)
    P += 1e-20
    np.log(P, out=P)
    # rfft2 halves the last axis: shift rows so the median window sees a contiguous spectrum
    Ps = np.fft.fftshift(P, axes=0)
    del P
    bg = ndi.uniform_filter(Ps, size=cfg.notch_window, mode="nearest")
    Ps -= bg
    del bg
    peaks = np.fft.ifftshift(Ps > cfg.notch_k, axes=0)
    del Ps
    # never below min_freq: only bins with both |fy| and fx under it can be, a small block
    fy = np.fft.fftfreq(shape[0])
    fx = np.fft.rfftfreq(shape[1])
    rows = np.flatnonzero(np.abs(fy) < cfg.min_freq)
    cols = np.flatnonzero(fx < cfg.min_freq)
    if rows.size and cols.size:
        low = np.hypot(fy[rows][:, None], fx[cols][None, :]) < cfg.min_freq
        peaks[np.ix_(rows, cols)] &= ~low
    if cfg.notch_radius:
        peaks = dilate_sparse(peaks, int(cfg.notch_radius))
    keep = ndi.gaussian_filter(peaks.astype(np.float32), 0.7)
    del peaks
    np.subtract(1.0, keep, out=keep)
    np.clip(keep, 0.0, 1.0, out=keep)
    keep[0, 0] = 1.0
    F *= keep
    del keep
    full = sfft.irfft2(F, s=shape)
    del F
    clean = full[pad:pad + h, pad:pad + w].astype(np.float32)
    del full
    lat = r - clean
    return clean, lat.astype(np.float32, copy=False)


def remove_streaks(r: np.ndarray, zero: np.ndarray | None = None) -> np.ndarray:
    """``r`` with its scan-line streaks suppressed: each bin on the two axes of its spectrum
    (within one bin of f_x = 0, what is constant along columns, and of f_y = 0, along rows)
    is divided by the square root of its power's excess over the median power of the other
    directions on its ring of spatial frequency (the off-axis bins of the same magnitude, in
    cycles per pixel), where it has one.

    A point defect's spectrum is about isotropic, and so is the detector's blob filter; a real
    scan's noise is not: line-to-line offsets, tip-change streaks and feedback ringing put
    their power on the axes, and a robust noise level taken over the whole scan then
    underrates them. The excess over the other directions is divided out: nothing is
    amplified, the reference is learned from the scan itself, and rows and columns are
    treated alike (whichever is the slow axis, and a scan turned by 90 degrees scores the
    same). The log power is smoothed over one frequency bin (sigma, in both directions) before
    the comparison, so a strong streak is brought down only part of the way and the bins
    beside the axes are cut a little too: on white noise with row offsets of ten times its
    std, 80-85% of the offsets' std goes. (Smoothing along each axis only takes out 95%, but
    scored no better on the real and synthetic dev sets: README, *Scan-line streaks*.)
    ``zero``: pixels set back to 0 (the step band and missing pixels, 0 in ``r`` already).
    float32; a scan under 3 px on a side is returned as it is.
    """
    a = np.asarray(r, np.float32)
    h, w = a.shape
    out = a.copy() if min(h, w) < 3 else _streaks_removed(a)
    if zero is not None:
        out[zero] = 0.0
    return out


def _streaks_removed(a: np.ndarray) -> np.ndarray:
    """`remove_streaks` of a float32 image at least 3 px on a side, before ``zero``."""
    h, w = a.shape
    F = sfft.rfft2(a)
    logp = np.abs(F)
    np.square(logp, out=logp)
    logp += max(float(logp.mean()), 1e-30) * 1e-12
    np.log(logp, out=logp)
    logp = _smooth_half_spectrum(logp, w)
    ring = _rings(h, w)
    # the axes: rows 0, 1, -1 (f_y within one bin of 0) and columns 0, 1 (f_x, rfft's half)
    axes = ((np.r_[0, 1, h - 1], slice(None)), (slice(None), np.r_[0, 1]))
    other = np.ones(logp.shape, bool)                # the other directions, each bin once
    for rows, cols in axes:
        other[rows, cols] = False
    if w % 2 == 0:   # the Nyquist column holds each of its bins twice (f_y and -f_y)
        other[h // 2 + 1:, -1] = False
    med = _ring_medians(logp, ring, other)
    gain = np.ones(logp.shape, np.float32)
    for rows, cols in axes:
        excess = logp[rows, cols] - med[ring[rows, cols]]
        gain[rows, cols] = np.exp(-0.5 * np.maximum(excess, 0.0))
    del logp
    gain[0, 0] = 1.0
    F *= gain
    del gain
    return sfft.irfft2(F, s=(h, w)).astype(np.float32, copy=False)


def _smooth_half_spectrum(v: np.ndarray, w: int, sigma: float = 1.0) -> np.ndarray:
    """``ndi.gaussian_filter`` of a real function of frequency (``v[ky, kx] = v[-ky, -kx]``)
    held as an ``rfft2`` half plane of an image ``w`` wide: periodic along ky, and beyond the
    half plane's two edges (kx < 0, kx past the last column) the mirrored bins, as on the
    whole spectrum (exactly so for w >= 2 * 4 sigma; narrower spectra reflect at the edges)."""
    h, last = v.shape[0], v.shape[1] - 1
    r = int(4.0 * sigma + 0.5)                       # gaussian_filter's radius (truncate 4)
    mirror = (-np.arange(h)) % h                     # ky -> -ky
    left = np.minimum(np.arange(r, 0, -1), last)     # kx = -r .. -1  <-  (-ky, r .. 1)
    right = np.clip(w - np.arange(last + 1, last + r + 1), 0, last)
    ext = np.concatenate([v[mirror][:, left], v, v[mirror][:, right]], axis=1)
    return ndi.gaussian_filter(ext, sigma, mode="wrap")[:, r:r + last + 1]


def _rings(h: int, w: int) -> np.ndarray:
    """The ring of each bin of an (h, w) ``rfft2``: its frequency magnitude in steps of
    1 / min(h, w) cycles per pixel."""
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    return np.rint(np.hypot(fy, fx) * np.float32(min(h, w))).astype(np.int32)


def _ring_medians(v: np.ndarray, ring: np.ndarray, use: np.ndarray) -> np.ndarray:
    """The median of ``v[use]`` over each ring (indices 0..ring.max()), as ``np.median`` gives
    it (the mean of the two middle values of an even count); +inf for a ring without such bins.
    One sort by value, then a stable sort by ring (a radix sort for 16-bit labels), so that
    each ring's values lie in order and its median is read off at its middle."""
    lab = ring[use]
    vals = v[use]
    n_rings = int(ring.max()) + 1
    if n_rings <= 2 ** 16:
        lab = lab.astype(np.uint16)
    order = np.argsort(vals)
    order = order[np.argsort(lab[order], kind="stable")]
    vals = vals[order]
    counts = np.bincount(lab, minlength=n_rings)
    starts = np.cumsum(counts) - counts
    has = counts > 0
    med = np.full(n_rings, np.inf, np.float32)
    lo = starts[has] + (counts[has] - 1) // 2
    hi = starts[has] + counts[has] // 2
    med[has] = (vals[lo] + vals[hi]) / vals.dtype.type(2)
    return med


def lattice_period(lat: np.ndarray, min_freq: float) -> float | None:
    """The period (px) of the strongest spectral peak of a removed lattice (`lattice_notch`'s
    second output) beyond ``min_freq``; None when nothing was removed."""
    if not np.any(lat):
        return None
    P = np.abs(sfft.rfft2(lat - np.float32(lat.mean(dtype=np.float64))))
    f = np.hypot(np.fft.fftfreq(lat.shape[0])[:, None], np.fft.rfftfreq(lat.shape[1])[None, :])
    P[f < min_freq] = 0.0
    i = np.unravel_index(int(np.argmax(P)), P.shape)
    return 1.0 / float(f[i]) if P[i] > 0 else None


def dilate_sparse(mask: np.ndarray, radius: int) -> np.ndarray:
    """``ndi.binary_dilation(mask, iterations=radius)`` (the 4-connected cross, so a diamond of
    Manhattan radius ``radius``; nothing wraps at the borders), computed from the coordinates of
    the few set pixels: spectral peaks are sparse, and a whole-array dilation is not."""
    out = np.zeros_like(mask, dtype=bool)
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    for dy in range(-radius, radius + 1):
        r = radius - abs(dy)
        for dx in range(-r, r + 1):
            y, x = ys + dy, xs + dx
            ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
            out[y[ok], x[ok]] = True
    return out


def _line_noise(a: np.ndarray, valid: np.ndarray, axis: int, smooth: int, min_px: int) -> np.ndarray:
    """Robust std along each scan line (rows: axis=1) of the deviations whose absolute values
    are ``a`` (NaN where not ``valid``), median-smoothed over ``smooth`` neighbouring lines; 0
    (no line estimate) for lines with fewer than ``min_px`` or than half their pixels valid: on
    short lines a defect is a large part of the sample."""
    s = nan_median(a, axis) * 1.4826
    s = np.where(valid.sum(axis=axis) >= max(min_px, 0.5 * valid.shape[axis]), s, 0.0)
    if smooth > 1:
        s = ndi.median_filter(s, size=int(smooth), mode="nearest")
    return s.astype(np.float32)


def nan_median(a: np.ndarray, axis: int) -> np.ndarray:
    """``np.nanmedian(a, axis)`` of a 2-D array (NaN for an all-NaN line), without numpy's
    masked-array route for short lines: one sort (NaNs sort last), then the middle of each
    line's valid values. Columns are sorted as the rows of a transposed copy: numpy sorts a
    strided axis several times slower."""
    s = np.sort(np.ascontiguousarray(a.T) if axis == 0 else a, axis=1)
    n = np.count_nonzero(~np.isnan(s), axis=1)
    lo = np.maximum((n - 1) // 2, 0)
    hi = np.maximum(n // 2, 0)
    rows = np.arange(s.shape[0])
    out = (s[rows, lo] + s[rows, hi]) / 2
    out[n == 0] = np.nan
    return out


def score_maps(residual: np.ndarray, valid: np.ndarray, scales, floor: float = 0.0,
               line_smooth: int = 0, line_min_px: int = 200, bank: GaussianBank | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """(score, line ratio). score = max over scales of |G_sigma * residual| / noise, the noise
    being the robust std of G_sigma * residual over ``valid`` pixels, at least ``floor``.

    With ``line_smooth`` > 0, ratio is, at each pixel and for the scale of its score, how much
    noisier its own row or column is than the scan (>= 1): a peak is a defect when its score
    also passes the threshold times this ratio. Scan lines hit by tip changes or feedback
    ringing then need a larger excursion, while the score map (peak positions and regions)
    is unchanged. Rows and columns are treated alike, so a scan rotated by 90 degrees scores
    the same.

    The smoothing is `GaussianBank`'s (``bank``: one already made of ``residual``, reaching the
    widest scale), the numbers of ``ndi.gaussian_filter`` from one shared FFT.
    """
    if bank is None:
        bank = GaussianBank(residual, max(scales))
    invalid = ~valid

    def one_scale(s: float):
        """(|z| of scale s; with line_smooth, (its rows' noise, its columns' noise, the scan's
        noise), else None)."""
        g = bank.at(s)
        med, sd = robust_location_scale(g[valid][::3])
        g -= med                          # g is now the deviation from the median
        np.abs(g, out=g)                  # |deviation|
        z = g / max(sd, floor)
        if not line_smooth:
            return z, None
        g[invalid] = np.nan
        return z, (_line_noise(g, valid, 1, line_smooth, line_min_px),
                   _line_noise(g, valid, 0, line_smooth, line_min_px), max(sd, floor, 1e-12))

    out = np.zeros(residual.shape, np.float32)
    ratio = np.ones(residual.shape, np.float32) if line_smooth else None
    for z, noises in map(one_scale, scales):
        if ratio is not None:
            rows, cols, noise = noises
            lines = np.maximum(rows[:, None], cols[None, :])
            lines /= noise
            np.maximum(lines, 1.0, out=lines)
            better = z > out
            np.copyto(ratio, lines, where=better)
            del lines, better
        np.maximum(out, z, out=out)
        del z
    out[invalid] = 0.0
    return out, ratio


def score_map(residual: np.ndarray, valid: np.ndarray, scales, floor: float = 0.0) -> np.ndarray:
    """The score of `score_maps` alone."""
    return score_maps(residual, valid, scales, floor)[0]


def _row_offsets(c: np.ndarray, use: np.ndarray) -> np.ndarray:
    """Scan-line offsets by the median of differences between consecutive rows (as Gwyddion's
    row alignment), over pixels used in both rows; ``c`` should be lattice-free."""
    import warnings

    both = use[1:] & use[:-1]
    d = np.where(both, c[1:] - c[:-1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(d, axis=1)
    med = np.nan_to_num(med, nan=0.0)
    offs = np.concatenate([[0.0], np.cumsum(med)])
    return (offs - np.median(offs)).astype(np.float32)


def _merge(peaks: np.ndarray, vals: np.ndarray, dist: float) -> np.ndarray:
    """Indices of the peaks kept, strongest first: a peak is dropped when a stronger kept peak
    lies closer than ``dist``. The close pairs come from a k-d tree, so the cost goes with the
    peaks and their near neighbours, not with the square of the peaks."""
    from scipy.spatial import cKDTree

    order = np.argsort(-vals)
    if len(peaks) < 2 or not dist > 0:
        return np.asarray(order, np.int64)
    pts = np.asarray(peaks, np.float64)
    near = cKDTree(pts).query_ball_point(pts, np.nextafter(float(dist), 0.0))   # strictly closer
    dropped = np.zeros(len(pts), bool)
    kept: list[int] = []
    for i in order:
        if dropped[i]:
            continue
        kept.append(int(i))
        dropped[near[i]] = True
    return np.asarray(kept, np.int64)


def terrace_levelled(img01: np.ndarray, cfg: AnomalyConfig = AnomalyConfig()) -> tuple[np.ndarray, Terraces]:
    """(the image with scars removed and each terrace levelled by its own plane, its terraces):
    the first step of `detect`, and the display of a scan in pictures."""
    z = remove_scars(img01, cfg.steps.scar_k, cfg.steps.scar_min_length)
    # steps are found on the image without its lattice, whatever the lattice and pixel size
    lat0 = lattice_notch(z - float(np.mean(z)), cfg)[1]
    np.subtract(z, lat0, out=lat0)
    terr = detect_steps(lat0, cfg.steps)
    del lat0
    return level_terraces(z, terr), terr


def detect(img01: np.ndarray, cfg: AnomalyConfig = AnomalyConfig(),
           missing: np.ndarray | None = None) -> AnomalyResult:
    """``missing``: pixels without a measurement (a scale bar burned into a picture, NaN in the
    file). They take their nearest measured neighbour's value, count as residual 0 and, with
    a margin of twice the widest blob scale, are neither searched nor part of any noise estimate."""
    # Memory: image-sized intermediates are dropped (del) as soon as they are used up and
    # computed in place where that gives the same numbers, so a large scan holds few at once.
    if missing is not None and not missing.any():
        missing = None
    if missing is not None:
        img01 = fill_from_nearest(img01, missing)
    lev, terr = terrace_levelled(img01, cfg)
    valid = ~terr.band
    b = cfg.border
    if b:
        valid[:b] = valid[-b:] = False
        valid[:, :b] = valid[:, -b:] = False
    if missing is not None:
        valid &= ~ndi.binary_dilation(missing, structure=np.ones((3, 3), bool),
                                      iterations=int(np.ceil(2 * max(cfg.scales))))
    r = _terrace_residual(lev, terr, cfg.background_sigma)
    if missing is not None:
        r[missing] = 0.0
    clean, lat = lattice_notch(r, cfg)
    del r
    wall = None         # px beside the steps not searched (the noise is still estimated there)
    if cfg.step_lattice_periods > 0 and terr.n > 1:
        period = lattice_period(lat, cfg.min_freq)
        if period is not None:
            wall = cfg.step_lattice_periods * period
    clean -= step_profile(clean, terr, None, cfg.profile_dist, cfg.profile_tile)
    # second pass: background and step profile without the defects found by a first score
    s0 = score_map(clean, valid, cfg.scales)
    del clean
    w = (s0 < cfg.low_threshold).astype(np.float32)
    del s0
    if missing is not None:
        w[missing] = 0.0
    if cfg.row_median:   # scan-line offsets left by the row alignment (thin dark/bright stripes)
        offs = _row_offsets(lev - lat, valid & (w > 0))
        lev = lev - offs[:, None]
    clean = _terrace_residual(lev, terr, cfg.background_sigma, weight=w)
    clean -= lat
    clean -= step_profile(clean, terr, w, cfg.profile_dist, cfg.profile_tile)
    del w
    zero = terr.band if missing is None else terr.band | missing    # no residual here
    clean[zero] = 0.0
    floor = cfg.lattice_floor * float(np.std(lat[valid][::3])) if cfg.lattice_floor else 0.0
    # the score, signs and halos see the residual without its streaks; the regions keep
    # `clean` (the class patches are cut from it)
    scored = remove_streaks(clean, zero) if cfg.streak_filter else clean
    bank = GaussianBank(scored, max(*cfg.scales, _SIGN_SIGMA))
    del scored
    score, ratio = score_maps(clean, valid, cfg.scales, floor, cfg.line_noise, cfg.line_min_px, bank)

    pk = local_peaks(score, cfg.min_distance, cfg.threshold)    # skimage's peak_local_max
    if len(pk):
        pk = pk[valid[pk[:, 0], pk[:, 1]]]
    if len(pk) and wall is not None:
        pk = pk[terr.dist[pk[:, 0], pk[:, 1]] > wall]
    if len(pk) and ratio is not None:   # ... and above the threshold of its own scan lines
        pk = pk[score[pk[:, 0], pk[:, 1]] >= cfg.threshold * ratio[pk[:, 0], pk[:, 1]]]
    del ratio
    vals = score[pk[:, 0], pk[:, 1]] if len(pk) else np.zeros(0)
    if len(pk):
        keep = _merge(pk.astype(float), vals, cfg.merge_distance)
        pk, vals = pk[keep], vals[keep]
    smooth = bank.at(_SIGN_SIGMA)
    del bank
    sign = np.sign(smooth[pk[:, 0], pk[:, 1]]) if len(pk) else np.zeros(0)
    if cfg.halo_distance > 0 and len(pk) > 1:
        loc, sd = robust_location_scale(smooth[valid][::3])
        smooth -= loc
        smooth /= max(sd, floor, 1e-12)
    rep = halo_groups(pk, vals, sign, cfg.halo_distance, smooth, cfg.low_threshold,
                      cfg.halo_coverage, cfg.halo_ring_max)
    del smooth, valid
    region_map, regions = _regions(score, pk, vals, sign, rep, cfg)
    return AnomalyResult(score, clean, lev, lat, terr, region_map > 0, regions, region_map)


def _terrace_residual(lev: np.ndarray, terr: Terraces, sigma: float, weight=None) -> np.ndarray:
    """``lev`` minus its terrace background, 0 on the step band (float32)."""
    r = terrace_background(lev, terr, sigma, weight=weight)
    np.subtract(lev, r, out=r)
    r[terr.band] = 0.0
    return r


def halo_groups(pk: np.ndarray, vals: np.ndarray, sign: np.ndarray, dist: float,
                z: np.ndarray, low: float, coverage: float = 0.75, ring_max: float = 3.0,
                sectors: int = 12) -> np.ndarray:
    """For each peak, the index of the peak that stands for its defect (itself, mostly).

    A charged defect images as a core in a ring of the opposite sign (a bright core in a dark
    screening halo, or the reverse), and the ring gives score peaks of its own around the core,
    sometimes stronger than it. A peak is such a core when a ring of the opposite sign
    surrounds it: in at least ``coverage`` of ``sectors`` directions, the mean of ``z`` (the
    smoothed residual over its noise) along some 1-px arc within ``dist`` of it is beyond
    ``low`` with the opposite sign. Averaging along arcs keeps noise from faking a ring. The
    opposite-sign peaks within ``dist`` of a core, of score at most ``ring_max`` times the
    core's, are then part of its defect: a ring is induced by its core, so it is not much
    stronger than it, while a weak dip among strong defects is ringed by them too. Two separate
    defects of opposite sign side by side do not ring each other, so they stay two. Stronger
    cores claim first; a core is never claimed."""
    n = len(pk)
    rep = np.arange(n)
    if n < 2 or not dist > 0:
        return rep
    from scipy.spatial import cKDTree

    near = cKDTree(pk.astype(np.float64)).query_ball_point(pk.astype(np.float64), float(dist))
    h, w = z.shape
    r = int(np.ceil(dist))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    rho = np.hypot(yy, xx)
    inside = (rho >= 1.0) & (rho <= dist)
    sector = ((np.arctan2(yy, xx) + np.pi) / (2 * np.pi) * sectors).astype(int) % sectors
    cell = (sector * (r + 1) + np.rint(rho).astype(int))[inside]   # (sector, 1-px arc)
    ncell = sectors * (r + 1)
    cores = np.zeros(n, bool)
    for i in np.argsort(-vals, kind="stable"):
        others = [j for j in near[i] if sign[j] != sign[i] and rep[j] == j and not cores[j]
                  and vals[j] <= ring_max * vals[i]]
        if not others or rep[i] != i:
            continue
        y, x = pk[i]
        win = np.zeros((2 * r + 1, 2 * r + 1), np.float64)   # zero (no ring) beyond the scan
        sy0, sy1, sx0, sx1 = max(y - r, 0), min(y + r + 1, h), max(x - r, 0), min(x + r + 1, w)
        win[sy0 - (y - r):sy1 - (y - r), sx0 - (x - r):sx1 - (x - r)] = z[sy0:sy1, sx0:sx1]
        sums = np.bincount(cell, win[inside] * -sign[i], minlength=ncell)
        counts = np.bincount(cell, minlength=ncell)
        arc = (sums / np.maximum(counts, 1)).reshape(sectors, r + 1)
        if np.count_nonzero(arc.max(axis=1) > low) >= coverage * sectors:
            cores[i] = True
            rep[others] = i
    return rep


def _regions(score: np.ndarray, pk: np.ndarray, vals: np.ndarray, sign: np.ndarray,
             rep: np.ndarray, cfg: AnomalyConfig) -> tuple[np.ndarray, list[dict]]:
    """(region map, regions) of the defects of peaks ``pk`` (``rep``: the peak that stands for
    each peak's defect, see `halo_groups`): a defect gets the pixels of its peaks' score >
    low_threshold components that are nearer to one of its peaks than to any other peak, and
    a score-weighted centre around its standing peak. The map (int32) holds 1 + the id of the
    region of each of its pixels, 0 elsewhere."""
    regions, pixels = [], []
    h, w_ = score.shape
    rc = cfg.centre_radius
    if len(pk):
        lab = label(score > cfg.low_threshold, connectivity=2)
        boxes = ndi.find_objects(lab)
        # pixels of each component go to their nearest peak (Voronoi split of touching defects),
        # and a peak's pixels to the defect it is part of. Owners are needed only for pixels of
        # components that hold a peak (regions) and for component pixels in the centre windows
        own_comp = lab[pk[:, 0], pk[:, 1]]
        has_peak = np.zeros(len(boxes) + 1, bool)
        has_peak[own_comp] = True
        has_peak[0] = False
        need = has_peak[lab]
        for y, x in pk[rep == np.arange(len(pk))]:
            y0, y1, x0, x1 = max(0, y - rc), min(h, y + rc + 1), max(0, x - rc), min(w_, x + rc + 1)
            need[y0:y1, x0:x1] |= lab[y0:y1, x0:x1] > 0
        owner = nearest_owner(score.shape, pk, need)
        del need
        if (rep != np.arange(len(pk))).any():
            owner = np.concatenate([[0], rep + 1]).astype(np.int32)[owner]
        for i, (y, x) in enumerate(pk):
            if rep[i] != i:
                continue
            y0, y1 = max(0, y - rc), min(h, y + rc + 1)
            x0, x1 = max(0, x - rc), min(w_, x + rc + 1)
            win = score[y0:y1, x0:x1]
            wts = np.clip(win - cfg.low_threshold, 0, None) * (owner[y0:y1, x0:x1] == i + 1)
            if wts.sum() <= 0:
                cy, cx = float(y), float(x)
            else:
                yy, xx = np.mgrid[y0:y1, x0:x1]
                cy = float((wts * yy).sum() / wts.sum())
                cx = float((wts * xx).sum() / wts.sum())
            ys, xs = [], []
            for c in np.unique(own_comp[rep == i]):
                # the component's bounding box holds all of it (the whole scan for no component)
                box = boxes[c - 1] if c > 0 else (slice(0, h), slice(0, w_))
                yc, xc = np.nonzero((lab[box] == c) & (owner[box] == i + 1))
                ys.append(yc + box[0].start)
                xs.append(xc + box[1].start)
            ys, xs = np.concatenate(ys), np.concatenate(xs)
            if not len(ys):   # a peak under low_threshold (threshold set below it) owns no pixel
                ys, xs = np.array([y]), np.array([x])
            pixels.append((ys, xs))
            regions.append({
                "x": cx, "y": cy,
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                "area_px": len(ys), "score": float(vals[rep == i].max()),
                "peak": [int(y), int(x)], "sign": float(sign[i]),
            })
    order = sorted(range(len(regions)), key=lambda j: (regions[j]["y"], regions[j]["x"]))
    region_map = np.zeros(score.shape, np.int32)
    for i, j in enumerate(order):
        region_map[pixels[j]] = i + 1
    return region_map, [{"id": i, **regions[j]} for i, j in enumerate(order)]


def nearest_owner(shape: tuple[int, int], pk: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """(H, W) int32: 1 + index of the peak of ``pk`` nearest to each pixel of ``where`` (all
    pixels for None; 0 elsewhere). Euclidean, from a k-d tree over the peaks, so the cost goes
    with the pixels asked about, not the scan; a pixel exactly as far from two peaks goes to
    either."""
    from scipy.spatial import cKDTree

    owner = np.zeros(shape, np.int32)
    if not len(pk):
        return owner
    ys, xs = np.nonzero(np.ones(shape, bool) if where is None else where)
    if ys.size:
        _, idx = cKDTree(np.asarray(pk, np.float64)).query(np.column_stack([ys, xs]).astype(np.float64))
        owner[ys, xs] = idx.astype(np.int32) + 1
    return owner
