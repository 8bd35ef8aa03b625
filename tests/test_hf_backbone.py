"""A Hugging Face causal LM as the hdlm backbone (hdlm.hf_backbone, hdlm.conversion; docs/conversion.md).

Tiny randomly initialised transformers models (Llama; Gemma 3 through the same adapter), float64,
no download. The references are the HF models themselves, run by transformers' own code paths
(SDPA attention with HF's causal masking, HF's own KV cache, ``generate``), or hdlm's independent
checks reused from the DiT tests (intervals run alone, enumeration of the T-step chain).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from hdlm.config import load_config  # noqa: E402
from hdlm.evaluation.discrete import ReverseChain, variational_chain  # noqa: E402
from hdlm.evaluation.likelihood import perplexity_bound  # noqa: E402
from hdlm.hf_backbone import HFBackbone, hf_config_dict  # noqa: E402
from hdlm.hyperschedule import block, quench, slide  # noqa: E402
from hdlm.layout import inference_cells  # noqa: E402
from hdlm.masks import dense_mask  # noqa: E402
from hdlm.backbone import build_model  # noqa: E402
from hdlm.objective import build_objective  # noqa: E402
from hdlm.processes import EpsilonHybrid, GammaHybrid  # noqa: E402
from hdlm.sampling import generate, make_sampler  # noqa: E402
from hdlm.sampling.samplers import Categorical  # noqa: E402

N, D, HF_ROWS, HF_BOS = 13, 12, 16, 14  # N real tokens < the HF model's 16 rows; its BOS is a token hdlm never uses


@pytest.fixture(autouse=True)
def float64_norms(monkeypatch):
    """transformers' RMSNorms round their input to float32 even in a float64 model, which turns 1e-16
    differences of summation order (SDPA vs eager attention, cached vs not) into 1e-7. Keep float64,
    identically on both sides of every comparison."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def rms(x, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    monkeypatch.setattr(LlamaRMSNorm, "forward", lambda self, x: self.weight * rms(x, self.variance_epsilon))
    monkeypatch.setattr(Gemma3RMSNorm, "forward", lambda self, x: rms(x, self.eps) * (1.0 + self.weight))


def hf_config(arch: str = "llama", vocab: int = HF_ROWS, bos: int = HF_BOS, softcap: float | None = None):
    common = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=bos, eos_token_id=0,
                  initializer_range=0.3, tie_word_embeddings=arch == "gemma3")
    if arch == "gemma3":  # one sliding and one global layer (different rotary bases), q/k norms, scaled embedding
        return transformers.Gemma3TextConfig(head_dim=4, query_pre_attn_scalar=4, sliding_window=32,
                                             layer_types=["sliding_attention", "full_attention"],
                                             final_logit_softcapping=softcap, **common)
    return transformers.LlamaConfig(**common)


def reference_lm(arch: str = "llama", seed: int = 0, **kw):
    """The HF model as transformers runs it (its SDPA attention, its own causal masks and cache)."""
    torch.manual_seed(seed)
    conf = hf_config(arch, **kw)
    conf._attn_implementation = "sdpa"  # eager attention softmaxes in float32
    lm = transformers.AutoModelForCausalLM.from_config(conf).double().eval()
    with torch.no_grad():  # RMSNorm weights start at 1 (Gemma: 0): move them so every weight matters
        for name, p in lm.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return lm


def convert_lm(ref, *, shift: int = 1, kind: str = "block", width: int = 4, proc: str = "epsilon", n: int = N,
               d: int = D, extra=()):
    """hdlm config + HFBackbone around a copy of ``ref`` (its document-start token is ``ref``'s BOS)."""
    cfg = load_config(None, [f"model.length={d}", f"model.vocab_size={n}", "model.time_conditioning=false",
                             f"model.configuration={'shifted' if shift else 'aligned'}", f"schedule.kind={kind}",
                             f"schedule.width={width}", f"process.kind={proc}", *extra])
    cfg = cfg.replace({"model.backbone": "hf", "model.hf_config": hf_config_dict(ref.config)})
    model = HFBackbone(cfg.model, copy.deepcopy(ref)).double().eval()
    model.init_special_rows(ref.config.bos_token_id)
    return cfg, model


