"""log p(continuation | context) with the context as a settled prompt (hdlm.evaluation.conditional).

By exhaustive enumeration on N = 2 real tokens, d = 3 (27 joint states), a random float64 model:
- the exact conditional −log p(y | c) of the prompted T-step generative process (forward algorithm,
  the tail position marginalised out) never exceeds the bound, and the bound is not tight (teeth);
- the bound itself is computed independently: the mixed chain (continuation noised by the dense
  posterior of test_likelihood's DenseChain, tail drawn from the model's kernel) propagated over
  all states, its KL terms summed; the library's Monte-Carlo trajectories must agree with it;
- Quench + SHIFTED is exact: ar_logprob equals the enumerated conditional, and is_greedy is the argmax.
"""

from __future__ import annotations

import math

import pytest
import torch

from hdlm.evaluation.conditional import PromptedChain, ar_logprob, bound_logprob, continuation_logprob
from hdlm.evaluation.discrete import ReverseChain, variational_chain
from hdlm.errors import HDLMError
from hdlm.hyperschedule import block, flat, quench, slide
from test_likelihood import D, GEOMETRIC, REAL, S, STATES, DenseChain, kernels, make_cfg, pairwise, random_model


def prompted(rc: ReverseChain, P: int) -> PromptedChain:
    return PromptedChain(rc.model, rc.process, rc.schedule, rc.shift, rc.settled_attention, rc.kernel, prompt_len=P)


def start(dc: DenseChain, y: torch.Tensor, P: int) -> torch.Tensor:
    """π_0 over the 27 states: the prompt holds y, the other positions the sampler's prior."""
    pi = torch.ones(len(STATES), dtype=torch.float64)
    for i in range(D):
        pi = pi * ((STATES[:, i] == y[i]).to(torch.float64) if i < P else dc.prior[STATES[:, i]])
    return pi


def exact_conditional(pc: PromptedChain, dc: DenseChain, y: torch.Tensor, P: int, C: int) -> float:
    pi = start(dc, y, P)
    for P_t in kernels(pc):
        pi = pi @ P_t
    hit = (STATES[:, P:P + C] == y[P:P + C]).all(1)
    return -math.log(float(pi[hit].sum()))


def mixed_chain_bound(pc: PromptedChain, dc: DenseChain, y: torch.Tensor, P: int, C: int,
                      frozen_tail: bool = False) -> float:
    """E Σ_t Σ_{i in y} KL(q ‖ p_θ) under the mixed chain, by propagating its law over all states.
    ``frozen_tail``: the tail never leaves the prior instead (a wrong estimator, to show the test can tell)."""
    F, m = pairwise(dc, pc.schedule, y)
    pi, total = start(dc, y, P), 0.0
    cont = range(P, P + C)
    with torch.no_grad():
        for t in range(pc.schedule.T):
            K = pc.kernel_matrix(STATES, torch.full((len(STATES),), t))  # (27, D, S): p_θ per position
            trans = torch.ones(len(STATES), len(STATES), dtype=torch.float64)
            for i in range(D):
                a, b = STATES[:, i].unsqueeze(1), STATES[:, i].unsqueeze(0)
                if i in cont:  # q(b | a, y_i) = F_t[a, b] m_{t+1}[b] / m_t[a] (Bayes on the dense chain)
                    q = F[t][i] * m[t + 1][i].unsqueeze(0) / m[t][i].clamp_min(1e-300).unsqueeze(1)
                    live = pi > 0
                    qa = q[STATES[live, i]]  # (live, S)
                    pa = K[live, i]
                    kl = torch.where(qa > 0, qa * (torch.log(qa) - torch.log(pa)), torch.zeros_like(qa)).sum(-1)
                    total += float((pi[live] * kl).sum())
                    trans = trans * q[a, b]
                elif i < P:
                    trans = trans * (a == b).to(torch.float64)
                elif frozen_tail:
                    trans = trans * (a == b).to(torch.float64)
                else:
                    trans = trans * K[:, i][torch.arange(len(STATES)).unsqueeze(1), b]
            pi = pi @ trans
    return total


