"""What a perplexity bound reports: summed NLLs and token counts, and the result built from them.

NLLs and token counts are summed over sequences, batches and ranks and divided once at the end
(never an average of perplexities, DESIGN.md §11); the standard error is that of the Monte-Carlo
estimate given the data.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..errors import HDLMError

Z95 = 1.959963984540054  # two-sided 95 % normal quantile

#: what each estimator's number is (docs/likelihood.md): an upper bound on −log p(y) of a sampler hdlm runs,
#: the exact NLL, or Algorithm 1's estimate (comparable with published tables, not a bound: no prior term)
KINDS = {"discrete": "bound", "continuous-bound": "bound", "exact": "exact", "continuous": "estimate"}
LABELS = {"discrete": "discrete bound", "continuous-bound": "continuous bound", "exact": "exact NLL",
          "continuous": "continuous estimate (Alg. 1)"}


def certified_sampler(estimator: str, kernel: str | None, schedule: dict, process_cfg: dict) -> str | None:
    """The sampler whose −log p(y) the number bounds (or equals), in words; None for an estimate."""
    if estimator == "exact":
        return f"ar (Quench + SHIFTED, T = {schedule.get('T')}): exact"
    if estimator == "continuous-bound":
        return "the masking sampler (ancestral / analytic) as T → ∞"
    if estimator == "discrete":
        return f"{kernel}, {schedule.get('kind')} T = {schedule.get('T')}"
    return None


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
    kernel: Optional[str] = None
    kind: str = "bound"  # bound | exact | estimate (KINDS)
    certifies: Optional[str] = None  # the sampler a bound bounds (certified_sampler); None for an estimate
    n_infinite: int = 0
    stderr_kind: str = ""
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_markdown(self, data: str = "") -> str:
        sched = self.schedule
        s = f"{sched.get('kind')} (T={sched.get('T')}, levels={sched.get('levels')}, ω={sched.get('width')})"
        head = "| data | estimator | certifies (sampler) | schedule | tokens | M | NLL/token | stderr | PPL | 95% interval |"
        rule = "|---|---|---|---|---:|---:|---:|---:|---:|---|"
        row = (f"| {data} | {LABELS.get(self.estimator, self.estimator)} | {self.certifies or '— (an estimate)'} | "
               f"{s} | {self.n_tokens} | {self.mc_samples} | "
               f"{self.nll_per_token:.4f} | {self.stderr:.4f} | {self.ppl:.3f} | "
               f"[{self.ppl_low:.3f}, {self.ppl_high:.3f}] |")
        lines = [head, rule, row]
        lines += [f"\n_{note}_" for note in self.notes]
        return "\n".join(lines)


def make_result(sums: NLLSums, *, estimator: str, mc_samples: int, schedule, process_cfg, variational,
                stratified: bool = False, kernel: str | None = None) -> PerplexityResult:
    """The reported result of summed statistics (notes say why a bound is infinite or not a bound)."""
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
                     f"to a transition of the variational chain (the analytic step clamps: try kernel 'posterior', "
                     f"or variational='absorb')")
    if estimator == "continuous":
        notes.append("the continuous estimate is Algorithm 1 (the training NELBO without its prior term): comparable "
                     "with published tables, not a bound on a sampler; 'continuous-bound' (masking processes) and "
                     "'discrete' are bounds")
    info = _schedule_info(schedule)
    return PerplexityResult(
        estimator=estimator, nll_per_token=nll, ppl=_exp(nll), stderr=se,
        ppl_low=_exp(nll - Z95 * se), ppl_high=_exp(nll + Z95 * se), n_tokens=sums.n_tokens,
        n_sequences=sums.n_sequences, mc_samples=mc_samples, schedule=info,
        process=dict(process_cfg), variational=variational, stratified=stratified,
        kernel=kernel if estimator == "discrete" else None, kind=KINDS.get(estimator, "bound"),
        certifies=certified_sampler(estimator, kernel, info, process_cfg), n_infinite=sums.n_infinite,
        stderr_kind=kind, notes=notes)


def _exp(v: float) -> float:
    """e^v, inf where it overflows a float (and nan stays nan)."""
    try:
        return math.exp(v)
    except OverflowError:
        return math.inf


def _schedule_info(hs) -> dict:
    return {"kind": hs.kind, "d": hs.d, "T": hs.T, "levels": hs.levels, "width": hs.width, "rho": hs.rho}
