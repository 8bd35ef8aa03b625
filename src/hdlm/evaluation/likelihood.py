"""Upper bounds on perplexity under any hyperschedule (paper §4.2-4.3, App. C.1, Algorithm 1,
Remark 1; DESIGN.md §2-3, §7). The derivations are in ``docs/likelihood.md``.

Three estimators of the negative log-likelihood −log p(y), summed over sequences and divided by
the number of tokens (never an average of perplexities, DESIGN.md §11):

- ``discrete`` (default): the variational bound of the T-step generative process that the
  samplers run, generation order t = 0 (noise) → T (clean)::

      −log p(y) ≤ Σ_{t=0}^{T-1} E_{q(x_t|y)} Σ_i KL( q(x^i_{t+1} | x^i_t, y) ‖ p_θ(x^i_{t+1} | x_t) )

  q is a per-token noising chain over the levels τ_t/𝒯 (:class:`ForwardChain`: the process's
  forward chain, or its absorbing part for a γ-hybrid, :func:`forward_chain`), whose top level
  𝒯 is the sampler's own prior (so there is no prior term, see :func:`variational_posterior`);
  p_θ is the sampler's reverse kernel (:func:`reverse_probs`). Only ACTIVE positions
  (Eq. 1) contribute: settled and worthless ones do not change in either chain (Remark 1).
  Estimated M times per sequence as T · KL_t with t uniform on {0..T−1} (stratified across the
  M draws by default) and x_t ~ q(x_t|y).
- ``continuous``: Algorithm 1, M draws of the training NELBO (:mod:`hdlm.objective`, model in
  eval mode, fixed seeds); the SEDD/MDLM continuous-time bound applied position-wise with rates
  |dℓ_i/du| (DESIGN.md §2). It bounds the T → ∞ process (up to the prior term those papers
  omit too) and is what published tables report.
- ``exact``: Quench with a SHIFTED model is an AR model: the NLL is the next-token
  cross-entropy, one forward pass, standard error 0. Chosen automatically for that case.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import HDLMError

ESTIMATORS = ("discrete", "continuous")
VARIATIONAL = ("auto", "forward", "absorb")
DEFAULT_MC_SAMPLES = 16
CHUNK_ELEMENTS = 1 << 18  # float64 kernel entries built at once (2 MiB per tensor: stays off mmap)
Z95 = 1.959963984540054  # two-sided 95 % normal quantile

# friendly zero-shot names (Table 3; SEDD / MDLM lists) -> (source spec, text field)
ZERO_SHOT = {
    "ptb": ("ptb", "text"),
    "wikitext103": ("hf:wikitext:wikitext-103-raw-v1", "text"),
    "wikitext2": ("hf:wikitext:wikitext-2-raw-v1", "text"),
    "lm1b": ("hf:lm1b", "text"),
    "lambada": ("hf:EleutherAI/lambada_openai", "text"),
    "ag_news": ("hf:ag_news", "text"),
    "pubmed": ("hf:scientific_papers:pubmed", "article"),
    "arxiv": ("hf:scientific_papers:arxiv", "article"),
    "openwebtext": ("hf:openwebtext", "text"),
    "owt": ("hf:openwebtext", "text"),
}
SPLIT_NAMES = ("train", "valid", "validation", "val", "test")


# ============================================================================================
# the variational (noising) chain q


def _one_hot(x: Tensor, n: int, dtype=torch.float64) -> Tensor:
    return torch.nn.functional.one_hot(x, n).to(dtype)


def _levels_like(s, x: Tensor) -> Tensor:
    return torch.broadcast_to(torch.as_tensor(s, dtype=torch.float64, device=x.device), x.shape)


class ForwardChain:
    """A per-token noising chain over levels s ∈ [0, 1], with level 0 = the clean token exactly.

    ``marginal(y, s)`` is q(x | y) at level s, ``step_row(x, s_lo, s_hi)`` is the vector over z of
    q(x at level s_hi | z at level s_lo) (s_lo ≤ s_hi), and ``sample(y, s, generator)`` draws
    from the marginal. All return float64 tensors over the N + 1 states (MASK = N).
    """

    def __init__(self, N: int) -> None:
        self.N = N

    def marginal(self, y: Tensor, s) -> Tensor:
        raise NotImplementedError

    def step_row(self, x: Tensor, s_lo, s_hi) -> Tensor:
        raise NotImplementedError

    def sample(self, y: Tensor, s, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError


class GammaChain(ForwardChain):
    """The γ-hybrid forward process, Eq. (7g): total noise c(s) = σ̄(s) for s > 0 and c(0) = 0."""

    def __init__(self, process) -> None:
        super().__init__(process.N)
        self.process = process

    def _c(self, s: Tensor) -> Tensor:
        return torch.where(s > 0, self.process.noise.sigma_bar(s), torch.zeros_like(s))

    def marginal(self, y: Tensor, s) -> Tensor:
        s = _levels_like(s, y)
        e_y = _one_hot(y, self.N + 1)
        return torch.where((s > 0).unsqueeze(-1), self.process.apply_exp(e_y, self._c(s)), e_y)

    def step_row(self, x: Tensor, s_lo, s_hi) -> Tensor:
        s_lo, s_hi = _levels_like(s_lo, x), _levels_like(s_hi, x)
        return self.process.exp_row(x, (self._c(s_hi) - self._c(s_lo)).clamp_min(0.0))

    def sample(self, y: Tensor, s, generator: torch.Generator | None = None) -> Tensor:
        s = _levels_like(s, y)
        x, _ = self.process.sample_forward(y, s, generator)
        return torch.where(s > 0, x, y)


class MaskChain(ForwardChain):
    """Substitute-then-mask (the ε-hybrid of §3.2) with keep probability α(s) = e^{−σ(s)}.

    Level 0 → s > 0: y is replaced by a uniform real token with probability ε, then masked with
    probability 1 − α(s); s' → s > s' > 0: only further masking, with probability 1 − α(s)/α(s').
    With ε = 0 and σ = (1 − γ)σ̄ it is the absorbing part of a γ-hybrid ("absorb" variational).
    """

    def __init__(self, N: int, sigma, epsilon: float) -> None:
        super().__init__(N)
        self.sigma = sigma
        self.epsilon = float(epsilon)

    def _substituted(self, v: Tensor) -> Tensor:
        """(1 − ε) e_v + ε/N over the real tokens, for real v (…) → (…, N+1)."""
        real = (torch.arange(self.N + 1, device=v.device) < self.N).to(torch.float64)
        return (1.0 - self.epsilon) * _one_hot(v.clamp(max=self.N), self.N + 1) + (self.epsilon / self.N) * real

    def marginal(self, y: Tensor, s) -> Tensor:
        s = _levels_like(s, y)
        sig = self.sigma(s)
        keep, p_mask = torch.exp(-sig).unsqueeze(-1), -torch.expm1(-sig).unsqueeze(-1)
        noisy = keep * self._substituted(y) + p_mask * _one_hot(torch.full_like(y, self.N), self.N + 1)
        return torch.where((s > 0).unsqueeze(-1), noisy, _one_hot(y, self.N + 1))

    def step_row(self, x: Tensor, s_lo, s_hi) -> Tensor:
        s_lo, s_hi = _levels_like(s_lo, x), _levels_like(s_hi, x)
        real = torch.arange(self.N + 1, device=x.device) < self.N
        is_mask = (x == self.N).unsqueeze(-1)
        from_clean = s_lo.unsqueeze(-1) == 0
        sig_hi = self.sigma(s_hi)
        sig_lo = torch.where(s_lo > 0, self.sigma(s_lo), torch.zeros_like(s_lo))
        keep_clean = torch.exp(-sig_hi).unsqueeze(-1)  # level 0 → s_hi
        ratio = torch.exp(-(sig_hi - sig_lo)).unsqueeze(-1)  # α(s_hi) / α(s_lo)
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        # x = MASK: a real z got masked (z = MASK: stays MASK; unreachable at level 0)
        to_mask_clean = torch.where(real, 1.0 - keep_clean, zero)
        to_mask_noisy = torch.where(real, 1.0 - ratio, torch.ones((), dtype=torch.float64, device=x.device))
        # x = v real: from level 0 z was substituted (or kept) into v and not masked; later levels only mask
        to_real_clean = keep_clean * self._substituted(x)
        to_real_noisy = ratio * _one_hot(x.clamp(max=self.N), self.N + 1) * real
        mask_row = torch.where(from_clean, to_mask_clean, to_mask_noisy)
        real_row = torch.where(from_clean, to_real_clean, to_real_noisy)
        return torch.where(is_mask, mask_row, real_row)

    def sample(self, y: Tensor, s, generator: torch.Generator | None = None) -> Tensor:
        s = _levels_like(s, y)
        noisy = s > 0
        u = torch.rand(y.shape, generator=generator, dtype=torch.float64, device=y.device)
        substituted = noisy & (u < self.epsilon)
        uniform = torch.randint(0, self.N, y.shape, generator=generator, device=y.device)
        u = torch.rand(y.shape, generator=generator, dtype=torch.float64, device=y.device)
        masked = noisy & (u < -torch.expm1(-self.sigma(s)))
        x = torch.where(substituted, uniform, y)
        return torch.where(masked, torch.full_like(y, self.N), x)


def forward_chain(process, variational: str = "forward") -> ForwardChain:
    """The variational chain of the discrete bound for ``process``.

    ``"forward"``: the process's own forward chain (γ: :class:`GammaChain`, ε: :class:`MaskChain`
    with its ε). ``"absorb"``: its absorbing part only (γ: masking at rate (1 − γ)σ̄, ε: ε = 0),
    a valid variational choice whose trajectories never hold a wrong token — finite wherever the
    sampler can reveal the right token, see docs/likelihood.md. ``"auto"``: "absorb" for a
    γ-hybrid with 0 < γ < 1, else "forward".
    """
    variational = resolved_variational(process, variational)
    if process.family == "score":
        if variational == "forward":
            return GammaChain(process)
        if process.gamma >= 1.0:
            raise HDLMError("variational = 'absorb' needs a MASK state; the uniform process (gamma = 1) has none")
        g = process.gamma
        return MaskChain(process.N, lambda s: (1.0 - g) * process.noise.sigma_bar(s), 0.0)
    eps = process.epsilon if variational == "forward" else 0.0
    return MaskChain(process.N, process.noise.sigma_bar, eps)


def resolved_variational(process, variational: str) -> str:
    """The chain ``variational`` names for ``process``: "auto" is "absorb" for 0 < γ < 1, else "forward"."""
    if variational not in VARIATIONAL:
        raise HDLMError(f"variational = {variational!r}: must be one of {', '.join(VARIATIONAL)}")
    if variational == "auto":
        return "absorb" if process.family == "score" and 0.0 < process.gamma < 1.0 else "forward"
    return variational


def forward_posterior(process, x_t: Tensor, y: Tensor, s_now, s_next, chain: ForwardChain | None = None) -> Tensor:
    """q(x_{t+1} | x_t, y) per token (…, N+1), by Bayes on the noising chain (s_next ≤ s_now):

        q(z | x_t, y) ∝ q(z | y, s_next) · q(x_t | z, s_next → s_now).

    For the γ-hybrid both factors come from Eq. (7g); for the ε-hybrid this gives (s_now > s_next > 0)
    an unmasked token stays, a MASK stays with probability (1 − α(s_next))/(1 − α(s_now)) and is
    otherwise revealed to (1 − ε)δ_y + ε·Uniform; at s_next = 0 every token becomes y.
    Where s_now = s_next (or x_t is unreachable from y) the token stays.
    """
    chain = chain or forward_chain(process)
    s_now, s_next = _levels_like(s_now, x_t), _levels_like(s_next, x_t)
    post = chain.marginal(y, s_next) * chain.step_row(x_t, s_next, s_now)
    total = post.sum(-1, keepdim=True)
    stay = _one_hot(x_t, chain.N + 1)
    post = torch.where(total > 0, post / torch.where(total > 0, total, torch.ones_like(total)), stay)
    return torch.where((s_now == s_next).unsqueeze(-1), stay, post)


def variational_posterior(process, x_t: Tensor, y: Tensor, s_now, s_next, chain: ForwardChain | None = None) -> Tensor:
    """The discrete bound's q(x_{t+1} | x_t, y): :func:`forward_posterior`, except at the top level.

    A token at full noise (s_now = 1) holds a draw from the sampler's prior (all MASK, or uniform
    tokens for γ = 1), independent of y; when it leaves the top level it is drawn from the chain's
    marginal q(· | y, s_next). This choice of variational distribution makes the prior term
    KL(q(x_0|y) ‖ p(x_0)) exactly 0 — with log-linear noise α(1) = 10⁻³ > 0, so the forward
    marginal at s = 1 is not the all-MASK prior and that term would be infinite.
    """
    chain = chain or forward_chain(process)
    s_now, s_next = _levels_like(s_now, x_t), _levels_like(s_next, x_t)
    post = forward_posterior(process, x_t, y, s_now, s_next, chain)
    leaving_top = ((s_now == 1.0) & (s_next < 1.0)).unsqueeze(-1)
    return torch.where(leaving_top, chain.marginal(y, s_next), post)


def draw_state(process, chain: ForwardChain, y: Tensor, level: Tensor,
               generator: torch.Generator | None = None) -> Tensor:
    """x_t ~ q(x_t | y) at per-position levels ``level`` = τ_t/𝒯: the prior at level 1, y at level 0."""
    level = _levels_like(level, y)
    x = chain.sample(y, level, generator)
    prior = process.prior(y.shape, generator=generator, device=y.device)
    return torch.where(level == 1.0, prior, x)


# ============================================================================================
# the reverse (generative) kernel p_θ


def epsilon_posterior_probs(process, raw: Tensor, x: Tensor, s_now, s_next) -> Tensor:
    """The ε-family "posterior-mean" reverse kernel (D3PM / MDLM mean parametrisation), (…, N+1):

        p_θ(x_{t+1} | x_t) = Σ_ŷ q(x_{t+1} | x_t, ŷ) p̂(ŷ | x_t),   p̂ = softmax(raw).

    With the ε-hybrid posterior of :func:`forward_posterior`: a MASK is revealed with
    p_transfer = (α(s_next) − α(s_now))/(1 − α(s_now)) to (1 − ε) p̂ + ε/N (to p̂ at the last step
    s_next = 0); a revealed token stays, except at the last step where it becomes ŷ ~ p̂ (it may
    be a substitution). For ε = 0 a revealed v is only consistent with ŷ = v, so it stays: the
    kernel is then MDLM's ancestral sampler (Algorithm 3) exactly. Samplers may use it as the
    "posterior" sampler of the ε family; the discrete bound bounds the NLL of this kernel.
    """
    N = process.N
    raw = raw.to(torch.float64)
    s_now, s_next = _levels_like(s_now, x), _levels_like(s_next, x)
    p_hat = torch.softmax(raw, dim=-1)
    final = (s_next == 0).unsqueeze(-1)
    eps = process.epsilon
    revealed_value = torch.where(final, p_hat, (1.0 - eps) * p_hat + eps / N)
    transfer = process.transfer_prob(s_now, s_next).to(torch.float64).unsqueeze(-1)
    zero = torch.zeros_like(transfer)
    from_mask = torch.cat([transfer * revealed_value, 1.0 - transfer], dim=-1)
    stay = _one_hot(x, N + 1)
    resample = torch.cat([p_hat, zero], dim=-1) if eps > 0 else stay
    from_real = torch.where(final, resample, stay)
    probs = torch.where((x == process.mask_id).unsqueeze(-1), from_mask, from_real)
    return torch.where((s_next < s_now).unsqueeze(-1), probs, stay)


def reverse_probs(process, raw: Tensor, x: Tensor, s_now, s_next, *, levels: int | None = None) -> Tensor:
    """The sampler's one-step kernel p_θ(x_{t+1} | x_t) per token (…, N+1), from raw outputs (…, N).

    𝒯 = 1 (``levels == 1``, Quench): draw the token from softmax(raw) (the AR sampler; training
    fits raw by cross-entropy there). γ family: the analytic Tweedie τ-leaping step with SEDD's
    final denoising rule (``process.analytic_probs``). ε family: :func:`epsilon_posterior_probs`.
    A position whose level does not decrease keeps its token.
    """
    raw = raw.to(torch.float64)
    s_now, s_next = _levels_like(s_now, x), _levels_like(s_next, x)
    stay = _one_hot(x, process.N + 1)
    if levels == 1:
        probs = torch.cat([torch.softmax(raw, -1), torch.zeros_like(raw[..., :1])], dim=-1)
    elif process.family == "score":
        probs = process.analytic_probs(process.log_score(raw, x, s_now), x, s_now, s_next)
    else:
        probs = epsilon_posterior_probs(process, raw, x, s_now, s_next)
    return torch.where((s_next < s_now).unsqueeze(-1), probs, stay)


def categorical_kl(q: Tensor, p: Tensor) -> Tensor:
    """KL(q ‖ p) over the last axis; 0 log 0 = 0, +inf where q > 0 = p."""
    return (torch.xlogy(q, q) - torch.xlogy(q, p)).sum(-1)


@dataclass
class ReverseChain:
    """The T-step generative process: a model, a process and a hyperschedule, run as the sampler does.

    Each step t → t+1 runs the model on settled ⁀ active cells (:func:`hdlm.layout.inference_cells`,
    Eq. 1), applies :func:`reverse_probs` at the active positions and leaves the others unchanged.
    ``t`` may be a LongTensor (B,) of steps sharing one split (settled_end, active_end).
    """

    model: Any
    process: Any
    schedule: Any
    shift: int = 0
    settled_attention: str = "causal"

    @classmethod
    def from_config(cls, model, cfg, schedule=None, process=None) -> "ReverseChain":
        from ..hyperschedule import from_config
        from ..processes import make_process

        schedule = schedule if schedule is not None else from_config(cfg.schedule, cfg.model.length)
        process = process if process is not None else make_process(cfg.process, cfg.model.vocab_size)
        return cls(model, process, schedule, cfg.model.shift, cfg.model.settled_attention)

    @property
    def ar(self) -> bool:
        """Quench + SHIFTED: plain AR decoding (no noisy interval)."""
        return self.schedule.levels == 1 and self.shift == 1

    def levels_at(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(τ_t/𝒯, τ_{t+1}/𝒯) as float64 (B, d) for steps t (B,)."""
        tab = self.schedule.table.to(torch.float64) / self.schedule.levels
        t = t.cpu()
        return tab[t], tab[t + 1]

    def split(self, t: Tensor) -> tuple[int, int]:
        splits = {self.schedule.split(int(v)) for v in t.tolist()}
        if len(splits) != 1:
            raise ValueError(f"ReverseChain: steps {t.tolist()} do not share one settled/active split")
        return splits.pop()

    def active_raw(self, x: Tensor, t: Tensor) -> tuple[Tensor, int, int, Tensor, Tensor]:
        """Model outputs at the active positions of step t: (raw (B, K, N), settled_end, active_end,
        levels now (B, d), levels next (B, d))."""
        from ..layout import attention_mask, inference_cells

        se, ae = self.split(t)
        now, nxt = (v.to(x.device) for v in self.levels_at(t))
        if ae == se:
            return x.new_zeros((x.shape[0], 0, self.process.N), dtype=torch.float64), se, ae, now, nxt
        cells, out_index = inference_cells(x, now, se, ae, self.process, self.shift, ar=self.ar,
                                           settled_attention=self.settled_attention,
                                           block_width=self.schedule.width)
        mask = attention_mask(cells.layout, cells.layout, device=x.device)
        raw = self.model(cells.tokens, cells.sigma, cells.positions, mask, keep=cells.keep, out_index=out_index)
        return raw, se, ae, now, nxt

    def active_probs(self, x: Tensor, t: Tensor) -> tuple[Tensor, int, int]:
        """p_θ(x_{t+1}^i | x_t) at the active positions: ((B, K, N+1), settled_end, active_end)."""
        raw, se, ae, now, nxt = self.active_raw(x, t)
        probs = reverse_probs(self.process, raw, x[:, se:ae], now[:, se:ae], nxt[:, se:ae], levels=self.schedule.levels)
        return probs, se, ae

    def kernel(self, x: Tensor, t: Tensor) -> Tensor:
        """p_θ(x_{t+1}^i | x_t) for every position (B, d, N+1): identity outside the active window."""
        probs, se, ae = self.active_probs(x, t)
        out = _one_hot(x, self.process.N + 1)
        out[:, se:ae] = probs
        return out

    def step_kl(self, y: Tensor, x: Tensor, t: Tensor, chain: ForwardChain) -> Tensor:
        """Σ_i KL(q(x^i_{t+1} | x_t, y) ‖ p_θ(x^i_{t+1} | x_t)) per sequence (B,), active positions only.

        Settled and worthless positions keep their token under both chains: their KL is 0 (Remark 1).
        The float64 kernels are built a few positions at a time (a 50k vocabulary is large).
        """
        raw, se, ae, now, nxt = self.active_raw(x, t)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for a, b in _chunks(ae - se, x.shape[0] * (self.process.N + 1)):
            i, j = se + a, se + b
            p = reverse_probs(self.process, raw[:, a:b], x[:, i:j], now[:, i:j], nxt[:, i:j],
                              levels=self.schedule.levels)
            q = variational_posterior(self.process, x[:, i:j], y[:, i:j], now[:, i:j], nxt[:, i:j], chain)
            total += categorical_kl(q, p).sum(-1)
        return total


