"""What the official ServiceNow/hdlm code computes, re-derived on hdlm's loaded model.

Not used by hdlm's own training or sampling. It exists so that tests hold a loaded checkpoint to
the official reference tensors (tests/fixtures/official-hdlm) and so that the places where hdlm
deliberately differs are computed side by side (docs/checkpoints.md):

- :func:`official_forward`: the official model output (B, L, N+1): ε raw logits, γ log-scores
  (scale_by_sigma), with the training-only MASK-logit post-processing when ``settled`` is given.
- ε losses (:func:`epsilon_corrupt`, :func:`epsilon_loss`): the official flat and annealing hybrid
  losses from their recorded random draws. Their differences from hdlm's HDCE, Eq. (9): the
  cross-entropy includes the MASK column, the annealing loss drops 1/(1 − p_mask) on kept tokens,
  and normalisation is by B·L (flat) or by the active count (annealing).
- γ losses (:func:`gamma_corrupt`, :func:`gamma_score_entropy`, :func:`gamma_loss`): the official
  QGamma score entropy (pure-absorb ratios at MASK, total σ̄ at real tokens: exact only for γ = 0)
  and its settled cross-entropy (MASK column included, −1000 placed one position early,
  ``ignore_index`` hard-coded to the GPT-2 MASK id 50257).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import position_weights
from ..sedd_score import log_expm1_official

#: the −1000 that official post-processing writes into the MASK logit of settled positions
SETTLED_MASK_LOGIT = -1000.0
#: the official γ loss's hard-coded cross-entropy ignore_index (the GPT-2 MASK id)
GAMMA_CE_IGNORE_INDEX = 50257
_EPS = 1e-12  # the official score entropy's guard inside its ratios and logs


# --------------------------------------------------------------------------------------------
# forward


def mark_settled_mask_logit(out: Tensor, settled: Tensor) -> Tensor:
    """Official post-processing (training form): ``out[b, i, MASK] = −1000`` wherever position
    i + 1 is settled (i ≤ L − 2): one position early, so the last settled position keeps its MASK
    logit. Samplers and evaluation never pass ``settled``, so inference is unaffected."""
    out = out.clone()
    nxt = torch.zeros_like(settled)
    nxt[:, :-1] = settled[:, 1:]
    out[..., -1] = torch.where(nxt, torch.full_like(out[..., -1], SETTLED_MASK_LOGIT), out[..., -1])
    return out


@torch.no_grad()
def official_forward(model, cfg, tokens: Tensor, positions: Tensor, *, sigma: Tensor | None = None,
                     attn_mask: Tensor | None = None, settled: Tensor | None = None) -> Tensor:
    """The official forward pass of a loaded checkpoint: (B, L, N+1).

    ``attn_mask`` is the official convention (bool (B, L, L), True = may not attend); ``sigma``
    (B, L) the per-token total noise (γ only); ``settled`` (B, L) bool asks for the training-form
    post-processing (only meaningful when the official ``model.post_process_logits`` is on).
    """
    mask = None if attn_mask is None else (~attn_mask).unsqueeze(1)
    keep = torch.exp(-cfg.process.gamma * sigma) if cfg.model.weighted_embedding else None
    out = model(tokens, sigma, positions, mask, keep=keep, all_columns=True)
    if cfg.process.parametrisation == "sedd":  # scale_by_sigma, in the official order of operations
        out = out - log_expm1_official(sigma).to(out.dtype).unsqueeze(-1) - math.log(out.shape[-1] - 1)
    if settled is not None:
        out = mark_settled_mask_logit(out, settled)
    return out


# --------------------------------------------------------------------------------------------
# epsilon family


def _scatter_tokens(x: Tensor, where: Tensor, tokens: Tensor) -> Tensor:
    """x with x[where] = tokens, filled in row-major order (as boolean-index assignment does)."""
    out = x.clone()
    out[where] = tokens.to(out.dtype)
    return out


def epsilon_corrupt(x0: Tensor, p_mask: Tensor, mask_u: Tensor, shuffle_u: Tensor, random_tokens: Tensor,
                    epsilon: float, mask_id: int, active: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The official ε corruption from its draws: mask where u < p_mask, then substitute a kept
    token where u' < ε (``random_tokens`` in row-major order); only ``active`` positions when given.
    Returns (noisy, masked, substituted)."""
    active = torch.ones_like(x0, dtype=torch.bool) if active is None else active.expand_as(x0)
    masked = (mask_u < p_mask) & active
    substituted = ~masked & active & (shuffle_u < epsilon)
    noisy = _scatter_tokens(x0, substituted, random_tokens)
    return noisy.masked_fill(masked, mask_id), masked, substituted


