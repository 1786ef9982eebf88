"""Dense (fully convolutional) encoding of overlapping windows.

Encoding every 32x32 window of a 512x512 scan at stride 4 repeats the same convolutions ~50
times per pixel. Here the convolution/pooling trunk of the encoder runs once per pooling phase
over the whole image, and each window's latent is the dense head applied to its block of the
shared feature map. The only difference from encoding windows one by one is at window borders:
there the shared trunk sees the neighbouring pixels where a lone window sees zero padding.
`benchmarks/bench_predict.py --compare-dense` measures how often the character map changes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from stm_defects.models.training import encode, resolve_device


def split_encoder(model) -> tuple[nn.Module, nn.Module, int]:
    """(trunk: convs + pools, head: dropout/flatten/dense layers, total pooling stride)."""
    layers = list(model.encoder)
    cut = max(i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)) + 1
    stride = 2 ** sum(isinstance(m, nn.MaxPool2d) for m in layers)
    return nn.Sequential(*layers[:cut]), nn.Sequential(*layers[cut:]), stride


@torch.inference_mode()
def encode_windows(model, img01: np.ndarray, origins: np.ndarray, size: int, device="auto",
                   min_group: int = 64, batch: int = 4096) -> np.ndarray:
    """Latents (N, d) of the windows at `origins` (N, 2) of `img01`, sharing the conv trunk.

    Windows whose origin phase (modulo the pooling stride) is shared by fewer than `min_group`
    windows are encoded one by one.
    """
    dev = resolve_device(device)
    was_training = model.training
    model.eval().to(dev)
    trunk, head, st = split_encoder(model)
    b = size // st
    img = torch.from_numpy(np.ascontiguousarray(img01, dtype=np.float32)).to(dev)
    out: np.ndarray | None = None
    phase = origins % st                                                  # (N, 2)
    keys = phase[:, 0] * st + phase[:, 1]
    lone = []
    try:
        for key in np.unique(keys):
            idx = np.flatnonzero(keys == key)
            if len(idx) < min_group:
                lone.append(idx)
                continue
            pr, pc = phase[idx[0]]
            feats = trunk(img[None, None, pr:, pc:])                       # (1, C, h, w)
            r = (origins[idx, 0] - pr) // st
            c = (origins[idx, 1] - pc) // st
            blocks = feats[0].unfold(1, b, 1).unfold(2, b, 1)               # (C, h-b+1, w-b+1, b, b)
            for s in range(0, len(idx), batch):
                sel = slice(s, s + batch)
                rr = torch.from_numpy(r[sel]).to(dev)
                cc = torch.from_numpy(c[sel]).to(dev)
                x = blocks[:, rr, cc].permute(1, 0, 2, 3)                   # (n, C, b, b)
                z = head(x.contiguous()).float().cpu().numpy()
                if out is None:
                    out = np.empty((len(origins), z.shape[1]), np.float32)
                out[idx[sel]] = z
        if lone:
            idx = np.concatenate(lone)
            patches = np.stack([img01[r:r + size, c:c + size] for r, c in origins[idx]])[:, None]
            z = encode(model, patches.astype(np.float32), device=dev)
            if out is None:
                out = np.empty((len(origins), z.shape[1]), np.float32)
            out[idx] = z
    finally:
        model.train(was_training)
    return out