def _chunks(n: int, row_size: int) -> list[tuple[int, int]]:
    """Slices [a, b) of range(n) with (b − a) · row_size ≤ CHUNK_ELEMENTS (at least one position each)."""
    step = max(1, CHUNK_ELEMENTS // max(1, row_size))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


# ============================================================================================
# aggregation: sums of NLLs and token counts


@dataclass
class NLLSums:
    """Additive statistics of per-sequence NLL estimates (sum over sequences and ranks, never averaged).

    ``nll``: Σ_b v̄_b (v̄_b = mean over the M draws of sequence b's total NLL estimate);
    ``nll_sq``: Σ_b v̄_b²; ``mc_var``: Σ_b s_b²/M (s_b² the sample variance over its draws);
    ``n_tokens``, ``n_sequences``, ``n_infinite`` (draws with an infinite value).
    """

    nll: float = 0.0
    nll_sq: float = 0.0
    mc_var: float = 0.0
    n_tokens: int = 0
    n_sequences: int = 0
    n_infinite: int = 0

    FIELDS = ("nll", "nll_sq", "mc_var", "n_tokens", "n_sequences", "n_infinite")

    def add(self, values: Tensor, tokens_per_sequence: int) -> None:
        """Add the (B, M) per-sequence, per-draw total NLL estimates of B sequences."""
        values = values.detach().to(torch.float64).cpu()
        B, M = values.shape
        mean = values.mean(1)
        self.nll += float(mean.sum())
        self.nll_sq += float((mean ** 2).sum())
        if M >= 2:
            var = values.var(1, unbiased=True)
            var = torch.where(torch.isfinite(mean), var, torch.full_like(var, math.inf))
            self.mc_var += float(var.sum()) / M
        self.n_tokens += B * int(tokens_per_sequence)
        self.n_sequences += B
        self.n_infinite += int((~torch.isfinite(values)).sum())

    def __add__(self, other: "NLLSums") -> "NLLSums":
        return NLLSums(*(getattr(self, f) + getattr(other, f) for f in self.FIELDS))

    def all_reduce(self, device=None) -> "NLLSums":
        """Sum over the ranks of an initialised torch.distributed group (identity otherwise)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        t = torch.tensor([float(getattr(self, f)) for f in self.FIELDS], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        v = t.cpu().tolist()
        return NLLSums(v[0], v[1], v[2], int(round(v[3])), int(round(v[4])), int(round(v[5])))

    def stderr_total(self, mc_samples: int, exact: bool) -> tuple[float, str]:
        """Standard error of Σ_b v̄_b and how it was obtained."""
        if exact:
            return 0.0, "exact"
        if mc_samples >= 2:
            return math.sqrt(max(self.mc_var, 0.0)), "monte-carlo (within-sequence spread over the M draws)"
        n = self.n_sequences
        if n < 2:
            return math.nan, "unknown (one sequence and one draw)"
        spread = n / (n - 1) * max(self.nll_sq - self.nll ** 2 / n, 0.0)  # n s² of the v_b
        return math.sqrt(spread), "conservative (M = 1: spread across sequences, includes data variance)"


@dataclass
class PerplexityResult:
    """A perplexity (upper bound) with its standard error, from summed NLLs and token counts."""

    estimator: str
    nll_per_token: float
    ppl: float
    stderr: float
    ppl_low: float
    ppl_high: float
    n_tokens: int
    n_sequences: int
    mc_samples: int
    schedule: dict
    process: dict
    variational: Optional[str] = None
    stratified: bool = False
    n_infinite: int = 0
    stderr_kind: str = ""
    notes: list = field(default_factory=list)

    @property
    def ppl_interval(self) -> tuple[float, float]:
        """95 % interval exp(nll ± 1.96 stderr)."""
        return self.ppl_low, self.ppl_high

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_markdown(self, data: str = "") -> str:
        sched = self.schedule
        s = f"{sched.get('kind')} (T={sched.get('T')}, levels={sched.get('levels')}, ω={sched.get('width')})"
        head = "| data | estimator | schedule | tokens | M | NLL/token | stderr | PPL | 95% interval |"
        rule = "|---|---|---|---:|---:|---:|---:|---:|---|"
        row = (f"| {data} | {self.estimator} | {s} | {self.n_tokens} | {self.mc_samples} | "
               f"{self.nll_per_token:.4f} | {self.stderr:.4f} | {self.ppl:.3f} | "
               f"[{self.ppl_low:.3f}, {self.ppl_high:.3f}] |")
        lines = [head, rule, row]
        lines += [f"\n_{note}_" for note in self.notes]
        return "\n".join(lines)


def _result(sums: NLLSums, *, estimator: str, mc_samples: int, schedule, process_cfg, variational,
            stratified: bool = False) -> PerplexityResult:
    exact = estimator == "exact"
    if sums.n_tokens == 0:
        raise HDLMError("perplexity bound: no tokens to evaluate")
    se_total, kind = sums.stderr_total(mc_samples, exact)
    if stratified and mc_samples >= 2:
        kind += "; conservative: the steps were stratified"
    nll = sums.nll / sums.n_tokens
    se = se_total / sums.n_tokens
    notes = []
    if sums.n_infinite:
        notes.append(f"{sums.n_infinite} draws had an infinite KL term: the sampler's kernel gives probability 0 "
                     f"to a transition of the variational chain (try variational='absorb' or the continuous estimator)")
    if estimator == "continuous" and process_cfg.get("kind") == "epsilon" and process_cfg.get("epsilon", 0) > 0:
        notes.append("continuous estimate of an epsilon-hybrid with epsilon > 0 is its HDCE training loss, "
                     "not a proven bound; use the discrete estimator for a bound")
    return PerplexityResult(
        estimator=estimator, nll_per_token=nll, ppl=_exp(nll), stderr=se,
        ppl_low=_exp(nll - Z95 * se), ppl_high=_exp(nll + Z95 * se), n_tokens=sums.n_tokens,
        n_sequences=sums.n_sequences, mc_samples=mc_samples, schedule=_schedule_info(schedule),
        process=dict(process_cfg), variational=variational, stratified=stratified, n_infinite=sums.n_infinite,
        stderr_kind=kind,
        notes=notes)


def _exp(v: float) -> float:
    if math.isnan(v):
        return math.nan
    return math.exp(v) if v < 700 else math.inf


def _schedule_info(hs) -> dict:
    return {"kind": hs.kind, "d": hs.d, "T": hs.T, "levels": hs.levels, "width": hs.width, "rho": hs.rho}


# ============================================================================================
# the estimators


def _seed(*parts: int) -> int:
    """A 40-bit seed from non-negative integers (per sequence and draw: independent of batching)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 8) ^ int(state[1])) & ((1 << 40) - 1)


