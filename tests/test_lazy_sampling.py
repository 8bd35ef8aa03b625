"""Issue #16.1a/#16.4: the output head runs only where a token can change, and a step that can
change nothing calls no model. References: the same generation with ``lazy=False`` (the head at
every active position, a model call at every step) must give identical tokens for every sampler;
the cells the head ran on are counted by a wrapper around the model.
"""

from __future__ import annotations

import pytest
import torch

from hdlm.hyperschedule import block, flat, quench, slide
from hdlm.processes import MDLM, EpsilonHybrid, GammaHybrid
from hdlm.sampling import generate, make_sampler
from hdlm.sampling.samplers import AncestralSampler
from test_generate import NOISE, D, N, tiny_model


class HeadCounter(torch.nn.Module):
    """The model, counting forward passes, sequences fed and the cells its head ran on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.n_real = model, model.cfg, model.n_real
        self.calls, self.rows, self.head_cells = 0, 0, 0

    def new_cache(self, *a, **k):
        return self.model.new_cache(*a, **k)

    def forward(self, tokens, *args, out_index=None, **kw):
        self.calls += 1
        self.rows += tokens.shape[0]
        self.head_cells += tokens.shape[0] * out_index.shape[-1]
        return self.model(tokens, *args, out_index=out_index, **kw)


def _gen(model, process, hs, sampler, lazy, kv_cache=True, prompt=None):
    counter = HeadCounter(model)
    res = generate(counter, process, hs, sampler, 3, prompt=prompt, generator=torch.Generator().manual_seed(7),
                   kv_cache=kv_cache, progress=False, lazy=lazy)
    return res, counter


SAMPLERS = [("mdlm", "ancestral"), ("mdlm", "acs"), ("mdlm", "posterior"), ("epsilon", "acs"),
            ("epsilon", "posterior"), ("gamma", "analytic"), ("gamma", "euler"), ("mdlm", "ancestral-fp32")]


def _process(kind):
    return {"mdlm": MDLM(N, NOISE), "epsilon": EpsilonHybrid(N, NOISE, 0.1), "gamma": GammaHybrid(N, NOISE, 0.1)}[kind]


@pytest.mark.parametrize("kind,name", SAMPLERS)
@pytest.mark.parametrize("hs,kv_cache,prompt", [(flat(D, steps=20), False, None), (block(D, 4), True, None),
                                                 (slide(D, 4), True, [3, 1]), (flat(D, steps=8), True, [5, 2, 7])],
                         ids=["flat", "block", "slide-prompt", "flat-prompt"])
def test_lazy_generation_gives_the_same_tokens(kind, name, hs, kv_cache, prompt):
    model = tiny_model(1)
    process = _process(kind)
    fp32 = name.endswith("-fp32")
    sampler = make_sampler(name.removesuffix("-fp32"), process, eta=0.3, float64=not fp32)
    prompt = None if prompt is None else torch.tensor(prompt)
    eager, e_count = _gen(model, process, hs, sampler, lazy=False, kv_cache=kv_cache, prompt=prompt)
    lazy, l_count = _gen(model, process, hs, sampler, lazy=True, kv_cache=kv_cache, prompt=prompt)
    assert torch.equal(lazy.tokens, eager.tokens)
    assert l_count.head_cells <= e_count.head_cells and lazy.n_model_calls == l_count.calls <= eager.n_model_calls
    if name in ("ancestral", "acs") and not fp32:  # the head runs only where a token is revealed or corrected
        assert l_count.head_cells < e_count.head_cells


def test_ancestral_needs_exactly_the_revealed_masks():
    """η = 0: the plan's `need` is the set of positions whose token changes (MASK → token), no more."""
    process = MDLM(N, NOISE)
    sampler = AncestralSampler(process)
    gen = torch.Generator().manual_seed(3)
    x = torch.where(torch.rand(4, 9, generator=gen) < 0.6, torch.full((4, 9), N), torch.randint(N, (4, 9), generator=gen))
    s_now, s_next = torch.full((9,), 0.6, dtype=torch.float64), torch.full((9,), 0.4, dtype=torch.float64)
    raw = torch.randn(4, 9, N, generator=gen, dtype=torch.float64)
    plan = sampler.plan(x, s_now, s_next, torch.Generator().manual_seed(1))
    out = sampler.finish(plan, raw[plan.need], torch.Generator().manual_seed(99))
    assert torch.equal(plan.need, out != x) and plan.need.any() and not plan.need.all()
    # and step() (full outputs) consumes the same random stream
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    p2 = sampler.plan(x, s_now, s_next, g2)
    assert torch.equal(sampler.step(raw, x, s_now, s_next, g1), sampler.finish(p2, raw[p2.need], g2))


def test_flat_mdlm_skips_steps_that_reveal_nothing_and_idle_sequences():
    """Flat MDLM with T = 4d steps: most steps reveal no MASK in some sequence; those cost nothing."""
    model = tiny_model(0)
    process = MDLM(N, NOISE)
    sampler = make_sampler("ancestral", process)
    hs = flat(D, steps=4 * D)
    eager, e_count = _gen(model, process, hs, sampler, lazy=False, kv_cache=False)
    lazy, l_count = _gen(model, process, hs, sampler, lazy=True, kv_cache=False)
    assert torch.equal(lazy.tokens, eager.tokens) and int(lazy.tokens.max()) < N
    assert e_count.calls == hs.T and l_count.calls < hs.T
    assert l_count.rows < 3 * l_count.calls  # some sequences were left out of some passes
    assert l_count.head_cells < e_count.head_cells / 4


def test_quench_ar_is_unchanged_by_lazy():
    model = tiny_model(1)
    process = MDLM(N, NOISE)
    hs = quench(D)
    sampler = make_sampler("auto", process, hyperschedule=hs)
    eager, _ = _gen(model, process, hs, sampler, lazy=False)
    lazy, _ = _gen(model, process, hs, sampler, lazy=True)
    assert torch.equal(lazy.tokens, eager.tokens) and lazy.n_model_calls == eager.n_model_calls == D
