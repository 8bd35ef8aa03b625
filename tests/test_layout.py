"""The efficient training layout (App. B.3, Fig. 7-10) and the Eq. (10) objective.

The vectorised loss over clean ⁀ K noisy intervals must equal, interval by interval, the loss of
running that interval alone behind its settled prefix (the naive Fig. 6 layout); Quench + SHIFTED
must be next-token cross-entropy; a settled cell must never see anything after it.
"""

import pytest
import torch
import torch.nn.functional as F

from hdlm.config import load_config
from hdlm.layout import inference_cells
from hdlm.masks import clean_layout, concat_layouts, dense_mask, interval_layout, naive_attention
from hdlm.model import HDLMTransformer
from hdlm.objective import build_objective

N, D, W = 11, 16, 4


def _setup(kind, conf, proc, width=W, rho=1.0, extra=()):
    cfg = load_config(None, [f"model.length={D}", f"model.vocab_size={N}", "model.n_layers=2", "model.hidden=32",
                             "model.n_heads=2", "model.cond_dim=16", "model.dropout=0", f"schedule.kind={kind}",
                             f"schedule.width={width}", f"schedule.rho={rho}", f"model.configuration={conf}",
                             f"process.kind={proc}", *extra])
    torch.manual_seed(0)
    model = HDLMTransformer(cfg.model).double().eval()
    with torch.no_grad():  # leave adaLN-Zero's zero init so the conditioning path is exercised
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, model, build_objective(cfg, N)


def _naive_forward(model, cells, idx, layout):
    """Run the cells `idx` of a training layout as their own forward pass with the given layout."""
    mask = dense_mask(layout, layout)
    with torch.no_grad():
            return model(cells.tokens[:, idx], cells.sigma[:, idx].double(), cells.positions[idx], mask,
                     keep=cells.keep[:, idx].double())


@pytest.mark.parametrize("kind", ["block", "slide"])
@pytest.mark.parametrize("conf", ["aligned", "shifted"])
@pytest.mark.parametrize("proc", ["gamma", "epsilon"])
def test_vectorised_loss_equals_sum_of_intervals_run_alone(kind, conf, proc):
    cfg, model, obj = _setup(kind, conf, proc)
    check_vectorised_loss_equals_intervals_run_alone(cfg, model, obj, kind)


def check_vectorised_loss_equals_intervals_run_alone(cfg, model, obj, kind):
    """The efficient layout's loss of ``model`` equals each interval run alone (also used for the HF backbone)."""
    N, D = cfg.model.vocab_size, cfg.model.length
    y = torch.randint(N, (3, D))
    seeds, bseed = torch.tensor([3, 4, 5]), 17
    with torch.no_grad():
        loss, stats = obj(model, y, seeds, bseed)
    tc = obj.cells(y, seeds, bseed)
    c, lay, shift = tc.cells, tc.cells.layout, cfg.model.shift
    n_diff = tc.diff_index.numel()
    assert n_diff == D if kind == "block" else 0 < n_diff <= D  # K = d/ω intervals (Slide's may be clipped at the ends)
    # reference: each interval alone behind its clean prefix (inference-style layout), summed
    diff_ref = torch.zeros(3, dtype=torch.float64)
    seg_ids = sorted(set(lay.seg.tolist()) - {0})
    for k in seg_ids:
        cells_k = (lay.seg == k).nonzero().squeeze(-1)
        j = int(lay.start[cells_k[0]])
        prefix = torch.arange(j)  # clean cells predicting 0..j-1 are the first j cells
        idx = torch.cat([prefix, cells_k])
        layout = concat_layouts(clean_layout(j, shift), interval_layout(j, j + len(cells_k) - shift, 1, shift))
        raw = _naive_forward(model, c, idx, layout)[:, j:]
        sel = torch.isin(tc.diff_index, cells_k)
        pos_in_k = (tc.diff_index[sel].unsqueeze(1) == cells_k.unsqueeze(0)).float().argmax(1)
        aux = {key: v[:, sel] for key, v in tc.diff_aux.items()}
        per_tok = obj.process.diffusion_loss(raw[:, pos_in_k], tc.diff_x[:, sel], tc.diff_y[:, sel],
                                             tc.diff_level[:, sel].double(), tc.diff_rate[:, sel].double(), aux)
        diff_ref += per_tok.sum(-1)
    diff_ref /= D
    assert torch.allclose(obj.last_nelbo, diff_ref, atol=1e-10, rtol=1e-10)
    if shift:  # the settled cross-entropy: a plain causal pass over the clean cells
        raw = _naive_forward(model, c, torch.arange(D), clean_layout(D, 1))
        ce_ref = F.cross_entropy(raw.reshape(-1, N), y.reshape(-1), reduction="none").view(3, D).sum(-1) / D
        assert stats["ce"] == pytest.approx(float(ce_ref.mean()), rel=1e-9)
        assert loss.item() == pytest.approx(float((ce_ref + diff_ref).mean()), rel=1e-9)


