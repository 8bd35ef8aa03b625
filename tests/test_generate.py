"""The generation driver, its KV cache, the pipeline and ``hdlm sample`` (paper §3.3, App. B.4).

A tiny random HDLMTransformer in float64 (every weight perturbed away from its adaLN-Zero init,
so no check is vacuous). References are independent of the driver: the uncached computation,
a hand-written autoregressive loop with a causal mask, and hand-counted cells and model calls.
"""

from __future__ import annotations

import json

import pytest
from conftest import tiny_bert_checkpoint
import torch

from hdlm.cli import main as cli_main
from hdlm.config import Config, DataConfig, ModelConfig, ScheduleConfig
from hdlm.errors import HDLMError
from hdlm.hyperschedule import block, flat, quench, slide
from hdlm.model import HDLMTransformer
from hdlm.noise import LogLinear
from hdlm.plots.trace import ACTIVE, ACTIVE_MASK, CHANGED, SETTLED, WORTHLESS, plot_trace, trace_grid
from hdlm.processes import MDLM, EpsilonHybrid, GammaHybrid
from hdlm.sampling import HDLMPipeline, generate, make_sampler

F64 = torch.float64
N, D = 11, 12
NOISE = LogLinear(1e-3)


def tiny_model(shift: int = 0, settled: str = "causal", vocab: int = N, length: int = D, seed: int = 1,
               **config) -> HDLMTransformer:
    """A tiny float64 model with weights perturbed by ``seed`` (``config``: other ModelConfig fields)."""
    cfg = ModelConfig(vocab_size=vocab, length=length, n_layers=2, hidden=16, n_heads=2, mlp_ratio=2, cond_dim=8,
                      dropout=0.0, pad_vocab_to=8, configuration="shifted" if shift else "aligned",
                      settled_attention=settled, **config)
    torch.manual_seed(0)
    model = HDLMTransformer(cfg).double().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def run(model, process, hs, sampler, batch=3, prompt=None, seed=5, kv_cache=True, trace=False, lazy=True):
    """generate() and the per-step (raw, cells run, cells cached) seen by the callback."""
    steps = []
    res = generate(model, process, hs, sampler, batch, prompt=prompt, generator=torch.Generator().manual_seed(seed),
                   kv_cache=kv_cache, trace=trace, progress=False, lazy=lazy,
                   callback=lambda s: steps.append((s.t, s.raw.clone(), s.n_cells, s.n_cached)))
    return res, steps


