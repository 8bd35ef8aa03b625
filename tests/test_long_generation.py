"""Issue #15: Block, Slide and Quench beyond the training length d (paper §4.5).

Every cell sees the cells whose input positions lie within d − 1 of its own (rotary positions
continue past d); the KV cache drops the cells no later cell can see. References: the uncached
computation (all clean cells rerun each step under the same window rule) and, for L = d, the
tokens main produced before the window existed (recorded with main at dd9c23b).
"""

from __future__ import annotations

import pytest
import torch

from hdlm.errors import HDLMError
from hdlm.hyperschedule import block, flat, quench, slide
from hdlm.processes import MDLM, EpsilonHybrid, GammaHybrid
from hdlm.sampling import generate, make_sampler
from test_generate import NOISE, D, N, tiny_model

RECORDED = {  # main at dd9c23b: tiny_model(shift), 2 samples, seed 5, eta 0.3, temperature 4
    "block": (1, block(D, 4), "gamma", "analytic",
              [[6, 5, 5, 5, 5, 5, 5, 5, 5, 1, 6, 5], [6, 5, 6, 5, 5, 5, 5, 5, 5, 5, 5, 5]]),
    "slide": (0, slide(D, 4), "mdlm", "acs",
              [[1, 4, 2, 5, 10, 5, 1, 10, 5, 5, 5, 6], [5, 1, 6, 2, 5, 5, 5, 6, 5, 1, 0, 6]]),
    "quench": (1, quench(D), "mdlm", "ar",
               [[5, 4, 2, 5, 7, 5, 6, 1, 5, 6, 5, 0], [2, 2, 7, 6, 5, 3, 1, 2, 4, 5, 5, 3]]),
}


def _process(kind):
    return {"mdlm": MDLM(N, NOISE), "epsilon": EpsilonHybrid(N, NOISE, 0.1), "gamma": GammaHybrid(N, NOISE, 0.1)}[kind]


def _run(model, process, hs, sampler, kv_cache, batch=2, prompt=None):
    steps = []
    res = generate(model, process, hs, sampler, batch, prompt=prompt, generator=torch.Generator().manual_seed(5),
                   kv_cache=kv_cache, progress=False, callback=lambda s: steps.append((s.raw.clone(), s.n_cached)))
    return res, steps


@pytest.mark.parametrize("case", list(RECORDED))
def test_length_d_reproduces_the_recorded_tokens(case):
    shift, hs, kind, name, tokens = RECORDED[case]
    process = _process(kind)
    res, _ = _run(tiny_model(shift), process, hs, make_sampler(name, process, eta=0.3, temperature=4.0), True)
    assert res.tokens.tolist() == tokens


@pytest.mark.parametrize("shift,settled", [(0, "causal"), (1, "causal"), (1, "block")])
@pytest.mark.parametrize("schedule,kind,name", [("block", "gamma", "analytic"), ("slide", "epsilon", "acs"),
                                                ("quench", "mdlm", "ar")])
def test_beyond_d_cached_equals_uncached(shift, settled, schedule, kind, name):
    """L = 2.5 d: identical tokens and outputs within 1e-9, the cache holding fewer than d + 3ω cells."""
    L = 30
    hs = {"block": block(L, 4), "slide": slide(L, 4), "quench": quench(L)}[schedule]
    model = tiny_model(shift, settled)
    process = _process(kind)
    sampler = make_sampler(name, process, eta=0.3, temperature=2.0)
    cached, c_steps = _run(model, process, hs, sampler, True, prompt=torch.tensor([3, 1]))
    plain, p_steps = _run(model, process, hs, sampler, False, prompt=torch.tensor([3, 1]))
    assert torch.equal(cached.tokens, plain.tokens) and cached.tokens.shape == (2, L) and int(cached.tokens.max()) < N
    assert len(c_steps) == len(p_steps)
    assert max((a - b).abs().max().item() for (a, _), (b, _) in zip(c_steps, p_steps)) < 1e-9
    assert max(n for _, n in c_steps) <= D  # old keys were dropped (the window is d + shift cells)
    assert cached.tokens_per_s > 0 and cached.prompt_len == 2


def test_window_changes_the_outputs_beyond_d():
    """Not vacuous: with a longer training length (no window) the same run gives other outputs."""
    L, hs = 30, block(30, 4)
    process = GammaHybrid(N, NOISE, 0.1)
    sampler = make_sampler("analytic", process)
    windowed, w_steps = _run(tiny_model(1), process, hs, sampler, True)
    full, f_steps = _run(tiny_model(1, length=L), process, hs, sampler, True)
    assert all((a - b).abs().max() < 1e-12 for (a, _), (b, _) in zip(w_steps[:12], f_steps[:12]))  # within d
    assert max((a - b).abs().max().item() for (a, _), (b, _) in zip(w_steps, f_steps)) > 1e-6


def test_flat_beyond_d_is_refused():
    process = MDLM(N, NOISE)
    with pytest.raises(HDLMError, match="only Block, Slide and Quench"):
        generate(tiny_model(0), process, flat(2 * D, steps=4), make_sampler("ancestral", process), 1, progress=False)
