"""The exact NLL of an autoregressive model: Quench + SHIFTED (paper §2.2, Standard AR).

With 𝒯 = 1 and a SHIFTED model every position is predicted once, from the clean prefix, by the
next-token cross-entropy: one forward pass gives −log p(y) exactly (standard error 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..layout import attention_mask, inference_cells
from ..processes import cross_entropy
from .discrete import ReverseChain, position_chunks


def exact_ar_values(chain: ReverseChain, y: Tensor) -> Tensor:
    """(B, 1) exact NLL of a Quench + SHIFTED model: Σ_i −log softmax(raw_i)[y_i], one forward pass."""
    d = y.shape[1]
    level = torch.ones(d, dtype=torch.float64, device=y.device)
    cells, out_index = inference_cells(y, level, 0, d, chain.process, 1, ar=True,
                                       settled_attention=chain.settled_attention, block_width=chain.schedule.width)
    mask = attention_mask(cells.layout, cells.layout, device=y.device)
    raw = chain.model(cells.tokens, cells.sigma, cells.positions, mask, keep=cells.keep, out_index=out_index)
    total = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
    for a, b in position_chunks(d, y.shape[0] * raw.shape[-1]):
        total += cross_entropy(raw[:, a:b].to(torch.float64), y[:, a:b]).sum(-1)
    return total.unsqueeze(-1)
