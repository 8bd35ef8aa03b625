"""Continuous-time numbers from the training NELBO: Algorithm 1 (an estimate) and a true bound.

``continuous`` (Algorithm 1 of the paper, App. C.1; DESIGN.md §2): M draws of the training
objective per sequence (model in eval mode, fixed seeds), the SEDD/MDLM continuous-time NELBO
applied position-wise with rates |dℓ_i/du|. It omits the prior term KL(q(x_1 | y) ‖ p(x_1)): with
noise whose α(1) > 0 (log-linear: α(1) = 10⁻³) the forward marginal at s = 1 is not the all-MASK
start of the samplers and that term is infinite, so this number is an *estimate comparable with
published tables*, not a bound on anything hdlm samples (it can fall below the data entropy).

``continuous-bound`` (masking family: MDLM and SEDD-absorb): the same integrand over the masking
chain stretched to mask every token at s = 1, 1 − α̃(s) = (1 − α(s)) / (1 − α(1)). Its reveal
probability (α̃(s) − α̃(t)) / (1 − α̃(t)) is exactly the samplers' p_transfer = (α(s) − α(t)) / (1 − α(t)),
so the samplers (model conditioned on σ̄(s), as they run it) are the reverse of this chain, which
starts at all-MASK: the prior term is 0 and the NELBO is an upper bound on −log p(y) of the
T → ∞ sampler (docs/likelihood.md). The weight −α̃'/(1 − α̃) = −α'/(1 − α) is unchanged; only the
masking probability grows by 1/(1 − α(1)).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..errors import HDLMError
from ..processes import MDLM, Process
from ..runtime import Stream, small_seed


class PriorMatched(MDLM):
    """The masking chain of :func:`prior_matched`: 1 − α̃(s) = (1 − α(s)) / (1 − α(1)), MASK at s = 1.

    ``noise`` stays the process's own, so the cells condition the model on σ̄(s) exactly as the
    samplers do; only the forward masking probability and the loss's normalisation change.
    """

    def __init__(self, N: int, noise):
        super().__init__(N, noise)
        one = torch.ones((), dtype=torch.float64)
        self.top = float(-torch.expm1(-noise.sigma_bar(one)))  # 1 − α(1)

    def _mask_prob(self, s: Tensor) -> Tensor:
        return (super()._mask_prob(s) / self.top).clamp(max=1.0)

    def diffusion_loss(self, raw: Tensor, x: Tensor, y: Tensor, s, rate, aux: dict | None = None) -> Tensor:
        """MDLM's integrand −α̃'/(1 − α̃) CE on masked tokens = −α'/(1 − α) CE (HDCE at ε = 0, over 1 − α(1))."""
        return super().diffusion_loss(raw, x, y, s, rate, aux) / self.top


def prior_matched(process: Process) -> PriorMatched:
    """The chain whose NELBO bounds the masking samplers of ``process`` (MDLM, or SEDD-absorb read as
    clean-token logits: DWDSE at γ = 0 is the same integrand). Other processes: an HDLMError."""
    masking = (process.family == "mean" and process.epsilon == 0.0) or (
        process.family == "score" and process.gamma == 0.0 and process.parametrisation == "subs")
    if not masking:
        raise HDLMError("continuous-bound: certifies the masking samplers only (mdlm, absorb); for "
                        f"{type(process).__name__} use the discrete bound, which certifies its sampler")
    return PriorMatched(process.N, process.noise)


def continuous_values(objective, model, y: Tensor, idx: Sequence[int], M: int, seed: int) -> Tensor:
    """(B, M) values d · NELBO per token from the training objective, fixed seeds per (sequence, draw)."""
    d = y.shape[1]
    out = torch.zeros(len(idx), M, dtype=torch.float64)
    for m in range(M):
        seeds = torch.tensor([small_seed(seed, Stream.BOUND_SAMPLE, gi, m) for gi in idx], dtype=torch.long)
        objective(model, y, seeds, small_seed(seed, Stream.BOUND_BATCH, m))
        out[:, m] = objective.last_nelbo.detach().to(torch.float64).cpu() * d
    return out
