"""The likelihood of a continuation given a context, the context held as a settled prompt (what
lm-evaluation-harness asks of a model: ``loglikelihood(context, continuation)``).

The generative process is the one ``hdlm sample --prompt`` runs: a sequence of d positions, the
context c (P tokens) settled at every step (level 0), the T-step reverse chain of the
hyperschedule on the rest (paper §3, Eq. 1; :class:`PromptedChain`). The continuation y (C
tokens) takes positions P .. P+C−1; the remaining positions (the *tail*) are generated too and
are marginalised out. Two cases:

- Quench + SHIFTED (an AR model): log p(y | c) = Σ_i log softmax(raw_i)[y_i] exactly, one forward
  pass over c ⁀ y (:func:`ar_logprob`); ``greedy`` says whether every y_i is the argmax.
- Otherwise: an upper bound on −log p(y | c), the discrete bound of ``docs/likelihood.md`` with
  the tail as latent variables. Take the variational distribution over trajectories that noises
  the continuation by the bound's chain q (its posterior q(x_{t+1}^i | x_t^i, y_i)) and draws the
  tail from the model's own kernel p_θ(x_{t+1}^i | x_t). In log p/q the tail's factors cancel, so

      −log p(y | c) ≤ E Σ_t Σ_{i in y} KL( q(x_{t+1}^i | x_t^i, y_i) ‖ p_θ(x_{t+1}^i | x_t) ),

  the expectation over trajectories of that mixed chain (:func:`trajectory_values`). Each draw
  runs one trajectory, summing its KL terms until the continuation is settled (Block, Slide and
  Quench stop early; Flat runs all T steps). The estimate is the mean over M trajectories, with
  its standard error; infinite terms (a kernel that gives 0 to a transition of q) stay infinite.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import HDLMError
from ..processes import Process
from ..runtime import Stream, generator, mix_seed
from .discrete import ReverseChain, categorical_kl, position_chunks, variational_posterior
from .exact import ar_raw


@dataclass
class PromptedChain(ReverseChain):
    """A :class:`ReverseChain` whose first ``prompt_len`` positions are settled at every step (a prompt),
    exactly as :func:`hdlm.sampling.generate.generate` runs a prompt."""

    prompt_len: int = 0

    def split(self, t: Tensor) -> tuple[int, int]:
        settled_end, active_end = super().split(t)
        settled_end = max(settled_end, self.prompt_len)
        return settled_end, max(active_end, settled_end)

    def levels_at(self, t: Tensor) -> tuple[Tensor, Tensor]:
        now, nxt = super().levels_at(t)
        now[:, :self.prompt_len] = 0.0
        nxt[:, :self.prompt_len] = 0.0
        return now, nxt


@dataclass
class ContinuationScore:
    """log p(continuation | context): exact (``exact``), or minus the Monte-Carlo estimate of an upper
    bound on the NLL (a lower bound on the log-likelihood in expectation), with its standard error."""

    logprob: float
    exact: bool
    stderr: float = 0.0
    greedy: bool | None = None
    draws: int = 1
    n_infinite: int = 0


def request_seed(seed: int, context: list[int], continuation: list[int]) -> int:
    """A seed of (seed, the request's tokens): a request gets the same draws in any order or batch."""
    digest = hashlib.sha256(repr((list(context), list(continuation))).encode()).digest()
    return mix_seed(seed, Stream.BOUND_DRAW, int.from_bytes(digest[:8], "little"))


@torch.no_grad()
def ar_logprob(chain: ReverseChain, context: list[int], continuation: list[int]) -> ContinuationScore:
    """Exact log p(continuation | context) of a Quench + SHIFTED model, and whether it is the greedy one."""
    device = next(chain.model.parameters()).device
    y = torch.tensor([list(context) + list(continuation)], dtype=torch.long, device=device)
    P = len(context)
    logp = torch.log_softmax(ar_raw(chain, y)[0, P:].to(torch.float64), dim=-1)  # (C, N)
    target = y[0, P:]
    total = float(logp.gather(-1, target.unsqueeze(-1)).sum())
    return ContinuationScore(total, exact=True, greedy=bool((logp.argmax(-1) == target).all()))


def _draw(probs: Tensor, g: torch.Generator) -> Tensor:
    """One token per row of probs (..., V), exact float64 inverse CDF."""
    from ..sampling.samplers import inverse_cdf_draw

    return inverse_cdf_draw(probs.reshape(-1, probs.shape[-1]), g).reshape(probs.shape[:-1])


def trajectory_values(chain: PromptedChain, q_chain: Process, y: Tensor, end: int, M: int,
                      g: torch.Generator) -> Tensor:
    """(M,) per-trajectory sums of the KL terms of positions [prompt_len, end) of y (d,) (see the module
    docstring): the continuation follows q, the tail p_θ, the prompt stays."""
    hs, P, N1 = chain.schedule, chain.prompt_len, chain.process.N + 1
    x = chain.process.prior((M, hs.d), generator=g, device=y.device)
    x[:, :P] = y[:P]
    ys = y.unsqueeze(0).expand(M, -1)
    total = torch.zeros(M, dtype=torch.float64, device=y.device)
    for t in range(hs.T):
        steps = torch.full((M,), t, dtype=torch.long)
        se, ae = chain.split(steps)
        if se >= end:
            break  # the continuation is settled: every later term is 0
        if ae == se:
            continue
        raw, se, ae, now, nxt = chain.active_raw(x, steps)
        new = x[:, se:ae].clone()
        for a, b in position_chunks(ae - se, M * N1):
            i, j = se + a, se + b
            probs = chain.probs(raw[:, a:b], x[:, i:j], now[:, i:j], nxt[:, i:j])
            ci, cj = i, min(j, end)  # continuation positions of this chunk (i >= se >= P)
            if ci < cj:
                q = variational_posterior(q_chain, x[:, ci:cj], ys[:, ci:cj], now[:, ci:cj], nxt[:, ci:cj])
                total += categorical_kl(q, probs[:, :cj - ci]).sum(-1)
                probs = torch.cat([q, probs[:, cj - ci:]], dim=1)
            moving = nxt[:, i:j] < now[:, i:j]  # as the samplers: a position moves only where its level drops
            new[:, a:b] = torch.where(moving, _draw(probs, g), x[:, i:j])
        x[:, se:ae] = new
    return total


@torch.no_grad()
def bound_logprob(chain: ReverseChain, q_chain: Process, context: list[int], continuation: list[int], M: int,
                  seed: int = 0) -> ContinuationScore:
    """−(M-trajectory estimate of the upper bound on −log p(continuation | context)), see the module docstring."""
    d = chain.schedule.d
    P, C = len(context), len(continuation)
    if C < 1 or P + C > d:
        raise HDLMError(f"continuation of {C} tokens after {P} context tokens: need 1 <= C and P + C <= d = {d}")
    device = next(chain.model.parameters()).device
    prompted = PromptedChain(chain.model, chain.process, chain.schedule, chain.shift, chain.settled_attention,
                             chain.kernel, prompt_len=P)
    y = torch.zeros(d, dtype=torch.long, device=device)  # tail entries are never read
    y[:P + C] = torch.tensor(list(context) + list(continuation), dtype=torch.long)
    g = generator(request_seed(seed, context, continuation) % (1 << 63), device)
    values = trajectory_values(prompted, q_chain, y, P + C, M, g).cpu()
    n_inf = int((~torch.isfinite(values)).sum())
    mean = float(values.mean())
    if M == 1:
        se = math.nan  # one draw: no spread to measure
    else:
        se = float(values.std(unbiased=True)) / math.sqrt(M) if n_inf == 0 else math.inf
    return ContinuationScore(-mean, exact=False, stderr=se, draws=M, n_infinite=n_inf)


def continuation_logprob(chain: ReverseChain, q_chain: Process, context: list[int], continuation: list[int],
                         M: int = 8, seed: int = 0) -> ContinuationScore:
    """log p(continuation | context) with the context as a settled prompt: exact for Quench + SHIFTED
    (:func:`ar_logprob`), else the bound estimate of :func:`bound_logprob` (M trajectories)."""
    if not continuation:
        raise HDLMError("loglikelihood: the continuation is empty (no token to score)")
    if chain.ar:
        if len(context) + len(continuation) > chain.schedule.d:
            raise HDLMError(f"{len(context)} + {len(continuation)} tokens exceed the model's length d = "
                            f"{chain.schedule.d}")
        return ar_logprob(chain, context, continuation)
    return bound_logprob(chain, q_chain, context, continuation, M, seed)


__all__ = ["ContinuationScore", "PromptedChain", "ar_logprob", "bound_logprob", "continuation_logprob",
           "trajectory_values"]