def test_efficient_layout_trains_diffusion_head_on_about_half_the_cells():
    for kind, width in [("block", 4), ("block", 2), ("slide", 4)]:
        _, _, obj = _setup(kind, "aligned", "gamma", width=width)
        tc = obj.cells(torch.randint(N, (2, D)), torch.tensor([1, 2]), 0)
        L = tc.cells.tokens.shape[1]
        frac = tc.diff_index.numel() / L
        assert frac == pytest.approx(0.5, abs=0.02) if kind == "block" else 0.4 <= frac <= 0.5
        single = obj.cells(torch.randint(N, (2, D)), torch.tensor([1, 2]), 0, single=True)
        assert single.diff_index.numel() <= width  # the naive layout trains at most ω positions


def test_quench_shifted_objective_is_next_token_cross_entropy():
    cfg, model, obj = _setup("quench", "shifted", "gamma", width=1)
    y = torch.randint(N, (2, D))
    with torch.no_grad():
        loss, _ = obj(model, y, torch.tensor([1, 2]), 0)
        bos = torch.full((2, 1), N + 1)
        tokens = torch.cat([bos, y[:, :-1]], 1)
        causal = torch.ones(D, D, dtype=torch.bool).tril()
        sigma = obj.process.noise.sigma_bar(torch.zeros(2, D, dtype=torch.float64))
        raw = model(tokens, sigma, torch.arange(D), causal, keep=torch.ones(2, D, dtype=torch.float64))
    ref = F.cross_entropy(raw.reshape(-1, N), y.reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)


def test_block_layout_draws_one_interval_per_block_with_independent_levels():
    _, _, obj = _setup("block", "aligned", "gamma")
    tc = obj.cells(torch.randint(N, (4, D)), torch.tensor([1, 2, 3, 4]), 9)
    starts = sorted(set(tc.cells.layout.start[tc.cells.layout.seg > 0].tolist()))
    assert starts == [0, 4, 8, 12]
    lev = tc.diff_level.view(4, 4, 4)  # (batch, block, position in block): ALIGNED Block at ρ = 1
    assert torch.all((lev > 0) & (lev <= 1))
    assert torch.allclose(lev, lev[..., :1].expand_as(lev))  # one level per block (Block anneals a block together)
    assert lev[:, :, 0].unique().numel() == 16  # independent per block and per sample
    assert torch.allclose(tc.diff_rate, torch.ones_like(tc.diff_rate))  # n_k/T · |dℓ/du| = 1 for Block


@pytest.mark.parametrize("conf", ["aligned", "shifted"])
def test_inference_cells_perturbations(conf):
    """Active cells never see worthless tokens; settled cells never see active ones (random weights)."""
    cfg, model, obj = _setup("block", conf, "gamma")
    hs, proc, shift = obj.hyperschedule, obj.process, cfg.model.shift
    t = 5  # second block is active
    a, e = hs.split(t)
    assert (a, e) == (4, 8)
    x = torch.randint(N, (2, D))
    x[:, a:] = N  # masks from the active window on
    level = hs.level_at_step(t).double()

    def run(x_):
        cells, out = inference_cells(x_, level, a, e, proc, shift)
        mask = dense_mask(cells.layout, cells.layout)
        with torch.no_grad():
            return model(cells.tokens, cells.sigma.double(), cells.positions, mask, keep=cells.keep.double()), out

    base, out = run(x)
    x2 = x.clone()
    x2[:, e:] = torch.randint(N, (2, D - e))  # change worthless tokens: nothing may move
    assert torch.equal(run(x2)[0], base)
    x3 = x.clone()
    x3[:, a + 1] = 3  # change an active token: the settled (clean) cells may not move
    moved = run(x3)[0]
    n_clean = out[0].item()
    assert torch.equal(moved[:, :n_clean], base[:, :n_clean])
    assert not torch.allclose(moved[:, out], base[:, out])
    # the naive reference agrees with SDPA on this mask
    cells, _ = inference_cells(x, level, a, e, proc, shift)
    mask = dense_mask(cells.layout, cells.layout)
    q = torch.randn(1, 2, len(cells.layout), 8, dtype=torch.float64)
    ref = naive_attention(q, q, q, mask)
    assert torch.allclose(F.scaled_dot_product_attention(q, q, q, attn_mask=mask), ref, atol=1e-12)


# ------------------------------------------------------------------------------------------
# the named steps of training_cells, one by one


