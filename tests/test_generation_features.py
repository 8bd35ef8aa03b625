"""Issue #15: stop at EOS, start after an EOS, and Flat infilling (generate, the pipeline and ``hdlm sample``).

References: the same generation without the feature (same seed: the steps before a stop are
the same computation) and the conditions themselves (never altered by any sampler).
"""

from __future__ import annotations

import json

import pytest
import torch

from hdlm.cli import main as cli_main
from hdlm.errors import HDLMError
from hdlm.hyperschedule import block, flat, quench, slide
from hdlm.processes import MDLM, EpsilonHybrid, GammaHybrid
from hdlm.sampling import HDLMPipeline, generate, make_sampler
from hdlm.sampling.pipeline import parse_infill
from test_generate import NOISE, D, N, checkpoint, tiny_model  # noqa: F401  (checkpoint: a fixture)

EOS = 5  # the tiny model's most likely token: most samples settle one early


def _gen(hs, stop, seed=3, shift=1, process=None, sampler="auto", **kw):
    process = process or MDLM(N, NOISE)
    smp = make_sampler(sampler, process, hyperschedule=hs, eta=0.3)
    return generate(tiny_model(shift), process, hs, smp, 3, generator=torch.Generator().manual_seed(seed),
                    progress=False, stop_at_eos=stop, **kw)


@pytest.mark.parametrize("hs", [quench(D), block(D, 4), slide(D, 4)], ids=["quench", "block", "slide"])
def test_stop_at_eos_returns_the_text_before_it_with_fewer_calls(hs):
    full = _gen(hs, None)
    stopped = _gen(hs, EOS)
    ref = [row.index(EOS) if EOS in row else D for row in full.tokens.tolist()]
    assert stopped.lengths.tolist() == ref and max(ref) < D  # every sample met an EOS
    for row, (a, b), n in zip(range(3), zip(stopped.tokens, full.tokens), ref):
        assert torch.equal(a[:n + 1], b[:n + 1])  # the same computation up to the EOS
    assert stopped.texts_ids() == [r[:n] for r, n in zip(full.tokens.tolist(), ref)]
    assert stopped.n_model_calls < full.n_model_calls
    assert stopped.tokens_per_s * stopped.wall_time == pytest.approx(sum(ref))  # only the tokens before EOS


def test_stop_at_eos_with_a_prompt_ignores_eos_in_the_prompt():
    prompt = torch.tensor([EOS, 2])
    res = _gen(block(D, 4), EOS, prompt=prompt)
    assert all(n >= 2 for n in res.lengths.tolist()) and torch.all(res.tokens[:, :2] == prompt)


INFILL = [-1, 3, 3, -1, -1, 7, -1, -1, -1, 0, -1, 9]


@pytest.mark.parametrize("kind,name", [("mdlm", "ancestral"), ("mdlm", "acs"), ("mdlm", "posterior"),
                                       ("epsilon", "acs"), ("epsilon", "posterior"), ("gamma", "analytic"),
                                       ("gamma", "euler")])
def test_infill_conditions_are_never_altered(kind, name):
    process = {"mdlm": MDLM(N, NOISE), "epsilon": EpsilonHybrid(N, NOISE, 0.1), "gamma": GammaHybrid(N, NOISE, 0.1)}[kind]
    cond = torch.tensor(INFILL)
    res = _gen(flat(D, steps=6), None, process=process, sampler=name, infill=cond, trace=True)
    keep = cond >= 0
    assert torch.all(res.tokens[:, keep] == cond[keep]) and int(res.tokens.max()) < N
    assert all(torch.all(step.tokens[:, keep] == cond[keep]) for step in res.trace)
    plain = _gen(flat(D, steps=6), None, process=process, sampler=name)
    assert not torch.equal(plain.tokens, res.tokens)


def test_infill_is_refused_beyond_flat_and_with_a_prompt():
    cond = torch.tensor(INFILL)
    for hs in (block(D, 4), slide(D, 4), quench(D)):
        with pytest.raises(HDLMError, match="only supports a prefix"):
            _gen(hs, None, infill=cond)
    with pytest.raises(HDLMError, match="not both"):
        _gen(flat(D, steps=4), None, infill=cond, prompt=torch.tensor([1]))
    with pytest.raises(HDLMError, match="expected"):
        _gen(flat(D, steps=4), None, infill=cond[:5])


def test_parse_infill_template():
    def enc(s):
        return [len(w) for w in s.split()]

    assert parse_infill("the [MASK:3] of the city", enc, 10) == [3, -1, -1, -1, 2, 3, 4, -1, -1, -1]
    assert parse_infill("[MASK:2] end", enc, 4) == [-1, -1, 3, -1]
    assert parse_infill("a [MASK] b", enc, 3) == [1, -1, 1]
    with pytest.raises(HDLMError, match="sequence length"):
        parse_infill("[MASK:9] x", enc, 5)


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_cli_length_stop_bos_eos_and_infill(checkpoint, capsys):
    base = ["sample", "--checkpoint", str(checkpoint), "--num-samples", "2", "--seed", "1", "--json", "--no-progress"]
    assert cli_main(base + ["--length", "24"]) == 0  # beyond the checkpoint's d = 16
    long = _jsonl(capsys.readouterr().out)
    assert len(long) == 2 and all(len(s["token_ids"]) == 24 for s in long)
    pipe = HDLMPipeline.from_pretrained(checkpoint, device="cpu")
    eos = pipe.tokenizer.eos_id
    assert cli_main(base + ["--bos-eos", "--stop-at-eos"]) == 0
    out = _jsonl(capsys.readouterr().out)
    assert all(s["prompt_length"] == 1 and s["token_ids"][0] == eos and eos not in s["token_ids"][1:] for s in out)
    assert cli_main(base + ["--schedule", "flat", "--steps", "4", "--infill", "hello [MASK:3] world"]) == 0
    filled = _jsonl(capsys.readouterr().out)
    hello, world = pipe.tokenizer.encode("hello"), pipe.tokenizer.encode(" world")
    for s in filled:
        assert s["token_ids"][:1] == hello and s["token_ids"][4:5] == world and len(s["token_ids"]) == 16
    assert cli_main(base + ["--infill", "hello [MASK:3] world"]) == 2  # block: a prefix only
    assert "only supports a prefix" in capsys.readouterr().err
    assert cli_main(base + ["--schedule", "flat", "--length", "24"]) == 2