def _blocks(data) -> tuple[int, Any]:
    """(number of sequences, index → LongTensor (k, d)) for a tensor, a TokenDataset or a sequence."""
    if isinstance(data, Tensor):
        if data.dim() != 2:
            raise HDLMError(f"perplexity bound: data tensor must be (n, d), got shape {tuple(data.shape)}")
        return data.shape[0], lambda idx: data[torch.as_tensor(idx, dtype=torch.long)].long()
    if hasattr(data, "gather"):
        return len(data), lambda idx: data.gather(np.asarray(idx, dtype=np.int64))
    return len(data), lambda idx: torch.stack([torch.as_tensor(data[i]) for i in idx]).long()


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def draw_step(T: int, m: int, M: int, generator: torch.Generator, stratified: bool = True) -> int:
    """Step t of draw m of M: uniform on {0..T−1}, or ⌊(m + u) T / M⌋ (stratified: the M draws of a
    sequence cover [0, T) evenly; averaged over m, t is still exactly uniform)."""
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return min(T - 1, int(((m + u) / M if stratified else u) * T))


def _discrete_values(chain: ReverseChain, q_chain: ForwardChain, y: Tensor, idx: Sequence[int], M: int,
                     seed: int, batch_size: int, stratified: bool = True) -> Tensor:
    """(B, M) values T · Σ_i KL_t(y, x_t), t from :func:`draw_step`, x_t ~ q(x_t|y), one generator per
    (sequence, draw) so that nothing depends on batching."""
    hs = chain.schedule
    T = hs.T
    tab = hs.table.to(torch.float64) / hs.levels
    y_cpu = y.cpu()
    groups: dict[tuple[int, int], list] = {}
    for b, gi in enumerate(idx):
        for m in range(M):
            g = torch.Generator().manual_seed(_seed(seed, 1, gi, m))
            t = draw_step(T, m, M, g, stratified)
            x = draw_state(chain.process, q_chain, y_cpu[b], tab[t], g)
            groups.setdefault(hs.split(t), []).append((b, m, t, x))
    values = torch.zeros(len(idx), M, dtype=torch.float64)
    for items in groups.values():  # one layout per split: batch the draws that share it
        for k in range(0, len(items), batch_size):
            chunk = items[k:k + batch_size]
            rows = torch.tensor([c[0] for c in chunk])
            x = torch.stack([c[3] for c in chunk]).to(y.device)
            t = torch.tensor([c[2] for c in chunk])
            kl = chain.step_kl(y[rows.to(y.device)], x, t, q_chain).cpu()
            for (b, m, _, _), v in zip(chunk, kl.tolist()):
                values[b, m] = T * v
    return values