def with_bos(y: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.full((y.shape[0], 1), HF_BOS), y], dim=1)


# --------------------------------------------------------------------------------------------
# the AR model, exactly


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_quench_shifted_cells_give_the_hf_models_own_logits_and_nll(arch):
    """Catches: wrong rotary positions for SHIFTED cells (p + 1), a BOS that is not the model's own
    document-start token, a mask or head that differs from the model's causal LM."""
    ref = reference_lm(arch)
    cfg, model = convert_lm(ref)
    y = torch.randint(N, (3, D))
    process = EpsilonHybrid(N, build_objective(cfg, N).process.noise, 0.01)
    cells, out_index = inference_cells(y, torch.ones(D, dtype=torch.float64), 0, D, process, 1, ar=True)
    with torch.no_grad():
        raw = model(cells.tokens, cells.sigma, cells.positions, dense_mask(cells.layout), keep=cells.keep,
                    out_index=out_index)
        logits = ref(with_bos(y[:, :-1])).logits
    assert (raw - logits[..., :N]).abs().max() <= 1e-10
    res = perplexity_bound(model, cfg, y, schedule=quench(D), progress=False)
    # HF's own loss: -log p(y) with p the softmax over the N real tokens hdlm predicts
    ce = F.cross_entropy(logits[..., :N].reshape(-1, N), y.reshape(-1), reduction="sum")
    assert res.estimator == "exact" and res.nll_per_token * res.n_tokens == pytest.approx(float(ce), rel=1e-10)


@pytest.mark.parametrize("with_prompt", [False, True], ids=["unconditional", "prompt"])
@pytest.mark.parametrize("kv_cache", [True, False], ids=["cache", "nocache"])
def test_ar_sampler_equals_hf_generate(with_prompt, kv_cache):
    """Greedy: token for token HF ``generate`` (its own KV cache). Seeded: HF's model and cache with
    hdlm's float64 draw from the same generator. Catches a wrong cache commit or BOS in AR decoding."""
    ref = reference_lm("llama", seed=1, vocab=N, bos=N - 1)  # every HF row is a real hdlm token here
    cfg, model = convert_lm(ref, kind="quench", width=1)
    process = EpsilonHybrid(N, build_objective(cfg, N).process.noise, 0.01)
    batch, prompt = 3, torch.tensor([[4, 7, 1], [0, 2, 9], [5, 5, 3]]) if with_prompt else None
    P = 3 if with_prompt else 0
    start = torch.cat([torch.full((batch, 1), N - 1), prompt], 1) if with_prompt else torch.full((batch, 1), N - 1)
    greedy = make_sampler("ar", process, top_k=1)
    out = generate(model, process, quench(D), greedy, batch, prompt=prompt, kv_cache=kv_cache, progress=False)
    hf = ref.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=D - P, do_sample=False,
                      min_new_tokens=D - P, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out.tokens, hf[:, 1:])
    # seeded sampling, with HF's own DynamicCache as the reference cache
    gen = torch.Generator().manual_seed(7)
    out = generate(model, process, quench(D), make_sampler("ar", process), batch, prompt=prompt,
                   generator=torch.Generator().manual_seed(7), kv_cache=kv_cache, progress=False)
    x, past, inp = start, transformers.DynamicCache(config=ref.config), start
    with torch.no_grad():
        while x.shape[1] < D + 1:
            logits = ref(inp, cache=past, use_cache=True).logits[:, -1, :N]
            inp = Categorical().sample_logits(logits, gen).unsqueeze(1)
            x = torch.cat([x, inp], 1)
    assert torch.equal(out.tokens, x[:, 1:])


# --------------------------------------------------------------------------------------------
# the hdlm machinery on the HF backbone


