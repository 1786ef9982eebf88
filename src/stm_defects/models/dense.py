"""Dense encoding of overlapping windows, equal to encoding each window on its own.

Encoding every 32x32 window of a 512x512 scan at stride 4 repeats the same convolutions ~50
times per pixel. :func:`encode_windows` shares that work between windows and still returns, to
float rounding, what ``models.training.encode`` returns for the extracted windows.

Why running the trunk over the whole image is not enough
--------------------------------------------------------
The encoder's convolutions zero-pad *the window* ('same' padding): a lone window sees zeros
beyond its border where a convolution over the whole image sees the neighbouring pixels. The
difference moves inwards by the kernel radius at every convolution, so with the default AE1
(three 3x3 convolutions, three 2x2 pools) 12 of the 16 bottleneck cells of a window differ. The
earlier version of this module did exactly that and moved ~18% of windows to another K-means
cluster.

How it is made exact
--------------------
Per axis, a feature at position ``u`` of a window (at some layer) depends on the window only
through the distances from ``u`` to the window's borders, and only while ``u`` lies within the
*band* (receptive-field distance) of a border. So each position has a *class*: ``("T", k)`` (k
cells below the top border, k < band), ``("B", k)`` (k cells above the bottom border) or
``("I", 0)`` (interior: the window-independent value). Rows and columns are independent, so a
2-D class is a (row class, column class) pair, and within a pair the feature is a function of
the absolute position alone. Each class is computed once at the positions (origins + offset)
where some window has it, and shared by all those windows: interior values by every window
covering them, (T0, I) values by all the windows of one origin row; only corner pairs such as
(T0, T1) are per window. A convolution grows the band by its kernel radius, a p x p pool
shrinks it to ceil(band / p), pointwise layers keep it.

All classes of a layer live in one channels-last buffer (rows = positions, class after class,
plus one zero row). A convolution gathers each output position's kernel taps from the classes
they reach, with taps in the window's zero padding left out, and multiplies once by the
matching weights; output classes that use the same taps share one gather + matmul. Eval
BatchNorm is folded into the convolution before it. A pool gathers its p x p cells and takes
the max. A pool also needs the window origins to be multiples of p at its input: windows of
each origin phase continue on their own pooling grid (a tree, so the layers before the split
stay shared; at stride 4 only the last pool splits). The head (dropout, flatten, dense) runs on
each window's gathered bottleneck block, as in the per-window path.

Cost, 512x512 scan, stride 4, slim AE1 (16-32-64): ~7 GMAC instead of ~37 GMAC window by
window (the corner classes, per window, are most of it). Encoders with other layers in the
trunk (strided or dilated convolutions, other pools, batch-statistics BatchNorm) fall back to
encoding window by window.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stm_defects.image.windows import windows_at
from stm_defects.models.training import encode, resolve_device

__all__ = ["clear_workspace", "encode_windows", "split_encoder"]

_INTERIOR = ("I", 0)
_POINTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
              nn.Identity, nn.Dropout, nn.Dropout2d)


def split_encoder(model) -> tuple[list[nn.Module], nn.Module, int] | None:
    """(trunk layers up to the last pool, head (dropout/flatten/dense), total pooling factor).

    None when the encoder has a trunk layer that :func:`encode_windows` cannot share (anything
    but stride-1 zero-'same'-padded odd convolutions, pointwise layers, eval BatchNorm with
    running statistics and non-overlapping max pools). A trunk without pools ends at the last
    convolution.
    """
    layers = list(model.encoder)
    spatial = [i for i, m in enumerate(layers) if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
    if not spatial:
        return None
    pools = [i for i in spatial if isinstance(layers[i], nn.MaxPool2d)]
    cut = (pools[-1] if pools else spatial[-1]) + 1
    trunk, factor = layers[:cut], 1
    for m in trunk:
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            ok = (m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == 1 and kh % 2 and kw % 2
                  and m.padding_mode == "zeros" and (m.padding == "same" or tuple(m.padding) == (kh // 2, kw // 2)))
        elif isinstance(m, nn.MaxPool2d):
            p = _pool_factor(m)
            ok = p is not None
            factor *= p or 1
        elif isinstance(m, nn.BatchNorm2d):
            ok = m.track_running_stats and m.running_mean is not None
        else:
            ok = isinstance(m, _POINTWISE)
        if not ok:
            return None
    return trunk, nn.Sequential(*layers[cut:]), factor


def _pool_factor(m: nn.MaxPool2d) -> int | None:
    """p for a p x p max pool with stride p and no padding, else None."""
    ks = m.kernel_size if isinstance(m.kernel_size, int) else set(m.kernel_size)
    st = m.stride if isinstance(m.stride, int) else set(m.stride)
    pad = m.padding if isinstance(m.padding, int) else max(m.padding)
    dil = m.dilation if isinstance(m.dilation, int) else max(m.dilation)
    if isinstance(ks, set) and len(ks) == 1:
        ks = ks.pop()
    if isinstance(st, set) and len(st) == 1:
        st = st.pop()
    if isinstance(ks, int) and ks == st and pad == 0 and dil == 1 and not m.ceil_mode:
        return ks
    return None


# --------------------------------------------------------------------------------------------
# One axis (rows or columns) of a set of windows at one layer


@dataclass
class _Axis:
    """Rows (or columns) of windows at one layer of the trunk, in that layer's cells.

    size: window side at this layer; band: cells from each border whose value depends on the
    window's zero padding; origins: sorted unique window origins (this layer's coordinates).
    """

    size: int
    band: int
    origins: np.ndarray
    _pos: dict = field(default_factory=dict, repr=False)

    def cls(self, u: int):
        """Class of relative position ``u`` (None outside the window)."""
        if u < 0 or u >= self.size:
            return None
        if u < self.band:
            return ("T", u)
        if u >= self.size - self.band:
            return ("B", self.size - 1 - u)
        return _INTERIOR

    @property
    def classes(self) -> list:
        return sorted({self.cls(u) for u in range(self.size)})

    def rel(self, c) -> int | None:
        """Relative position of a border class (None for the interior)."""
        kind, k = c
        return k if kind == "T" else self.size - 1 - k if kind == "B" else None

    def positions(self, c) -> np.ndarray:
        """Sorted positions (this layer's coordinates) at which some window has class ``c``."""
        if c not in self._pos:
            u = self.rel(c)
            if u is not None:
                p = self.origins + u
            else:
                inner = np.arange(self.band, self.size - self.band)
                p = np.unique((self.origins[:, None] + inner[None, :]).ravel())
            self._pos[c] = p
        return self._pos[c]

    def locate(self, c, pos: np.ndarray) -> np.ndarray:
        """Indices of ``pos`` in ``positions(c)`` (every one must be there)."""
        have = self.positions(c)
        idx = np.searchsorted(have, pos)
        if len(pos) and (idx.max() >= len(have) or not np.array_equal(have[idx], pos)):
            raise AssertionError("dense encoding: a needed position was not computed")
        return idx


def _conv_taps(src: _Axis, dst: _Axis, h: int) -> dict:
    """Per output class of ``dst``, per tap offset -h..h: (input class, input indices), or None
    where the tap reads the window's zero padding."""
    plan = {}
    for c in dst.classes:
        u, pos = dst.rel(c), dst.positions(c)
        taps = []
        for d in range(-h, h + 1):
            ci = _INTERIOR if u is None else src.cls(u + d)
            taps.append(None if ci is None else (ci, src.locate(ci, pos + d)))
        plan[c] = taps
    return plan


def _pool_taps(src: _Axis, dst: _Axis, p: int, phase: int) -> dict:
    """Per output class of ``dst``, per pooled cell 0..p-1: (input class, input indices)."""
    plan = {}
    for c in dst.classes:
        u, pos = dst.rel(c), dst.positions(c) * p + phase
        cells = [_INTERIOR if u is None else src.cls(p * u + d) for d in range(p)]
        plan[c] = [(ci, src.locate(ci, pos + d)) for d, ci in enumerate(cells)]
    return plan


# --------------------------------------------------------------------------------------------
# Features of all classes in one buffer: (n + 1, C), channels last, last row zero


class _Layout:
    """Row ranges of the class maps in a feature buffer.

    Class (a, b) occupies ``n_r(a) * n_c(b)`` consecutive rows (row-major over its row and
    column positions); the buffer has one more row, kept zero, that padded taps read.
    """

    def __init__(self, ar: _Axis, ac: _Axis, keys=None) -> None:
        self.ar, self.ac = ar, ac
        self.keys = list(keys) if keys is not None else [(a, b) for a in ar.classes for b in ac.classes]
        self.offset, n = {}, 0
        for a, b in self.keys:
            self.offset[a, b] = n
            n += len(ar.positions(a)) * len(ac.positions(b))
        self.n = n

    def rows(self, a, b, ri: np.ndarray, ci: np.ndarray) -> np.ndarray:
        """Buffer rows of class (a, b) at its row indices ``ri`` x column indices ``ci``."""
        return self.offset[a, b] + ri[:, None] * len(self.ac.positions(b)) + ci[None, :]


class _Arena:
    """Named scratch buffers, grown on demand and reused: by sibling pooling grids, by row tiles
    and (through :func:`_workspace`) by later calls in the same thread. Fresh memory costs a
    page fault per 4 KB on first touch; for a 512x512 scan that was ~30% of the time."""

    def __init__(self, device) -> None:
        self.device, self.bufs = device, {}

    def get(self, key, rows: int, cols: int) -> torch.Tensor:
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < rows * cols:
            self.bufs.pop(key, None)
            buf = self.bufs[key] = torch.empty(rows * cols, dtype=torch.float32, device=self.device)
        return buf[:rows * cols].view(rows, cols)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bufs.values())


