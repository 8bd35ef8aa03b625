"""The DiT backbone and its KV cache (paper §2.3, App. B.4; DESIGN.md §4, §5, §9).

Tiny models in float64 with every weight perturbed away from its (partly zero) init, so that
adaLN, the gates and the head all matter and no check is vacuous.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hdlm import masks
from hdlm.config import ModelConfig
from hdlm.errors import HDLMError
from hdlm.masks import clean_layout, concat_layouts, dense_mask, interval_layout
from hdlm.model import HDLMTransformer, KVCache

N = 11
MASK, BOS = N, N + 1


def tiny_model(shift: int = 0, settled: str = "causal", **overrides) -> HDLMTransformer:
    cfg = ModelConfig(vocab_size=N, length=16, n_layers=2, hidden=16, n_heads=2, mlp_ratio=2, cond_dim=8,
                      dropout=0.0, pad_vocab_to=8, configuration="shifted" if shift else "aligned",
                      settled_attention=settled, **overrides)
    torch.manual_seed(0)
    model = HDLMTransformer(cfg).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # leave adaLN-Zero: every modulation, gate and the head non-zero
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def cell_tokens(layout, clean_y: torch.Tensor, noisy_x: torch.Tensor | None = None) -> torch.Tensor:
    """Input token of each cell: BOS at p = -1, y at clean cells, x (noisy state) at noisy cells."""
    B = clean_y.shape[0]
    out = torch.empty(B, len(layout), dtype=torch.long)
    for c, (p, s) in enumerate(zip(layout.pos.tolist(), layout.seg.tolist())):
        if p < 0:
            out[:, c] = BOS
        else:
            out[:, c] = clean_y[:, p] if s == 0 or noisy_x is None else noisy_x[:, p]
    return out


@pytest.mark.parametrize("shift,settled", [(1, "causal"), (0, "causal"), (1, "block")])
def test_settled_cells_are_causal(shift, settled):
    """Over clean cells, the output of the cell with input position p depends only on inputs at
    p' <= p (token-causal), or on the inputs of its own and earlier blocks (block-causal):
    perturbing the token and σ̄ of the cell at input position j never moves an output it may not see."""
    w = 3
    model = tiny_model(shift, settled)
    d = 9
    lay = clean_layout(d, shift, settled_attention=settled, block_width=w)
    mask = dense_mask(lay)
    gen = torch.Generator().manual_seed(2)
    y = torch.randint(0, N, (2, d), generator=gen)
    tokens = cell_tokens(lay, y)
    sigma = torch.rand(2, d, generator=gen, dtype=torch.float64) * 3
    with torch.no_grad():
        base = model(tokens, sigma, lay.target, mask)
        base_dense = model(tokens, sigma, lay.target, None)
        for j in range(d - shift):
            cell = j + shift  # the cell whose input position is j
            t2, s2 = tokens.clone(), sigma.clone()
            t2[:, cell] = (t2[:, cell] + 1) % N
            s2[:, cell] += 0.7
            out = model(t2, s2, lay.target, mask)
            diff = (out - base).abs().amax(dim=(0, 2))  # per cell
            p = lay.pos
            if settled == "causal":
                blind = p < j
            else:
                blind = (p + shift) // w < (j + shift) // w
            if blind.any():
                assert diff[blind].max().item() < 1e-12
            assert diff[cell] > 1e-6  # the cell itself sees its input: not vacuous
            if settled == "block" and (j + shift) % w:
                assert diff[cell - 1] > 1e-6  # an earlier cell of the same block sees it
            if j > 0:  # without the mask the same perturbation does leak backwards: the test can fail
                leak = (model(t2, s2, lay.target, None) - base_dense).abs().amax(dim=(0, 2))
                assert leak[:cell].max() > 1e-6


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("settled", ["causal", "block"])
@pytest.mark.parametrize("last_commit", [False, True])
def test_kv_cache_matches_uncached(shift, settled, last_commit):
    """Clean prefix committed to the cache in chunks, then the active interval against the cache,
    equals one uncached forward over prefix ⁀ interval with the equivalent dense mask (batch 3)."""
    w, d, s, e, B = 4, 12, 8, 12, 3
    model = tiny_model(shift, settled)
    kw = dict(settled_attention=settled, block_width=w)
    full = masks.inference_layout(s, e, shift, d, **kw)
    lay_clean, interval = full[:s], full[s:]
    gen = torch.Generator().manual_seed(3 + shift)
    y = torch.randint(0, N, (B, d), generator=gen)
    noise = torch.randint(0, N, (B, d), generator=gen)
    x = torch.where(torch.rand(B, d, generator=gen) < 0.5, torch.full_like(y, MASK), noise)
    x[:, :s] = y[:, :s]  # settled positions are clean (SHIFTED's interval repeats y[s-1])
    tokens = cell_tokens(full, y, x)
    sigma = torch.zeros(B, len(full), dtype=torch.float64)
    sigma[:, s:] = torch.rand(B, len(full) - s, generator=gen, dtype=torch.float64) * 4
    keep = torch.rand(B, len(full), generator=gen, dtype=torch.float64)

    chunks = [(0, 3), (3, 8)] if settled == "causal" else [(0, 4), (4, 8)]  # block: whole blocks only
    with torch.no_grad():
        ref = model(tokens, sigma, full.target, dense_mask(full), keep=keep)
        cache = model.new_cache(B, max_len=len(full) + 2)
        assert isinstance(cache, KVCache) and cache.k[0].dtype == torch.float64
        outs, done = [], 0
        pieces = chunks[:-1] if last_commit else chunks
        for a, b in pieces:
            q = lay_clean[a:b]
            outs.append(model(tokens[:, a:b], sigma[:, a:b], q.target, dense_mask(q, lay_clean[:b]),
                              keep=keep[:, a:b], cache=cache, commit=b - a))
            assert cache.length == b
            done = b
        q = concat_layouts(lay_clean[done:], interval)
        mask = dense_mask(q, concat_layouts(lay_clean[:done], q))
        outs.append(model(tokens[:, done:], sigma[:, done:], q.target, mask, keep=keep[:, done:],
                          cache=cache, commit=s - done))
        assert cache.length == s
        got = torch.cat(outs, dim=1)
    assert (got - ref).abs().max().item() < 1e-10
    assert ref[:, s:].abs().max() > 1e-3  # non-trivial outputs

    # a second step against the same cache (commit=0 left it at s) gives the same again
    with torch.no_grad():
        again = model(tokens[:, s:], sigma[:, s:], interval.target,
                      dense_mask(interval, concat_layouts(lay_clean, interval)), keep=keep[:, s:], cache=cache)
    assert (again - ref[:, s:]).abs().max().item() < 1e-10
    assert cache.length == s


def test_cache_reset_truncate_and_room():
    model = tiny_model()
    cache = model.new_cache(batch=2, max_len=6)
    lay = clean_layout(4, 0)
    tok = torch.randint(0, N, (2, 4))
    sig = torch.zeros(2, 4, dtype=torch.float64)
    with torch.no_grad():
        full = model(tok, sig, lay.target, dense_mask(lay))
        model(tok, sig, lay.target, dense_mask(lay), cache=cache, commit=4)
        assert cache.length == 4
        cache.truncate(2)  # forget cells 2, 3 and recompute them against the first two
        q = lay[2:]
        out = model(tok[:, 2:], sig[:, 2:], q.target, dense_mask(q, lay), cache=cache, commit=2)
        assert (out - full[:, 2:]).abs().max() < 1e-12
        with pytest.raises(HDLMError, match="too short"):
            model(tok, sig, lay.target, dense_mask(lay, concat_layouts(lay, lay)), cache=cache)
        with pytest.raises(ValueError):
            cache.truncate(5)
        cache.reset()
        assert cache.length == 0
        with pytest.raises(ValueError, match="batch"):
            model(tok[:1], sig[:1], lay.target, dense_mask(lay), cache=cache)
        with pytest.raises(ValueError, match="shape"):
            model(tok, sig, lay.target, dense_mask(lay[:3]))


def test_out_index_equals_slicing():
    model = tiny_model(1)
    lay = concat_layouts(clean_layout(6, 1), interval_layout(3, 6, 1, 1))
    gen = torch.Generator().manual_seed(4)
    tok = torch.randint(0, N + 2, (3, len(lay)), generator=gen)
    sig = torch.rand(3, len(lay), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        full = model(tok, sig, lay.target, dense_mask(lay))
        idx = torch.tensor([7, 2, 9])
        assert torch.allclose(model(tok, sig, lay.target, dense_mask(lay), out_index=idx), full[:, idx],
                              atol=1e-12, rtol=0)
        idx2 = torch.tensor([[0, 1], [5, 9], [9, 3]])
        got = model(tok, sig, lay.target, dense_mask(lay), out_index=idx2)
        want = torch.stack([full[b, idx2[b]] for b in range(3)])
        assert torch.allclose(got, want, atol=1e-12, rtol=0)
        # (B, L) positions equal to the broadcast (L,) ones give the same output
        pos2 = lay.target.expand(3, -1)
        assert torch.allclose(model(tok, sig, pos2, dense_mask(lay)), full, atol=1e-12, rtol=0)
    assert full.shape == (3, len(lay), N)


def test_rotary_is_a_complex_rotation():
    """Rotary (Su et al.): feature pairs (i, i + D/2) rotate by the angle p * 10000^(-2i/D)."""
    from hdlm.model import apply_rotary, rotary_cos_sin

    D = 8
    x = torch.randn(2, 3, 5, D, dtype=torch.float64)
    pos = torch.tensor([0, 1, 7, 30, 1023])
    cos, sin = rotary_cos_sin(pos, D, torch.float64)
    got = apply_rotary(x, cos, sin)
    theta = torch.tensor([10000.0 ** (-2 * i / D) for i in range(D // 2)], dtype=torch.float64)
    z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * torch.exp(1j * pos[:, None].double() * theta)
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], dim=-1), atol=1e-12, rtol=0)


def test_positions_are_relative_and_matter():
    model = tiny_model()
    lay = concat_layouts(clean_layout(5, 0), interval_layout(2, 5, 1, 0))
    tok = torch.randint(0, N + 1, (2, len(lay)))
    sig = torch.rand(2, len(lay), dtype=torch.float64)
    mask = dense_mask(lay)
    with torch.no_grad():
        a = model(tok, sig, lay.target, mask)
        b = model(tok, sig, lay.target + 100, mask)  # a common offset: same relative positions
        moved = lay.target.clone()
        moved[6] += 1
        c = model(tok, sig, moved, mask)
    assert (a - b).abs().max() < 1e-10
    assert (a - c).abs().max() > 1e-6


def test_weighted_embedding_is_used():
    model = tiny_model()
    tok = torch.randint(0, N, (1, 5))
    sig = torch.rand(1, 5, dtype=torch.float64)
    lay = clean_layout(5, 0)
    with torch.no_grad():
        plain = model(tok, sig, lay.target, None)
        ones = model(tok, sig, lay.target, None, keep=torch.ones(1, 5, dtype=torch.float64))
        zeros = model(tok, sig, lay.target, None, keep=torch.zeros(1, 5, dtype=torch.float64))
        masked = model(torch.full_like(tok, MASK), sig, lay.target, None)
    assert torch.allclose(plain, ones, atol=1e-12)
    assert torch.allclose(zeros, masked, atol=1e-12)  # keep = 0 embeds as MASK (Eq. 12)


def test_without_time_conditioning():
    model = tiny_model(time_conditioning=False)
    assert not any("adaLN" in name or "noise_embedding" in name for name, _ in model.named_parameters())
    tok = torch.randint(0, N, (2, 5))
    lay = clean_layout(5, 0)
    with torch.no_grad():
        a = model(tok, torch.rand(2, 5, dtype=torch.float64), lay.target, dense_mask(lay))
        b = model(tok, None, lay.target, dense_mask(lay))
    assert torch.equal(a, b)
    assert a.shape == (2, 5, N) and a.abs().max() > 1e-3


def test_sigma_conditions_each_cell():
    model = tiny_model()
    tok = torch.randint(0, N, (1, 4))
    sig = torch.rand(1, 4, dtype=torch.float64)
    with torch.no_grad():
        a = model(tok, sig, None, None)
        sig2 = sig.clone()
        sig2[0, 2] += 1.0
        b = model(tok, sig2, None, None)
    assert (a - b).abs().max() > 1e-6


def test_tied_head_and_padding():
    model = tiny_model(tie_embeddings=True)
    untied = tiny_model()
    assert model.token_embedding.shape[0] == 16  # N + 2 = 13 rows padded to a multiple of 8
    assert untied.token_embedding.shape[0] == N + 2 and untied.head.weight.shape[0] == 16
    assert model.num_parameters() < untied.num_parameters()
    with torch.no_grad():
        out = model(torch.randint(0, N, (2, 3)), torch.rand(2, 3, dtype=torch.float64), None, None)
    assert out.shape == (2, 3, N)


def test_flex_block_mask_path_matches_sdpa():
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = tiny_model(1).float()
    lay = concat_layouts(clean_layout(8, 1), interval_layout(2, 6, 1, 1), interval_layout(5, 8, 2, 1))
    tok = torch.randint(0, N + 2, (2, len(lay)))
    sig = torch.rand(2, len(lay))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention on CPU warns that it is unfused
        a = model(tok, sig, lay.target, dense_mask(lay))
        b = model(tok, sig, lay.target, masks.flex_block_mask(lay, device="cpu"))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_zero_vocab_is_a_clear_error():
    with pytest.raises(HDLMError, match="vocab_size"):
        HDLMTransformer(ModelConfig(vocab_size=0))


def paper_config() -> ModelConfig:
    return ModelConfig(vocab_size=50257, length=1024, n_layers=12, hidden=768, n_heads=12, mlp_ratio=4,
                       cond_dim=128, tie_embeddings=False, pad_vocab_to=64)


def test_paper_size_parameter_count():
    """SEDD/MDLM "small" DiT (12 x 768, 12 heads, cond 128, GPT-2 vocabulary, untied): counted by hand.

    The published total for that DiT with vocabulary 50258 is 169.6M (≈ 92M in the blocks);
    here V = N + 2 = 50259 embedding rows and the head is padded to 50304 rows.
    """
    with torch.device("meta"):
        model = HDLMTransformer(paper_config())
    h, c, r, n_layers = 768, 128, 4, 12
    block = 3 * h * h + h * h + (h * r * h + r * h) + (r * h * h + h) + (c * 6 * h + 6 * h) + 2 * h
    noise = 256 * c + c + c * c + c
    final = h + (c * 2 * h + 2 * h) + (h * 50304 + 50304)
    embed = 50259 * h
    assert model.num_parameters() == n_layers * block + noise + final + embed
    assert abs(model.num_parameters() - 169.6e6) / 169.6e6 < 0.01
    assert model.num_parameters(non_embedding=True) == n_layers * block + noise + final - h * 50304


def test_paper_size_forward_on_cpu():
    torch.manual_seed(0)
    model = HDLMTransformer(paper_config()).eval()
    lay = clean_layout(32, 1)
    tok = cell_tokens(lay, torch.randint(0, 50257, (1, 32)))
    with torch.no_grad():
        out = model(tok, torch.rand(1, 32), lay.target, dense_mask(lay), out_index=torch.arange(24, 32))
    assert out.shape == (1, 8, 50257) and torch.isfinite(out).all()