@pytest.mark.parametrize("kind", ["block", "slide"])
@pytest.mark.parametrize("proc", ["gamma", "epsilon"])
def test_training_layout_loss_equals_intervals_run_alone(kind, proc):
    """The DiT check of the efficient layout (tests/test_layout.py), on the HF backbone."""
    from test_layout import check_vectorised_loss_equals_intervals_run_alone

    cfg, model = convert_lm(reference_lm("llama", seed=2), kind=kind, proc=proc, n=11, d=16)
    torch.manual_seed(0)
    check_vectorised_loss_equals_intervals_run_alone(cfg, model, build_objective(cfg, 11), kind)


@pytest.mark.parametrize("arch,softcap", [("llama", None), ("gemma3", 0.7)])
def test_fused_chunked_head_loss_equals_unchunked_on_the_hf_backbone(arch, softcap):
    """The objective's fused head + loss (hdlm.head_loss.LinearHead: the soft-cap differentiated per
    chunk, the weight gradient accumulated in place) against the plain head, loss and backward:
    loss and every gradient within 1e-10 (float64), a soft-cap small enough to bend the logits."""
    cfg, model = convert_lm(reference_lm(arch, seed=3, softcap=softcap), kind="block", proc="gamma", n=11, d=16)
    assert model.softcap == softcap
    obj = build_objective(cfg, 11)
    y = torch.randint(11, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for chunk in (0, 2 * 11 * 3):  # unchunked; three positions per chunk
        obj.head_chunk = chunk
        model.zero_grad(set_to_none=True)
        loss, _ = obj(model, y, torch.tensor([1, 2]), 5)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (got, grads) = results
    assert ref_grads.keys() == grads.keys() and float(ref) != 0.0
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-10, rtol=0, msg=name)


CACHE_CASES = {
    "block": (block(D, 4), None, "causal"),
    "slide-rho2-prompt": (slide(D, 4, rho=2), [3, 1, 4, 1, 5], "causal"),
    "block-prompt-blockcausal": (block(D, 4), [3, 1, 4, 1, 5], "block"),
}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("case", list(CACHE_CASES))
@pytest.mark.parametrize("family", ["gamma", "epsilon"])
def test_cached_generation_equals_uncached(arch, case, family):
    """Same seed: identical tokens and logits within 1e-9 at every step, batch 3, with prompts
    (catches keys/values cached from the wrong cells or with the wrong rotary positions)."""
    hs, prompt, settled = CACHE_CASES[case]
    cfg, model = convert_lm(reference_lm(arch, seed=3), extra=[f"model.settled_attention={settled}"])
    noise = build_objective(cfg, N).process.noise
    if family == "gamma":
        process = GammaHybrid(N, noise, 0.1)
        sampler = make_sampler("analytic", process, temperature=0.9)
    else:
        process = EpsilonHybrid(N, noise, 0.1)
        sampler = make_sampler("acs", process, eta=0.2)
    prompt = None if prompt is None else torch.tensor(prompt)
    runs = []
    for kv_cache in (True, False):
        steps = []
        res = generate(model, process, hs, sampler, 3, prompt=prompt, generator=torch.Generator().manual_seed(5),
                       kv_cache=kv_cache, progress=False, callback=lambda s: steps.append((s.raw.clone(), s.n_cached)))
        runs.append((res, steps))
    (cached, c_steps), (plain, p_steps) = runs
    assert torch.equal(cached.tokens, plain.tokens) and int(cached.tokens.max()) < N
    assert len(c_steps) == len(p_steps) and any(n > 0 for _, n in c_steps)
    assert max((a - b).abs().max().item() for (a, _), (b, _) in zip(c_steps, p_steps)) < 1e-9


@pytest.mark.parametrize("kind,proc,hs,variational", [
    ("epsilon", dict(epsilon=0.2), block(3, 2), "forward"),
    ("epsilon", dict(epsilon=0.2), slide(3, 2), "absorb"),
    ("gamma", dict(gamma=0.2, noise="geometric", sigma_min=1e-3, sigma_max=1.0), block(3, 2), "forward")])
