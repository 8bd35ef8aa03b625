"""Issue #12.10: the same seed gives the same text whatever the batch size (one random stream per
sequence), and issue #16.4: output reuse in Flat sampling for models without time conditioning.

References: batch-size independence compares the sequences generated in batches of 1, 2 and 4
with each other (each batch gets the streams of its own sequence indices, as the pipeline does);
output reuse compares ``reuse=True`` against ``reuse=False`` (the model at every step that needs
an output) with the forward passes counted by a wrapper.
"""

from __future__ import annotations

import pytest
import torch

from hdlm.hyperschedule import block, flat, quench, slide
from hdlm.model import HDLMTransformer
from hdlm.processes import MDLM, EpsilonHybrid, GammaHybrid
from hdlm.sampling import HDLMPipeline, SequenceGenerators, generate, make_sampler
from conftest import tiny_bert_checkpoint
from test_generate import NOISE, D, N, tiny_model
from test_lazy_sampling import HeadCounter


def _process(kind):
    return {"mdlm": MDLM(N, NOISE), "epsilon": EpsilonHybrid(N, NOISE, 0.1), "gamma": GammaHybrid(N, NOISE, 0.1)}[kind]


def _in_batches(model, process, hs, sampler, batch, seed=11, total=4, prompt=None, kv_cache=True):
    rows = []
    for first in range(0, total, batch):
        gens = SequenceGenerators(seed, range(first, first + batch))
        rows.append(generate(model, process, hs, sampler, batch, prompt=prompt, generator=gens,
                             kv_cache=kv_cache, progress=False).tokens)
    return torch.cat(rows)


STREAM_CASES = [("gamma", "analytic", block(D, 4), None, 0), ("gamma", "euler", slide(D, 4), [3, 1], 0),
                ("epsilon", "posterior", flat(D, steps=12), None, 0), ("epsilon", "acs", block(D, 4), [2], 1),
                ("mdlm", "ancestral", flat(D, steps=12), [5, 2, 7], 0), ("mdlm", "ancestral", block(D, 4), None, 1),
                ("mdlm", "ar", quench(D), [4, 0], 1), ("gamma", "posterior", flat(D, steps=10), None, 0)]


@pytest.mark.parametrize("kind,name,hs,prompt,shift", STREAM_CASES,
                         ids=[f"{k}-{n}-{h.kind}{'-prompt' if p else ''}" for k, n, h, p, _ in STREAM_CASES])
def test_same_seed_same_tokens_whatever_the_batch_size(kind, name, hs, prompt, shift):
    model, process = tiny_model(shift), _process(kind)
    sampler = make_sampler(name, process, hyperschedule=hs, eta=0.3)
    prompt = None if prompt is None else torch.tensor(prompt)
    ones = _in_batches(model, process, hs, sampler, 1, prompt=prompt)
    assert len({tuple(r) for r in ones.tolist()}) > 1  # not one stream repeated
    for batch in (2, 4):
        assert torch.equal(_in_batches(model, process, hs, sampler, batch, prompt=prompt), ones)
    assert torch.equal(_in_batches(model, process, hs, sampler, 4, prompt=prompt), ones)  # deterministic
    other = _in_batches(model, process, hs, sampler, 4, seed=12, prompt=prompt)
    assert not torch.equal(other, ones)


def test_default_generator_is_per_sequence_streams_of_seed_zero():
    model, process = tiny_model(0), _process("mdlm")
    sampler = make_sampler("ancestral", process)
    a = generate(model, process, block(D, 4), sampler, 3, progress=False).tokens
    b = generate(model, process, block(D, 4), sampler, 3, generator=SequenceGenerators(0, range(3)), progress=False)
    assert torch.equal(a, b.tokens)
    with pytest.raises(Exception, match="sequence generators"):
        generate(model, process, block(D, 4), sampler, 2, generator=SequenceGenerators(0, range(3)), progress=False)


def test_pipeline_texts_do_not_depend_on_the_batch_size(tmp_path):
    pipe = HDLMPipeline.from_pretrained(tiny_bert_checkpoint(tmp_path / "ckpt"), device="cpu")
    ids = [pipe.generate_ids(4, "hello", seed=3, batch_size=b).tokens for b in (1, 2, 4)]
    assert torch.equal(ids[0], ids[1]) and torch.equal(ids[0], ids[2])
    flat_ids = [pipe.generate_ids(3, seed=5, batch_size=b, schedule="flat", steps=6).tokens for b in (1, 3)]
    assert torch.equal(*flat_ids)


# --------------------------------------------------------------------------------------------
# output reuse (issue #16.4)


def untimed_model(weighted: bool = False, vocab: int = N) -> HDLMTransformer:
    """A tiny model without time conditioning (ε-hybrid / MDLM style, Table 1 (d))."""
    return tiny_model(vocab=vocab, seed=2, time_conditioning=False, weighted_embedding=weighted)


