"""The training objective of the paper: Eq. (10) with the position weights of Eq. (11),
and the weighted token embedding of Eq. (12) that the model calls.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def weighted_embedding(weight: Tensor, tokens: Tensor, keep: Tensor | None, mask_id: int) -> Tensor:
    """Eq. (12): e^{-gamma sigma_bar} f(x) + (1 - e^{-gamma sigma_bar}) f(MASK).

    ``weight`` is the (V, h) embedding table, ``tokens`` (B, L) ids, ``keep`` (B, L) the
    per-token keep weight from :meth:`Process.embed_keep` (None: plain embedding).
    """
    emb = weight[tokens]
    if keep is None:
        return emb
    keep = keep.to(emb.dtype).unsqueeze(-1)
    return keep * emb + (1.0 - keep) * weight[mask_id]


def position_weights(d: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Eq. (11): w(i) = floor(i / omega) / (ceil(d / omega) - 1), and w = 1 when ceil(d/omega) = 1."""
    n_blocks = math.ceil(d / width)
    if n_blocks == 1:
        return torch.ones(d, device=device, dtype=dtype)
    i = torch.arange(d, device=device)
    return (i // width).to(dtype) / (n_blocks - 1)
