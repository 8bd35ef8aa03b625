"""The continuous numbers against exact values (issue #14 §1), by enumeration and quadrature.

N = 2 real tokens + MASK, d = 3, Flat ALIGNED, MDLM / SEDD-absorb with the default log-linear noise
(α(1) = 10⁻³ > 0). The exact value of each continuous NELBO is a 1-D Gauss-Legendre integral over
the level s of an exact sum over the 2^d mask patterns:

    NELBO(y) = ∫₀¹ Σ_S Π_i π(s)^[i∈S] (1 − π(s))^[i∉S] Σ_{i∈S} −α'(s)/(1 − α(s)) · CE_i(x_S, s) ds,

π = 1 − α (Algorithm 1's estimate) or π = (1 − α)/(1 − α(1)) (the prior-matched bound). The T-step
sampler's exact NLL comes from the forward algorithm over all 27 states (tests/test_likelihood.py).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from hdlm.evaluation.discrete import ReverseChain
from hdlm.evaluation.likelihood import perplexity_bound
from hdlm.errors import HDLMError
from hdlm.hyperschedule import flat
from hdlm.layout import attention_mask, inference_cells
from hdlm.noise import make_noise
from hdlm.processes import cross_entropy, make_process

from test_likelihood import D, N, REAL, DenseChain, exact_nll, kernels, make_cfg, random_model

F64 = torch.float64
PATTERNS = torch.tensor(list(itertools.product([0, 1], repeat=D)), dtype=torch.bool)  # True = masked
P_DATA = torch.tensor([0.30, 0.02, 0.15, 0.08, 0.05, 0.20, 0.12, 0.08], dtype=F64)  # over REAL's order


class ExactMDLMDenoiser(torch.nn.Module):
    """raw = log p_data(y_i = z | the unmasked tokens of x): the exact clean-token posterior of a
    masking chain (it does not depend on the masking level). Flat ALIGNED cells only (x = tokens)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=F64))

    def forward(self, tokens, sigma, positions, mask, keep=None, out_index=None):
        x = tokens[:, -D:]
        assert tokens.shape[1] == D
        visible = x < N
        consistent = ((REAL[None] == x[:, None]) | ~visible[:, None]).all(-1).to(F64) * P_DATA  # (B, 8)
        post = torch.stack([torch.stack([(consistent * (REAL[:, i] == z)).sum(-1) for z in range(N)], -1)
                            for i in range(D)], 1)
        raw = torch.log(post / post.sum(-1, keepdim=True))
        return raw if out_index is None else raw[:, out_index]


def quadrature_nelbo(model, cfg, y: torch.Tensor, prior_matched: bool, nodes: int = 32) -> float:
    """The exact continuous NELBO of one sequence y (d,), by quadrature over s and enumeration of masks."""
    process = make_process(cfg.process, N)
    noise = make_noise(cfg.process.noise, eps=cfg.process.noise_eps)
    top = 1.0 - math.exp(-float(noise.sigma_bar(torch.tensor(1.0, dtype=F64)))) if prior_matched else 1.0
    u, w = np.polynomial.legendre.leggauss(nodes)
    total = 0.0
    for s, ws in zip((u + 1) / 2, w / 2):
        s_t = torch.tensor(float(s), dtype=F64)
        pi = float(-torch.expm1(-noise.sigma_bar(s_t))) / top
        weight = float(noise.mask_weight(s_t))
        x = torch.where(PATTERNS, torch.full_like(PATTERNS, N, dtype=torch.long), y.expand(len(PATTERNS), D))
        cells, out = inference_cells(x, torch.full((D,), float(s), dtype=F64), 0, D, process, 0)
        with torch.no_grad():
            raw = model(cells.tokens, cells.sigma.to(F64), cells.positions,
                        attention_mask(cells.layout, cells.layout), keep=cells.keep.to(F64), out_index=out)
        ce = (cross_entropy(raw.to(F64), y.expand(len(PATTERNS), D)) * PATTERNS).sum(-1)
        prob = (pi ** PATTERNS.sum(-1)) * ((1 - pi) ** (~PATTERNS).sum(-1))
        total += ws * weight * float((prob * ce).sum())
    return total