_LOCAL = threading.local()
_KEEP_BYTES = 512 << 20       # workspaces up to this size are kept for the next call


def _workspace(device: torch.device) -> _Arena:
    """This thread's arena for ``device`` (kept between calls while under ``_KEEP_BYTES``)."""
    arenas = _LOCAL.__dict__.setdefault("arenas", {})
    if str(device) not in arenas:
        arenas[str(device)] = _Arena(device)
    return arenas[str(device)]


def clear_workspace() -> None:
    """Free the scratch buffers :func:`encode_windows` keeps for the calling thread."""
    _LOCAL.__dict__.pop("arenas", None)


def _chunks(n: int, width: int):
    """Row slices so that a gathered (rows, width) block stays around 32 MB (fewer, larger
    operations: on a busy 2-core machine every parallel operation can stall on its barrier)."""
    step = max(256, (1 << 23) // max(width, 1))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def _ops(trunk: list[nn.Module]) -> list[tuple]:
    """The trunk as ("conv", weight (kh, kw, Cin, Cout), bias), ("pool", p), ("pointwise", fn)
    on (n, C) features. Eval BatchNorm is a per-channel affine map, folded into the convolution
    before it (equal to float rounding)."""
    ops: list[tuple] = []
    for m in trunk:
        if isinstance(m, nn.Conv2d):
            b = m.bias if m.bias is not None else m.weight.new_zeros(m.out_channels)
            ops.append(("conv", m.weight.permute(2, 3, 1, 0), b))
        elif isinstance(m, nn.BatchNorm2d):
            scale = torch.rsqrt(m.running_var + m.eps)
            shift = -m.running_mean * scale
            if m.affine:
                scale, shift = scale * m.weight, shift * m.weight + m.bias
            if ops and ops[-1][0] == "conv":
                _, w, b = ops[-1]
                ops[-1] = ("conv", w * scale, b * scale + shift)
            else:
                ops.append(("pointwise", lambda x, a=scale, c=shift: torch.addcmul(c, x, a)))
        elif isinstance(m, nn.MaxPool2d):
            ops.append(("pool", _pool_factor(m)))
        else:
            ops.append(("pointwise", m))
    return ops


def _conv(w: torch.Tensor, bias: torch.Tensor, feats: torch.Tensor, lay: _Layout, arena: _Arena, key):
    """A zero-padded 'same' convolution (weights (kh, kw, Cin, Cout)) of every class.

    An output class whose taps (padded taps left out) all read one input class on a regular
    grid is a strided ``conv2d`` of that class map (the interior, and every class of the first
    layer). The others gather each output row's taps and multiply once; classes using the same
    taps share the gathers and matmuls. The output layout keeps each batch contiguous.
    """
    hr, hc = w.shape[0] // 2, w.shape[1] // 2
    ar = _Axis(lay.ar.size, lay.ar.band + hr, lay.ar.origins)
    ac = _Axis(lay.ac.size, lay.ac.band + hc, lay.ac.origins)
    rplan, cplan = _conv_taps(lay.ar, ar, hr), _conv_taps(lay.ac, ac, hc)
    grids, groups = [], {}
    for a in ar.classes:
        for b in ac.classes:
            rt, ct = _grid_taps(rplan[a]), _grid_taps(cplan[b])
            if rt is not None and ct is not None:
                grids.append(((a, b), rt, ct))
            else:
                used = tuple((i, j) for i, r in enumerate(rplan[a]) if r for j, c in enumerate(cplan[b]) if c)
                groups.setdefault(used, []).append((a, b))
    out_lay = _Layout(ar, ac, [g[0] for g in grids] + [k for keys in groups.values() for k in keys])
    cin, cout = w.shape[2:]
    out = arena.get(key, out_lay.n + 1, cout)
    out[-1] = 0
    wt = w.permute(3, 2, 0, 1)                                           # (Cout, Cin, kh, kw)
    for (a, b), (ca, i0, i1, r0, gr), (cb, j0, j1, c0, gc) in grids:
        nr, nc = len(ar.positions(a)), len(ac.positions(b))
        off, n_in = lay.offset[ca, cb], len(lay.ac.positions(cb))
        x = feats[off:off + len(lay.ar.positions(ca)) * n_in].view(-1, n_in, cin).permute(2, 0, 1)
        x = x[:, r0:r0 + (nr - 1) * gr + i1 - i0, c0:c0 + (nc - 1) * gc + j1 - j0]
        y = F.conv2d(x[None], wt[:, :, i0:i1, j0:j1], bias, stride=(gr, gc))[0]     # (Cout, nr, nc)
        start = out_lay.offset[a, b]
        out[start:start + nr * nc].view(nr, nc, cout).copy_(y.permute(1, 2, 0))
    for used, keys in groups.items():
        idx = np.concatenate([
            np.stack([lay.rows(rplan[a][i][0], cplan[b][j][0], rplan[a][i][1], cplan[b][j][1]).ravel()
                      for i, j in used], axis=1) for a, b in keys])       # (n_group, taps)
        idx = torch.from_numpy(idx.ravel()).to(feats.device)
        wg = torch.cat([w[i, j] for i, j in used])                       # (taps * Cin, Cout)
        k, start = wg.shape[0], out_lay.offset[keys[0]]
        for sl in _chunks(len(idx) // len(used), k):
            g = arena.get("gather", sl.stop - sl.start, k)
            torch.index_select(feats, 0, idx[sl.start * len(used):sl.stop * len(used)], out=g.view(-1, cin))
            torch.addmm(bias, g, wg, out=out[start + sl.start:start + sl.stop])
    return out, out_lay


def _grid_taps(taps: list) -> tuple | None:
    """(input class, first tap, end tap, first index, step) when the taps in use (one axis,
    [(class, indices)] or None per offset) read one input class at index first + step * j +
    (tap - first tap) for output j: a strided convolution with the kernel's taps first..end.
    None otherwise."""
    live = [(t, c, i) for t, tap in enumerate(taps) if tap for c, i in [tap]]
    t0, c0, i0 = live[0]
    if any(c != c0 or not np.array_equal(i, i0 + (t - t0)) for t, c, i in live) or live[-1][0] - t0 + 1 != len(live):
        return None
    step = int(i0[1] - i0[0]) if len(i0) > 1 else 1
    if step < 1 or not np.array_equal(np.diff(i0), np.full(len(i0) - 1, step)):
        return None
    return c0, t0, t0 + len(live), int(i0[0]), step


def _pool(p: int, feats: torch.Tensor, lay: _Layout, arena: _Arena, key, phase_r: int, phase_c: int,
          rows: np.ndarray, cols: np.ndarray):
    """p x p max pool for the windows with origin rows ``rows`` and columns ``cols`` (input cells)."""
    ar = _Axis(lay.ar.size // p, math.ceil(lay.ar.band / p), (rows - phase_r) // p)
    ac = _Axis(lay.ac.size // p, math.ceil(lay.ac.band / p), (cols - phase_c) // p)
    rplan, cplan = _pool_taps(lay.ar, ar, p, phase_r), _pool_taps(lay.ac, ac, p, phase_c)
    out_lay = _Layout(ar, ac)
    idx = np.concatenate([
        np.stack([lay.rows(ca, cb, ri, ci).ravel() for ca, ri in rplan[a] for cb, ci in cplan[b]], axis=1)
        for a, b in out_lay.keys])                                       # (n, p * p)
    idx = torch.from_numpy(idx.ravel()).to(feats.device)
    c = feats.shape[1]
    out = arena.get(key, out_lay.n + 1, c)
    out[-1] = 0
    for sl in _chunks(out_lay.n, p * p * c):
        g = arena.get("gather", (sl.stop - sl.start) * p * p, c)
        torch.index_select(feats, 0, idx[sl.start * p * p:sl.stop * p * p], out=g)
        torch.amax(g.view(-1, p * p, c), dim=1, out=out[sl])
    return out, out_lay


def _run(ops: list, feats: torch.Tensor, lay: _Layout, pix_r, pix_c, arena: _Arena, leaf,
         start: int = 0, slot: tuple = (0, 1)) -> None:
    """Run ``ops[start:]`` on the features, then ``leaf(layout, pixel origin rows, pixel origin
    cols, features)`` once per pooling grid. ``pix_r``/``pix_c``: the windows' pixel origins,
    aligned with the axes' origins. ``slot`` (level, parity) names the arena buffer holding
    ``feats``: each layer writes the other parity, and the grids after a split write one level
    deeper, one after the other, so the buffer they all read stays intact."""
    level, parity = slot
    for i in range(start, len(ops)):
        op = ops[i]
        if op[0] == "conv":
            parity = 1 - parity
            feats, lay = _conv(op[1], op[2], feats, lay, arena, (level, parity))
        elif op[0] == "pool":
            p = op[1]
            phases_r, phases_c = np.unique(lay.ar.origins % p), np.unique(lay.ac.origins % p)
            child_slot = (level, 1 - parity) if len(phases_r) * len(phases_c) == 1 else (level + 1, 0)
            for fr in phases_r:                                         # one pooling grid per phase
                sr = lay.ar.origins % p == fr
                for fc in phases_c:
                    sc = lay.ac.origins % p == fc
                    child, clay = _pool(p, feats, lay, arena, child_slot, int(fr), int(fc),
                                        lay.ar.origins[sr], lay.ac.origins[sc])
                    _run(ops, child, clay, pix_r[sr], pix_c[sc], arena, leaf, i + 1, child_slot)
            return
        else:
            feats = op[1](feats)                                        # pointwise, in any layout
            feats[-1] = 0
    leaf(lay, pix_r, pix_c, feats)


def _blocks(lay: _Layout, feats: torch.Tensor, orr: np.ndarray, occ: np.ndarray) -> torch.Tensor:
    """(n, C, s, s) bottleneck blocks of the windows at (this layer's) origins ``orr``, ``occ`` (n,)."""
    ar, ac = lay.ar, lay.ac
    idx = np.empty((len(orr), ar.size, ac.size), np.int64)
    for u in range(ar.size):
        cu = ar.cls(u)
        ri = ar.locate(cu, orr + u)
        for v in range(ac.size):
            cv = ac.cls(v)
            idx[:, u, v] = lay.offset[cu, cv] + ri * len(ac.positions(cv)) + ac.locate(cv, occ + v)
    g = feats.index_select(0, torch.from_numpy(idx.ravel()).to(feats.device))
    return g.view(len(orr), ar.size, ac.size, -1).permute(0, 3, 1, 2)


@torch.inference_mode()
def encode_windows(model, img01: np.ndarray, origins: np.ndarray, size: int, device="auto",
                   batch: int = 4096, max_windows: int = 16384) -> np.ndarray:
    """Latents (N, d) float32 of the ``size`` x ``size`` windows at ``origins`` (N, 2) of ``img01``.

    Equal (to float rounding) to ``encode(model, windows)`` on the extracted windows, but the
    convolutions are shared between overlapping windows (see the module docstring). Work is done
    on the grid of the origins' unique rows x unique columns, so it suits window grids. Origin
    rows are taken in tiles of at most ``max_windows`` grid windows, which bounds memory (~250
    MB for 16384 windows of the slim AE1; a tile recomputes the pixels it shares with the
    previous one). The scratch buffers are kept for the next call in the same thread (up to
    512 MB; :func:`clear_workspace` frees them). ``batch``: windows per call of the dense head.
    The model's train/eval mode is restored afterwards.
    """
    img = np.asarray(img01, dtype=np.float32)
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    if len(origins) and (origins.min() < 0 or origins[:, 0].max() > img.shape[0] - size
                         or origins[:, 1].max() > img.shape[1] - size):
        raise ValueError("every window must lie inside the image")
    dev = resolve_device(device)
    was_training = model.training
    model.eval().to(dev)
    try:
        parts = split_encoder(model)
        if parts is None or size % parts[2] or len(origins) == 0:
            patches, _ = windows_at(img, origins + size // 2, size)
            return encode(model, patches, device=dev)
        ops, head = _ops(parts[0]), parts[1]
        rows, cols = np.unique(origins[:, 0]), np.unique(origins[:, 1])
        row_of = np.searchsorted(rows, origins[:, 0])
        step = max(1, max_windows // len(cols))
        x = torch.from_numpy(np.ascontiguousarray(img)).to(dev)
        arena = _workspace(dev)
        out: list = [None]

        def leaf(lay, pix_r, pix_c, feats):
            mine = tile[np.isin(origins[tile, 0], pix_r) & np.isin(origins[tile, 1], pix_c)]
            orr = lay.ar.origins[np.searchsorted(pix_r, origins[mine, 0])]
            occ = lay.ac.origins[np.searchsorted(pix_c, origins[mine, 1])]
            for b in range(0, len(mine), batch):
                z = head(_blocks(lay, feats, orr[b:b + batch], occ[b:b + batch])).float().cpu().numpy()
                if out[0] is None:
                    out[0] = np.empty((len(origins), z.shape[1]), np.float32)
                out[0][mine[b:b + batch]] = z

        for s in range(0, len(rows), step):                     # tiles of origin rows
            tile = np.flatnonzero((row_of >= s) & (row_of < s + step))
            lay = _Layout(_Axis(size, 0, rows[s:s + step]), _Axis(size, 0, cols))
            pr = torch.from_numpy(lay.ar.positions(_INTERIOR)).to(dev)
            pc = torch.from_numpy(lay.ac.positions(_INTERIOR)).to(dev)
            feats = arena.get((0, 1), lay.n + 1, 1)
            feats[-1] = 0
            feats[:-1, 0] = x.index_select(0, pr).index_select(1, pc).reshape(-1)
            _run(ops, feats, lay, lay.ar.origins, lay.ac.origins, arena, leaf)
        if arena.nbytes > _KEEP_BYTES:
            clear_workspace()
        return out[0]
    finally:
        model.train(was_training)