def _exact_ar_values(chain: ReverseChain, y: Tensor) -> Tensor:
    """(B, 1) exact NLL of a Quench + SHIFTED model: Σ_i −log softmax(raw_i)[y_i], one forward pass."""
    from ..layout import attention_mask, inference_cells
    from ..processes import cross_entropy

    d = y.shape[1]
    level = torch.ones(d, dtype=torch.float64, device=y.device)
    cells, out_index = inference_cells(y, level, 0, d, chain.process, 1, ar=True,
                                       settled_attention=chain.settled_attention, block_width=chain.schedule.width)
    mask = attention_mask(cells.layout, cells.layout, device=y.device)
    raw = chain.model(cells.tokens, cells.sigma, cells.positions, mask, keep=cells.keep, out_index=out_index)
    total = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
    for a, b in _chunks(d, y.shape[0] * raw.shape[-1]):
        total += cross_entropy(raw[:, a:b].to(torch.float64), y[:, a:b]).sum(-1)
    return total.unsqueeze(-1)


def _continuous_values(objective, model, y: Tensor, idx: Sequence[int], M: int, seed: int) -> Tensor:
    """(B, M) values d · NELBO per token from the training objective, fixed seeds per (sequence, draw)."""
    d = y.shape[1]
    out = torch.zeros(len(idx), M, dtype=torch.float64)
    for m in range(M):
        seeds = torch.tensor([_seed(seed, 2, gi, m) for gi in idx], dtype=torch.long)
        objective(model, y, seeds, _seed(seed, 3, m))
        out[:, m] = objective.last_nelbo.detach().to(torch.float64).cpu() * d
    return out