CASES = [  # (process kind, process args, schedule, configuration, prompt length, continuation length, model seed)
    ("gamma", dict(gamma=0.2, **GEOMETRIC), flat(D, steps=3), "aligned", 1, 1, 7),
    ("gamma", dict(gamma=0.2, **GEOMETRIC), flat(D, steps=2), "shifted", 0, 2, 8),
    ("epsilon", dict(epsilon=0.2), flat(D, steps=3), "aligned", 1, 1, 1),  # the tail matters here (below)
    ("mdlm", {}, flat(D, steps=3), "aligned", 1, 1, 1),
    ("absorb", dict(GEOMETRIC), slide(D, 2), "shifted", 1, 1, 2),
    ("mdlm", {}, block(D, 2), "aligned", 1, 1, 0),
]


@pytest.mark.parametrize("kind,proc,hs,configuration,P,C,seed", CASES,
                         ids=[f"{c[0]}-{c[2].kind}{c[2].T}-{c[3]}-P{c[4]}C{c[5]}" for c in CASES])
def test_bound_bounds_the_exact_conditional_and_matches_enumeration(kind, proc, hs, configuration, P, C, seed):
    cfg = make_cfg(kind, configuration, **proc)
    model = random_model(cfg, seed=seed, scale=0.5 if kind in ("epsilon", "mdlm") else 0.25)
    # ε: the posterior kernel, against the forward chain (Algorithm 3's kernel needs the absorbing chain)
    rc = ReverseChain.from_config(model, cfg, schedule=hs, kernel="posterior" if kind == "epsilon" else None)
    pc, dc = prompted(rc, P), DenseChain(cfg)
    q_chain = variational_chain(rc.process, "forward")
    gaps, tail_effect = [], []
    for y in REAL[::2]:
        exact = exact_conditional(pc, dc, y, P, C)
        bound = mixed_chain_bound(pc, dc, y, P, C)
        assert bound >= exact - 1e-10
        gaps.append(bound - exact)
        est = bound_logprob(rc, q_chain, y[:P].tolist(), y[P:P + C].tolist(), M=400, seed=1)
        assert not est.exact and est.draws == 400 and est.n_infinite == 0
        assert abs(-est.logprob - bound) < 4 * est.stderr + 1e-9, (y.tolist(), -est.logprob, bound, est.stderr)
        tail_effect.append(abs(mixed_chain_bound(pc, dc, y, P, C, frozen_tail=True) - bound) / max(est.stderr, 1e-12))
    assert max(gaps) > 1e-4
    if kind == "epsilon":  # a tail left at the prior would be told apart (> 8 standard errors)
        assert max(tail_effect) > 8


@pytest.mark.parametrize("P", [0, 1, 2])
def test_quench_shifted_is_exact_with_the_greedy_flag(P):
    cfg = make_cfg("absorb", "shifted")
    model = random_model(cfg, seed=7, scale=0.8)
    rc = ReverseChain.from_config(model, cfg, schedule=quench(D))
    pc, dc = prompted(rc, P), DenseChain(cfg)
    for y in REAL:
        ctx, cont = y[:P].tolist(), y[P:].tolist()
        got = ar_logprob(rc, ctx, cont)
        assert got.exact and got.stderr == 0.0
        assert -got.logprob == pytest.approx(exact_conditional(pc, dc, y, P, D - P), rel=1e-9)
        # greedy: each continuation token is the argmax of the next-token distribution given the true prefix
        assert got.greedy == all(
            int(torch.argmax(torch.stack([torch.tensor(ar_logprob(rc, y[:i].tolist(), [z]).logprob)
                                          for z in range(S - 1)]))) == int(y[i]) for i in range(P, D))
    assert continuation_logprob(rc, None, REAL[0][:P].tolist(), REAL[0][P:].tolist()).exact


def test_errors_are_one_line():
    cfg = make_cfg("mdlm")
    rc = ReverseChain.from_config(random_model(cfg), cfg, schedule=flat(D, steps=2))
    q = variational_chain(rc.process)
    with pytest.raises(HDLMError, match="continuation is empty"):
        continuation_logprob(rc, q, [0], [])
    with pytest.raises(HDLMError, match="P \\+ C <= d = 3"):
        continuation_logprob(rc, q, [0, 1], [1, 0])
