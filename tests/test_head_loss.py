"""The fused chunked head + loss (hdlm.head_loss) equals the plain unchunked head and loss.

References are the unchunked computation through ordinary autograd (logits materialised at once,
then the loss, then ``backward``): float64, loss and every parameter's gradient within 1e-10, for
γ (DWDSE), ε (HDCE), AR (CE), ALIGNED and SHIFTED, tied and untied heads.
"""

import pytest
import torch
import torch.nn.functional as F

from hdlm.config import load_config
from hdlm.head_loss import LinearHead, chunk_positions, fused_head_loss
from hdlm.model import HDLMTransformer
from hdlm.objective import build_objective

N, D = 11, 16


def _setup(proc, conf, kind="block", extra=()):
    cfg = load_config(None, [f"model.length={D}", f"model.vocab_size={N}", "model.n_layers=2", "model.hidden=32",
                             "model.n_heads=2", "model.cond_dim=16", "model.dropout=0", f"schedule.kind={kind}",
                             "schedule.width=4", f"model.configuration={conf}", f"process.kind={proc}", *extra])
    torch.manual_seed(0)
    model = HDLMTransformer(cfg.model).double()
    with torch.no_grad():  # off the adaLN-Zero / zero-head init so every gradient is non-trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, build_objective(cfg, N)


def _loss_and_grads(model, obj, head_chunk, single=False):
    obj.head_chunk = head_chunk
    model.zero_grad(set_to_none=True)
    y = torch.randint(N, (3, D), generator=torch.Generator().manual_seed(5))
    loss, stats = obj(model, y, torch.tensor([3, 4, 5]), 17, single=single)
    loss.backward()
    return loss.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [("gamma", "aligned", "block", ()), ("gamma", "shifted", "block", ()), ("epsilon", "aligned", "block", ()),
         ("epsilon", "shifted", "slide", ()), ("mdlm", "aligned", "flat", ()),
         ("gamma", "shifted", "quench", ()),  # AR: CE only
         ("gamma", "shifted", "block", ("objective.beta1=0.5", "model.tie_embeddings=true")),
         ("gamma", "aligned", "block", ("process.parametrisation=sedd",))]


@pytest.mark.parametrize("proc,conf,kind,extra", CASES)
@pytest.mark.parametrize("single", [False, True])
def test_chunked_head_loss_equals_unchunked(proc, conf, kind, extra, single):
    model, obj = _setup(proc, conf, kind, extra)
    ref_loss, ref_stats, ref_grads = _loss_and_grads(model, obj, 0, single)
    # 3 × N logits per chunk: one position per chunk, so chunks straddle every boundary
    loss, stats, grads = _loss_and_grads(model, obj, 3 * N, single)
    assert abs(float(loss - ref_loss)) <= 1e-10 * max(1.0, abs(float(ref_loss)))
    assert stats == pytest.approx(ref_stats, rel=1e-10, abs=1e-12)
    assert grads.keys() == ref_grads.keys() and len(grads) > 5
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-10, atol=1e-12), name
    assert float(ref_loss) != 0.0 and any(float(g.abs().max()) > 1e-6 for g in ref_grads.values())


def _capped(raw):
    return torch.tanh(raw / 3.0) * 3.0


# (head given to fused_head_loss, the same head written out for the reference, with a bias)
HEADS = {"F.linear": (F.linear, F.linear, True),
         "LinearHead, soft-cap, no bias": (LinearHead(_capped), lambda x, w: _capped(F.linear(x, w)), False),
         "generic callable": (lambda x, w, b: _capped(F.linear(x, w, b)), lambda x, w, b: _capped(F.linear(x, w, b)),
                              True)}


