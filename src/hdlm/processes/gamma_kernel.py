"""The γ-hybrid's reverse kernels in closed form: a few O(N) passes per row.

Every factor of a γ-hybrid kernel is, per row, a scalar plus a correction in the column j of a real
x_t (Eq. 7g: exp(cQ)[x, z] = a(1-b)/N + ab [z = x] for real x, 1 - a for x = MASK). Composed from
its definitions, :meth:`hdlm.processes.gamma.GammaHybrid.kernel_posterior` makes some fifty passes
over (positions × vocabulary) float tensors and ``analytic_probs`` about twenty-five; the sampler
pays them at every active position of every step. Here each is a handful of passes and float64
per-row scalars.
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

    Per row: the Tweedie denoiser is D ∝ r · exp_row(x, σ̄(s_now) − σ̄(0)), r = relu(b′ p + (1 − b′) Σp / N),
    b′ = e^{γ(σ̄(s_now) − σ̄(0))} (:meth:`GammaHybrid.analytic_probs` to level 0, normalised: the
    model's odds and the scaling by max s cancel); m̃ ∝ p · q(x | ·); w = p̂ / q(x | ·) = α r + β p
    off column j; and the kernel is k_r r + k_p p + k_c off column j, with column j and MASK set per
    row (:func:`_row_coefficients`, float64). The O(N) passes run in raw's dtype.
    """
    n, dtype, shape = proc.N, raw.dtype, x.shape
    d_t = proc._step_delta(x, s_now, 0.0, torch.float64, x.device)[0].reshape(-1)  # the Tweedie step to level 0
    s_now, s_next = levels64(s_now, x).reshape(-1), levels64(s_next, x).reshape(-1)
    x, raw = x.reshape(-1), raw.reshape(-1, n)
    is_mask, j = _token_column(proc, x)

    p = torch.softmax(raw, dim=-1)
    sp = _row_sum(p)
    r = _clamped_back(p, sp, proc.gamma, d_t)
    sums = sp, _row_sum(r), *(t.gather(-1, j).squeeze(-1).double() for t in (p, r))
    *coefficients, ok = _row_coefficients(proc, is_mask, s_now, s_next, d_t, *sums)
    k_r, k_p, k_c, col_j, col_mask = (t.to(dtype) for t in coefficients)

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
    zero = torch.zeros_like(sp)
    c_now, c_next = proc._chain_noise(s_now), proc._chain_noise(s_next)
    (a_now, abar_now, b_now, bbar_now), (a_n, abar_n, b_n, bbar_n) = coeffs(c_now), coeffs(c_next)
    (a_d, abar_d, b_d, bbar_d), (a_t, abar_t, b_t, bbar_t) = coeffs((c_now - c_next).clamp_min(0.0)), coeffs(d_t)
    kappa = -torch.expm1(-gamma * c_now)
    # D = r exp_row(x, d_t) / s_t. Empty (D = e_x in analytic_probs) only with no step (s_now = 0, where the
    # kernel stays anyway) or for γ = 0 at a real x whose p underflows (Σp = 1 gives max r >= 1/N otherwise):
    # there w = 0 and the kernel stays at x too
    g_t, h_t = torch.where(is_mask, abar_t, a_t * bbar_t / n), torch.where(is_mask, zero, a_t * b_t)
    s_t = torch.where(d_t > 0, g_t * sr + h_t * r_j, zero)
    # q(x | ·) = g_q + [z = j] h_q; m̃ = (g_q p + [z = j] h_q p_j) / s_m (at a MASK: p / Σp)
    g_q, h_q = torch.where(is_mask, abar_now, a_now * bbar_now / n), torch.where(is_mask, zero, a_now * b_now)
    s_m = torch.where(is_mask, abar_now * sp, g_q * sp + h_q * p_j)
    # w = p̂ / q(x | ·) = (1 − κ) D / q + κ m̃ / q: α r + β p off column j, w_j at it; t_w = Σ w
    alpha = (1 - kappa) * _ratio(_ratio(g_t, g_q), s_t)
    beta = kappa * _ratio((g_q > 0).to(sp.dtype), s_m)
    w_j = _ratio((1 - kappa) * _ratio((g_t + h_t) * r_j, s_t) + kappa * _ratio((g_q + h_q) * p_j, s_m), g_q + h_q)
    t_w = alpha * (sr - r_j) + beta * (sp - p_j) + w_j
    # the kernel = exp_row(x, δ) * exp(c(s_next) Q) [w, 0], normalised
    e_off = torch.where(is_mask, abar_d, a_d * bbar_d / n)
    spread = a_n * bbar_n * t_w / n
    col_j = (e_off + torch.where(is_mask, zero, a_d * b_d)) * (a_n * b_n * w_j + spread)
    col_mask = torch.where(is_mask, abar_n * t_w, zero)
    total = e_off * (a_n * b_n * (t_w - w_j) + (n - 1) * spread) + col_j + col_mask
    scale = e_off * a_n * b_n
    return (_ratio(scale * alpha, total), _ratio(scale * beta, total), _ratio(e_off * spread, total),
            _ratio(col_j, total), _ratio(col_mask, total), total > 0)


def _token_column(proc: "GammaHybrid", x: Tensor) -> tuple[Tensor, Tensor]:
    """Which rows hold MASK, and the column (M, 1) of each row's real token (0, a dummy, at a MASK)."""
    is_mask = x == proc.mask_id
    return is_mask, torch.where(is_mask, torch.zeros_like(x), x).unsqueeze(-1)