def epsilon_loss(logits: Tensor, x0: Tensor, p_mask: Tensor, masked: Tensor, substituted: Tensor, epsilon: float,
                 lam: float, *, active: Tensor | None = None, divide_kept: bool = True,
                 mask_column: bool = True) -> Tensor:
    """The official hybrid ε loss from the model's logits (B, L, N+1).

    Weights: masked 1/p_mask (p_mask clamped at 1e-4), kept-and-substituted λ(1 − ε), kept λε,
    divided by 1 − p_mask when ``divide_kept`` (the flat loss; the annealing loss does not).
    Sum over tokens, divided by B·L (flat, ``active`` None) or by the number of active tokens.
    ``mask_column=False`` leaves the MASK logit out of the cross-entropy, as hdlm does.
    """
    logits = logits if mask_column else logits[..., :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x0.reshape(-1), reduction="none").view_as(x0)
    p = p_mask.expand_as(ce)
    kept = torch.where(substituted, torch.full_like(p, lam * (1.0 - epsilon)), torch.full_like(p, lam * epsilon))
    if divide_kept:
        kept = kept / (1.0 - p)
    w = torch.where(masked, 1.0 / p.clamp(min=1e-4), kept)
    if active is not None:
        w = torch.where(active.expand_as(ce), w, torch.zeros_like(w))
    count = ce.numel() if active is None else active.expand_as(ce).sum().clamp(min=1)
    return (ce * w).sum() / count


# --------------------------------------------------------------------------------------------
# gamma family


def gamma_corrupt(x0: Tensor, sigma: Tensor, u: Tensor, random_tokens: Tensor, gamma: float,
                  mask_id: int) -> Tensor:
    """The official QGamma forward draw from its draws: with A = e^{−(1−γ)σ}, B = e^{−γσ}, a real
    token is masked where u < 1 − A and replaced by the next of ``random_tokens`` where
    1 − A ≤ u < 1 − A + A(1 − B)."""
    a, b = torch.exp(-(1 - gamma) * sigma), torch.exp(-gamma * sigma)
    p_absorb, p_uniform = 1 - a, a * (1 - b)
    real = x0 != mask_id
    absorb = (u < p_absorb) & real
    uniform = (u >= p_absorb) & (u < p_absorb + p_uniform) & real
    return _scatter_tokens(x0, uniform, random_tokens).masked_fill(absorb, mask_id)


def gamma_score_entropy(log_score: Tensor, sigma: Tensor, x: Tensor, x0: Tensor, gamma: float) -> Tensor:
    """The official QGamma score entropy per token (B, L), from log-scores (B, L, N+1).

    At MASK: (1 − γ)[Σ_real e^{ls} − r ls_{x0} + r(log r − 1)] with the pure-absorb ratio
    r = 1/(e^σ − 1). At a real x: γ times SEDD's uniform score entropy over the N real tokens at
    the *total* noise σ (ratio 1 − N/(e^σ − 1 + N)). Both are exact only for γ = 0; hdlm's DWDSE
    is the exact one for every γ (:func:`hdlm.sedd_score.sedd_dwdse`).
    """
    n = log_score.shape[-1] - 1
    esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), torch.exp(sigma) - 1)
    r_abs = 1 / (esigm1 + _EPS)
    r_uni = 1 - n / (esigm1 + n + _EPS)
    ls_x0 = log_score.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    real = log_score[..., :n]
    mask_term = (real.exp().sum(-1) - r_abs * ls_x0 + r_abs * (torch.log(r_abs + _EPS) - 1)) * (1 - gamma)
    x_real = torch.where(x == n, torch.zeros_like(x), x)
    ls_x = real.gather(-1, x_real.unsqueeze(-1)).squeeze(-1)
    neg_common = real.mean(-1) - ls_x / n
    pos_common = real.exp().mean(-1) - real.exp().gather(-1, x_real.unsqueeze(-1)).squeeze(-1) / n
    same = x == x0
    neg = torch.where(same, r_uni * neg_common, neg_common + ls_x0 / (esigm1 + _EPS))
    const = torch.where(same, (n - 1) / n * r_uni * (torch.log(r_uni + _EPS) - 1),
                        ((-torch.log(r_uni + _EPS) - 1) / (r_uni + _EPS) - (n - 2)) / n)
    real_term = torch.where(x0 < n, gamma * (pos_common - neg + const), torch.zeros_like(neg))
    return torch.where(x == n, mask_term, real_term)


def gamma_loss(log_score: Tensor, sigma: Tensor, dsigma: Tensor, x: Tensor, x0: Tensor, settled: Tensor,
               weight_mask: Tensor, width: int, gamma: float, *, mask_column: bool = True,
               ignore_index: int = GAMMA_CE_IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """The official γ annealing loss (diffusion, CE) per sequence (B,), from the training-form
    log-scores (B, L, N+1) and the step's ``settled`` (L,) bool and ``weight_mask`` (L,).

    diffusion = Σ over unsettled positions of σ' · score entropy · weight_mask; CE = mean over the
    settled positions (those ≠ ``ignore_index``) of cross-entropy(log-score) times the Eq. (11)
    block weights of the settled prefix. ``mask_column=False`` drops the MASK logit from the CE.
    """
    se = gamma_score_entropy(log_score, sigma, x, x0, gamma)
    free = ~settled
    diff = (dsigma[:, free] * se[:, free] * weight_mask[free]).sum(-1)
    n_settled = int(settled.sum())
    if n_settled == 0:
        return diff, torch.zeros_like(diff)
    logits = log_score[:, settled] if mask_column else log_score[:, settled, :-1]
    target = x0[:, settled]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none",
                         ignore_index=ignore_index).view_as(target)
    ce = ce * position_weights(n_settled, width, device=ce.device)
    valid = (target != ignore_index).float()
    return diff, (ce * valid).sum(-1) / (valid.sum(-1) + 1e-8)