@pytest.mark.parametrize("kind", ["mdlm", "absorb"])
def test_library_estimators_match_their_exact_values(kind):
    """Algorithm 1 ('continuous') and the prior-matched bound, Monte Carlo, against quadrature."""
    cfg = make_cfg(kind)
    model = random_model(cfg, seed=4, scale=0.25)
    hs = flat(D, steps=16)
    for estimator, matched in (("continuous", False), ("continuous-bound", True)):
        exact = sum(quadrature_nelbo(model, cfg, y, matched) for y in REAL)
        res = perplexity_bound(model, cfg, REAL, schedule=hs, estimator=estimator, mc_samples=120, seed=2,
                               progress=False)
        total, se = res.nll_per_token * res.n_tokens, res.stderr * res.n_tokens
        assert res.estimator == estimator and 0 < se < 0.15 * exact
        assert abs(total - exact) < 4 * se, (estimator, total, exact, se)


def test_the_estimate_falls_below_the_entropy_and_the_bound_does_not():
    """Issue #14's example: with the exact denoiser, Algorithm 1's number is below the data entropy
    (it omits the prior term); the prior-matched NELBO is −log p_data(y) itself, and the T-step
    sampler's exact NLL converges to it."""
    cfg = make_cfg("mdlm")
    model = ExactMDLMDenoiser()
    entropy = -float((P_DATA * P_DATA.log()).sum())
    est = [quadrature_nelbo(model, cfg, y, False) for y in REAL]
    bound = [quadrature_nelbo(model, cfg, y, True) for y in REAL]
    for b, p in zip(bound, P_DATA.tolist()):
        assert b == pytest.approx(-math.log(p), abs=1e-6)
    assert float((P_DATA * torch.tensor(est)).sum()) < entropy - 1e-3
    assert all(e < b for e, b in zip(est, bound))
    prior = DenseChain(cfg).prior
    gaps = []
    for T in (4, 32, 256):
        P = kernels(ReverseChain.from_config(model, cfg, schedule=flat(D, steps=T)))
        gaps.append(max(abs(exact_nll(P, prior, y) - b) for y, b in zip(REAL, bound)))
    assert gaps[2] < gaps[1] < gaps[0] and gaps[2] < 0.02


def test_continuous_bound_is_above_the_large_T_sampler_nll_and_the_nll_converges():
    cfg = make_cfg("absorb")
    model = random_model(cfg, seed=6, scale=0.3)
    prior = DenseChain(cfg).prior
    nll = {}
    for T in (8, 32, 128):
        P = kernels(ReverseChain.from_config(model, cfg, schedule=flat(D, steps=T)))
        nll[T] = torch.tensor([exact_nll(P, prior, y) for y in REAL], dtype=F64)
    bound = torch.tensor([quadrature_nelbo(model, cfg, y, True) for y in REAL], dtype=F64)
    est = torch.tensor([quadrature_nelbo(model, cfg, y, False) for y in REAL], dtype=F64)
    assert torch.all(bound >= nll[128] - (nll[128] - nll[32]).abs())  # ≥ the T → ∞ NLL, up to the O(1/T) left
    assert (nll[128] - nll[32]).abs().max() < (nll[32] - nll[8]).abs().max()
    assert torch.all(bound >= est) and torch.any(bound > est + 1e-3)  # the stretched chain masks more: the prior term it accounts for


def test_continuous_bound_refuses_processes_whose_sampler_it_does_not_certify():
    for kind, proc in (("gamma", dict(gamma=0.2)), ("epsilon", dict(epsilon=0.2))):
        cfg = make_cfg(kind, **proc)
        with pytest.raises(HDLMError, match="continuous-bound: certifies the masking samplers only"):
            perplexity_bound(random_model(cfg), cfg, REAL, schedule=flat(D, steps=4), estimator="continuous-bound",
                             progress=False)
