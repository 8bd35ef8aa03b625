"""The discrete perplexity bound: the variational bound of the T-step sampler (paper App. C.1, Remark 1).

Generation order t = 0 (noise) → T (clean)::

    −log p(y) ≤ Σ_{t=0}^{T-1} E_{q(x_t|y)} Σ_i KL( q(x^i_{t+1} | x^i_t, y) ‖ p_θ(x^i_{t+1} | x_t) )

q is a per-token noising chain over the levels τ_t/𝒯 (:func:`variational_chain`: the process
itself, or its absorbing part), whose top level 𝒯 is the sampler's own prior (so there is no
prior term, see :func:`variational_posterior`); p_θ is the sampler's reverse kernel
(:meth:`hdlm.processes.Process.reverse_kernel`, run by :class:`ReverseChain`). Only ACTIVE
positions (Eq. 1) contribute: settled and worthless ones do not change in either chain. Estimated
M times per sequence as T · KL_t with t uniform on {0..T−1} (stratified across the M draws by
default) and x_t ~ q(x_t|y). The derivations are in ``docs/likelihood.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..config import VARIATIONAL_CHAINS as VARIATIONAL
from ..errors import HDLMError
from ..hyperschedule import Hyperschedule, from_config
from ..layout import attention_mask, inference_cells
from ..processes import Process, make_process
from ..processes.base import levels64, one_hot
from ..runtime import Stream, generator, mix_seed

CHUNK_ELEMENTS = 1 << 18  # float64 kernel entries built at once (2 MiB per tensor: stays off mmap)


# --------------------------------------------------------------------------------------------
# the variational (noising) chain q


def resolved_variational(process: Process, variational: str) -> str:
    """The chain ``variational`` names for ``process``: "auto" is "absorb" for 0 < γ < 1 and for ε > 0, else
    "forward" (the absorbing chain keeps every default kernel's bound finite: docs/likelihood.md)."""
    if variational not in VARIATIONAL:
        raise HDLMError(f"variational = {variational!r}: must be one of {', '.join(VARIATIONAL)}")
    if variational == "auto":
        mixed = (0.0 < process.gamma < 1.0) if process.family == "score" else getattr(process, "epsilon", 0.0) > 0.0
        return "absorb" if mixed else "forward"
    return variational


def variational_chain(process: Process, variational: str = "forward") -> Process:
    """The noising chain q of the bound, as a process whose ``chain_*`` methods and posterior are used.

    ``"forward"``: the process itself. ``"absorb"``: its absorbing part (γ: masking at rate
    (1 − γ)σ̄; ε: ε = 0), a valid variational choice whose trajectories never hold a wrong token —
    finite wherever the sampler can reveal the right token. ``"auto"``: "absorb" for a γ-hybrid
    with 0 < γ < 1 and an ε-hybrid with ε > 0 (its default kernel, Algorithm 3, never substitutes), else "forward".
    """
    if resolved_variational(process, variational) == "forward":
        return process
    return process.absorbing_part()


def variational_posterior(chain: Process, x_t: Tensor, y: Tensor, s_now, s_next) -> Tensor:
    """The bound's q(x_{t+1} | x_t, y): ``chain.posterior``, except when leaving the top level.

    A token at full noise (s_now = 1) holds a draw from the sampler's prior (all MASK, or uniform
    tokens for γ = 1), independent of y; when it leaves the top level it is drawn from the chain's
    marginal q(· | y, s_next). This choice makes the prior term KL(q(x_0|y) ‖ p(x_0)) exactly 0 —
    with log-linear noise α(1) = 10⁻³ > 0 the forward marginal at s = 1 is not the all-MASK prior,
    and that term would be infinite.
    """
    s_now, s_next = levels64(s_now, x_t), levels64(s_next, x_t)
    leaving_top = ((s_now == 1.0) & (s_next < 1.0)).unsqueeze(-1)
    return torch.where(leaving_top, chain.chain_marginal(y, s_next), chain.posterior(x_t, y, s_now, s_next))


def draw_state(process: Process, chain: Process, y: Tensor, level: Tensor,
               generator: torch.Generator | None = None) -> Tensor:
    """x_t ~ q(x_t | y) at per-position levels ``level`` = τ_t/𝒯: the prior at level 1, y at level 0."""
    level = levels64(level, y)
    x = chain.chain_sample(y, level, generator)
    prior = process.prior(y.shape, generator=generator, device=y.device)
    return torch.where(level == 1.0, prior, x)


def categorical_kl(q: Tensor, p: Tensor) -> Tensor:
    """KL(q ‖ p) over the last axis; 0 log 0 = 0, +inf where q > 0 = p."""
    return (torch.xlogy(q, q) - torch.xlogy(q, p)).sum(-1)


def position_chunks(n: int, row_size: int) -> list[tuple[int, int]]:
    """Slices [a, b) of range(n) with (b − a) · row_size ≤ CHUNK_ELEMENTS (at least one position each)."""
    step = max(1, CHUNK_ELEMENTS // max(1, row_size))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


# --------------------------------------------------------------------------------------------
# the reverse (generative) chain p_θ


@dataclass
class ReverseChain:
    """The T-step generative process: a model, a process and a hyperschedule, run as the sampler does.

    Each step t → t+1 runs the model on settled ⁀ active cells (:func:`hdlm.layout.inference_cells`,
    Eq. 1), applies the process's reverse kernel ``kernel`` at the active positions ("ar" when
    𝒯 = 1, else the process's default) and leaves the others unchanged. ``t`` may be a LongTensor
    (B,) of steps sharing one split (settled_end, active_end).
    """

    model: Any
    process: Process
    schedule: Hyperschedule
    shift: int = 0
    settled_attention: str = "causal"
    kernel: str | None = None

    def __post_init__(self) -> None:
        if self.kernel is None:
            self.kernel = "ar" if self.schedule.levels == 1 else self.process.default_kernel
        if self.kernel not in self.process.kernels:
            raise HDLMError(f"reverse kernel '{self.kernel}': {type(self.process).__name__} offers "
                            f"{', '.join(self.process.kernels)}")

    @classmethod
    def from_config(cls, model, cfg, schedule=None, process=None, kernel: str | None = None) -> "ReverseChain":
        schedule = schedule if schedule is not None else from_config(cfg.schedule, cfg.model.length)
        process = process if process is not None else make_process(cfg.process, cfg.model.vocab_size)
        return cls(model, process, schedule, cfg.model.shift, cfg.model.settled_attention, kernel)

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
        """Model outputs at the active positions of step t: (raw (B, K, N) float64, settled_end,
        active_end, levels now (B, d), levels next (B, d))."""
        se, ae = self.split(t)
        now, nxt = (v.to(x.device) for v in self.levels_at(t))
        if ae == se:
            return x.new_zeros((x.shape[0], 0, self.process.N), dtype=torch.float64), se, ae, now, nxt
        cells, out_index = inference_cells(x, now, se, ae, self.process, self.shift, ar=self.ar,
                                           settled_attention=self.settled_attention,
                                           block_width=self.schedule.width)
        mask = attention_mask(cells.layout, cells.layout, device=x.device)
        raw = self.model(cells.tokens, cells.sigma, cells.positions, mask, keep=cells.keep, out_index=out_index)
        return raw.to(torch.float64), se, ae, now, nxt

    def probs(self, raw: Tensor, x: Tensor, s_now: Tensor, s_next: Tensor) -> Tensor:
        """p_θ(x_{t+1}^i | x_t) (…, N+1) in float64 from the raw outputs at those positions."""
        return self.process.reverse_kernel(raw, x, s_now, s_next, self.kernel)

    def kernel_matrix(self, x: Tensor, t: Tensor) -> Tensor:
        """p_θ(x_{t+1}^i | x_t) for every position (B, d, N+1): identity outside the active window."""
        raw, se, ae, now, nxt = self.active_raw(x, t)
        out = one_hot(x, self.process.N + 1)
        out[:, se:ae] = self.probs(raw, x[:, se:ae], now[:, se:ae], nxt[:, se:ae])
        return out

    def step_kl(self, y: Tensor, x: Tensor, t: Tensor, chain: Process) -> Tensor:
        """Σ_i KL(q(x^i_{t+1} | x_t, y) ‖ p_θ(x^i_{t+1} | x_t)) per sequence (B,), active positions only.

        Settled and worthless positions keep their token under both chains: their KL is 0 (Remark 1).
        The float64 kernels are built a few positions at a time (a 50k vocabulary is large).
        """
        raw, se, ae, now, nxt = self.active_raw(x, t)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for a, b in position_chunks(ae - se, x.shape[0] * (self.process.N + 1)):
            i, j = se + a, se + b
            p = self.probs(raw[:, a:b], x[:, i:j], now[:, i:j], nxt[:, i:j])
            q = variational_posterior(chain, x[:, i:j], y[:, i:j], now[:, i:j], nxt[:, i:j])
            total += categorical_kl(q, p).sum(-1)
        return total


# --------------------------------------------------------------------------------------------
# the Monte-Carlo estimate


def draw_step(T: int, m: int, M: int, generator: torch.Generator, stratified: bool = True) -> int:
    """Step t of draw m of M: uniform on {0..T−1}, or ⌊(m + u) T / M⌋ (stratified: the M draws of a
    sequence cover [0, T) evenly; averaged over m, t is still exactly uniform)."""
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return min(T - 1, int(((m + u) / M if stratified else u) * T))


def discrete_values(chain: ReverseChain, q_chain: Process, y: Tensor, idx: Sequence[int], M: int,
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
            g = generator(mix_seed(seed, Stream.BOUND_DRAW, gi, m))
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