def nll_sums(model, cfg, data, *, estimator: str = "discrete", mc_samples: int | None = None, schedule=None,
             batch_size: int = 8, seed: int = 0, device=None, progress: bool = True, variational: str = "auto",
             stratified: bool = True, rank: int | None = None, world_size: int | None = None) -> tuple[NLLSums, dict]:
    """This rank's share of :func:`perplexity_bound`: the summed statistics and the settings used.

    Sequences are split across ranks by index (rank r takes r, r + W, …); every random draw is
    seeded by (seed, sequence index, draw), so the sums do not depend on batching or on W.
    """
    from tqdm.auto import tqdm

    from ..hyperschedule import from_config

    if estimator not in ESTIMATORS:
        raise HDLMError(f"perplexity estimator '{estimator}': must be one of {', '.join(ESTIMATORS)}")
    if batch_size < 1:
        raise HDLMError(f"perplexity bound: batch_size = {batch_size} must be >= 1")
    M = DEFAULT_MC_SAMPLES if mc_samples is None else int(mc_samples)
    if M < 1:
        raise HDLMError(f"perplexity bound: mc_samples = {mc_samples} must be >= 1")
    n, get = _blocks(data)
    if n == 0:
        raise HDLMError("perplexity bound: the dataset is empty")
    d = int(get([0]).shape[1])
    hs = schedule if schedule is not None else from_config(cfg.schedule, d)
    if hs.d != d:
        raise HDLMError(f"perplexity bound: hyperschedule length {hs.d} does not match the data's d = {d}")
    if device is None:
        device = next(model.parameters()).device
    chain = ReverseChain.from_config(model, cfg, schedule=hs)
    if chain.ar:
        estimator, M = "exact", 1
    q_chain = forward_chain(chain.process, variational) if estimator == "discrete" else None
    objective = None
    if estimator == "continuous":
        from ..objective import build_objective

        objective = build_objective(cfg, cfg.model.vocab_size)
        objective.hyperschedule, objective.block_width = hs, hs.width

    r0, w0 = _dist_rank_world()
    rank = r0 if rank is None else rank
    world_size = w0 if world_size is None else world_size
    mine = list(range(rank, n, world_size))
    sums = NLLSums()
    was_training = model.training
    model.eval()
    try:
        batches = [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]
        bar = tqdm(batches, desc=f"ppl ({estimator})", unit="batch", disable=(None if progress and rank == 0 else True))
        with torch.no_grad():
            for idx in bar:
                y = get(idx).to(device)
                if estimator == "exact":
                    values = _exact_ar_values(chain, y)
                elif estimator == "discrete":
                    values = _discrete_values(chain, q_chain, y, idx, M, seed, batch_size, stratified)
                else:
                    values = _continuous_values(objective, model, y, idx, M, seed)
                sums.add(values, d)
                if sums.n_tokens:
                    bar.set_postfix(nll=f"{sums.nll / sums.n_tokens:.4f}")
    finally:
        model.train(was_training)
    settings = {"estimator": estimator, "mc_samples": M, "stratified": stratified and estimator == "discrete",
                "schedule": hs, "process_cfg": dataclasses.asdict(cfg.process),
                "variational": resolved_variational(chain.process, variational) if estimator == "discrete" else None}
    return sums, settings