CASES = {
    "block-aligned": (0, "causal", block(D, 4), None),
    "block-shifted": (1, "causal", block(D, 4), None),
    "slide-aligned": (0, "causal", slide(D, 4), None),
    "slide-shifted": (1, "causal", slide(D, 4, rho=2), None),
    "block-shifted-prompt": (1, "causal", block(D, 4), [3, 1, 4, 1, 5]),
    "slide-aligned-prompt": (0, "causal", slide(D, 4), [2, 7, 1]),
    "blockcausal-prompt": (0, "block", block(D, 4), [3, 1, 4, 1, 5]),  # cells of a half-settled block
    "blockcausal-slide": (1, "block", slide(D, 4), None),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", ["gamma", "epsilon"])
def test_cached_generation_equals_uncached(case, family):
    """Same seed: identical tokens, and logits within 1e-9 at every step, with fewer cells run."""
    shift, settled, hs, prompt = CASES[case]
    model = tiny_model(shift, settled)
    if family == "gamma":
        process = GammaHybrid(N, NOISE, 0.1)
        sampler = make_sampler("analytic", process, temperature=0.9)
    else:
        process = EpsilonHybrid(N, NOISE, 0.1)
        sampler = make_sampler("acs", process, eta=0.2)
    prompt = None if prompt is None else torch.tensor(prompt)
    cached, c_steps = run(model, process, hs, sampler, prompt=prompt, kv_cache=True)
    plain, p_steps = run(model, process, hs, sampler, prompt=prompt, kv_cache=False)
    assert torch.equal(cached.tokens, plain.tokens)
    assert [s[0] for s in c_steps] == [s[0] for s in p_steps]
    for (_, raw_c, _, _), (_, raw_p, _, _) in zip(c_steps, p_steps):
        assert (raw_c - raw_p).abs().max() < 1e-9
    assert sum(s[2] for s in c_steps) < sum(s[2] for s in p_steps)
    assert any(s[3] > 0 for s in c_steps) and all(s[3] == 0 for s in p_steps)
    assert int(cached.tokens.max()) < N  # no MASK left
    if prompt is not None:
        assert torch.all(cached.tokens[:, : len(prompt)] == prompt)


def test_cache_feeds_only_new_clean_cells_and_the_active_window():
    """Block(ω = 4), d = 12, ALIGNED, no prompt: each step runs the ω active cells plus the 4 cells
    settled since the last step (at the first step of blocks 1 and 2): 12·4 + 2·4 = 56 cells;
    without the cache the settled prefix is rerun every step: 4·(4 + 8 + 12) = 96."""
    model = tiny_model(0)
    process = GammaHybrid(N, NOISE, 0.1)
    sampler = make_sampler("analytic", process)
    _, c_steps = run(model, process, block(D, 4), sampler, kv_cache=True)
    _, p_steps = run(model, process, block(D, 4), sampler, kv_cache=False)
    assert sum(s[2] for s in c_steps) == 56 and sum(s[2] for s in p_steps) == 96
    assert [s[3] for s in c_steps] == [0] * 4 + [0] + [4] * 3 + [4] + [8] * 3
    # Flat has no settled prefix: nothing is ever cached
    _, f_steps = run(model, process, flat(D, steps=6), sampler, kv_cache=True)
    assert all(s[3] == 0 and s[2] == D for s in f_steps)


@pytest.mark.parametrize("hs,prompt_len,calls", [
    (block(D, 4), 5, 12 - 4),  # block 0 lies inside the prompt: its 𝒯 = 4 steps are skipped
    (quench(D), 5, 12 - 5),
    (slide(D, 4), 5, 15 - 5),  # active window [t-3, t+1) inside [0, 5) for t <= 4
    (flat(D, steps=6), 5, 6),
    (block(D, 4), 0, 12),
])
def test_model_calls_are_T_minus_skipped_steps(hs, prompt_len, calls):
    model = tiny_model(1)
    process = MDLM(N, NOISE)
    prompt = torch.arange(prompt_len) % N if prompt_len else None
    sampler = make_sampler("auto", process, hyperschedule=hs)
    res, steps = run(model, process, hs, sampler, prompt=prompt, lazy=False)
    assert res.n_model_calls == calls == len(steps)
    lazy, lazy_steps = run(model, process, hs, sampler, prompt=prompt)  # calls only where a MASK is revealed
    assert torch.equal(lazy.tokens, res.tokens) and lazy.n_model_calls == len(lazy_steps) <= calls
    assert res.steps == hs.T and res.prompt_len == prompt_len


def hand_written_ar(model, process, batch, d, prompt=None, seed=5, greedy=False):
    """Plain AR decoding: recompute [BOS] + x_<t with a causal mask, draw x_t from softmax of the
    last output (greedy: argmax; else float64 inverse CDF with one uniform per row)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(batch, 0, dtype=torch.long) if prompt is None else prompt.expand(batch, -1).clone()
    sigma0 = float(process.noise.sigma_bar(torch.tensor(0.0, dtype=F64)))
    while x.shape[1] < d:
        inp = torch.cat([torch.full((batch, 1), N + 1), x], dim=1)
        L = inp.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        logits = model(inp, torch.full((batch, L), sigma0, dtype=F64), torch.arange(L), causal)[:, -1]
        if greedy:
            nxt = logits.argmax(-1)
        else:
            u = torch.rand(batch, generator=gen, dtype=F64)
            cdf = torch.softmax(logits.to(F64), -1).cumsum(-1)
            nxt = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        x = torch.cat([x, nxt.unsqueeze(1)], dim=1)
    return x


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
@pytest.mark.parametrize("kv_cache", [True, False], ids=["cache", "nocache"])
@pytest.mark.parametrize("with_prompt", [False, True], ids=["unconditional", "prompt"])
def test_quench_shifted_is_plain_autoregressive_decoding(greedy, kv_cache, with_prompt):
    model = tiny_model(1)
    process = MDLM(N, NOISE)
    prompt = torch.tensor([4, 0, 9]) if with_prompt else None
    sampler = make_sampler("auto", process, hyperschedule=quench(D), top_k=1 if greedy else 0)
    assert sampler.name == "ar"
    res, _ = run(model, process, quench(D), sampler, batch=4, prompt=prompt, kv_cache=kv_cache)
    ref = hand_written_ar(model, process, 4, D, prompt=prompt, greedy=greedy)
    assert torch.equal(res.tokens, ref)
    assert res.n_model_calls == D - (3 if with_prompt else 0)


def test_batch_rows_get_their_own_prompts_and_bad_prompts_are_refused():
    model = tiny_model(0)
    process = GammaHybrid(N, NOISE, 0.2)
    sampler = make_sampler("analytic", process)
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    res, _ = run(model, process, slide(D, 4), sampler, batch=2, prompt=prompts)
    assert torch.equal(res.tokens[:, :3], prompts)
    for bad in (torch.arange(D + 1) % N, torch.tensor([N]), torch.tensor([[1, 2]] * 3)):
        with pytest.raises(HDLMError):
            run(model, process, slide(D, 4), sampler, batch=2, prompt=bad)


def test_same_seed_same_tokens_and_trace():
    model = tiny_model(1)
    process = EpsilonHybrid(N, NOISE, 0.05)
    sampler = make_sampler("acs", process, eta=0.1)
    a, _ = run(model, process, block(D, 4), sampler, seed=3, trace=True)
    b, _ = run(model, process, block(D, 4), sampler, seed=3)
    c, _ = run(model, process, block(D, 4), sampler, seed=4)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert len(a.trace) == block(D, 4).T
    assert torch.all(a.trace[0].tokens == N)  # x_0 = all MASK
    for step, nxt in zip(a.trace, a.trace[1:] + [None]):
        after = nxt.tokens if nxt is not None else a.tokens.cpu()
        # only the active window of the step may change
        changed = (after != step.tokens).any(0).nonzero().flatten()
        assert all(step.settled_end <= int(i) < step.active_end for i in changed)


def test_trace_grid_roles_and_plot(tmp_path):
    M = 9
    states = [[M, M, M], [5, M, M], [5, 7, M], [5, 6, 2]]
    splits = [(0, 2), (0, 3), (1, 3)]
    tokens, role = trace_grid(states, splits, M)
    assert role.tolist() == [
        [ACTIVE_MASK, ACTIVE_MASK, WORTHLESS],
        [CHANGED, ACTIVE_MASK, ACTIVE_MASK],
        [SETTLED, CHANGED, ACTIVE_MASK],
        [SETTLED, CHANGED, CHANGED],
    ]
    assert role[2, 0] == SETTLED and tokens[3].tolist() == [5, 6, 2] and ACTIVE not in role
    model = tiny_model(0)
    process = GammaHybrid(N, NOISE, 0.3)
    res, _ = run(model, process, slide(D, 4), make_sampler("analytic", process), trace=True)
    path = plot_trace(res, tmp_path / "trace.png", mask_id=N, decode=lambda i: f"t{i}")
    assert path.exists() and path.stat().st_size > 1000


# ------------------------------------------------------------------------------------------
# pipeline and CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A pretrained folder: tiny γ-hybrid Block model over the bert-base-uncased vocabulary. (conftest.tiny_bert_checkpoint)"""
    return tiny_bert_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_pipeline_generates_texts_with_the_prompt(checkpoint):
    pipe = HDLMPipeline.from_pretrained(checkpoint, device="cpu")
    texts = pipe.generate(prompt="hello world")  # defaults from config.sample: 3 samples, batches of 2
    assert len(texts) == 3 and all(t.startswith("hello world") for t in texts)
    assert texts == pipe.generate(prompt="hello world")  # seed 7 from the config
    res = pipe.generate_ids(2, [7592, 2088], schedule="flat", steps=4, seed=1)
    assert res.tokens.shape == (2, 16) and res.tokens[:, :2].tolist() == [[7592, 2088]] * 2
    assert res.hyperschedule.kind == "flat" and res.steps == 4 and res.n_model_calls == 4
    assert res.sampler == "posterior"  # the γ default (0 < γ < 1)
    assert pipe.hyperschedule().kind == "block" and pipe.hyperschedule().T == 8  # width 4 at rho 2
    assert pipe.hyperschedule("quench").T == 16
    ids_c = pipe.generate_ids(2, "hello", seed=3, kv_cache=True).tokens
    ids_p = pipe.generate_ids(2, "hello", seed=3, kv_cache=False).tokens
    assert torch.equal(ids_c, ids_p)
    with pytest.raises(HDLMError):
        pipe.generate_ids(1, "word " * 20)  # longer than d = 16
    with pytest.raises(HDLMError):
        pipe.generate_ids(1, sampler="acs")  # a gamma-family model


def test_cli_sample_json_out_and_trace(checkpoint, tmp_path, capsys):
    args = ["sample", "--checkpoint", str(checkpoint), "--num-samples", "2", "--prompt", "hello", "--seed", "1",
            "--json", "--no-progress"]
    assert cli_main(args) == 0
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(first) == 2 and all(s["prompt_length"] == 1 and s["seed"] == 1 for s in first)
    assert all(s["text"].startswith("hello") and len(s["token_ids"]) == 16 for s in first)
    assert first[0]["sampler"]["hyperschedule"]["T"] == 8 and first[0]["sampler"]["name"] == "posterior"
    out = tmp_path / "s.jsonl"
    png = tmp_path / "trace.png"
    assert cli_main(args + ["--no-kv-cache", "--out", str(out), "--trace", str(png)]) == 0
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["token_ids"] for s in again] == [s["token_ids"] for s in first]
    assert png.exists() and png.stat().st_size > 1000
    assert cli_main(["sample", "--checkpoint", str(checkpoint), "--num-samples", "1", "--schedule", "slide",
                     "--width", "4", "--sampler", "euler", "--top-p", "0.9", "--draw", "float32-gumbel", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "=== sample 0 ===" in text
    assert cli_main(["sample", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert cli_main(["sample", "--checkpoint", str(checkpoint), "--sampler", "ancestral"]) == 2


# ------------------------------------------------------------------------------------------
# CUDA (skipped elsewhere)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shift", [0, 1])
def test_cached_generation_on_cuda(shift):
    """FlexAttention path: cached and uncached agree on CUDA; a seed gives the same tokens."""
    model = tiny_model(shift).float().cuda()
    process = GammaHybrid(N, NOISE, 0.1)
    sampler = make_sampler("analytic", process, top_k=1)  # greedy: robust to float32 rounding
    outs = {}
    for kv in (True, False):
        steps = []
        res = generate(model, process, slide(D, 4), sampler, 3, generator=torch.Generator(device="cuda").manual_seed(0),
                       kv_cache=kv, progress=False, callback=lambda s: steps.append(s.raw.double().cpu()))
        outs[kv] = (res.tokens.cpu(), steps)
    assert torch.equal(outs[True][0], outs[False][0])
    assert max((a - b).abs().max().item() for a, b in zip(outs[True][1], outs[False][1])) < 1e-3
    again = generate(model, process, slide(D, 4), sampler, 3, generator=torch.Generator(device="cuda").manual_seed(0),
                     progress=False)
    assert torch.equal(again.tokens.cpu(), outs[True][0])


def test_schedule_overrides_agree_between_sample_and_eval_ppl(tmp_path, capsys):
    """#12 item 8: one rule merges a checkpoint's schedule with --schedule/--width/--rho/--steps.

    On a Block ω = 8, ρ = 2 checkpoint (d = 16, so d/4 = 4 ≠ ω), ``--schedule slide`` keeps ω = 8
    and ρ = 2 in both ``hdlm sample`` (the pipeline) and ``hdlm eval ppl``; before, the pipeline fell
    back to ω = d/4 while eval ppl kept ω = 8, so the samples and the bound described different
    schedules. Both commands record the schedule they used: they must agree for every override."""
    from hdlm.checkpoint import save_pretrained
    from hdlm.cli import main
    from hdlm.tokenizers import load_tokenizer

    tok = load_tokenizer("bert-base-uncased")
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, length=16, n_layers=1, hidden=16, n_heads=2,
                                   mlp_ratio=2, cond_dim=8, dropout=0.0),
                 schedule=ScheduleConfig(kind="block", width=8, rho=2.0), data=DataConfig(tokenizer="bert-base-uncased"))
    checkpoint = save_pretrained(HDLMTransformer(cfg.model), cfg, tok.identity(), tmp_path / "ckpt")
    text = tmp_path / "eval.txt"
    text.write_text("\n".join(f"the cat sat on the mat number {i} ." for i in range(8)) + "\n")
    for flags in (["--schedule", "slide"], ["--schedule", "slide", "--rho", "1"], ["--schedule", "flat"],
                  ["--schedule", "quench"], ["--width", "4"]):
        out_s, out_p = tmp_path / "s.jsonl", tmp_path / "p.json"
        assert main(["sample", "--checkpoint", str(checkpoint), "--num-samples", "1", "--out", str(out_s),
                     "--no-progress", "--device", "cpu", *flags]) == 0
        assert main(["eval", "ppl", "--checkpoint", str(checkpoint), "--data", str(text), "--mc-samples", "1",
                     "--device", "cpu", "--json", str(out_p), *flags]) == 0
        s = json.loads(out_s.read_text())["sampler"]["hyperschedule"]
        p = json.loads(out_p.read_text())["schedule"]
        assert (s["kind"], s["T"], s["width"], s["levels"]) == (p["kind"], p["T"], p["width"], p["levels"]), flags
        if flags == ["--schedule", "slide"]:
            assert (p["width"], p["rho"], p["T"]) == (8, 2.0, 11)  # the checkpoint's ω and ρ carried over
    capsys.readouterr()
