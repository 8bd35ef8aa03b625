"""The continuous estimate: Algorithm 1 of the paper on the training NELBO (App. C.1; DESIGN.md §2).

M draws of the training objective per sequence (model in eval mode, fixed seeds): the SEDD/MDLM
continuous-time bound applied position-wise with rates |dℓ_i/du|. It bounds the T → ∞ process
(up to the prior term those papers omit too) and is what published tables report.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..runtime import Stream, small_seed


def continuous_values(objective, model, y: Tensor, idx: Sequence[int], M: int, seed: int) -> Tensor:
    """(B, M) values d · NELBO per token from the training objective, fixed seeds per (sequence, draw)."""
    d = y.shape[1]
    out = torch.zeros(len(idx), M, dtype=torch.float64)
    for m in range(M):
        seeds = torch.tensor([small_seed(seed, Stream.BOUND_SAMPLE, gi, m) for gi in idx], dtype=torch.long)
        objective(model, y, seeds, small_seed(seed, Stream.BOUND_BATCH, m))
        out[:, m] = objective.last_nelbo.detach().to(torch.float64).cpu() * d
    return out
