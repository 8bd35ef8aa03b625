"""Attention masks from cell metadata (paper §3.3, App. B.3-B.4, Fig. 7-10).

References are independent of hdlm.masks: a brute-force double loop over Python ints that
restates the rule, hand-drawn matrices of the paper's figures, and the explicit-softmax
attention computed here.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from hdlm import masks
from hdlm.errors import HDLMError
from hdlm.masks import CellLayout, clean_layout, concat_layouts, dense_mask, interval_layout


def brute_force(q: CellLayout, k: CellLayout) -> torch.Tensor:
    """The rule of docs/architecture.md, cell pair by cell pair."""
    shift, kind, w = q.shift, q.settled_attention, q.block_width
    out = torch.zeros(len(q), len(k), dtype=torch.bool)
    for a, (qp, qs, qj) in enumerate(zip(q.pos.tolist(), q.seg.tolist(), q.start.tolist())):
        for b, (kp, ks) in enumerate(zip(k.pos.tolist(), k.seg.tolist())):
            if qs == 0 and ks == 0:
                ok = kp <= qp if kind == "causal" else (kp + shift) // w <= (qp + shift) // w
            elif qs != 0 and ks == 0:
                ok = kp < qj - shift
            elif qs != 0 and ks != 0:
                ok = qs == ks
            else:
                ok = False
            out[a, b] = ok
    return out


def random_case(rng: random.Random, shift: int, kind: str, cached: bool):
    """(query layout, key layout): a clean part plus several noisy intervals, optionally with a
    clean cached prefix on the key side and the query cells in a shuffled order."""
    d = rng.randint(4, 14)
    w = rng.randint(1, 5)
    kw = dict(settled_attention=kind, block_width=w)
    n_cached = rng.randint(0, d) if cached else 0
    clean = clean_layout(d, shift, **kw)
    parts = [clean[n_cached:]]
    for seg in range(1, rng.randint(1, 4) + 1):
        j = rng.randint(0, d - 1)
        parts.append(interval_layout(j, min(j + w, d), seg, shift, **kw))
    new = concat_layouts(*parts)
    if rng.random() < 0.5:  # the rule must not depend on cell order
        new = new[torch.randperm(len(new), generator=torch.Generator().manual_seed(rng.randint(0, 10**6)))]
    kv = concat_layouts(clean[:n_cached], new)
    return new, kv


CASES = [(shift, kind, cached) for shift in (0, 1) for kind in ("causal", "block") for cached in (False, True)]


@pytest.mark.parametrize("shift,kind,cached", CASES)
def test_dense_mask_matches_brute_force(shift, kind, cached):
    rng = random.Random(100 * shift + 10 * (kind == "block") + cached)
    for _ in range(12):
        q, kv = random_case(rng, shift, kind, cached)
        assert torch.equal(dense_mask(q, kv), brute_force(q, kv))


def _flex_or_skip():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"this torch build has no FlexAttention: {e}")
    return create_block_mask, flex_attention


@pytest.mark.parametrize("shift,kind,cached", CASES)
def test_backends_agree(shift, kind, cached):
    """SDPA + dense mask, explicit softmax and FlexAttention (eager, CPU forward) give the same output."""
    create_block_mask, flex_attention = _flex_or_skip()
    rng = random.Random(7 + 100 * shift + 10 * (kind == "block") + cached)
    gen = torch.Generator().manual_seed(rng.randint(0, 10**6))
    for trial in range(2):
        q_lay, kv_lay = random_case(rng, shift, kind, cached)
        Lq, Lk = len(q_lay), len(kv_lay)
        q = torch.randn(2, 3, Lq, 8, generator=gen)
        k, v = torch.randn(2, 3, Lk, 8, generator=gen), torch.randn(2, 3, Lk, 8, generator=gen)
        mask = dense_mask(q_lay, kv_lay)
        # explicit softmax, written here
        scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
        ref = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        naive = masks.naive_attention(q, k, v, mask)
        if trial == 0:  # FlexAttention's own builder on the rule ...
            block_mask = create_block_mask(masks.mask_mod_from(q_lay, kv_lay), B=None, H=None, Q_LEN=Lq,
                                           KV_LEN=Lk, device="cpu")
        else:  # ... and the cached builder of hdlm.masks
            block_mask = masks.flex_block_mask(q_lay, kv_lay, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile": expected on CPU
            flex = flex_attention(q, k, v, block_mask=block_mask)
        for out in (sdpa, naive, flex):
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_naive_attention_against_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    v = torch.tensor([[1.0], [2.0], [4.0]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out = masks.naive_attention(q, k, v, mask)
    # query 0 scores keys 0 and 2 both 1/sqrt(2): equal weights, (1 + 4) / 2
    torch.testing.assert_close(out[0], torch.tensor([2.5]))
    torch.testing.assert_close(out[1], torch.tensor([0.0]))  # attends to nothing -> zero


def parse(picture: str) -> torch.Tensor:
    rows = [line.replace(" ", "") for line in picture.strip().splitlines()]
    return torch.tensor([[c == "x" for c in row] for row in rows])


# Fig. 7: ALIGNED, slide, d = 12, omega = 4, intervals starting at j in {2, 5, 11}; token-causal.
# Columns: 12 clean cells (p = 0..11) | interval j=2 (p = 2..5) | j=5 (p = 5..8) | j=11 (p = 11).
FIG7 = """
x........... .... .... .
xx.......... .... .... .
xxx......... .... .... .
xxxx........ .... .... .
xxxxx....... .... .... .
xxxxxx...... .... .... .
xxxxxxx..... .... .... .
xxxxxxxx.... .... .... .
xxxxxxxxx... .... .... .
xxxxxxxxxx.. .... .... .
xxxxxxxxxxx. .... .... .
xxxxxxxxxxxx .... .... .
xx.......... xxxx .... .
xx.......... xxxx .... .
xx.......... xxxx .... .
xx.......... xxxx .... .
xxxxx....... .... xxxx .
xxxxx....... .... xxxx .
xxxxx....... .... xxxx .
xxxxx....... .... xxxx .
xxxxxxxxxxx. .... .... x
"""

# Fig. 9: SHIFTED, slide, same intervals. Clean cells p = -1 (BOS) .. 10; an interval with targets
# [j, min(j+4, 12)) has inputs p = j-1 .. min(j+4, 12)-1 (first repeats the last settled token).
FIG9 = """
x........... ..... ..... ..
xx.......... ..... ..... ..
xxx......... ..... ..... ..
xxxx........ ..... ..... ..
xxxxx....... ..... ..... ..
xxxxxx...... ..... ..... ..
xxxxxxx..... ..... ..... ..
xxxxxxxx.... ..... ..... ..
xxxxxxxxx... ..... ..... ..
xxxxxxxxxx.. ..... ..... ..
xxxxxxxxxxx. ..... ..... ..
xxxxxxxxxxxx ..... ..... ..
xx.......... xxxxx ..... ..
xx.......... xxxxx ..... ..
xx.......... xxxxx ..... ..
xx.......... xxxxx ..... ..
xx.......... xxxxx ..... ..
xxxxx....... ..... xxxxx ..
xxxxx....... ..... xxxxx ..
xxxxx....... ..... xxxxx ..
xxxxx....... ..... xxxxx ..
xxxxx....... ..... xxxxx ..
xxxxxxxxxxx. ..... ..... xx
xxxxxxxxxxx. ..... ..... xx
"""

# Fig. 8: ALIGNED, block, j in {0, 4, 8}, block-causal settled attention.
FIG8 = """
xxxx........ .... .... ....
xxxx........ .... .... ....
xxxx........ .... .... ....
xxxx........ .... .... ....
xxxxxxxx.... .... .... ....
xxxxxxxx.... .... .... ....
xxxxxxxx.... .... .... ....
xxxxxxxx.... .... .... ....
xxxxxxxxxxxx .... .... ....
xxxxxxxxxxxx .... .... ....
xxxxxxxxxxxx .... .... ....
xxxxxxxxxxxx .... .... ....
............ xxxx .... ....
............ xxxx .... ....
............ xxxx .... ....
............ xxxx .... ....
xxxx........ .... xxxx ....
xxxx........ .... xxxx ....
xxxx........ .... xxxx ....
xxxx........ .... xxxx ....
xxxxxxxx.... .... .... xxxx
xxxxxxxx.... .... .... xxxx
xxxxxxxx.... .... .... xxxx
xxxxxxxx.... .... .... xxxx
"""

# Fig. 10: SHIFTED, block, j in {0, 4, 8}, block-causal: the BOS cell and p = 0..2 predict block 0.
FIG10 = """
xxxx........ ..... ..... .....
xxxx........ ..... ..... .....
xxxx........ ..... ..... .....
xxxx........ ..... ..... .....
xxxxxxxx.... ..... ..... .....
xxxxxxxx.... ..... ..... .....
xxxxxxxx.... ..... ..... .....
xxxxxxxx.... ..... ..... .....
xxxxxxxxxxxx ..... ..... .....
xxxxxxxxxxxx ..... ..... .....
xxxxxxxxxxxx ..... ..... .....
xxxxxxxxxxxx ..... ..... .....
............ xxxxx ..... .....
............ xxxxx ..... .....
............ xxxxx ..... .....
............ xxxxx ..... .....
............ xxxxx ..... .....
xxxx........ ..... xxxxx .....
xxxx........ ..... xxxxx .....
xxxx........ ..... xxxxx .....
xxxx........ ..... xxxxx .....
xxxx........ ..... xxxxx .....
xxxxxxxx.... ..... ..... xxxxx
xxxxxxxx.... ..... ..... xxxxx
xxxxxxxx.... ..... ..... xxxxx
xxxxxxxx.... ..... ..... xxxxx
xxxxxxxx.... ..... ..... xxxxx
"""


def figure_layout(shift: int, kind: str, starts: list[int], d: int = 12, w: int = 4) -> CellLayout:
    kw = dict(settled_attention=kind, block_width=w)
    parts = [clean_layout(d, shift, **kw)]
    parts += [interval_layout(j, min(j + w, d), n + 1, shift, **kw) for n, j in enumerate(starts)]
    return concat_layouts(*parts)


@pytest.mark.parametrize("picture,shift,kind,starts", [
    (FIG7, 0, "causal", [2, 5, 11]),
    (FIG9, 1, "causal", [2, 5, 11]),
    (FIG8, 0, "block", [0, 4, 8]),
    (FIG10, 1, "block", [0, 4, 8]),
])
def test_paper_figures(picture, shift, kind, starts):
    lay = figure_layout(shift, kind, starts)
    expected = parse(picture)
    assert expected.shape == (len(lay), len(lay))
    assert torch.equal(dense_mask(lay), expected)


def test_shifted_interval_inputs():
    """SHIFTED: an interval's first input repeats the last settled token (BOS at j = 0), and its
    last cell predicts the position after the window (dropped by the caller)."""
    lay = interval_layout(0, 4, 1, shift=1)
    assert lay.pos.tolist() == [-1, 0, 1, 2, 3]
    assert lay.target.tolist() == [0, 1, 2, 3, 4]
    assert clean_layout(3, 1).pos.tolist() == [-1, 0, 1]
    assert clean_layout(3, 0).pos.tolist() == [0, 1, 2]


@pytest.mark.parametrize("shift", [0, 1])
def test_inference_layout_and_cache_side(shift):
    """One generation step: the active window sees every settled cell and itself; with the settled
    cells cached, the mask over (window) x (cache ⁀ window) is the matching block of the full one."""
    s, e, d = 6, 10, 12
    lay = masks.inference_layout(s, e, shift, d)
    assert lay.pos.tolist() == list(range(-shift, s - shift)) + list(range(s - shift, e))
    assert (lay.seg == 0).sum().item() == s
    full = dense_mask(lay)
    window = lay[s:]
    cached = dense_mask(window, concat_layouts(lay[:s], window))
    assert cached.shape == (e - s + shift, e + shift)
    assert cached.all()  # dense on settled ⁀ active
    assert torch.equal(cached, full[s:])
    with pytest.raises(HDLMError):
        masks.inference_layout(7, 5, shift, d)


def test_mask_cache_reuses_and_keys_on_contents():
    a = masks.inference_layout(3, 7, 1, 8)
    b = masks.inference_layout(3, 7, 1, 8)  # equal contents, different tensors
    assert dense_mask(a) is dense_mask(b)
    c = masks.inference_layout(4, 7, 1, 8)
    assert c.pos.shape == a.pos.shape  # same length, different metadata: a different mask
    assert not torch.equal(dense_mask(c), dense_mask(a))
    assert torch.equal(dense_mask(c), brute_force(c, c))
    blocky = masks.inference_layout(3, 7, 1, 8, settled_attention="block", block_width=4)
    assert not torch.equal(dense_mask(blocky), dense_mask(a))


def test_layouts_must_agree():
    with pytest.raises(ValueError):
        concat_layouts(clean_layout(3, 0), clean_layout(3, 1))
    with pytest.raises(HDLMError):
        clean_layout(3, 0, settled_attention="diagonal")
