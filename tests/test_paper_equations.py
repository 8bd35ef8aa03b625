"""Equations whose mutations the rest of the suite let through (issue #14 §3), each checked against
values written from the paper, not from the code under test.

- Eq. (11): the settled-token position weights, by hand, and their use in the naive layout's CE;
- Eq. (10): β₁ and β₂ weigh the settled CE and the diffusion loss;
- Algorithm 4 (ACS): a revealed token is corrected with probability η (1 − p_transfer);
- the cells one generation step runs are the cells training runs for the same x_t and levels.
"""

from __future__ import annotations

import pytest
import torch

from hdlm.config import load_config
from hdlm.hyperschedule import block, slide
from hdlm.layout import inference_cells, interval_cells, noisy_inputs, position_weights, target_levels
from hdlm.masks import dense_mask
from hdlm.model import HDLMTransformer
from hdlm.noise import LogLinear
from hdlm.objective import build_objective
from hdlm.processes import EpsilonHybrid, cross_entropy, make_process
from hdlm.sampling.samplers import AncestralSampler

F64 = torch.float64


# ------------------------------------------------------------------------------------------
# Eq. (11): w(i) = ⌊i/ω⌋ / (⌈d/ω⌉ − 1), w = 1 when ⌈d/ω⌉ = 1


@pytest.mark.parametrize("d,width,expected", [
    (5, 2, [0, 0, 0.5, 0.5, 1]),  # ⌈5/2⌉ − 1 = 2
    (8, 4, [0, 0, 0, 0, 1, 1, 1, 1]),  # ⌈8/4⌉ − 1 = 1
    (9, 3, [0, 0, 0, 0.5, 0.5, 0.5, 1, 1, 1]),
    (3, 4, [1, 1, 1]),  # one block: the convention w = 1
])
def test_position_weights_are_eq11_by_hand(d, width, expected):
    got = position_weights(d, width, dtype=F64)
    assert torch.equal(got, torch.tensor(expected, dtype=F64))


def _tiny(overrides, N=7, D=8):
    cfg = load_config(None, [f"model.length={D}", f"model.vocab_size={N}", "model.n_layers=1", "model.hidden=16",
                             "model.n_heads=2", "model.cond_dim=8", "model.dropout=0", *overrides])
    torch.manual_seed(0)
    model = HDLMTransformer(cfg.model).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return cfg, model


def test_naive_layout_weighs_the_settled_cross_entropy_by_eq11():
    """The one-interval layout (Fig. 6) multiplies cell i's CE by w(i): (1/d) Σ_i w(i) CE_i, recomputed here."""
    N, D = 7, 8
    cfg, model = _tiny(["schedule.kind=block", "schedule.width=2", "model.configuration=shifted",
                        "process.kind=epsilon"], N, D)
    obj = build_objective(cfg, N)
    y = torch.randint(N, (2, D), generator=torch.Generator().manual_seed(1))
    seeds = torch.tensor([4, 5])
    w = torch.tensor([0, 0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1, 1], dtype=F64)  # d = 8, ω = 2: ⌈d/ω⌉ − 1 = 3
    for batch_seed in range(12):  # until the drawn window leaves a settled prefix with nonzero weights
        tc = obj.cells(y, seeds, batch_seed, single=True)
        if tc.ce_index.numel() > 2:
            break
    n = tc.ce_index.numel()
    assert n > 2
    torch.testing.assert_close(tc.ce_weight.to(F64), w[:n])
    with torch.no_grad():
        _, stats = obj(model, y, seeds, batch_seed, single=True)
        c = tc.cells
        raw = model(c.tokens, c.sigma.double(), c.positions, dense_mask(c.layout, c.layout), keep=c.keep.double(),
                    out_index=tc.ce_index)
    ce = (cross_entropy(raw, y[:, :n]) * w[:n]).sum(-1) / D  # clean cell i (SHIFTED) predicts y_i
    assert stats["ce"] == pytest.approx(float(ce.mean()), rel=1e-6)


# ------------------------------------------------------------------------------------------
# Eq. (10): L = β₁ L_CE(settled) + β₂ L_diffusion(active)


@pytest.mark.parametrize("proc", ["gamma", "epsilon"])
def test_objective_weighs_ce_by_beta1_and_diffusion_by_beta2(proc):
    N, D = 7, 8
    base = ["schedule.kind=block", "schedule.width=2", "model.configuration=shifted", f"process.kind={proc}"]
    cfg, model = _tiny(base, N, D)
    y = torch.randint(N, (3, D), generator=torch.Generator().manual_seed(2))
    seeds = torch.tensor([1, 2, 3])
    with torch.no_grad():
        _, ref = build_objective(cfg, N)(model, y, seeds, 9)
        cfg2, _ = _tiny([*base, "objective.beta1=0.3", "objective.beta2=2.5"], N, D)
        loss, stats = build_objective(cfg2, N)(model, y, seeds, 9)
    assert ref["ce"] > 0.1 and ref["diffusion"] > 0.1  # both terms present: each weight matters
    assert stats["ce"] == pytest.approx(ref["ce"]) and stats["diffusion"] == pytest.approx(ref["diffusion"])
    assert float(loss) == pytest.approx(0.3 * ref["ce"] + 2.5 * ref["diffusion"], rel=1e-9)
    assert stats["nelbo"] == pytest.approx(ref["diffusion"])  # the NELBO is not reweighted