def _counted(model, process, hs, sampler, reuse, prompt=None, kv_cache=False, batch=3):
    counter = HeadCounter(model)
    res = generate(counter, process, hs, sampler, batch, prompt=prompt, generator=SequenceGenerators(4, range(batch)),
                   kv_cache=kv_cache, progress=False, reuse=reuse)
    return res, counter


REUSE_CASES = [("mdlm", "ancestral"), ("mdlm", "acs"), ("mdlm", "posterior"), ("epsilon", "posterior"),
               ("epsilon", "acs"), ("gamma", "analytic"), ("gamma", "euler"), ("gamma", "posterior")]


@pytest.mark.parametrize("kind,name", REUSE_CASES)
@pytest.mark.parametrize("prompt", [None, [3, 1]], ids=["noprompt", "prompt-cache"])
def test_flat_output_reuse_gives_the_same_tokens_with_fewer_forward_passes(kind, name, prompt):
    model, process = untimed_model(), _process(kind)
    hs = flat(D, steps=4 * D)  # small steps: most change no token of some sequence
    sampler = make_sampler(name, process, eta=0.3)
    prompt = None if prompt is None else torch.tensor(prompt)
    off, c_off = _counted(model, process, hs, sampler, reuse=False, prompt=prompt, kv_cache=True)
    on, c_on = _counted(model, process, hs, sampler, reuse=True, prompt=prompt, kv_cache=True)
    assert torch.equal(on.tokens, off.tokens) and int(on.tokens.max()) < N
    assert off.n_reused == 0 and on.n_model_calls == c_on.calls <= off.n_model_calls == c_off.calls
    if name in ("ancestral", "posterior") and kind != "gamma":
        # the plan already runs a sequence only where a token changes, so its input changed since its
        # last pass, unless that pass was for another sequence of the batch (the KV cache's whole batch)
        assert c_on.rows <= c_off.rows and (on.n_reused == 0 or prompt is not None)
    else:  # a step that ran the model and changed no token leaves the next step's input as it was
        assert on.n_reused > 0 and c_on.rows < c_off.rows


def test_reuse_needs_unchanged_inputs_time_conditioning_and_keep_weights_break_it():
    hs = flat(D, steps=4 * D)
    process = _process("gamma")
    sampler = make_sampler("analytic", process)
    reused = {}
    for name, model in (("timed", tiny_model(0)), ("weighted", untimed_model(weighted=True)),
                        ("plain", untimed_model(weighted=False))):
        off, c_off = _counted(model, process, hs, sampler, reuse=False)
        on, c_on = _counted(model, process, hs, sampler, reuse=True)
        assert torch.equal(on.tokens, off.tokens) and c_on.rows <= c_off.rows
        reused[name] = on.n_reused
    assert reused["timed"] == 0  # σ̄ changes every Flat step: a time-conditioned model never reuses
    # the Eq. (12) keep weight of a real token changes every step: only rows still all MASK are reused
    res = generate(untimed_model(weighted=True), process, hs, sampler, 3, generator=SequenceGenerators(4, range(3)),
                   kv_cache=False, progress=False, trace=True)
    all_mask = sum(int((st.tokens == N).all(1).sum()) for st in res.trace if st.model_called)
    assert res.n_reused == reused["weighted"] <= all_mask and reused["weighted"] <= reused["plain"]


def test_reuse_outputs_equal_a_fresh_forward_pass():
    """The raw outputs a step reads from the store equal the model run afresh on that step's input."""
    model, process = untimed_model(), _process("mdlm")
    hs = flat(D, steps=3 * D)
    sampler = make_sampler("posterior", process)
    seen = {}
    for reuse in (False, True):
        steps = []
        generate(model, process, hs, sampler, 2, generator=SequenceGenerators(1, range(2)), progress=False,
                 reuse=reuse, kv_cache=False, callback=lambda s: steps.append((s.t, s.raw.clone())))
        seen[reuse] = steps
    assert [t for t, _ in seen[True]] == [t for t, _ in seen[False]]
    assert max((a - b).abs().max().item() for (_, a), (_, b) in zip(seen[True], seen[False])) < 1e-10


def test_kernel_samplers_read_no_output_where_the_token_cannot_change():
    """ε family: a MASK that stays MASK (decided from 1 − p_transfer) and a revealed token need no output."""
    process = MDLM(N, NOISE)
    sampler = make_sampler("posterior", process)
    x = torch.tensor([[N, N, 3, N, 5, N, N, 1]])
    s_now, s_next = torch.full((8,), 0.5, dtype=torch.float64), torch.full((8,), 0.45, dtype=torch.float64)
    plan = sampler.plan(x, s_now, s_next, SequenceGenerators(0, [0]))
    assert not plan.need[x != N].any() and plan.need.sum() < (x == N).sum()
    raw = torch.randn(1, 8, N, dtype=torch.float64)
    out = sampler.finish(plan, raw[plan.need], SequenceGenerators(0, [0]))
    assert torch.equal(out[~plan.need], x[~plan.need]) and (out[plan.need] != N).all()
