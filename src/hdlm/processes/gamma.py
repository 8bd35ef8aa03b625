"""gamma-hybrid processes (paper §3.2, App. A; SEDD framework): Q_gamma = (1-gamma) Q_absorb + gamma Q_uniform.

Q_absorb = e_M 1^T - I and Q_uniform = (1/N) u u^T - diag(u) (u: the real tokens). Both square
to minus themselves and commute, which gives the closed-form evolution operator of Eq. (7g)::

    exp(c Q_gamma) = I + (1 - a) Q_absorb + a (1 - b) Q_uniform,  a = e^{-(1-gamma) c}, b = e^{-gamma c}

(valid for any real c, also negative). Trained with DWDSE (Lou et al., 2024) in closed form;
sampled with SEDD's analytic (Tweedie tau-leaping) or Euler kernels. :class:`Absorb` (gamma = 0)
and :class:`Uniform` (gamma = 1) are the same code.

Likelihood: the integral over s of the DWDSE plus the prior term is Lou et al.'s (2024) bound on
-log p of the continuous-time reverse process; with a hyperschedule each position runs its own
clock (DESIGN.md §2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import PARAMETRISATIONS
from ..errors import HDLMError
from ..head_loss import vocab_reductions
from ..noise import NoiseSchedule, Scaled
from ..sedd_score import sedd_dwdse, sedd_log_score
from .base import NEG_INF, Process, float_dtype, levels64, noise_like, one_hot
from .epsilon import MDLM
from .gamma_kernel import posterior_kernel_subs, tweedie_kernel_subs, tweedie_step


def _phi(d: Tensor) -> Tensor:
    """e^d - d - 1 (>= 0, = 0 iff d = 0): one score-entropy term over its ratio r,
    s - r log s + r (log r - 1) = r phi(log s - log r), without cancelling large numbers."""
    return torch.expm1(d) - d


def _normalise_step(probs: Tensor, log_score: Tensor, x: Tensor, s_next: Tensor, delta: Tensor,
                    mask_id: int) -> Tensor:
    """Shared end of the gamma-family sampler steps: SEDD's final denoising rule, then normalise.

    Where s_next == 0 the MASK state gets probability 0 (the output must be real tokens);
    where delta == 0 the token stays x. If nothing keeps positive mass, x stays too, except a
    MASK at the last step (only possible where the process cannot reach MASK, gamma = 1): it
    takes the normalised real scores, so the output never holds MASK.
    """
    probs = probs.clamp_min(0.0)
    final = (s_next == 0).unsqueeze(-1)
    is_mask_state = torch.arange(probs.shape[-1], device=probs.device) == mask_id
    probs = torch.where(final & is_mask_state, torch.zeros_like(probs), probs)
    total = probs.sum(-1, keepdim=True)
    stay = torch.nn.functional.one_hot(x, probs.shape[-1]).to(probs.dtype)
    real_scores = torch.softmax(log_score.masked_fill(is_mask_state, NEG_INF), dim=-1)
    fallback = torch.where(final & (x == mask_id).unsqueeze(-1), real_scores, stay)
    probs = torch.where(total > 0, probs / torch.where(total > 0, total, torch.ones_like(total)), fallback)
    return torch.where(delta.unsqueeze(-1) == 0, stay, probs)


class GammaHybrid(Process):
    """Q_gamma = (1-gamma) Q_absorb + gamma Q_uniform (§3.2, App. A), trained with DWDSE.

    The model's raw outputs are read as log-probabilities of the real token at position i given
    the rest *and* given that i is not masked (a SUBS-like parametrisation with exact
    normalisation, see :meth:`log_score`). With ``parametrisation = "sedd"`` they are read as
    SEDD's / the official checkpoints' scale_by_sigma log-ratios instead (:mod:`hdlm.sedd_score`):
    the same process, kernels and exact DWDSE, another reading of the network's output.
    """

    family = "score"
    kernels = ("analytic", "euler", "posterior", "ar")

    def __init__(self, N: int, noise: NoiseSchedule, gamma: float, parametrisation: str = "subs"):
        super().__init__(N, noise)
        if not 0.0 <= gamma <= 1.0:
            raise HDLMError(f"gamma-hybrid: gamma = {gamma} must be in [0, 1]")
        if parametrisation not in PARAMETRISATIONS:
            raise HDLMError(f"gamma-hybrid: parametrisation = {parametrisation!r} must be one of "
                            f"{', '.join(PARAMETRISATIONS)}")
        self.gamma = float(gamma)
        # 0 < γ < 1: the full-support posterior-mean kernel (the analytic step, the paper's sampler,
        # clamps and its discrete bound is then infinite; bench/RESULTS.md compares the two); γ = 0, 1: analytic
        self.default_kernel = "posterior" if 0.0 < self.gamma < 1.0 else "analytic"
        # "sedd": raw outputs are SEDD / official scale_by_sigma log-ratios (hdlm.sedd_score)
        self.parametrisation = parametrisation

    # ---- the evolution operator, Eq. (7g) -----------------------------------------------

    def _coeffs(self, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """a = e^{-(1-gamma)c}, 1 - a, b = e^{-gamma c}, 1 - b (expm1 keeps small c exact)."""
        ca, cb = (1.0 - self.gamma) * c, self.gamma * c
        return torch.exp(-ca), -torch.expm1(-ca), torch.exp(-cb), -torch.expm1(-cb)

    def transition(self, delta) -> Tensor:
        """Dense exp(delta Q_gamma) from Eq. (7g): (..., N+1, N+1) for delta of shape (...).

        Column y is q(. | y) after extra total noise delta. Builds N x N: small N only.
        """
        delta = torch.as_tensor(delta, dtype=float_dtype(delta))
        a, one_minus_a, b, one_minus_b = (t[..., None, None] for t in self._coeffs(delta))
        n = self.N
        eye = torch.eye(n + 1, dtype=delta.dtype, device=delta.device)
        real = torch.ones(n + 1, dtype=delta.dtype, device=delta.device)
        real[n] = 0.0
        real_block = torch.outer(real, real)
        to_mask = torch.zeros_like(eye)
        to_mask[n, :n] = 1.0
        out = (a * b) * eye * real_block + (a * one_minus_b / n) * real_block + one_minus_a * to_mask
        out[..., n, n] = 1.0  # MASK is absorbing
        return out

    def apply_exp(self, v: Tensor, c) -> Tensor:
        """exp(c Q_gamma) v for v (..., N+1) and c (...) of any sign, without N x N matrices.

        Real z: a b v_z + a (1-b) (sum_real v) / N; MASK: v_M + (1-a) (sum_real v).
        """
        c = noise_like(c, v.shape[:-1], v.dtype, v.device)
        a, one_minus_a, b, one_minus_b = (t.unsqueeze(-1) for t in self._coeffs(c))
        v_real, v_mask = v[..., : self.N], v[..., self.N :]
        total_real = v_real.sum(-1, keepdim=True)
        out_real = a * b * v_real + a * one_minus_b * total_real / self.N
        out_mask = v_mask + one_minus_a * total_real
        return torch.cat([out_real, out_mask], dim=-1)

    def exp_row(self, x: Tensor, c) -> Tensor:
        """Row x of exp(c Q_gamma): [exp(cQ)]_{x, z} = P(z -> x over c), (..., N+1)."""
        dtype = float_dtype(c)
        c = noise_like(c, x.shape, dtype, x.device)
        a, one_minus_a, b, one_minus_b = (t.unsqueeze(-1) for t in self._coeffs(c))
        z = torch.arange(self.N + 1, device=x.device)
        x_ = x.unsqueeze(-1)
        z_real = z < self.N
        from_real = torch.where(z_real, a * one_minus_b / self.N + a * b * (z == x_).to(dtype), 0.0)
        from_mask = torch.where(z_real, one_minus_a, 1.0)
        return torch.where(x_ == self.mask_id, from_mask, from_real)

    def _real_marginal_logs(self, sigma_bar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """b, log q_same, log q_other of q_z = b [z = y] + (1-b)/N over real z.

        q is the real part of the marginal divided by a (= the uniform process's marginal at
        total noise gamma * sigma_bar); log q_other = -inf where nothing moved (b = 1).
        """
        one_minus_b = -torch.expm1(-self.gamma * sigma_bar)
        log_other = torch.log(one_minus_b) - math.log(self.N)
        log_same = torch.log1p(-one_minus_b * (1.0 - 1.0 / self.N))
        return 1.0 - one_minus_b, log_same, log_other

    # ---- forward process ----------------------------------------------------------------

    def marginal(self, y: Tensor, s) -> Tensor:
        """q(x | y, s) = exp(sigma_bar(s) Q_gamma) e_y: P(MASK) = 1 - a, P(y) = ab + a(1-b)/N, P(z) = a(1-b)/N."""
        s = noise_like(s, y.shape, float_dtype(s), y.device)
        e_y = torch.nn.functional.one_hot(y, self.N + 1).to(s.dtype)
        return self.apply_exp(e_y, self.noise.sigma_bar(s))

    def sample_forward(self, y: Tensor, s, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        """x ~ q(x | y, s): mask with probability 1 - a, else redraw uniformly with probability 1 - b.

        Same law as :meth:`marginal` (the redraw may give y back). ``aux`` is empty.
        """
        dtype = float_dtype(s)
        s = noise_like(s, y.shape, dtype, y.device)
        _, one_minus_a, _, one_minus_b = self._coeffs(self.noise.sigma_bar(s))
        masked = torch.rand(y.shape, generator=generator, device=y.device, dtype=dtype) < one_minus_a
        redraw = torch.rand(y.shape, generator=generator, device=y.device, dtype=dtype) < one_minus_b
        uniform = torch.randint(0, self.N, y.shape, generator=generator, device=y.device)
        x = torch.where(redraw, uniform, y)
        return torch.where(masked, torch.full_like(y, self.mask_id), x), {}

    def prior(self, shape, generator: torch.Generator | None = None, device=None) -> Tensor:
        """All MASK for gamma < 1 (absorbing); uniform real tokens for gamma = 1."""
        if self.gamma < 1.0:
            return torch.full(tuple(shape), self.mask_id, dtype=torch.long, device=device)
        return torch.randint(0, self.N, tuple(shape), generator=generator, device=device)

    def embed_keep(self, x: Tensor, s) -> Tensor:
        """Eq. (12) / App. B.5: a real token is unperturbed with probability e^{-gamma sigma_bar(s)}; MASK: 1."""
        s = noise_like(s, x.shape, float_dtype(s), x.device)
        keep = torch.exp(-self.gamma * self.noise.sigma_bar(s))
        return torch.where(x == self.mask_id, torch.ones_like(keep), keep)

    # ---- the forward chain over levels (level 0 is the clean token, even where sigma_bar(0) > 0)

    def _chain_noise(self, s: Tensor) -> Tensor:
        """Total noise c(s) of the level chain: sigma_bar(s) for s > 0, exactly 0 at level 0."""
        return torch.where(s > 0, self.noise.sigma_bar(s), torch.zeros_like(s))

    def chain_marginal(self, y: Tensor, s) -> Tensor:
        """exp(c(s) Q_gamma) e_y, Eq. (7g); e_y at level 0."""
        s = levels64(s, y)
        e_y = one_hot(y, self.N + 1)
        return torch.where((s > 0).unsqueeze(-1), self.apply_exp(e_y, self._chain_noise(s)), e_y)

    def chain_row(self, x: Tensor, s_lo, s_hi) -> Tensor:
        """Row x of exp((c(s_hi) - c(s_lo)) Q_gamma)."""
        s_lo, s_hi = levels64(s_lo, x), levels64(s_hi, x)
        return self.exp_row(x, (self._chain_noise(s_hi) - self._chain_noise(s_lo)).clamp_min(0.0))

    def absorbing_part(self) -> "Process":
        """MDLM masking at rate (1 - gamma) sigma_bar (the gamma-hybrid without its substitutions)."""
        if self.gamma >= 1.0:
            raise HDLMError("variational = 'absorb' needs a MASK state; the uniform process (gamma = 1) has none")
        return MDLM(self.N, Scaled(self.noise, 1.0 - self.gamma))

    # ---- score parametrisation ----------------------------------------------------------

    def _log_mask_odds(self, sigma_bar: Tensor) -> Tensor:
        """log(a / (1-a)) = -log(expm1((1-gamma) sigma_bar)), kept finite where (1-gamma) sigma_bar = 0."""
        c = ((1.0 - self.gamma) * sigma_bar).clamp_min(torch.finfo(sigma_bar.dtype).tiny)
        return -torch.log(torch.expm1(c))

    def log_score(self, raw: Tensor, x: Tensor, s) -> Tensor:
        """Model log-ratios log s_z ~ log p(z at i | rest) / p(x at i | rest), (..., N+1).

        Given the rest, position i is MASK with probability 1 - a exactly (masking ignores the
        token), so with p = softmax(raw) modelling the real token given "not masked":
        at MASK, log s_z = log p_z + log(a/(1-a)) for real z (for gamma = 0 this is SEDD's
        -log(e^{sigma_bar} - 1) scaling) and log s_M = 0; at a real x, log s_z = log p_z - log p_x
        and log s_M = -inf (MASK never turns back into a real token).
        With ``parametrisation = "sedd"`` the raw outputs are the log-ratios themselves
        (:func:`hdlm.sedd_score.sedd_log_score`).
        """
        s = noise_like(s, x.shape, raw.dtype, raw.device)
        if self.parametrisation == "sedd":
            return sedd_log_score(raw, x, self.noise.sigma_bar(s), self.mask_id)
        lsm = torch.log_softmax(raw, dim=-1)
        is_mask = x == self.mask_id
        x_real = torch.where(is_mask, torch.zeros_like(x), x)
        lsm_x = lsm.gather(-1, x_real.unsqueeze(-1))
        odds = self._log_mask_odds(self.noise.sigma_bar(s)).unsqueeze(-1)
        log_real = torch.where(is_mask.unsqueeze(-1), lsm + odds, lsm - lsm_x)
        log_mask = torch.where(is_mask, 0.0, NEG_INF).to(raw.dtype).unsqueeze(-1)
        return torch.cat([log_real, log_mask], dim=-1)

    # ---- DWDSE --------------------------------------------------------------------------

    def diffusion_loss(self, raw: Tensor, x: Tensor, y: Tensor, s, rate, aux: dict | None = None) -> Tensor:
        """rate * DWDSE per token (Lou et al., 2024), exact in closed form for Q_gamma.

        L = sigma_bar'(s) sum_{z != x} Q(x, z) [s_z - r_z log s_z + r_z (log r_z - 1)],
        r_z = p_s(z | y) / p_s(x | y), s_z from :meth:`log_score`. With p = softmax(raw) and
        q_z = b [z = y] + (1-b)/N (real marginal over a):
        * x = MASK: Q(M, z) = 1 - gamma for every real z, s_z = p_z a/(1-a), r_z = q_z a/(1-a)
          (non-zero also for z != y). The factor a/(1-a) = 1/expm1((1-gamma) sigma_bar) comes out
          exactly and the sum is KL(q || p) = -(b log p_y + (1-b)/N sum_z log p_z) + sum_z q_z log q_z.
        * x real: Q(x, z) = gamma / N for every other real z (none from MASK), s_z = p_z / p_x,
          r_z = q_z / q_x: SEDD's uniform score entropy at noise gamma * sigma_bar.
        Only reductions of log_softmax(raw) are formed: no further (..., N) temporaries, so the
        loss is cheap at N = 50k (its gradient, p - q-like, is exact; in float32 the value of a
        near-perfect prediction carries rounding from the sums: pass float64 raw for exact values).
        Zero where rate == 0 and at states the forward process cannot reach from y.
        With ``parametrisation = "sedd"`` the same loss is computed from the model's log-ratios
        (:func:`hdlm.sedd_score.sedd_dwdse`).
        """
        s = noise_like(s, x.shape, raw.dtype, raw.device)
        rate = noise_like(rate, x.shape, raw.dtype, raw.device)
        loss = self._sedd_loss if self.parametrisation == "sedd" else self._subs_loss
        return loss(raw, x, y, s, rate)

    def _subs_loss(self, raw: Tensor, x: Tensor, y: Tensor, s: Tensor, rate: Tensor) -> Tensor:
        """:meth:`diffusion_loss` from hdlm's (subs) reading of ``raw``; ``s``, ``rate`` shaped like x."""
        n = self.N
        sigma_bar, dsigma_bar = self.noise.sigma_bar(s), self.noise.dsigma_bar(s)
        b, log_same, log_other = self._real_marginal_logs(sigma_bar)
        moved = log_other > NEG_INF  # q_other > 0
        log_other_safe = torch.where(moved, log_other, torch.zeros_like(log_other))
        zero = torch.zeros_like(sigma_bar)

        # log p_y, log p_x and sum_z log p_z from one gather and one logsumexp: the (..., N)
        # log-softmax is never materialised and the backward is one pass (head_loss.vocab_reductions)
        is_mask = x == self.mask_id
        x_real = torch.where(is_mask, y, x)
        lse, entries, raw_sum = vocab_reductions(raw, torch.stack([y, x_real], -1))
        lsm_y, lsm_x = (entries - lse.unsqueeze(-1)).unbind(-1)
        lsm_sum = raw_sum - n * lse
        lsm_sum_safe = torch.where(moved, lsm_sum, zero)  # multiplied by q_other = 0 otherwise

        # x = MASK: (1-gamma) a/(1-a) KL(q || p)
        c_mask = (1.0 - self.gamma) * sigma_bar
        ok_mask = is_mask & (c_mask > 0)
        coef_mask = (1.0 - self.gamma) / torch.expm1(torch.where(ok_mask, c_mask, torch.ones_like(c_mask)))
        q_other = torch.exp(log_other)
        neg_entropy = torch.xlogy(torch.exp(log_same), torch.exp(log_same)) + (n - 1) * torch.xlogy(q_other, q_other)
        term_mask = -(b * lsm_y + q_other * lsm_sum_safe) + neg_entropy

        # x real: sum_{z != x} s_z = (1 - p_x)/p_x and sum_{z != x} log s_z = sum_z log p_z - N log p_x
        sum_s = torch.expm1(-lsm_x)
        sum_log_s = lsm_sum - n * lsm_x
        # ... x = y: every r_z = rho = q_other / q_same
        log_rho = log_other_safe - log_same
        rho = torch.where(moved, torch.exp(log_rho), zero)
        term_same = sum_s - torch.where(moved, rho * sum_log_s, zero) + (n - 1) * rho * (log_rho - 1.0)
        # ... x != y: r_y = 1/rho (its term written as r phi(log s - log r)), r_z = 1 for the N-2 others
        log_s_y = lsm_y - lsm_x
        term_y = torch.exp(-log_rho) * _phi(log_s_y + log_rho)
        term_other = (sum_s - torch.exp(log_s_y)) - (sum_log_s - log_s_y) - (n - 2)
        term_real = torch.where(x == y, term_same, term_other + term_y)
        ok_real = ~is_mask & ((x == y) | moved)

        per_token = torch.where(is_mask, coef_mask * term_mask, (self.gamma / n) * term_real)
        live = (ok_mask | ok_real) & (rate != 0)
        return torch.where(live, rate * dsigma_bar * per_token, zero)

    def _sedd_loss(self, raw: Tensor, x: Tensor, y: Tensor, s: Tensor, rate: Tensor) -> Tensor:
        """rate * DWDSE from SEDD-parametrised outputs, zero where the state is unreachable or rate == 0."""
        moved = self._real_marginal_logs(self.noise.sigma_bar(s))[2] > NEG_INF  # q_other > 0
        is_mask = x == self.mask_id
        live = (rate != 0) & (s > 0) & (~is_mask & ((x == y) | moved) | is_mask & ((1.0 - self.gamma) * s > 0))
        safe_s = torch.where(live, s, torch.full_like(s, 0.5))  # keeps log(e^σ̄ − 1) finite off the live cells
        sigma_bar = self.noise.sigma_bar(safe_s)
        log_real = sedd_log_score(raw, x, sigma_bar, self.mask_id)[..., : self.N]
        per_token = sedd_dwdse(log_real, x, y, sigma_bar, self.gamma)
        zero = torch.zeros_like(per_token)
        return torch.where(live, rate * self.noise.dsigma_bar(safe_s) * per_token, zero)

    # ---- sampler maths (SEDD's Tweedie tau-leaping and Euler) ---------------------------

    def _step_delta(self, x: Tensor, s_now, s_next, dtype, device) -> tuple[Tensor, Tensor]:
        s_now = noise_like(s_now, x.shape, dtype, device)
        s_next = noise_like(s_next, x.shape, dtype, device)
        delta = (self.noise.sigma_bar(s_now) - self.noise.sigma_bar(s_next)).clamp_min(0.0)
        return delta, s_next

    def analytic_probs(self, log_score: Tensor, x: Tensor, s_now, s_next) -> Tensor:
        """Tweedie tau-leaping step (Lou et al., 2024, Thm 4.2), per token: probabilities (..., N+1).

        With delta = sigma_bar(s_now) - sigma_bar(s_next) >= 0 and s = exp(log_score) (s_x = 1),
        p(z) oc [exp(-delta Q) s]_z exp(delta Q)[x, z]; exact when s holds the true ratios of a
        single token. Tiny negatives (imperfect scores, rounding) are clamped to 0. Where
        s_next == 0 MASK gets probability 0 (SEDD's final denoising step); where delta == 0, x stays.
        Pass float64 log-scores for the most accurate MASK probability. Computed in closed form
        (:func:`hdlm.processes.gamma_kernel.tweedie_step`); :meth:`_analytic_composed` is the same step
        from ``apply_exp`` and ``exp_row``.
        """
        return tweedie_step(self, log_score, x, s_now, s_next)

    def _analytic_composed(self, log_score: Tensor, x: Tensor, s_now, s_next) -> Tensor:
        """:meth:`analytic_probs` composed from its definition (the reference of the closed form)."""
        delta, s_next = self._step_delta(x, s_now, s_next, log_score.dtype, log_score.device)
        # p is invariant to rescaling s, so take s / max(s): no overflow for large scores
        scaled = torch.exp(log_score - log_score.amax(-1, keepdim=True))
        back = self.apply_exp(scaled, -delta)
        row = self.exp_row(x, delta)
        probs = torch.where(row > 0, back * row, torch.zeros_like(row))  # row = 0 kills any -inf/inf in back
        return _normalise_step(probs, log_score, x, s_next, delta, self.mask_id)

    def euler_probs(self, log_score: Tensor, x: Tensor, s_now, s_next) -> Tensor:
        """Euler step of the reverse process: p(z) = [z = x] + delta Q(x, z) s_z for z != x.

        The reverse rate x -> z is the forward rate z -> x times the ratio s_z; the diagonal is
        1 - sum of the others, clamped to >= 0 (computed in log space, so a step whose leaving mass
        exceeds 1 becomes that mass normalised); then the final-step rule of :meth:`analytic_probs`.
        """
        delta, s_next = self._step_delta(x, s_now, s_next, log_score.dtype, log_score.device)
        z = torch.arange(self.N + 1, device=x.device)
        x_ = x.unsqueeze(-1)
        z_real = z < self.N
        from_mask, from_real = (torch.tensor(v, dtype=log_score.dtype, device=x.device)
                                for v in (1.0 - self.gamma, self.gamma / self.N))
        rate_in = torch.where(x_ == self.mask_id, from_mask, from_real)
        rate_in = torch.where(z_real & (z != x_), rate_in, torch.zeros_like(rate_in))
        # in log space: when the total leaving mass reaches 1 the clamped, normalised step is its
        # softmax (stay = 0), and large scores cannot overflow
        log_leave = torch.where(rate_in > 0, torch.log(delta.unsqueeze(-1) * rate_in) + log_score, NEG_INF)
        log_total = torch.logsumexp(log_leave, dim=-1, keepdim=True)
        saturated = log_total >= 0
        leave = torch.where(saturated, torch.softmax(log_leave.clamp_min(torch.finfo(log_leave.dtype).min), -1),
                            torch.exp(log_leave))
        stay = torch.where(saturated, torch.zeros_like(log_total), -torch.expm1(log_total))
        probs = torch.where(rate_in > 0, leave, torch.zeros_like(leave)) + torch.where(z == x_, stay, 0.0)
        return _normalise_step(probs, log_score, x, s_next, delta, self.mask_id)

    def kernel_analytic(self, raw: Tensor, x: Tensor, s_now, s_next) -> Tensor:
        """The analytic (Tweedie tau-leaping) kernel from raw outputs: the paper's default sampler
        (for the "subs" parametrisation without forming the log-scores: :func:`tweedie_kernel_subs`)."""
        if self.parametrisation == "subs":
            return tweedie_kernel_subs(self, raw, x, s_now, s_next)
        return self.analytic_probs(self.log_score(raw, x, s_now), x, s_now, s_next)

    def kernel_euler(self, raw: Tensor, x: Tensor, s_now, s_next) -> Tensor:
        """The Euler kernel from raw outputs."""
        return self.euler_probs(self.log_score(raw, x, s_now), x, s_now, s_next)

    def kernel_posterior(self, raw: Tensor, x: Tensor, s_now, s_next) -> Tensor:
        """The posterior-mean kernel p_θ(x_s | x_t) = Σ_ŷ q(x_s | x_t, ŷ) p̂(ŷ | x_t), (..., N+1).

        q is the exact posterior of the level chain (Eq. 7g's absorbing ⊕ uniform operator, Bayes;
        :meth:`Process.posterior`); p̂ is :meth:`clean_probs`. The ŷ sum is O(N) work:
        p(z) = q(x_t at s_now | z at s_next) · [exp(c(s_next) Q_γ) w]_z with w_ŷ = p̂(ŷ) / q(x_t | ŷ).
        Nothing is clamped: every state the chain can reach from a ŷ with p̂(ŷ) > 0 keeps probability
        > 0 (the discrete bound with this kernel is finite), and at the last step (s_next = 0) the
        kernel is p̂ itself, so MASK never survives. For γ = 0 it is MDLM's ancestral step.
        With ``parametrisation = "subs"`` (p̂ from softmax(raw)) it is computed in closed form by
        :func:`hdlm.processes.gamma_kernel.posterior_kernel_subs`;
        :meth:`_posterior_composed` is the same kernel from the definitions.
        """
        if self.parametrisation == "subs":
            return posterior_kernel_subs(self, raw, x, s_now, s_next)
        return self._posterior_composed(raw, x, s_now, s_next, reference=False)

    def _posterior_composed(self, raw: Tensor, x: Tensor, s_now, s_next, reference: bool = True) -> Tensor:
        """:meth:`kernel_posterior` composed from its parts: :meth:`clean_probs`, ``apply_exp``, ``exp_row``
        (``reference``: with the composed Tweedie step too, all from the definitions)."""
        n = self.N
        s_now, s_next = levels64(s_now, x), levels64(s_next, x)
        p_hat, q_x = self.clean_probs(raw, x, s_now, reference=reference)
        w = torch.where(q_x > 0, p_hat / torch.where(q_x > 0, q_x, torch.ones_like(q_x)), torch.zeros_like(q_x))
        prior = self.apply_exp(torch.cat([w, torch.zeros_like(w[..., :1])], -1), self._chain_noise(s_next).to(w.dtype))
        delta = (self._chain_noise(s_now) - self._chain_noise(s_next)).clamp_min(0.0).to(w.dtype)
        probs = self.exp_row(x, delta) * prior
        total = probs.sum(-1, keepdim=True)
        stay = one_hot(x, n + 1, probs.dtype)
        return torch.where(total > 0, probs / torch.where(total > 0, total, torch.ones_like(total)), stay)

    def clean_probs(self, raw: Tensor, x: Tensor, s_now, reference: bool = False) -> tuple[Tensor, Tensor]:
        """(p̂(ŷ | x_t), q(x_t at s_now | ŷ)) over the real ŷ, (..., N) each: the model's clean token.

        p̂ = (1 − κ) D + κ m̃, κ = 1 − e^{−γ c(s_now)} (the chance the uniform part has redrawn the
        token by s_now). D is the Tweedie denoiser (:meth:`denoise_probs`: exact Bayes from exact
        scores, but it clamps negative weights to 0); m̃ ∝ m_ŷ q(x_t | ŷ) is the model's real-token
        distribution m = softmax(real log-scores) conditioned on x_t (m models the noisy token, which
        differs from the clean one by the uniform part). D = m̃ for γ = 0; for γ > 0 the κ part gives
        every ŷ consistent with x_t positive weight, at an O(κ²) cost from exact scores.
        """
        n = self.N
        s_now = levels64(s_now, x)
        c_now = self._chain_noise(s_now).to(raw.dtype)
        log_score = self.log_score(raw, x, s_now.to(raw.dtype))
        q_x = self.exp_row(x, c_now)[..., :n]
        m = torch.softmax(log_score[..., :n], dim=-1) * q_x
        m = m / m.sum(-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
        if self.gamma == 0.0:
            return m, q_x
        kappa = -torch.expm1(-self.gamma * c_now).unsqueeze(-1)
        step = self._analytic_composed if reference else self.analytic_probs  # reference: from the definitions
        tweedie = step(log_score, x, s_now.to(raw.dtype), torch.zeros_like(s_now, dtype=raw.dtype))
        return (1.0 - kappa) * tweedie[..., :n] + kappa * m, q_x

    def denoise_probs(self, log_score: Tensor, x: Tensor, s_now) -> Tensor:
        """The last step to noise 0: :meth:`analytic_probs` with s_next = 0 (no MASK left)."""
        return self.analytic_probs(log_score, x, s_now, 0.0)


class Absorb(GammaHybrid):
    """SEDD's absorbing process (gamma = 0)."""

    def __init__(self, N: int, noise: NoiseSchedule, parametrisation: str = "subs"):
        super().__init__(N, noise, gamma=0.0, parametrisation=parametrisation)


class Uniform(GammaHybrid):
    """SEDD's uniform process over the N real tokens (gamma = 1)."""

    def __init__(self, N: int, noise: NoiseSchedule, parametrisation: str = "subs"):
        super().__init__(N, noise, gamma=1.0, parametrisation=parametrisation)
