"""epsilon-hybrid processes (paper §3.2; MDM framework): substitute, then mask.

Unless s = 0 (then x = y), y is replaced by a uniform real token with probability epsilon, then
masked with probability 1 - alpha(s). Trained with HDCE, Eq. (8)-(9); sampled with Algorithm 3
(ancestral), Algorithm 4 (ACS) or the posterior-mean kernel. :class:`MDLM` is epsilon = 0.

Likelihood: for epsilon = 0 the HDCE is MDLM's continuous-time NELBO (any lambda: kept tokens
weigh 0). For epsilon > 0 the HDCE of Eq. (9) is the paper's training loss, not a proven bound
on the NLL; the discrete bound (:mod:`hdlm.evaluation.discrete`) bounds the posterior-mean kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import HDLMError
from ..noise import NoiseSchedule
from .base import Process, cross_entropy, float_dtype, levels64, noise_like, one_hot


class EpsilonHybrid(Process):
    """Substitute-then-mask process of §3.2, trained with HDCE, Eq. (8)-(9).

    Unless s = 0 (then x = y), y is replaced by a uniform real token with probability epsilon
    (the redraw may give y back), then masked with probability 1 - alpha(s): the y-th column of
    (1 + epsilon Q_uniform)(1 + (1 - alpha) Q_absorb). ``raw`` are logits of the clean token.
    """

    family = "mean"
    kernels = ("ancestral", "posterior", "ar")
    #: Algorithm 3, the sampler ``hdlm sample`` runs: the discrete bound certifies it by default
    default_kernel = "ancestral"

    def __init__(self, N: int, noise: NoiseSchedule, epsilon: float, lam: float = 1.0):
        super().__init__(N, noise)
        if not 0.0 <= epsilon <= 1.0:
            raise HDLMError(f"epsilon-hybrid: epsilon = {epsilon} must be in [0, 1]")
        if lam < 0.0:
            raise HDLMError(f"epsilon-hybrid: lam = {lam} must be >= 0")
        self.epsilon = float(epsilon)
        self.lam = float(lam)

    def _mask_prob(self, s: Tensor) -> Tensor:
        """p_mask = 1 - alpha(s) = -expm1(-sigma_bar(s)) (accurate at small s)."""
        return -torch.expm1(-self.noise.sigma_bar(s))

    def marginal(self, y: Tensor, s) -> Tensor:
        """s > 0: P(MASK) = 1 - alpha, P(y) = alpha (1 - eps + eps/N), P(z != y) = alpha eps / N; s = 0: y."""
        s = noise_like(s, y.shape, float_dtype(s), y.device)
        p_mask = self._mask_prob(s).unsqueeze(-1)
        keep = 1.0 - p_mask
        e_y = torch.nn.functional.one_hot(y, self.N + 1).to(s.dtype)
        real = (torch.arange(self.N + 1, device=y.device) < self.N).to(s.dtype)
        noisy = keep * ((1.0 - self.epsilon) * e_y + (self.epsilon / self.N) * real)
        noisy = noisy + p_mask * (1.0 - real)
        return torch.where((s > 0).unsqueeze(-1), noisy, e_y)

    def sample_forward(self, y: Tensor, s, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        """x ~ q(x | y, s); ``aux["substituted"]`` (bool) records the uniform redraw event."""
        dtype = float_dtype(s)
        s = noise_like(s, y.shape, dtype, y.device)
        noisy = s > 0
        substituted = noisy & (torch.rand(y.shape, generator=generator, device=y.device, dtype=dtype) < self.epsilon)
        uniform = torch.randint(0, self.N, y.shape, generator=generator, device=y.device)
        masked = noisy & (torch.rand(y.shape, generator=generator, device=y.device, dtype=dtype) < self._mask_prob(s))
        x = torch.where(substituted, uniform, y)
        return torch.where(masked, torch.full_like(y, self.mask_id), x), {"substituted": substituted}

    def prior(self, shape, generator: torch.Generator | None = None, device=None) -> Tensor:
        """All MASK."""
        return torch.full(tuple(shape), self.mask_id, dtype=torch.long, device=device)

    def embed_keep(self, x: Tensor, s) -> Tensor:
        """Eq. (12) does not apply: 1 everywhere."""
        return torch.ones(x.shape, dtype=float_dtype(s), device=x.device)

    # ---- the forward chain over levels (the marginal above is already e_y at level 0)

    def chain_marginal(self, y: Tensor, s) -> Tensor:
        return self.marginal(y, levels64(s, y))

    def chain_row(self, x: Tensor, s_lo, s_hi) -> Tensor:
        """q(x at s_hi | z at s_lo): from level 0, z is substituted (or kept) into x and not masked, or
        masked; from a noisy level s_lo > 0 only further masking, with probability 1 - alpha(s_hi)/alpha(s_lo)."""
        s_lo, s_hi = levels64(s_lo, x), levels64(s_hi, x)
        real = torch.arange(self.N + 1, device=x.device) < self.N
        is_mask = (x == self.N).unsqueeze(-1)
        from_clean = s_lo.unsqueeze(-1) == 0
        sig_hi = self.noise.sigma_bar(s_hi)
        sig_lo = torch.where(s_lo > 0, self.noise.sigma_bar(s_lo), torch.zeros_like(s_lo))
        keep_clean = torch.exp(-sig_hi).unsqueeze(-1)  # level 0 -> s_hi
        ratio = torch.exp(-(sig_hi - sig_lo)).unsqueeze(-1)  # alpha(s_hi) / alpha(s_lo)
        zero, one = (torch.tensor(v, dtype=torch.float64, device=x.device) for v in (0.0, 1.0))
        # x = MASK: a real z got masked (z = MASK stays MASK; unreachable at level 0)
        to_mask_clean = torch.where(real, 1.0 - keep_clean, zero)
        to_mask_noisy = torch.where(real, 1.0 - ratio, one)
        # x = v real: from level 0 z was substituted (or kept) into v and not masked; later levels only mask
        to_real_clean = keep_clean * self._substituted(x)
        to_real_noisy = ratio * one_hot(x.clamp(max=self.N), self.N + 1) * real
        mask_row = torch.where(from_clean, to_mask_clean, to_mask_noisy)
        real_row = torch.where(from_clean, to_real_clean, to_real_noisy)
        return torch.where(is_mask, mask_row, real_row)

    def _substituted(self, v: Tensor) -> Tensor:
        """(1 - eps) e_v + eps/N over the real tokens, for real v (...) -> (..., N+1)."""
        real = (torch.arange(self.N + 1, device=v.device) < self.N).to(torch.float64)
        return (1.0 - self.epsilon) * one_hot(v.clamp(max=self.N), self.N + 1) + (self.epsilon / self.N) * real

    def absorbing_part(self) -> "Process":
        """MDLM with the same noise (the epsilon-hybrid without its substitutions)."""
        return MDLM(self.N, self.noise)

    def log_probs(self, raw: Tensor) -> Tensor:
        """log p(clean token) = log_softmax(raw), (..., N)."""
        return torch.log_softmax(raw, dim=-1)

    def diffusion_loss(self, raw: Tensor, x: Tensor, y: Tensor, s, rate, aux: dict | None = None) -> Tensor:
        """HDCE, Eq. (8)-(9), per token: w * (-log softmax(raw)_y) * rate * (-alpha'(s)).

        w = 1/p_mask (masked), lambda(1-eps)/(1-p_mask) (unmasked, substituted), lambda eps/(1-p_mask)
        (unmasked, not substituted), p_mask = 1 - alpha(s). Eq. (9) is written for flat training
        with linear alpha, where rate = 1 and -alpha' = 1; the factor rate * (-alpha'(s)) makes the
        same weights a continuous-time integrand for any alpha and any hyperschedule (with
        Linear(eps) noise, -alpha' = 1 - eps). For epsilon = 0 this is MDLM's NELBO integrand
        -alpha'/(1-alpha) CE on masked tokens. Zero where rate == 0 or s == 0.
        """
        if aux is None or "substituted" not in aux:
            raise HDLMError("epsilon-hybrid loss needs aux['substituted'] from sample_forward")
        dtype, device = raw.dtype, raw.device
        s = noise_like(s, x.shape, dtype, device)
        rate = noise_like(rate, x.shape, dtype, device)
        p_mask, keep = self._mask_prob(s), self.noise.alpha(s)
        masked = x == self.mask_id
        substituted = torch.broadcast_to(aux["substituted"].to(device), x.shape)
        zero = torch.zeros_like(p_mask)
        inv_mask = torch.where(p_mask > 0, 1.0 / torch.where(p_mask > 0, p_mask, 1.0), zero)
        inv_keep = torch.where(keep > 0, 1.0 / torch.where(keep > 0, keep, 1.0), zero)
        kept_weight = self.lam * torch.where(substituted, torch.full_like(p_mask, 1.0 - self.epsilon),
                                             torch.full_like(p_mask, self.epsilon))
        w = torch.where(masked, inv_mask, kept_weight * inv_keep)
        factor = rate * -self.noise.dalpha(s)
        live = (rate != 0) & (s > 0)
        return torch.where(live, factor * w * cross_entropy(raw, y), zero)

    def transfer_prob(self, s_now, s_next) -> Tensor:
        """P(a MASK at s_now is revealed by s_next) = (alpha(s_next) - alpha(s_now)) / (1 - alpha(s_now)).

        Alg. 3's 1 - s/t for linear alpha. 0 where s_now == s_next; 1 where s_next == 0 (no MASK
        survives the last step; this rule wins when both hold).
        """
        dtype = torch.promote_types(float_dtype(s_now), float_dtype(s_next))
        s_now, s_next = torch.broadcast_tensors(torch.as_tensor(s_now, dtype=dtype),
                                                torch.as_tensor(s_next, dtype=dtype))
        now = torch.expm1(-self.noise.sigma_bar(s_now))  # -(1 - alpha(s_now))
        nxt = torch.expm1(-self.noise.sigma_bar(s_next))
        moving = (s_now != s_next) & (now != 0)
        p = torch.where(moving, 1.0 - nxt / torch.where(now != 0, now, torch.ones_like(now)), torch.zeros_like(now))
        p = torch.where(s_next == 0, torch.ones_like(p), p)
        return p.clamp(0.0, 1.0)


    def kernel_posterior(self, raw: Tensor, x: Tensor, s_now, s_next) -> Tensor:
        """The "posterior-mean" reverse kernel (D3PM / MDLM mean parametrisation), (..., N+1):

            p_θ(x_s | x_t) = Σ_ŷ q(x_s | x_t, ŷ) p̂(ŷ | x_t),   p̂ = softmax(raw),

        with q from :meth:`posterior`: a MASK is revealed with p_transfer (:meth:`transfer_prob`) to
        (1 - eps) p̂ + eps/N (to p̂ at the last step s_next = 0); a revealed token stays, except at the
        last step where it becomes ŷ ~ p̂ (it may be a substitution). For eps = 0 a revealed v is only
        consistent with ŷ = v, so it stays: the kernel is then MDLM's ancestral sampler (Algorithm 3).
        """
        return self._mean_kernel(raw, x, s_now, s_next, self.epsilon)

    def kernel_ancestral(self, raw: Tensor, x: Tensor, s_now, s_next) -> Tensor:
        """Algorithm 3's kernel (:class:`~hdlm.sampling.samplers.AncestralSampler` at η = 0): a MASK is
        revealed with p_transfer to p̂ = softmax(raw), revealed tokens stay. It is :meth:`kernel_posterior`
        at ε = 0; for ε > 0 the discrete bound certifies it against the absorbing chain (variational
        "auto" = "absorb"), whose trajectories never hold a substituted token."""
        return self._mean_kernel(raw, x, s_now, s_next, 0.0)

    def kernel_stay(self, x: Tensor, s_now, s_next, kernel: str) -> Tensor | None:
        """The mean kernels' stay probability is the model's only at a revealed token's last step
        under ``posterior`` with ε > 0: a MASK stays with 1 − p_transfer, a revealed token otherwise stays."""
        if kernel not in ("posterior", "ancestral"):
            return None
        s_now, s_next = levels64(s_now, x), levels64(s_next, x)
        stay = torch.where(x == self.mask_id, 1.0 - self.transfer_prob(s_now, s_next).to(torch.float64),
                           torch.ones_like(s_now))
        if kernel == "posterior" and self.epsilon > 0:  # resampled from p̂ at its last step
            stay = stay.masked_fill((x != self.mask_id) & (s_next == 0) & (s_next < s_now), float("nan"))
        return torch.where(s_next < s_now, stay, torch.ones_like(stay))

    def _mean_kernel(self, raw: Tensor, x: Tensor, s_now, s_next, eps: float) -> Tensor:
        """Σ_ŷ q_ε(x_s | x_t, ŷ) softmax(raw)(ŷ) for the substitution rate ``eps`` (see :meth:`kernel_posterior`)."""
        N = self.N
        s_now, s_next = levels64(s_now, x), levels64(s_next, x)
        p_hat = torch.softmax(raw, dim=-1)
        final = (s_next == 0).unsqueeze(-1)
        revealed_value = torch.where(final, p_hat, (1.0 - eps) * p_hat + eps / N)
        transfer = self.transfer_prob(s_now, s_next).to(raw.dtype).unsqueeze(-1)
        from_mask = torch.cat([transfer * revealed_value, 1.0 - transfer], dim=-1)
        stay = one_hot(x, N + 1, raw.dtype)
        resample = torch.cat([p_hat, torch.zeros_like(transfer)], dim=-1) if eps > 0 else stay
        from_real = torch.where(final, resample, stay)
        return torch.where((x == self.mask_id).unsqueeze(-1), from_mask, from_real)


class MDLM(EpsilonHybrid):
    """MDLM (Sahoo et al., 2024): the epsilon-hybrid with epsilon = 0."""

    def __init__(self, N: int, noise: NoiseSchedule, lam: float = 1.0):
        super().__init__(N, noise, epsilon=0.0, lam=lam)
