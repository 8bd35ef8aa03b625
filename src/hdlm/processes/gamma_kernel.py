"""The γ-hybrid's posterior-mean reverse kernel in closed form (a few O(N) passes per row).

:meth:`hdlm.processes.gamma.GammaHybrid.kernel_posterior` composed from its definitions makes some
fifty passes over (positions × vocabulary) float tensors; the sampler pays them at every active
position of every step. Here the same kernel is a handful of passes and float64 per-row scalars.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import levels64, one_hot

if TYPE_CHECKING:
    from .gamma import GammaHybrid


def posterior_kernel_subs(proc: "GammaHybrid", raw: Tensor, x: Tensor, s_now, s_next) -> Tensor:
    """:meth:`GammaHybrid.kernel_posterior` for p = softmax(raw) in a handful of passes over the vocabulary.

    Every factor of the kernel is, per row, a scalar plus a correction in the column j of a real
    x_t (Eq. 7g: exp(cQ)[x, z] = a(1-b)/N + ab [z = x] for real x, 1 - a for x = MASK), so:
    the Tweedie denoiser is D ∝ r · exp_row(x, σ̄(s_now) − σ̄(0)) with r = relu(b′ p + (1 − b′) Σp / N),
    b′ = e^{γ(σ̄(s_now) − σ̄(0))} (:meth:`GammaHybrid.analytic_probs` to level 0, normalised: the model's
    odds and the scaling by max s cancel); m̃ ∝ p · q(x | ·); w = p̂ / q(x | ·) = α r + β p off column j;
    and the kernel is k_r r + k_p p + k_c off column j, with column j and MASK set per row
    (:func:`_row_coefficients`, float64). The O(N) passes run in raw's dtype.
    """
    n, dtype, shape = proc.N, raw.dtype, x.shape
    s_now, s_next = levels64(s_now, x).reshape(-1), levels64(s_next, x).reshape(-1)
    x, raw = x.reshape(-1), raw.reshape(-1, n)
    is_mask = x == proc.mask_id
    j = torch.where(is_mask, torch.zeros_like(x), x).unsqueeze(-1)  # column of a real x_t (a dummy for MASK)
    d_t = (proc.noise.sigma_bar(s_now) - proc.noise.sigma_bar(torch.zeros_like(s_now))).clamp_min(0.0)
    b_up, bbar_up = torch.exp(proc.gamma * d_t), -torch.expm1(proc.gamma * d_t)  # b(-δ), 1 - b(-δ)

    p = torch.softmax(raw, dim=-1)
    sp = p.sum(-1, dtype=torch.float64)
    r = torch.addcmul((bbar_up * sp / n).to(dtype).unsqueeze(-1), p, b_up.to(dtype).unsqueeze(-1)).clamp_min_(0.0)
    sums = sp, r.sum(-1, dtype=torch.float64), *(t.gather(-1, j).squeeze(-1).double() for t in (p, r))
    k_r, k_p, k_c, col_j, col_mask, ok = (t.to(dtype) if t.is_floating_point() else t for t in
                                          _row_coefficients(proc, is_mask, s_now, s_next, d_t, *sums))

    out = torch.empty(raw.shape[0], n + 1, dtype=dtype, device=raw.device)
    torch.mul(r, k_r.unsqueeze(-1), out=out[:, :n])
    out[:, :n].addcmul_(p, k_p.unsqueeze(-1)).add_(k_c.unsqueeze(-1))
    out[:, :n].scatter_(-1, j, col_j.unsqueeze(-1))
    out[:, n] = col_mask
    if not bool(ok.all()):  # nothing reachable: stay
        out[~ok] = one_hot(x[~ok], n + 1, dtype)
    return out.view(*shape, n + 1)


def _row_coefficients(proc: "GammaHybrid", is_mask: Tensor, s_now: Tensor, s_next: Tensor, d_t: Tensor,
                      sp: Tensor, sr: Tensor, p_j: Tensor, r_j: Tensor) -> tuple[Tensor, ...]:
    """Per row (float64): the kernel's k_r, k_p, k_c off column j, its value at column j and at MASK,
    and whether anything is reachable, from Σp, Σr, p_j, r_j (see :func:`posterior_kernel_subs`)."""
    n, gamma, coeffs = proc.N, proc.gamma, proc._coeffs  # coeffs(c): a, 1 - a, b, 1 - b
    zero, one = torch.zeros_like(sp), torch.ones_like(sp)

    def inverse(t: Tensor, where: Tensor) -> Tensor:
        return torch.where(where, 1.0 / torch.where(where, t, one), zero)

    c_now, c_next = proc._chain_noise(s_now), proc._chain_noise(s_next)
    (a_now, abar_now, b_now, bbar_now), (a_n, abar_n, b_n, bbar_n) = coeffs(c_now), coeffs(c_next)
    (a_d, abar_d, b_d, bbar_d), (a_t, abar_t, b_t, bbar_t) = coeffs((c_now - c_next).clamp_min(0.0)), coeffs(d_t)
    kappa = -torch.expm1(-gamma * c_now)
    # D = r exp_row(x, d_t) / s_t. Empty (D = e_x in analytic_probs) only with no step (s_now = 0, where the
    # kernel stays anyway) or for γ = 0 at a real x whose p underflows (Σp = 1 gives max r >= 1/N otherwise):
    # there w = 0 and the kernel stays at x too
    g_t, h_t = torch.where(is_mask, abar_t, a_t * bbar_t / n), torch.where(is_mask, zero, a_t * b_t)
    s_t = g_t * sr + h_t * r_j
    ar = inverse(s_t, (d_t > 0) & (s_t > 0))
    # q(x | ·) = g_q + [z = j] h_q; m̃ = g_m p + [z = j] h_m p_j
    g_q, h_q = torch.where(is_mask, abar_now, a_now * bbar_now / n), torch.where(is_mask, zero, a_now * b_now)
    s_m = torch.where(is_mask, abar_now * sp, g_q * sp + h_q * p_j).clamp_min(torch.finfo(sp.dtype).tiny)
    g_m, h_m = torch.where(is_mask, abar_now, g_q) / s_m, h_q / s_m
    # w = p̂ / q(x | ·) = (1 − κ) D / q + κ m̃ / q: α r + β p off column j, w_j at it; t_w = Σ w
    inv_q = inverse(g_q, g_q > 0)
    alpha, beta = inv_q * (1 - kappa) * ar * g_t, inv_q * kappa * g_m
    w_j = ((1 - kappa) * ar * (g_t + h_t) * r_j + kappa * (g_m + h_m) * p_j) * inverse(g_q + h_q, g_q + h_q > 0)
    t_w = alpha * (sr - r_j) + beta * (sp - p_j) + w_j
    # the kernel = exp_row(x, δ) * exp(c(s_next) Q) [w, 0], normalised
    e_off = torch.where(is_mask, abar_d, a_d * bbar_d / n)
    spread = a_n * bbar_n * t_w / n
    col_j = (e_off + torch.where(is_mask, zero, a_d * b_d)) * (a_n * b_n * w_j + spread)
    col_mask = torch.where(is_mask, abar_n * t_w, zero)
    total = e_off * (a_n * b_n * (t_w - w_j) + (n - 1) * spread) + col_j + col_mask
    ok = total > 0
    inv = inverse(total, ok)
    scale = inv * e_off * a_n * b_n
    return scale * alpha, scale * beta, inv * e_off * spread, inv * col_j, inv * col_mask, ok