def test_draw_intervals_stratifies_steps_and_reads_the_windows_of_eq1():
    from hdlm.hyperschedule import block, quench, slide
    from hdlm.layout import draw_intervals

    hs = slide(D, W)  # T = D + W - 1 = 19
    steps, sizes, windows = draw_intervals(hs, D, 0, batch_seed=3)
    K = -(-D // W)
    assert len(steps) == K and sum(sizes) == hs.T  # strata of [0, T), one step in each
    bounds = [k * hs.T // K for k in range(K + 1)]
    assert all(bounds[k] <= t < bounds[k + 1] for k, t in enumerate(steps))
    assert windows == [hs.split(t) for t in steps]
    assert draw_intervals(hs, D, 0, batch_seed=3) == (steps, sizes, windows)  # a function of the batch seed
    assert len(draw_intervals(hs, D, 0, batch_seed=3, n_intervals=2)[0]) == 2
    one, size, _ = draw_intervals(block(D, W), D, 0, batch_seed=1, single=True)
    assert len(one) == 1 and size == [block(D, W).T]
    assert draw_intervals(quench(D), D, 1, batch_seed=0) == ([], [], [])  # Quench + SHIFTED: plain AR


def test_levels_and_rates_follow_the_continuous_view_per_sample():
    from hdlm.hyperschedule import quench, slide
    from hdlm.layout import draw_intervals, levels_and_rates

    hs = slide(D, W)
    steps, sizes, windows = draw_intervals(hs, D, 0, batch_seed=5)
    seeds = torch.tensor([11, 12])
    lev, rate = levels_and_rates(hs, steps, sizes, windows, seeds, D)
    for b, s in enumerate(seeds.tolist()):  # u_k = (t_k + φ_k)/T, φ from the sample's own seed
        phi = torch.rand(len(steps), generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        u = (torch.tensor(steps, dtype=torch.float64) + phi) / hs.T
        torch.testing.assert_close(lev[b], hs.level(u).double(), rtol=0, atol=0)
        weight = torch.tensor(sizes, dtype=torch.float64)[:, None] / hs.T
        torch.testing.assert_close(rate[b], hs.level_rate(u).double() * weight, rtol=0, atol=0)
    assert not torch.equal(lev[0], lev[1])  # samples draw their own times
    q = quench(D)
    qs, qz, qw = draw_intervals(q, D, 0, batch_seed=5)
    lev, rate = levels_and_rates(q, qs, qz, qw, seeds, D)
    for k, (a, e) in enumerate(qw):  # 𝒯 = 1: the active tokens are at full noise, rate 1
        assert lev[0, k, a:e].eq(1).all() and lev[0, k].sum() == e - a and torch.equal(rate[0, k], lev[0, k])


def test_noisy_inputs_keep_clean_cells_and_do_not_depend_on_the_batch():
    from hdlm.hyperschedule import block
    from hdlm.layout import draw_intervals, interval_cells, levels_and_rates, noisy_inputs
    from hdlm.processes import GammaHybrid
    from hdlm.noise import LogLinear

    process = GammaHybrid(N, LogLinear(), 0.3)
    hs = block(D, W)
    y = torch.randint(0, N, (3, D), generator=torch.Generator().manual_seed(0))
    seeds = torch.tensor([5, 6, 7])
    steps, sizes, windows = draw_intervals(hs, D, 1, batch_seed=2)
    layout, n_clean = interval_cells(windows, hs, D, 1, False)
    lev, _ = levels_and_rates(hs, steps, sizes, windows, seeds, D)
    tokens, in_level, _ = noisy_inputs(y, layout, lev, process, seeds, discrete=False)
    clean = layout.is_clean & (layout.pos >= 0)
    assert torch.equal(tokens[:, clean], y[:, layout.pos[clean]])  # clean cells hold the data
    assert (in_level[:, layout.is_clean] == 0).all()
    assert (tokens[:, layout.pos < 0] == N + 1).all()  # SHIFTED's BOS (clean, and repeated by the first interval)
    assert (tokens[:, ~layout.is_clean] == N).any()  # some noise was drawn
    alone, _, _ = noisy_inputs(y[1:2], layout, lev[1:2], process, seeds[1:2], discrete=False)
    assert torch.equal(alone[0], tokens[1])  # a sample's noise is its own, whatever the batch


def test_loss_targets_pair_each_prediction_with_its_noisy_input_and_clean_target():
    cfg, _, obj = _setup("block", "shifted", "gamma")
    y = torch.randint(0, N, (2, D), generator=torch.Generator().manual_seed(1))
    tc = obj.cells(y, torch.tensor([3, 4]), 9)
    lay = tc.cells.layout
    target = lay.pos[tc.diff_index] + 1  # SHIFTED: cell with input p predicts p + 1
    assert torch.equal(tc.diff_y, y[:, target])
    # the noisy token at the predicted position is the input of the next cell of the same interval
    assert torch.equal(lay.pos[tc.diff_index + 1], target) and torch.equal(tc.diff_x, tc.cells.tokens[:, tc.diff_index + 1])
    ends = {int(s): int(lay.pos[lay.seg == s].max()) for s in lay.seg.unique().tolist() if s > 0}
    assert all(int(p) < ends[int(s)] for p, s in zip(lay.pos[tc.diff_index], lay.seg[tc.diff_index]))  # last dropped
    assert torch.equal(tc.ce_target, y[:, lay.pos[tc.ce_index] + 1]) and (tc.ce_weight == 1).all()