def perplexity_bound(model, cfg, data, *, estimator: str = "discrete", mc_samples: int | None = None,
                     schedule=None, batch_size: int = 8, seed: int = 0, device=None, progress: bool = True,
                     variational: str = "auto", stratified: bool = True) -> PerplexityResult:
    """Upper bound on the perplexity of ``model`` on ``data`` (paper App. C.1, Algorithm 1).

    ``data``: a LongTensor (n, d), a :class:`~hdlm.data.TokenDataset` or a sequence of (d,) tensors.
    ``estimator``: "discrete" (bound on the NLL of the T-step sampler; default) or "continuous"
    (Algorithm 1 on the training NELBO); Quench + SHIFTED is always evaluated exactly.
    ``schedule``: a :class:`~hdlm.hyperschedule.Hyperschedule` overriding ``cfg.schedule``.
    ``variational``: the discrete bound's noising chain (see :func:`forward_chain`); ``stratified``:
    spread each sequence's M steps evenly over [0, T) (:func:`draw_step`; the reported standard
    error is then conservative).
    NLLs and token counts are summed over batches and, when torch.distributed is initialised,
    over ranks; the standard error is that of the Monte-Carlo estimate given the data.
    """
    sums, s = nll_sums(model, cfg, data, estimator=estimator, mc_samples=mc_samples, schedule=schedule,
                       batch_size=batch_size, seed=seed, device=device, progress=progress, variational=variational,
                       stratified=stratified)
    if device is None:
        device = next(model.parameters()).device
    sums = sums.all_reduce(device=device)
    return _result(sums, estimator=s["estimator"], mc_samples=s["mc_samples"], schedule=s["schedule"],
                   process_cfg=s["process_cfg"], variational=s["variational"], stratified=s["stratified"])