def _clamped_back(scaled: Tensor, total: Tensor, gamma: float, delta: Tensor) -> Tensor:
    """relu(b′ s + (1 − b′) T / N), b′ = e^{γδ}: [exp(−δQ) s] on the real tokens up to the row's factor
    e^{(1−γ)δ}, clamped at 0 (the Tweedie step's back-propagated scores; T = Σ_real s, float64)."""
    n, dtype = scaled.shape[-1], scaled.dtype
    b_up, bbar_up = torch.exp(gamma * delta), -torch.expm1(gamma * delta)
    return torch.addcmul((bbar_up * total / n).to(dtype).unsqueeze(-1), scaled,
                         b_up.to(dtype).unsqueeze(-1)).clamp_min_(0.0)


def _row_sum(t: Tensor) -> Tensor:
    """Σ over the last dim in t's dtype, as float64: accumulating a float32 row in float64 is much slower
    on CPU (bench/RESULTS.md), and float32's pairwise sum is as accurate as its float32 terms."""
    return t.sum(-1).double()


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, else 0 (one division: a tiny den over a tiny num stays finite)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def tweedie_step(proc: "GammaHybrid", log_score: Tensor, x: Tensor, s_now, s_next) -> Tensor:
    """:meth:`GammaHybrid.analytic_probs` (the Tweedie τ-leaping step) in a few passes over the vocabulary.

    With s = exp(log_score − max) and δ = σ̄(s_now) − σ̄(s_next): [exp(−δQ) s]_z = a′ (b′ s_z + (1 − b′) T / N)
    for real z (a′ = e^{(1−γ)δ}, b′ = e^{γδ}, T = Σ_real s) and s_M + (1 − a′) T at MASK; times
    exp_row(x, δ) (a per-row scalar g off column j, g + h at it), clamped at 0 and normalised. The
    edge cases follow ``_normalise_step``: MASK gets 0 at the last step, no step stays at x, and a
    zero total falls back to the real scores (a MASK at the last step) or to x.
    """
    n, shape = proc.N, x.shape
    log_score = log_score.reshape(-1, n + 1)
    scaled = torch.exp(log_score - log_score.amax(-1, keepdim=True))
    out = _tweedie(proc, scaled[:, :n], scaled[:, n].double(), log_score[:, :n], x, s_now, s_next)
    return out.view(*shape, n + 1)


def tweedie_kernel_subs(proc: "GammaHybrid", raw: Tensor, x: Tensor, s_now, s_next) -> Tensor:
    """:meth:`GammaHybrid.kernel_analytic` for p = softmax(raw): :func:`tweedie_step` of ``proc.log_score``
    without forming it. The step is invariant to scaling a row's scores, so with e = exp(raw − max raw):
    s = e (and s_M = 0) at a real x, and s = e, s_M = e^{−(log p_max + odds)} at a MASK
    (odds = log(a / (1 − a)), :meth:`GammaHybrid._log_mask_odds`)."""
    n, shape = proc.N, x.shape
    raw, flat_x = raw.reshape(-1, n), x.reshape(-1)
    e = torch.exp(raw - raw.amax(-1, keepdim=True))
    log_p_max = -torch.log(_row_sum(e))
    odds = proc._log_mask_odds(proc.noise.sigma_bar(levels64(s_now, x).reshape(-1)))
    s_mask = torch.where(flat_x == proc.mask_id, torch.exp(-(log_p_max + odds)), torch.zeros_like(odds))
    return _tweedie(proc, e, s_mask, raw, x, s_now, s_next).view(*shape, n + 1)


def _tweedie(proc: "GammaHybrid", scaled: Tensor, scaled_mask: Tensor, real_logits: Tensor, x: Tensor,
             s_now, s_next) -> Tensor:
    """The Tweedie step from the real scores ``scaled`` (M, N) (any per-row scale, ≤ 1), the MASK
    score ``scaled_mask`` (M,) float64 on the same scale, and logits of the real scores (fallback)."""
    n, dtype = proc.N, scaled.dtype
    delta, s_next = proc._step_delta(x, s_now, s_next, torch.float64, x.device)
    delta, final, x = delta.reshape(-1), (s_next == 0).reshape(-1), x.reshape(-1)
    is_mask, j = _token_column(proc, x)
    total_real = _row_sum(scaled)
    a_up, abar_up = torch.exp((1.0 - proc.gamma) * delta), -torch.expm1((1.0 - proc.gamma) * delta)
    r = _clamped_back(scaled, total_real, proc.gamma, delta)
    r_j = r.gather(-1, j).squeeze(-1).double()
    a_d, abar_d, b_d, bbar_d = proc._coeffs(delta)
    zero = torch.zeros_like(delta)
    g, h = torch.where(is_mask, abar_d, a_d * bbar_d / n), torch.where(is_mask, zero, a_d * b_d)
    col_mask = torch.where(is_mask & ~final, (scaled_mask + abar_up * total_real).clamp_min(0.0), zero)
    total = a_up * (g * _row_sum(r) + h * r_j) + col_mask
    ok = total > 0

    out = torch.empty(x.shape[0], n + 1, dtype=dtype, device=x.device)
    torch.mul(r, _ratio(a_up * g, total).to(dtype).unsqueeze(-1), out=out[:, :n])
    out[:, :n].scatter_(-1, j, _ratio(a_up * (g + h) * r_j, total).to(dtype).unsqueeze(-1))
    out[:, n] = _ratio(col_mask, total).to(dtype)
    scores = ~ok & final & is_mask & (delta > 0)  # nothing left for a MASK at the last step: the real scores
    if bool(scores.any()):
        out[scores] = torch.nn.functional.pad(torch.softmax(real_logits[scores], dim=-1), (0, 1))
    stay = ~ok & ~scores  # (no step, δ = 0, gives e_x by the formula itself)
    if bool(stay.any()):
        out[stay] = one_hot(x[stay], n + 1, dtype)
    return out
