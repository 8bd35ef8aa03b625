"""The SEDD ("scale_by_sigma") score parametrisation of the γ family (docs/checkpoints.md).

The official γ checkpoints (like SEDD's absorbing models) output log-ratios directly:

    log s_z = raw_z − log(e^σ̄ − 1) − log N        (z over the N real tokens)

where σ̄ is the total noise of the position. hdlm's own γ models instead read ``raw`` as logits
of the real token given that it is not masked (``parametrisation = "subs"``,
:meth:`hdlm.processes.GammaHybrid.log_score`). This module is the ``"sedd"`` reading: the
log-scores in hdlm's convention (s_x = 1 for the current token, MASK reachable only from MASK)
and the exact DWDSE of Q_γ computed from them, so that a published checkpoint samples with
hdlm's samplers and fine-tunes with hdlm's exact loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_NEG_INF = float("-inf")


def log_expm1(sigma: Tensor) -> Tensor:
    """log(e^σ − 1) for σ > 0, accurate for small and large σ: σ + log(1 − e^{−σ})."""
    return sigma + torch.log(-torch.expm1(-sigma))


def log_expm1_official(sigma: Tensor) -> Tensor:
    """The official form: log(expm1(σ)) for σ < 0.5, log(exp(σ) − 1) otherwise (no clamp)."""
    return torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log()


def sedd_offset(sigma_bar: Tensor, n: int) -> Tensor:
    """−log(e^σ̄ − 1) − log N: what scale_by_sigma adds to every raw output."""
    return -log_expm1(sigma_bar) - math.log(n)


def sedd_log_score(raw: Tensor, x: Tensor, sigma_bar: Tensor, mask_id: int) -> Tensor:
    """Log-scores (…, N+1) from SEDD-parametrised raw outputs (…, N), in hdlm's convention.

    Real columns z ≠ x: raw_z − log(e^σ̄ − 1) − log N. The current token's own ratio is 1
    (log 0); the MASK column is 0 at a MASK and −inf at a real token (MASK never turns back
    into a real token, so the reverse process cannot move a real token to MASK).
    """
    log_real = raw + sedd_offset(sigma_bar.to(raw.dtype), raw.shape[-1]).unsqueeze(-1)
    is_mask = x == mask_id
    own = torch.nn.functional.one_hot(torch.where(is_mask, torch.zeros_like(x), x), raw.shape[-1]).bool()
    log_real = torch.where(own & ~is_mask.unsqueeze(-1), torch.zeros_like(log_real), log_real)
    log_mask = torch.where(is_mask, 0.0, _NEG_INF).to(raw.dtype).unsqueeze(-1)
    return torch.cat([log_real, log_mask], dim=-1)


def _ratio_terms(log_s: Tensor, log_r: Tensor) -> Tensor:
    """s − r log s + r (log r − 1) per entry, written r φ(log s − log r) with φ(d) = e^d − d − 1
    (no cancellation of large numbers); s alone where r = 0."""
    has_r = log_r > _NEG_INF
    d = log_s - torch.where(has_r, log_r, torch.zeros_like(log_r))
    with_r = torch.exp(torch.where(has_r, log_r, torch.zeros_like(log_r))) * (torch.expm1(d) - d)
    return torch.where(has_r, with_r, torch.exp(log_s))


def sedd_dwdse(log_real: Tensor, x: Tensor, y: Tensor, sigma_bar: Tensor, gamma: float) -> Tensor:
    """Σ_{z≠x} Q(x, z) [s_z − r_z log s_z + r_z (log r_z − 1)] per token, exact for Q_γ (DESIGN.md §3).

    ``log_real`` (…, N) are the model's log-scores of the real tokens (:func:`sedd_log_score`'s
    first N columns), x the noisy and y the clean token. With a = e^{−(1−γ)σ̄}, b = e^{−γσ̄} and
    q_z = b [z = y] + (1 − b)/N (the real marginal divided by a):
    at x = MASK, Q(M, z) = 1 − γ and r_z = q_z a/(1 − a) for every real z; at a real x,
    Q(x, z) = γ/N for the other real z and r_z = q_z / q_x. The caller multiplies by σ̄'(s)
    and the rate; states the forward process cannot reach from y are the caller's to zero.
    """
    n = log_real.shape[-1]
    sb = sigma_bar.to(log_real.dtype)
    one_minus_b = -torch.expm1(-gamma * sb)
    log_other = (torch.log(one_minus_b) - math.log(n)).unsqueeze(-1)  # −inf where nothing moved
    log_same = torch.log1p(-one_minus_b * (1.0 - 1.0 / n)).unsqueeze(-1)
    is_y = torch.nn.functional.one_hot(y, n).bool()
    log_q = torch.where(is_y, log_same, log_other)  # (…, N)

    is_mask = x == n
    x_real = torch.where(is_mask, y, x)
    is_x = torch.nn.functional.one_hot(x_real, n).bool()
    # x = MASK: r_z = q_z / expm1((1 − γ) σ̄)
    c = ((1.0 - gamma) * sb).clamp_min(torch.finfo(sb.dtype).tiny)
    log_r_mask = log_q - torch.log(torch.expm1(c)).unsqueeze(-1)
    term_mask = (1.0 - gamma) * _ratio_terms(log_real, log_r_mask).sum(-1)
    # x real: r_z = q_z / q_x over z ≠ x
    log_qx = log_q.gather(-1, x_real.unsqueeze(-1))
    log_r_real = torch.where(is_x, _NEG_INF, log_q - torch.where(log_qx > _NEG_INF, log_qx, torch.zeros_like(log_qx)))
    terms_real = torch.where(is_x, torch.zeros_like(log_real), _ratio_terms(log_real, log_r_real))
    term_real = (gamma / n) * terms_real.sum(-1)
    return torch.where(is_mask, term_mask, term_real)