# ------------------------------------------------------------------------------------------
# Algorithm 4 (ACS): correction with probability η (1 − p_transfer), p_transfer = 1 − s/t (linear α)


def test_acs_corrects_revealed_tokens_at_rate_eta_times_one_minus_p_transfer():
    N, B = 4, 40000
    eps = 1e-3
    process = EpsilonHybrid(N, LogLinear(eps), 0.1)  # α(s) = 1 − (1 − eps) s: p_transfer = 1 − s/t
    t, s, eta = 0.7, 0.5, 0.6
    p_transfer = 1.0 - s / t
    raw = torch.full((B, 2, N), -60.0, dtype=F64)
    raw[..., 0] = 60.0  # the model puts all its mass on token 0
    x = torch.tensor([[N, 1]]).expand(B, 2).clone()  # position 0 masked, position 1 revealed as 1
    out = AncestralSampler(process, eta=eta).step(raw, x, torch.full((2,), t, dtype=F64),
                                                  torch.full((2,), s, dtype=F64),
                                                  torch.Generator().manual_seed(3))
    revealed = (out[:, 0] == 0).double().mean().item()
    corrected = (out[:, 1] == 0).double().mean().item()
    assert set(out[:, 0].tolist()) <= {0, N} and set(out[:, 1].tolist()) <= {0, 1}
    se = 0.5 / B ** 0.5
    assert abs(revealed - p_transfer) < 5 * se
    assert abs(corrected - eta * (1.0 - p_transfer)) < 5 * se  # η p_transfer would be 0.171, not 0.429


# ------------------------------------------------------------------------------------------
# inference cells = training cells for the same x_t and levels


@pytest.mark.parametrize("proc_kind", ["gamma", "epsilon"])
@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "shifted"])
@pytest.mark.parametrize("hs", [block(8, 2), slide(8, 2)], ids=["block", "slide"])
def test_inference_cells_equal_training_cells_for_the_same_state(proc_kind, shift, hs):
    """For every step with a settled prefix: the training layout's one-interval cells (noisy inputs
    drawn by training's own forward process) and the generation step's cells for that x_t and the
    step's levels hold the same tokens, σ̄ of the predicted position, Eq. (12) keep weights,
    rotary positions and attention mask — in particular the SHIFTED copy of the last settled token
    and the first active token."""
    N, D = 7, 8
    cfg = load_config(None, [f"process.kind={proc_kind}", "process.gamma=0.3", "process.epsilon=0.2"])
    proc = make_process(cfg.process, N)
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for t in range(hs.T):
        a, e = hs.split(t)
        if a == e or a == 0:
            continue
        lev = hs.level_at_step(t, dtype=F64)
        y = torch.randint(N, (3, D), generator=gen)
        layout, _ = interval_cells([(a, e)], hs, D, shift, True, settled_attention="causal",
                                   block_width=hs.width, device=y.device)
        lev_k = lev.expand(3, 1, D).clone()  # (B, K = 1, d)
        tokens, in_level, _ = noisy_inputs(y, layout, lev_k, proc, torch.tensor([1, 2, 3]), False)
        x = y.clone()  # x_t: the settled prefix is y, the window holds training's noisy draws
        noisy_in = (~layout.is_clean) & (layout.pos >= layout.start)
        x[:, layout.pos[noisy_in]] = tokens[:, noisy_in]
        x[:, e:] = N  # worthless
        cells, out_index = inference_cells(x, lev, a, e, proc, shift, block_width=hs.width)
        sigma = proc.noise.sigma_bar(target_levels(layout, lev_k, shift, D))
        keep = proc.embed_keep(tokens.clamp(max=N), in_level)
        assert torch.equal(cells.tokens, tokens)
        assert torch.equal(cells.positions, layout.pos + shift)
        torch.testing.assert_close(cells.sigma.to(F64), sigma.to(F64), rtol=1e-6, atol=0)
        torch.testing.assert_close(cells.keep.to(F64), keep.to(F64), rtol=1e-6, atol=0)
        assert torch.equal(dense_mask(cells.layout, cells.layout), dense_mask(layout, layout))
        # the first active token (input cell of position a) carries its own level's keep weight
        first = int(((~layout.is_clean) & (layout.pos == a)).nonzero()[0])
        torch.testing.assert_close(cells.keep[:, first].to(F64), proc.embed_keep(x[:, a], lev[a]).to(F64))
        # the SHIFTED copy of the last settled token predicts position a at a's level, keeps weight 1
        if shift:
            copy = int(((~layout.is_clean) & (layout.pos == a - 1)).nonzero()[0])
            assert torch.equal(cells.tokens[:, copy], y[:, a - 1])
            torch.testing.assert_close(cells.sigma[:, copy].to(F64), proc.noise.sigma_bar(lev[a]).expand(3))
            assert torch.all(cells.keep[:, copy] == 1)
        checked += 1
    assert checked > 0
