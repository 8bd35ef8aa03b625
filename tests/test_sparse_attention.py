"""Block-sparse attention (hdlm.sparse_attention, issue #16.2) against dense SDPA and the explicit softmax.

References are independent of the tiling: dense SDPA with the full boolean mask, and
masks.naive_attention (explicit softmax). Everything in float64, outputs and gradients, on the
efficient training layout and the inference layouts of every hyperschedule kind, ALIGNED and
SHIFTED, with odd sizes and a tile that does not divide the layout.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hdlm import masks, sparse_attention
from hdlm.config import load_config
from hdlm.errors import HDLMError
from hdlm.layout import attention_mask
from hdlm.masks import inference_layout, naive_attention
from hdlm.model import HDLMTransformer
from hdlm.objective import build_objective
from hdlm.sparse_attention import BlockSparseMask, block_sparse_attention, plan

N = 13


def _cfg(kind: str, conf: str, d: int, width: int, *extra: str):
    return load_config(None, [f"model.length={d}", f"model.vocab_size={N}", "model.n_layers=2", "model.hidden=32",
                              "model.n_heads=2", "model.cond_dim=16", "model.dropout=0", f"schedule.kind={kind}",
                              f"schedule.width={width}", f"model.configuration={conf}", "process.kind=gamma",
                              *extra])


def _training_layout(kind: str, conf: str, d: int = 23, width: int = 5, settled: str = "causal"):
    cfg = _cfg(kind, conf, d, width, f"model.settled_attention={settled}")
    obj = build_objective(cfg, N)
    y = torch.randint(N, (2, d), generator=torch.Generator().manual_seed(3))
    return obj.cells(y, torch.tensor([4, 5]), 7).cells.layout


def _check_against_references(mask: torch.Tensor, planned: BlockSparseMask, B: int = 2, H: int = 3, D: int = 8):
    """block-sparse == dense SDPA == explicit softmax, outputs and gradients w.r.t. q, k, v (float64)."""
    gen = torch.Generator().manual_seed(mask.shape[0] * 31 + mask.shape[1])
    Lq, Lk = mask.shape
    leaves = [torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for L in (Lq, Lk, Lk)]
    upstream = torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64)
    results = []
    for fn in (lambda q, k, v: block_sparse_attention(q, k, v, planned),
               lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
               lambda q, k, v: naive_attention(q, k, v, mask)):
        q, k, v = (t.clone().requires_grad_(True) for t in leaves)
        out = fn(q, k, v)
        out.backward(upstream)
        results.append([out.detach(), q.grad, k.grad, v.grad])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["block", "slide", "flat", "quench"])
@pytest.mark.parametrize("conf", ["aligned", "shifted"])
@pytest.mark.parametrize("settled", ["causal", "block"])
def test_block_sparse_equals_dense_on_the_efficient_training_layout(kind, conf, settled):
    lay = _training_layout(kind, conf, settled=settled)
    mask = masks.dense_mask(lay, lay)
    for tile in (4, 7, 1000):  # tiles that do not divide the layout, and one tile per segment
        planned = plan(mask, lay.seg, tile)
        assert all(len(set(lay.seg[t.lo:t.hi].tolist())) == 1 for t in planned.tiles)  # never straddles
        _check_against_references(mask, planned)


@pytest.mark.parametrize("conf", ["aligned", "shifted"])
@pytest.mark.parametrize("settled,width", [("causal", 1), ("block", 4)])
def test_block_sparse_equals_dense_on_inference_layouts(conf, settled, width):
    shift = 1 if conf == "shifted" else 0
    for settled_end, active_end in ((0, 5), (7, 11), (13, 17), (17, 17)):
        lay = inference_layout(settled_end, active_end, shift, 17, settled_attention=settled, block_width=width)
        if len(lay) == 0:
            continue
        mask = masks.dense_mask(lay, lay)
        _check_against_references(mask, plan(mask, lay.seg, 3))


def test_fully_masked_rows_and_empty_tiles_are_handled_like_dense():
    """Rows (and whole tiles) that may attend nothing get what dense SDPA gives them: zeros."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(19, 23, generator=gen) < 0.3
    mask[2] = False
    mask[7:11] = False  # a whole tile (19 rows cut evenly in tiles of <= 4: 0, 3, 7, 11, 15) with no key
    planned = plan(mask, None, 4)
    assert any(t.mask is not None and not t.mask.any() for t in planned.tiles)
    _check_against_references(mask, planned)


def test_plan_keeps_only_needed_keys_and_counts_them():
    """The tiles compute every allowed pair, and on the efficient layout far fewer than all pairs."""
    lay = _training_layout("block", "aligned", d=64, width=16)
    mask = masks.dense_mask(lay, lay)
    planned = plan(mask, lay.seg, 16)
    covered = torch.zeros_like(mask)
    for t in planned.tiles:
        covered[t.lo:t.hi, t.keys] = True
        allowed = mask[t.lo:t.hi, t.keys]
        assert (t.mask is None and bool(allowed.all())) or torch.equal(t.mask, allowed)
    assert torch.equal(covered & mask, mask)
    assert planned.computed == int(covered.sum())
    assert int(mask.sum()) <= planned.computed < 0.5 * mask.numel()


def test_attention_mask_chooses_sparse_for_long_layouts_and_obeys_the_switch(monkeypatch):
    long_lay = _training_layout("block", "aligned", d=sparse_attention.MIN_CELLS, width=64)
    short_lay = _training_layout("block", "aligned", d=16, width=4)
    monkeypatch.delenv(sparse_attention.ENV, raising=False)
    auto = attention_mask(long_lay, long_lay)
    assert isinstance(auto, BlockSparseMask) and auto.fraction <= sparse_attention.MAX_FRACTION
    assert torch.equal(auto.dense, masks.dense_mask(long_lay, long_lay))
    assert isinstance(attention_mask(short_lay, short_lay), torch.Tensor)  # too short to pay
    assert isinstance(attention_mask(short_lay, short_lay, mode="sparse"), BlockSparseMask)
    monkeypatch.setenv(sparse_attention.ENV, "dense")
    assert isinstance(attention_mask(long_lay, long_lay), torch.Tensor)
    monkeypatch.setenv(sparse_attention.ENV, "fast")
    with pytest.raises(HDLMError, match="HDLM_ATTENTION"):
        attention_mask(long_lay, long_lay)


@pytest.mark.parametrize("conf", ["aligned", "shifted"])
def test_training_step_with_block_sparse_attention_equals_dense(conf, monkeypatch):
    """The whole objective (loss and every parameter gradient) through the model, float64."""
    cfg = _cfg("block", conf, 29, 6)
    torch.manual_seed(0)
    model = HDLMTransformer(cfg.model).double()
    with torch.no_grad():  # leave adaLN-Zero's zero init so attention matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    obj = build_objective(cfg, N)
    y = torch.randint(N, (3, 29), generator=torch.Generator().manual_seed(1))
    grads = {}
    for mode in ("dense", "sparse"):
        monkeypatch.setenv(sparse_attention.ENV, mode)
        model.zero_grad(set_to_none=True)
        loss, _ = obj(model, y, torch.tensor([1, 2, 3]), 5)
        loss.backward()
        grads[mode] = [loss.detach()] + [p.grad for p in model.parameters()]
    for a, b in zip(grads["dense"], grads["sparse"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_plan_rejects_non_boolean_masks():
    with pytest.raises(ValueError, match="2-D bool"):
        plan(torch.ones(3, 3))
