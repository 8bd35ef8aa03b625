"""Samplers: one reverse step on the active positions (paper §3.4, App. B.4, App. D; DESIGN.md §6).

Every sampler has one method, ``step(raw, x, s_now, s_next, generator) -> x_next``, acting on
the active window only: ``raw`` (B, A, N) are the network outputs at the active positions,
``x`` (B, A) their tokens and ``s_now``/``s_next`` their noise levels τ_t/𝒯 and τ_{t+1}/𝒯,
one per position (A,) or (B, A): a hyperschedule gives every position its own level change
(§3.1). A position takes part in a step only where its level decreases (s_next < s_now); the
others (settled and prompt tokens at level 0, worthless ones at full noise) are returned
unchanged and cost no random numbers.

- Any reverse kernel of the process (:class:`KernelSampler`, by name; ``process.reverse_kernel``):
  γ family (SEDD) the analytic (Tweedie τ-leaping, the paper's default, App. B.4) or the Euler
  rule, whose last step to level 0 uses the final denoising rule (no MASK left); ε family the
  posterior-mean kernel that the discrete perplexity bound certifies.
- ε family (MDLM, ``"mean"``): :class:`AncestralSampler` is Algorithm 3 for a general α: a
  MASK is revealed with p_transfer = (α(s_next) − α(s_now)) / (1 − α(s_now)) and then drawn from
  the model's clean-token distribution; revealed tokens stay. With ``eta > 0`` it is the
  adaptive correction sampler (ACS, Algorithm 4, §3.4): a revealed active token is also
  redrawn from the model's prediction with probability η (1 − p_transfer). Both use the same
  uniform per position, so η = 0 is Algorithm 3 step for step.
- AR (:class:`ARSampler`): with 𝒯 = 1 (Quench) training reads ``raw`` as plain logits of the
  token (a cross-entropy), so the step is "draw the token from softmax(logits)".

Categorical draws (:class:`Categorical`) apply temperature, top-k and top-p, then draw exactly
in float64: by inverse CDF (cumsum + searchsorted on one uniform per row; the default,
~4× cheaper than Gumbel-max, DESIGN.md §9) or by Gumbel-max. ``float64=False`` reproduces the
float32 Gumbel-max of the SEDD/MDLM code, whose 24-bit uniforms truncate the Gumbel noise and
lower the effective temperature (Zheng et al., 2024; paper App. F.2, Table 5): it exists to
reproduce the "FP32" columns, not for use. No rejection sampling, no repetition penalty.
All randomness comes from the ``generator`` passed in: a fixed seed gives the same tokens on
the same device. With :class:`~hdlm.sampling.rng.SequenceGenerators` every sequence draws from its
own stream (``rows`` name the sequence of each drawn row), so its tokens do not depend on the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import DRAW_METHODS
from ..config import SAMPLER_NAMES as SAMPLERS
from ..errors import HDLMError
from ..processes.base import levels64
from .rng import SequenceGenerators, sequence_rows, uniforms

Generator = torch.Generator | SequenceGenerators | None



# --------------------------------------------------------------------------------------------
# categorical draws


def shape_log_probs(logp: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, top-k and top-p (nucleus) on log-probabilities (M, V) -> unnormalised log-weights.

    Temperature divides the log-probabilities; top-k keeps the k most likely classes; top-p
    keeps the smallest set of most likely classes whose probability reaches p (the most likely
    class is always kept). Removed classes get -inf. Identity at the defaults.
    """
    if temperature != 1.0:
        logp = torch.log_softmax(logp / temperature, dim=-1)
    V = logp.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logp, top_k, dim=-1).values[..., -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = torch.sort(logp, dim=-1, descending=True)
        probs = torch.softmax(sorted_lp, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely classes
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = logp.masked_fill(drop, float("-inf"))
    return logp


def inverse_cdf_draw(probs: Tensor, generator: Generator = None, rows: Tensor | None = None) -> Tensor:
    """Exact float64 draw from each row of ``probs`` (M, V) (non-negative, positive total).

    One uniform per row: the class is the first whose cumulative weight exceeds u · total.
    A class of weight 0 is never returned. ``rows``: the sequence of each row (per-sequence generators).
    """
    p = probs.to(torch.float64)
    cdf = torch.cumsum(p, dim=-1)
    u = uniforms(p.shape[:-1], generator, torch.float64, p.device, rows)
    target = (u * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # u * total may round up to total: fall back to the last class with positive weight
    last = p.shape[-1] - 1 - torch.argmax((p.flip(-1) > 0).to(torch.uint8), dim=-1)
    return torch.minimum(idx, last)


def gumbel_max_draw(probs: Tensor, generator: Generator = None,
                    dtype: torch.dtype = torch.float64, rows: Tensor | None = None) -> Tensor:
    """Gumbel-max draw argmax_z p_z / E_z, E_z = -log U_z ~ Exp(1), computed in ``dtype``.

    This "exponential race" is Gumbel-max (argmax log p_z + G_z) without the second log, as the
    SEDD/MDLM code writes it. In float64 it is exact to ~2^-53. In float32 the uniforms are
    multiples of 2^-24, so E_z >= 2^-24 and the Gumbel noise is truncated at ~16.6: a class whose
    weight is below ~2^-24 times that of a dominant class (a MASK that stays MASK during a small
    step) is under-drawn, which lowers the entropy of the samples (App. F.2).
    """
    p = probs.to(dtype)
    u = uniforms(p.shape, generator, dtype, p.device, rows)
    race = -torch.log(u.clamp_min_(torch.finfo(dtype).tiny))
    return torch.argmax(p / race, dim=-1)


@dataclass(frozen=True)
class Categorical:
    """How samplers turn probabilities into tokens: shaping, then a draw.

    ``method`` is "cdf" (exact float64 inverse CDF, the default), "gumbel" (float64 Gumbel-max) or
    "float32-gumbel", the flawed float32 Gumbel-max of the reference code (App. F.2);
    ``float64=False`` is the same as "float32-gumbel" (and ``float64`` says which one is in use).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    method: str = "cdf"
    float64: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise HDLMError(f"sampling temperature = {self.temperature!r}: must be a number > 0")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise HDLMError(f"sampling top_k = {self.top_k!r}: must be an integer >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise HDLMError(f"sampling top_p = {self.top_p!r}: must be in (0, 1] (1 = off)")
        if self.method not in DRAW_METHODS:
            raise HDLMError(f"sampling draw method = {self.method!r}: must be one of {', '.join(DRAW_METHODS)}")
        if self.method == "float32-gumbel" or not self.float64:
            object.__setattr__(self, "method", "float32-gumbel")
            object.__setattr__(self, "float64", False)

    @property
    def shapes(self) -> bool:
        """Whether temperature / top-k / top-p change anything."""
        return self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0

    def shape_probs(self, probs: Tensor) -> Tensor:
        """Apply temperature / top-k / top-p to probability rows (M, V); returns normalised rows."""
        if not self.shapes:
            return probs
        logp = torch.log(probs / probs.sum(-1, keepdim=True))
        return torch.softmax(shape_log_probs(logp, self.temperature, self.top_k, self.top_p), dim=-1)

    def draw(self, probs: Tensor, generator: Generator = None, rows: Tensor | None = None) -> Tensor:
        """One class per row of the (unshaped) weights ``probs`` (M, V); ``rows``: each row's sequence."""
        if probs.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=probs.device)
        if not self.float64:
            return gumbel_max_draw(probs, generator, torch.float32, rows)
        if self.method == "gumbel":
            return gumbel_max_draw(probs, generator, torch.float64, rows)
        return inverse_cdf_draw(probs, generator, rows)

    def sample(self, probs: Tensor, generator: Generator = None, rows: Tensor | None = None) -> Tensor:
        """Shape then draw: one class per row of ``probs`` (M, V)."""
        return self.draw(self.shape_probs(probs), generator, rows)

    def sample_logits(self, logits: Tensor, generator: Generator = None, rows: Tensor | None = None) -> Tensor:
        """Draw from softmax(logits) (M, V) after temperature / top-k / top-p."""
        logp = torch.log_softmax(logits.to(_work_dtype(logits)), dim=-1)
        return self.draw(torch.softmax(shape_log_probs(logp, self.temperature, self.top_k, self.top_p), -1),
                         generator, rows)


# --------------------------------------------------------------------------------------------
# the samplers


def _work_dtype(t: Tensor) -> torch.dtype:
    """float64 stays, anything narrower than float32 (bf16 autocast) is promoted to float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass
class StepPlan:
    """What a sampler decided before seeing the model: which active positions need an output.

    ``need`` (B, A): the positions whose network output the step reads (the others keep their
    token whatever the output is); ``state``: the random numbers already drawn for this step.
    """

    x: Tensor  # (B, A) tokens before the step
    s_now: Tensor  # (B, A) float64 levels
    s_next: Tensor  # (B, A)
    moving: Tensor  # (B, A) level decreases
    need: Tensor  # (B, A) output needed
    state: dict


def rows_within(need: Tensor, subset: Tensor, raw_need: Tensor) -> Tensor:
    """The rows of ``raw_need`` (outputs at need.nonzero(), row-major) for the positions ``subset`` ⊆ need."""
    index = torch.full(need.shape, -1, dtype=torch.long, device=need.device)
    index[need] = torch.arange(raw_need.shape[0], device=need.device)
    return raw_need[index[subset]]


class Sampler:
    """Base class: ``step`` updates the active positions whose level decreases.

    A step is ``plan`` (random numbers that do not depend on the model, and which positions
    can change, ``StepPlan.need``) then ``finish`` (the outputs at those positions only). The
    generation driver runs the output head only there, and skips the model call when no
    position can change; ``step`` is both with the full output, the same random stream.
    """

    name = "abstract"

    def __init__(self, process, categorical: Categorical | None = None) -> None:
        self.process = process
        self.categorical = categorical or Categorical()

    def step(self, raw: Tensor, x: Tensor, s_now, s_next, generator: Generator = None) -> Tensor:
        """x_{t+1} (B, A) from x_t (B, A), raw (B, A, N) and per-position levels (A,) or (B, A)."""
        if raw.shape[:-1] != x.shape:
            raise ValueError(f"{self.name} sampler: raw {tuple(raw.shape)} does not match x {tuple(x.shape)}")
        plan = self.plan(x, s_now, s_next, generator)
        return self.finish(plan, raw[plan.need], generator)

    def plan(self, x: Tensor, s_now, s_next, generator: Generator = None) -> StepPlan:
        """The model-independent part of a step; by default every moving position needs its output."""
        s_now, s_next = levels64(s_now, x), levels64(s_next, x)
        moving = s_next < s_now
        return StepPlan(x, s_now, s_next, moving, moving, {})

    def finish(self, plan: StepPlan, raw_need: Tensor, generator: Generator = None) -> Tensor:
        """x_{t+1} from the plan and the outputs (M, N) at plan.need.nonzero() (row-major)."""
        out = plan.x.clone()
        if plan.moving.any():
            self._update(out, raw_need, plan, generator)
        return out

    def _update(self, out: Tensor, raw_need: Tensor, plan: StepPlan, generator: Generator) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        c = self.categorical
        return (f"{type(self).__name__}({self.name}, temperature={c.temperature}, top_k={c.top_k}, "
                f"top_p={c.top_p}, method={c.method}, float64={c.float64})")


class KernelSampler(Sampler):
    """Draws each moving position from a reverse kernel of the process, p_θ(x_s | x_t), by name.

    The kernel (``process.reverse_kernel``: γ family "analytic" = SEDD's Tweedie τ-leaping, the
    paper's default, or "euler"; ε family "posterior", the kernel the discrete bound certifies)
    uses each position's own level change (§3.4, App. B.4). Temperature, top-k and top-p reshape
    the real-token part only and keep its total mass, so they change which token appears, not
    how fast tokens appear.
    """

    def __init__(self, process, categorical: Categorical | None = None, kernel: str | None = None) -> None:
        super().__init__(process, categorical)
        kernel = kernel or process.default_kernel
        if kernel not in process.kernels:
            raise HDLMError(f"reverse kernel '{kernel}': {type(process).__name__} offers {', '.join(process.kernels)}")
        self.kernel = kernel
        self.name = kernel

    @property
    def rule(self) -> str:
        """The kernel's name (γ family: "analytic" or "euler")."""
        return self.kernel

    def step_probs(self, raw: Tensor, x: Tensor, s_now: Tensor, s_next: Tensor) -> Tensor:
        """The step distribution (M, N+1) of M positions, before shaping."""
        return self.process.reverse_kernel(raw.to(_work_dtype(raw)), x, s_now, s_next, self.kernel)

    def _shape_real(self, probs: Tensor) -> Tensor:
        if not self.categorical.shapes:
            return probs
        N = self.process.N
        real, rest = probs[:, :N], probs[:, N:]
        mass = real.sum(-1, keepdim=True)
        has_mass = mass > 0
        shaped = self.categorical.shape_probs(torch.where(has_mass, real, torch.ones_like(real))) * mass
        return torch.cat([torch.where(has_mass, shaped, real), rest], dim=-1)

    def plan(self, x: Tensor, s_now, s_next, generator: Generator = None) -> StepPlan:
        """Two stages, exact by the chain rule: stay at x with probability p(x) (one float64 uniform
        per moving position, drawn here), else draw over the other states. Where the process knows
        p(x) without the model (``process.kernel_stay``: a MASK of the ε family stays with
        1 − p_transfer, a revealed token stays) the first stage is decided here, and only the
        positions that may move need an output (issue #16.4)."""
        plan = super().plan(x, s_now, s_next, generator)
        if not self.categorical.float64:  # the reference code's single float32 draw over N+1 states
            return plan
        rows = plan.moving.nonzero(as_tuple=True)
        u = uniforms(rows[0].shape, generator, torch.float64, x.device, rows[0])
        known = self.process.kernel_stay(x, plan.s_now, plan.s_next, self.kernel)
        known = torch.full_like(u, float("nan")) if known is None else known[rows]
        plan.need = plan.moving.clone()
        plan.need[rows] = known.isnan() | (u >= known)
        plan.state.update(u=u[plan.need[rows]], known=~known[plan.need[rows]].isnan())
        return plan

    def _update(self, out, raw_need, plan, generator) -> None:
        rows = plan.need.nonzero(as_tuple=True)
        x_rows = plan.x[rows]
        if not x_rows.numel():
            return
        probs = self._shape_real(self.step_probs(raw_need, x_rows, plan.s_now[rows], plan.s_next[rows]))
        if not self.categorical.float64:
            out[rows] = self.categorical.draw(probs, generator, rows[0])
            return
        # in a small step most positions stay, so most rows skip the O(N) draw (DESIGN.md §9)
        stay = probs.gather(-1, x_rows.unsqueeze(-1)).squeeze(-1).to(torch.float64)
        move = plan.state["known"] | (plan.state["u"] >= stay)
        new = x_rows.clone()
        if move.any():
            p_move = probs[move].scatter(-1, x_rows[move].unsqueeze(-1), 0.0)
            drawn = self.categorical.draw(p_move, generator, rows[0][move])
            # p(x) = 1 up to rounding: nothing else to go to, stay
            new[move] = torch.where(p_move.sum(-1) > 0, drawn, x_rows[move])
        out[rows] = new


class ScoreSampler(KernelSampler):
    """γ family: SEDD's analytic (Tweedie τ-leaping) or Euler step, per position (§3.4, App. B.4)."""

    def __init__(self, process, categorical: Categorical | None = None, rule: str = "analytic") -> None:
        if rule not in ("analytic", "euler"):
            raise HDLMError(f"score sampler rule = {rule!r}: must be analytic or euler")
        super().__init__(process, categorical, kernel=rule)


class AncestralSampler(Sampler):
    """ε family: Algorithm 3 (η = 0) and the adaptive correction sampler, Algorithm 4 (η > 0).

    One uniform u per moving position: a MASK with u < p_transfer is revealed, and (ACS) a
    revealed token with u < η (1 − p_transfer) is redrawn; both draw from the model's
    clean-token distribution softmax(raw) (after temperature / top-k / top-p), computed only
    for the positions that change. ``float64=False`` instead reproduces MDLM's float32 step:
    a MASK draws from the joint [p_transfer · p(z), 1 − p_transfer] with float32 Gumbel-max.
    """

    def __init__(self, process, categorical: Categorical | None = None, eta: float = 0.0) -> None:
        super().__init__(process, categorical)
        if not 0.0 <= eta <= 1.0:
            raise HDLMError(f"ACS eta = {eta!r}: must be in [0, 1]")
        self.eta = float(eta)
        self.name = "acs" if self.eta > 0 else "ancestral"

    def _clean_probs(self, raw: Tensor) -> Tensor:
        logp = self.process.log_probs(raw.to(_work_dtype(raw)))
        c = self.categorical
        return torch.softmax(shape_log_probs(logp, c.temperature, c.top_k, c.top_p), dim=-1)

    def plan(self, x: Tensor, s_now, s_next, generator: Generator = None) -> StepPlan:
        """The uniforms come first (they do not depend on the model): only the MASKs being revealed
        (and, for ACS, the tokens being corrected) need an output (issue #16.1a)."""
        plan = super().plan(x, s_now, s_next, generator)
        if not plan.moving.any():
            plan.need = torch.zeros_like(plan.moving)
            return plan
        p_transfer = self.process.transfer_prob(plan.s_now, plan.s_next).to(torch.float64)
        masked = x == self.process.mask_id
        plan.state.update(p_transfer=p_transfer, masked=masked)
        if not self.categorical.float64:  # its random numbers come after the first draw
            plan.need = plan.moving & (masked | (self.eta > 0))
            return plan
        u = uniforms(x.shape, generator, torch.float64, x.device)
        change = plan.moving & masked & (u < p_transfer)
        if self.eta > 0:
            change |= plan.moving & ~masked & (u < self.eta * (1.0 - p_transfer))
        plan.need = change
        return plan

    def _update(self, out, raw_need, plan, generator) -> None:
        if not self.categorical.float64:
            self._update_float32(out, raw_need, plan, generator)
            return
        if raw_need.shape[0]:
            out[plan.need] = self.categorical.draw(self._clean_probs(raw_need), generator, sequence_rows(plan.need))

    def _update_float32(self, out, raw_need, plan, generator) -> None:
        """MDLM's reference step (App. F.2 "FP32"): float32 Gumbel-max over [p_tr · p(z), 1 − p_tr]."""
        x, moving, masked, p_transfer = plan.x, plan.moving, plan.state["masked"], plan.state["p_transfer"]
        reveal = moving & masked
        p_tr = p_transfer[reveal].unsqueeze(-1)
        joint = torch.cat([p_tr * self._clean_probs(rows_within(plan.need, reveal, raw_need)), 1.0 - p_tr], dim=-1)
        out[reveal] = self.categorical.draw(joint, generator, sequence_rows(reveal))  # index N = MASK stays MASK
        if self.eta > 0:
            u = uniforms(x.shape, generator, torch.float32, x.device)
            fix = moving & ~masked & (u < self.eta * (1.0 - p_transfer))
            out[fix] = self.categorical.draw(self._clean_probs(rows_within(plan.need, fix, raw_need)), generator,
                                             sequence_rows(fix))


class PosteriorSampler(KernelSampler):
    """ε family: the posterior-mean kernel Σ_ŷ q(x_s | x_t, ŷ) p̂(ŷ | x_t) whose NLL the discrete
    perplexity bound certifies (docs/likelihood.md). For ε = 0 it is Algorithm 3; for ε > 0 a MASK
    is revealed to (1 − ε) p̂ + ε/N and revealed tokens are redrawn from p̂ at their last step.
    """

    def __init__(self, process, categorical: Categorical | None = None) -> None:
        super().__init__(process, categorical, kernel="posterior")


class ARSampler(Sampler):
    """Autoregressive decoding: each moving position is drawn from softmax(raw) (temperature,
    top-k, top-p applied), whatever its current token.

    With 𝒯 = 1 (Quench) training fits ``raw`` by cross-entropy for every process (the active
    token is fully masked and settled in one step), so this is exactly "sample the next token
    from softmax(logits)" (§2.2, Standard AR).
    """

    name = "ar"

    def _update(self, out, raw_need, plan, generator) -> None:
        out[plan.moving] = self.categorical.sample_logits(raw_need, generator, sequence_rows(plan.moving))


def make_sampler(name: str, process, *, hyperschedule=None, eta: float = 0.01, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, float64: bool = True, method: str = "cdf") -> Sampler:
    """A sampler by name (``SAMPLERS``).

    "auto" is "ar" when the hyperschedule has a single level (Quench: the model is an AR model),
    else the process's default kernel (γ family: "posterior" for 0 < γ < 1, "analytic" for γ = 0, 1),
    or "ancestral" for the ε family.
    "ancestral" and "acs" (with ``eta`` = η) are Algorithms 3 and 4 of the ε family; "ar" draws
    from softmax(raw); any other name is one of the process's reverse kernels (``process.kernels``).
    """
    if name not in SAMPLERS:
        raise HDLMError(f"sampler '{name}': must be one of {', '.join(SAMPLERS)}")
    family = getattr(process, "family", None)
    if name == "auto":
        if hyperschedule is not None and hyperschedule.levels == 1:
            name = "ar"
        else:
            name = process.default_kernel if family == "score" else "ancestral"
    categorical = Categorical(temperature=temperature, top_k=top_k, top_p=top_p, method=method, float64=float64)
    if name in ("ancestral", "acs"):
        if family != "mean":
            raise HDLMError(f"sampler '{name}' needs an epsilon-family (mean) process; "
                            f"{type(process).__name__} is '{family}': use {', '.join(process.kernels)}")
        return AncestralSampler(process, categorical, eta=eta if name == "acs" else 0.0)
    if name == "ar":
        if hyperschedule is not None and hyperschedule.levels > 1:
            raise HDLMError(f"sampler 'ar' draws from the scores as logits: it needs a quench (AR) hyperschedule, "
                            f"not {hyperschedule.kind} with {hyperschedule.levels} levels (use --sampler auto)")
        return ARSampler(process, categorical)
    if name not in process.kernels:
        offered = dict.fromkeys(("ancestral", "acs", *process.kernels) if family == "mean" else process.kernels)
        raise HDLMError(f"sampler '{name}': {type(process).__name__} ({family} family) offers {', '.join(offered)}")
    return KernelSampler(process, categorical, kernel=name)
