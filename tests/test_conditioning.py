"""hdlm.conditioning.Conditioning: adaLN once per noise level equals adaLN per cell (values and gradients)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hdlm.conditioning import Conditioning
from hdlm.config import load_config
from hdlm.model import HDLMTransformer


def test_rows_and_select_equal_the_per_cell_projection():
    torch.manual_seed(0)
    embed = torch.nn.Linear(1, 8).double()
    lin = torch.nn.Linear(8, 5).double()
    sigma = torch.tensor([[0.0, 0.5, 0.5, 0.5, 2.0, 2.0], [0.5, 0.0, 0.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    emb = lambda s: embed(s[..., None])  # noqa: E731
    dedup = Conditioning.of(emb, sigma)
    assert dedup.where is not None and dedup.features.shape[0] == 4  # levels 0, 0.5, 2, 3
    want = lin(emb(sigma))
    assert torch.equal(dedup.rows(lin), want)
    index = torch.tensor([[5, 0], [1, 3]])
    assert torch.equal(dedup.select(index).rows(lin), torch.gather(want, 1, index[..., None].expand(-1, -1, 5)))
    assert torch.equal(dedup.select(torch.tensor([2, 4])).rows(lin), want[:, [2, 4]])
    # all levels distinct: one row per cell, no gather; select still works
    distinct = Conditioning.of(emb, torch.arange(6, dtype=torch.float64).view(2, 3))
    assert distinct.where is None
    assert torch.equal(distinct.select(torch.tensor([[2], [0]])).rows(lin)[:, 0], lin(emb(torch.tensor([2.0, 3.0],
                                                                                                       dtype=torch.float64))))


def test_model_outputs_and_gradients_equal_the_per_cell_path(monkeypatch):
    cfg = load_config(None, ["model.length=16", "model.vocab_size=40", "model.n_layers=2", "model.hidden=32",
                             "model.n_heads=2", "model.dropout=0"])
    torch.manual_seed(0)
    model = HDLMTransformer(cfg.model).double()
    for p in model.parameters():  # adaLN-Zero starts at zero: make the conditioning matter
        torch.nn.init.normal_(p, std=0.1)
    tokens = torch.randint(42, (3, 16))
    sigma = torch.tensor([0.0, 0.7, 1.3, 2.0], dtype=torch.float64).repeat_interleave(4).expand(3, 16).clone()
    sigma[1] *= 1.5
    index = torch.tensor([1, 5, 9, 15])

    def run():
        model.zero_grad()
        out = model(tokens, sigma, out_index=index)
        out.pow(2).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out, grads = run()
    monkeypatch.setattr(Conditioning, "of", Conditioning.per_cell)
    ref_out, ref_grads = run()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
    assert F.mse_loss(out, torch.zeros_like(out)) > 0