# ============================================================================================
# command line: `hdlm eval ppl`


def resolve_data_spec(spec: str, data_cfg) -> tuple[Any, str, str]:
    """``ptb:test`` | a local file[:SPLIT] | ``hf:NAME[:CONFIG][:SPLIT]`` | a zero-shot name[:SPLIT]
    (wikitext103, wikitext2, lm1b, lambada, ag_news, pubmed, arxiv, openwebtext) → (DataConfig, split, label)."""
    spec = spec.strip()
    if not spec:
        raise HDLMError("--data is empty: use ptb:test, a local file, hf:NAME[:CONFIG]:SPLIT or a zero-shot name")
    split = "test"
    head, _, tail = spec.rpartition(":")
    if head and tail in SPLIT_NAMES:
        spec, split = head, tail
    text_field = data_cfg.text_field
    if spec.lower() in ZERO_SHOT:
        spec, text_field = ZERO_SHOT[spec.lower()]
    return dataclasses.replace(data_cfg, dataset=spec, text_field=text_field), split, f"{spec}:{split}"


def _schedule_override(args, cfg):
    """A Hyperschedule from --schedule/--width/--rho/--steps over the checkpoint's, or None."""
    from ..hyperschedule import from_config

    kind, width = getattr(args, "schedule", None), getattr(args, "width", None)
    rho, steps = getattr(args, "rho", None), getattr(args, "steps", None)
    if kind is None and width is None and rho is None and steps is None:
        return None
    sc = cfg.schedule
    sc = dataclasses.replace(sc, kind=kind or sc.kind, width=width if width is not None else sc.width,
                             rho=rho if rho is not None else sc.rho, steps=steps if steps is not None else sc.steps)
    return from_config(sc, cfg.model.length)