def test_discrete_bound_bounds_exact_nll_by_enumeration(kind, proc, hs, variational):
    """The DiT enumeration check (tests/test_likelihood.py) on a SHIFTED HF backbone, N = 2, d = 3."""
    import test_likelihood as tl

    ref = reference_lm("llama", seed=4, vocab=4, bos=3)
    cfg, model = convert_lm(ref, n=tl.N, d=tl.D, kind=hs.kind, width=2, proc=kind,
                            extra=[f"process.{k}={v}" for k, v in proc.items()])
    rc = ReverseChain.from_config(model, cfg, schedule=hs, kernel="posterior" if kind == "epsilon" else None)
    chain, dc = variational_chain(rc.process, variational), tl.DenseChain(cfg, variational)
    P = tl.kernels(rc)
    gaps = []
    for y in tl.REAL:
        nll = tl.exact_nll(P, dc.prior, y)
        bound = tl.library_bound(rc, chain, dc, y)
        assert bound == pytest.approx(tl.trajectory_nelbo(dc, hs, P, y), rel=1e-9, abs=1e-10)
        assert math.isfinite(bound) and bound >= nll - 1e-10
        gaps.append(bound - nll)
    assert max(gaps) > 1e-4


def test_time_conditioning_starts_at_zero_and_learns():
    """The optional σ̄ input is zero-initialised (the converted model is still the AR model) but trainable."""
    ref = reference_lm("llama", seed=5)
    cfg, plain = convert_lm(ref)
    cfg_t, timed = convert_lm(ref, extra=["model.time_conditioning=true"])
    timed.noise_embedding.double()
    y = torch.randint(N, (2, D))
    obj = build_objective(cfg_t, N)
    loss, _ = obj(timed, y, torch.tensor([1, 2]), 3)
    with torch.no_grad():
        ref_loss, _ = build_objective(cfg, N)(plain, y, torch.tensor([1, 2]), 3)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    loss.backward()
    assert timed.noise_proj.weight.grad.abs().sum() > 0


def test_build_model_and_errors():
    ref = reference_lm("llama")
    cfg, model = convert_lm(ref)
    rebuilt = build_model(cfg.model).double().eval()  # the architecture from model.hf_config alone
    rebuilt.load_state_dict(model.state_dict())
    y = with_bos(torch.randint(N, (2, D - 1)))
    with torch.no_grad():
        assert torch.equal(rebuilt(y, None), model(y, None))
    from hdlm.errors import HDLMError

    with pytest.raises(HDLMError, match="hf_config"):
        build_model(cfg.replace({"model.hf_config": None}).model)
    with pytest.raises(HDLMError, match="embedding/head rows"):
        HFBackbone(cfg.replace({"model.vocab_size": HF_ROWS + 1}).model, copy.deepcopy(ref))
    with pytest.raises(HDLMError, match="sliding window"):
        convert_lm(reference_lm("gemma3"), d=40)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_block_sparse_attention_equals_dense_on_the_hf_backbone(arch, monkeypatch):
    """hdlm.sparse_attention through the HF layers (grouped-query keys, the model's own scale):
    the training loss and every gradient equal dense SDPA's (float64)."""
    cfg, model = convert_lm(reference_lm(arch, seed=3), kind="block", proc="gamma", n=11, d=16)
    obj = build_objective(cfg, 11)
    y = torch.randint(11, (2, 16), generator=torch.Generator().manual_seed(4))
    import hdlm.hf_backbone as hf_backbone

    calls, sparse_fn = [], hf_backbone.block_sparse_attention
    monkeypatch.setattr(hf_backbone, "block_sparse_attention", lambda *a, **kw: calls.append(1) or sparse_fn(*a, **kw))
    results = {}
    for mode in ("dense", "sparse"):
        monkeypatch.setenv("HDLM_ATTENTION", mode)
        model.zero_grad(set_to_none=True)
        loss, _ = obj(model, y, torch.tensor([1, 2]), 3)
        loss.backward()
        results[mode] = [loss.detach()] + [p.grad for p in model.parameters() if p.grad is not None]
    assert len(calls) == 2 and len(results["dense"]) == len(results["sparse"]) > 1  # one call per layer
    for a, b in zip(results["dense"], results["sparse"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