@pytest.mark.parametrize("name", list(HEADS))
def test_fused_head_loss_against_autograd_with_arbitrary_weights(name):
    """Σ coef·ℓ and its gradients w.r.t. x (a strided slice, as the objective passes), weight and
    bias, for the linear head's in-place path and the generic one; values without grad mode too."""
    head, ref_head, with_bias = HEADS[name]
    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(2, 9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, generator=g, requires_grad=True)
    params = (w, b) if with_bias else (w,)
    y = torch.randint(9, (2, 7), generator=g)
    coef = torch.rand(2, 7, dtype=torch.float64, generator=g)

    def loss(raw, lo, hi):
        return F.cross_entropy(raw.transpose(1, 2), y[:, lo:hi], reduction="none") ** 2

    x = x_full[:, 1:8]
    ref_per = loss(ref_head(x, *params), 0, 7)
    ref = (ref_per * coef).sum()
    ref_grads = torch.autograd.grad(ref, (x_full, *params))
    assert all(float(r.abs().max()) > 1e-3 for r in ref_grads)
    for chunk in (1, 3, 7, 100):
        total, per = fused_head_loss(x, coef, head, loss, params, chunk)
        assert not per.requires_grad
        grads = torch.autograd.grad(3.0 * total, (x_full, *params))  # the incoming gradient scales them
        assert torch.allclose(total, ref, rtol=1e-12) and torch.allclose(per, ref_per, rtol=1e-12)
        for a, r in zip(grads, ref_grads):
            assert torch.allclose(a, 3.0 * r, rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            total0, per0 = fused_head_loss(x, coef, head, loss, params, chunk)
        assert torch.allclose(total0, ref, rtol=1e-12) and torch.allclose(per0, ref_per, rtol=1e-12)


def test_fused_head_loss_without_weight_gradient():
    """A frozen head (weight without grad): only the features' gradient, the same as autograd's."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 3, dtype=torch.float64, generator=g)
    y = torch.randint(6, (2, 4), generator=g)
    coef = torch.rand(2, 4, dtype=torch.float64, generator=g)

    def loss(raw, lo, hi):
        return F.cross_entropy(raw.transpose(1, 2), y[:, lo:hi], reduction="none")

    ref = torch.autograd.grad((loss(F.linear(x, w), 0, 4) * coef).sum(), x)[0]
    total, _ = fused_head_loss(x, coef, F.linear, loss, (w,), 3)
    assert torch.allclose(torch.autograd.grad(total, x)[0], ref, rtol=1e-10, atol=1e-12)


def test_chunk_positions():
    assert chunk_positions(2, 50257, 1 << 22) == 41
    assert chunk_positions(64, 50257, 1 << 10) == 1


def test_vocab_reductions_equal_autograd_through_logsumexp_gather_sum():
    """The one-pass backward of head_loss.vocab_reductions against autograd of the plain ops and
    finite differences (float64), with repeated indices (x = y gathers one column twice)."""
    from hdlm.head_loss import vocab_reductions

    gen = torch.Generator().manual_seed(5)
    raw = torch.randn(2, 3, 17, generator=gen, dtype=torch.float64) * 4
    index = torch.randint(17, (2, 3, 2), generator=gen)
    index[0, 1, 1] = index[0, 1, 0]
    ups = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((2, 3), (2, 3, 2), (2, 3))]
    results = []
    for fn in (vocab_reductions, lambda r, i: (torch.logsumexp(r, -1), r.gather(-1, i), r.sum(-1))):
        leaf = raw.clone().requires_grad_(True)
        outs = fn(leaf, index)
        sum((o * u).sum() for o, u in zip(outs, ups)).backward()
        results.append([*(o.detach() for o in outs), leaf.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(lambda r: vocab_reductions(r, index), (raw.clone().requires_grad_(True),))



@pytest.mark.parametrize("used", [(0,), (1,), (2,), (0, 1), (1, 2)])
def test_vocab_reductions_with_unused_outputs(used):
    """An output the loss does not read gets no gradient pass (None, not zeros): the gradient
    through the others still equals autograd of the plain ops (the cross-entropy reads only two)."""
    from hdlm.head_loss import vocab_reductions

    gen = torch.Generator().manual_seed(6)
    raw = torch.randn(3, 11, generator=gen, dtype=torch.float64)
    index = torch.randint(11, (3, 2), generator=gen)
    grads = []
    for fn in (vocab_reductions, lambda r, i: (torch.logsumexp(r, -1), r.gather(-1, i), r.sum(-1))):
        leaf = raw.clone().requires_grad_(True)
        outs = fn(leaf, index)
        sum(outs[k].sum() * (k + 2) for k in used).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=0)