def _maybe_init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group, so ranks share the sequences."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _resolve_device(name: str | None) -> torch.device:
    name = name or "auto"
    if name == "auto":
        return torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HDLMError(f"device '{name}' requested but CUDA is not available")
    return torch.device(name)


def perplexity_bound_cli(args) -> int:
    """``hdlm eval ppl``: load a checkpoint and data, print a markdown table, optionally write JSON."""
    from .. import __version__
    from ..data import load_split
    from ..hub import load_pretrained, weights_sha256

    checkpoint = getattr(args, "checkpoint", None)
    if not checkpoint:
        raise HDLMError("eval ppl: --checkpoint DIR is required")
    _maybe_init_distributed()
    device = _resolve_device(getattr(args, "device", None))
    pre = load_pretrained(checkpoint, device=device)  # a folder, a run folder, an official checkpoint, a Hub id
    model, cfg, tokenizer = pre.model, pre.config, pre.tokenizer
    data_cfg, split, label = resolve_data_spec(getattr(args, "data", None) or "ptb:test", cfg.data)
    dataset = load_split(data_cfg, split, tokenizer, cfg.model.length)
    schedule = _schedule_override(args, cfg)
    seed = int(getattr(args, "seed", None) or 0)
    result = perplexity_bound(
        model, cfg, dataset, estimator=getattr(args, "estimator", None) or "discrete",
        mc_samples=getattr(args, "mc_samples", None), schedule=schedule,
        batch_size=int(getattr(args, "batch_size", None) or 8), seed=seed, device=device,
        progress=True, variational=getattr(args, "variational", None) or "auto",
        stratified=not getattr(args, "no_stratify", False))
    rank, _ = _dist_rank_world()
    if rank != 0:
        return 0
    print(result.to_markdown(label))
    out = getattr(args, "json", None)
    if out:
        record = {"command": shlex.join(sys.argv), "checkpoint": str(checkpoint),
                  "checkpoint_sha256": weights_sha256(pre), "hdlm_version": __version__,
                  "data": label, "seed": seed, **result.to_dict()}
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return 0


__all__ = ["ForwardChain", "GammaChain", "MaskChain", "forward_chain", "forward_posterior", "variational_posterior",
           "draw_state", "epsilon_posterior_probs", "reverse_probs", "categorical_kl", "ReverseChain", "NLLSums",
           "PerplexityResult", "nll_sums", "perplexity_bound", "perplexity_bound_cli", "resolve_data_spec",
           "ESTIMATORS", "ZERO_SHOT"]
