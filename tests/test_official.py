"""The published (official ServiceNow/hdlm) checkpoints run in hdlm exactly.

Ground truth: tests/fixtures/official-hdlm (see its README): tiny models saved by the official
code and the tensors its forward passes and losses produced. Nothing here was computed by hdlm.
Tolerances are the fixture's: ε float32 1e-6, ε float64 1e-9, γ float32 1e-5 (absolute; 1.5e-5 for
the std-0.5 fixture, see ``scripts/official_parity.forward_atol``), losses 1e-5 relative.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hdlm.layout import inference_cells
from hdlm.masks import dense_mask
from hdlm.hub import load_official  # moved from hdlm.official (it builds a model)
from hdlm.official.compat import (SETTLED_MASK_LOGIT, epsilon_corrupt, epsilon_loss, gamma_corrupt, gamma_loss,
                                  gamma_score_entropy, official_forward)
from hdlm.processes import make_process
from hdlm.sedd_score import log_expm1_official, sedd_dwdse, sedd_log_score

FIXTURES = Path(__file__).parent / "fixtures" / "official-hdlm"


def _parity_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("official_parity", Path(__file__).parents[1] / "scripts" / "official_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


forward_atol = _parity_script().forward_atol
EPSILON_DIRS = ["epsilon", "epsilon_std0.5"]
GAMMA_DIRS = ["gamma", "gamma_std0.5"]
MASK = 61


@functools.lru_cache(maxsize=None)
def loaded(name: str, dtype: torch.dtype = torch.float32):
    model, cfg, _ = load_official(FIXTURES / name)
    return model.to(dtype), cfg


@functools.lru_cache(maxsize=None)
def ref(name: str) -> dict:
    return load_file(str(FIXTURES / name / "reference.safetensors"))


def official_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs()).max())


# --------------------------------------------------------------------------------------------
# forward passes


@pytest.mark.parametrize("name", EPSILON_DIRS)
@pytest.mark.parametrize("form", ["a", "b", "b_ar"])  # plain, block-causal mask, SHIFTED-family mask
def test_epsilon_forward_equals_official(name, form):
    """Raw logits over all 62 ids (MASK column included) in float32 and float64.

    float64 at 1e-9 needs the float32 LayerNorm and float64 rotary of the stored inv_freq; the
    masked forms need the official attention (rows 12–15 attend to no key: uniform weights)."""
    r = ref(name)
    mask = None if form == "a" else r[f"{form}.attn_mask"]
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-9)):
        model, cfg = loaded(name, dtype)
        out = official_forward(model, cfg, r["input.xt"], r["input.positions"], attn_mask=mask)
        assert out.dtype == dtype and out.shape == (2, 16, 62)
        assert max_abs(out, r[f"{form}.logits.{'float32' if dtype == torch.float32 else 'float64'}"]) <= tol


@pytest.mark.parametrize("name", GAMMA_DIRS)
@pytest.mark.parametrize("form", ["a", "a_eval", "b_train", "b_sampler", "bw"])
def test_gamma_forward_equals_official(name, form):
    """Log-scores (scale_by_sigma) over all 62 ids: per-token σ from 0.055 to 5.3 (both esigm1
    branches), the eval fallback σ = 1e-3, the training form (−1000 post-processing), the
    sampler form and the sampler's growing window."""
    r, (model, cfg) = ref(name), loaded(name)
    xt, pos = r["input.xt"], r["input.positions"]
    calls = {
        "a": (xt, pos, r["a.sigma"], None, None, "a.log_score.float32"),
        "a_eval": (xt, pos, r["a_eval.sigma"], None, None, "a_eval.log_score.float32"),
        "b_train": (xt, pos, r["b.sigma"], r["b.attn_mask"], r["b.settled"].expand(2, -1), "b.log_score_train.float32"),
        "b_sampler": (xt, pos, r["b.sigma"], r["b.attn_mask"], None, "b.log_score_sampler.float32"),
        "bw": (r["bw.xt"], pos[:, :12], r["bw.sigma"], r["bw.attn_mask"], None, "bw.log_score.float32"),
    }
    tokens, positions, sigma, mask, settled, key = calls[form]
    out = official_forward(model, cfg, tokens, positions, sigma=sigma, attn_mask=mask, settled=settled)
    assert max_abs(out, r[key]) <= forward_atol(name)


@pytest.mark.parametrize("name", GAMMA_DIRS)
def test_gamma_sampler_window_through_hdlm_inference_layout(name):
    """hdlm's own inference cells for the split settled [0, 8) ⁀ active [8, 12) (block-causal
    settled attention, ω = 4) reproduce the official sampler's window call: same tokens, rotary
    positions and mask; only σ (official t = 1e-4 for settled cells, hdlm 0) is taken from the
    reference so that the comparison is exact."""
    r, (model, cfg) = ref(name), loaded(name)
    process = make_process(cfg.process, cfg.model.vocab_size)
    x = r["input.xt"]
    level = torch.zeros(16)
    cells, out_index = inference_cells(x, level, 8, 12, process, 0, settled_attention="block", block_width=4)
    assert torch.equal(cells.tokens, r["bw.xt"]) and torch.equal(cells.positions, torch.arange(12))
    mask = dense_mask(cells.layout)
    assert torch.equal(mask, ~r["bw.attn_mask"][0])
    sigma = r["bw.sigma"]
    with torch.no_grad():
        raw = model(cells.tokens, sigma, cells.positions, mask, keep=torch.exp(-cfg.process.gamma * sigma),
                    all_columns=True)
    out = raw - log_expm1_official(sigma).unsqueeze(-1) - math.log(61)
    assert max_abs(out, r["bw.log_score.float32"]) <= forward_atol(name)
    assert torch.equal(out_index, torch.arange(8, 12))


@pytest.mark.parametrize("name", GAMMA_DIRS)
def test_training_post_processing_touches_only_the_mask_logit_one_position_early(name):
    """The official −1000 goes to the MASK column of rows i whose next position is settled
    (i = 0..6 for settled 0..7), nowhere else: the training and sampler forms differ exactly there.
    hdlm's samplers never ask for it, so inference is unaffected."""
    r = ref(name)
    train, sampler = r["b.log_score_train.float32"], r["b.log_score_sampler.float32"]
    differs = (train != sampler).any(0)  # (L, V)
    assert differs[:, :MASK].sum() == 0 and differs[:, MASK].nonzero().flatten().tolist() == list(range(7))
    assert (train[:, :7, MASK] == SETTLED_MASK_LOGIT).all()


def test_weights_stay_float32_and_inv_freq_is_the_stored_buffer():
    model, _ = loaded("gamma")
    st = load_file(str(FIXTURES / "gamma" / "model.safetensors"))
    assert torch.equal(model.rotary_inv_freq, st["rotary_emb.inv_freq"])
    assert torch.equal(model.token_embedding, st["vocab_embed.embedding"])
    assert model.head.weight.shape == (62, 32) and model.adaLN_final is None


# --------------------------------------------------------------------------------------------
# losses from the recorded draws


@pytest.mark.parametrize("name", EPSILON_DIRS)
def test_epsilon_flat_loss_equals_official(name):
    r, (model, cfg) = ref(name), loaded(name)
    x0, pos = r["input.clean_ids"], r["input.positions"]
    p_mask = ((1 - 1e-4) * r["c_flat.draw0.rand"] + 1e-4)[:, None].expand(2, 16)
    noisy, masked, sub = epsilon_corrupt(x0, p_mask, r["c_flat.draw1.rand"], r["c_flat.draw2.rand"],
                                         r["c_flat.draw3.randint"], cfg.process.epsilon, MASK)
    assert torch.equal(noisy, r["c_flat.noisy_batch"])
    logits = official_forward(model, cfg, noisy, pos)
    assert max_abs(logits, r["c_flat.logits"]) <= 1e-6
    loss = epsilon_loss(logits, x0, p_mask, masked, sub, cfg.process.epsilon, cfg.process.lam)
    assert rel(loss, r["c_flat.loss.float32"]) <= 1e-5


@pytest.mark.parametrize("name", EPSILON_DIRS)
def test_epsilon_block_loss_equals_official(name):
    r, (model, cfg) = ref(name), loaded(name)
    x0, pos, active, p_mask = r["input.clean_ids"], r["input.positions"], r["b.active"], r["b.t"]
    noisy, masked, sub = epsilon_corrupt(x0, p_mask, r["c_block.draw1.rand"], r["c_block.draw2.rand"],
                                         r["c_block.draw3.randint"], cfg.process.epsilon, MASK, active=active)
    assert torch.equal(noisy, r["c_block.noisy_batch"])
    logits = official_forward(model, cfg, noisy, pos, attn_mask=r["c_block.attn_mask"])
    loss = epsilon_loss(logits, x0, p_mask, masked, sub, cfg.process.epsilon, cfg.process.lam, active=active,
                        divide_kept=False)
    assert rel(loss, r["c_block.loss.float32"]) <= 1e-5


@pytest.mark.parametrize("name", EPSILON_DIRS)
def test_hdlm_hdce_is_the_official_formula_with_the_documented_corrections(name):
    """hdlm's HDCE (Eq. 9) on the official block draw equals the official annealing loss once its
    documented deviations are undone: the MASK logit left out of the cross-entropy, kept tokens
    divided by 1 − p_mask, and hdlm's continuous-time factor −α'(s) = 1 − eps of its linear noise.
    The official value itself differs (the test asserts by how much it must)."""
    r, (model, cfg) = ref(name), loaded(name)
    x0, pos, active, p_mask = r["input.clean_ids"], r["input.positions"], r["b.active"], r["b.t"]
    noisy, masked, sub = epsilon_corrupt(x0, p_mask, r["c_block.draw1.rand"], r["c_block.draw2.rand"],
                                         r["c_block.draw3.randint"], cfg.process.epsilon, MASK, active=active)
    logits = official_forward(model, cfg, noisy, pos, attn_mask=r["c_block.attn_mask"]).double()
    process = make_process(cfg.process, 61)
    eps = cfg.process.noise_eps
    s = (p_mask.double() / (1 - eps)).expand(2, 16)  # hdlm's level with p_mask(s) = the official t
    rate = active.double().expand(2, 16)
    hdce = process.diffusion_loss(logits[..., :MASK], noisy, x0, s, rate, {"substituted": sub})
    hdlm_loss = hdce.sum() / active.expand(2, 16).sum()
    corrected = epsilon_loss(logits, x0, p_mask.double(), masked, sub, cfg.process.epsilon, cfg.process.lam,
                             active=active, divide_kept=True, mask_column=False) * (1 - eps)
    assert rel(hdlm_loss, corrected) <= 1e-9
    official = epsilon_loss(logits, x0, p_mask.double(), masked, sub, cfg.process.epsilon, cfg.process.lam,
                            active=active, divide_kept=False)
    assert rel(official, r["c_block.loss.float32"]) <= 1e-5 and rel(hdlm_loss, official) > 1e-4


@pytest.mark.parametrize("name", GAMMA_DIRS)
def test_gamma_score_entropy_equals_official(name):
    r = ref(name)
    xt, x0 = r["input.xt"], r["input.clean_ids"]
    se = gamma_score_entropy(r["b.log_score_train.float32"], r["b.sigma"], xt, x0, 0.01)
    assert rel(se, r["c_se.score_entropy"]) <= 1e-5
    se_a = gamma_score_entropy(r["a.log_score.float32"], r["a.sigma"], xt, x0, 0.01)
    assert rel(se_a, r["c_se.score_entropy_a"]) <= 1e-5


@pytest.mark.parametrize("name", GAMMA_DIRS)
def test_gamma_loss_equals_official(name):
    r, (model, cfg) = ref(name), loaded(name)
    x0, pos = r["input.clean_ids"], r["input.positions"]
    sigma = r["c_loss.sigma"]
    assert torch.equal(sigma, r["b.sigma"]) and torch.equal(r["c_loss.attn_mask"], r["b.attn_mask"])
    perturbed = gamma_corrupt(x0, sigma, r["c_loss.draw1.rand"], r["c_loss.draw2.randint"], cfg.process.gamma, MASK)
    assert torch.equal(perturbed, r["c_loss.perturbed"])
    log_score = official_forward(model, cfg, perturbed, pos, sigma=sigma, attn_mask=r["c_loss.attn_mask"],
                                 settled=r["c_loss.settled_tokens"])
    assert max_abs(log_score, r["c_loss.log_score"]) <= forward_atol(name)
    diff, ce = gamma_loss(log_score, sigma, r["b.dsigma"], perturbed, x0, r["b.settled"], r["b.weight_mask"],
                          width=4, gamma=cfg.process.gamma)
    assert rel(diff, r["c_loss.diff_loss"]) <= 1e-5 and rel(ce, r["c_loss.ce_loss"]) <= 1e-5
    assert rel(diff.mean() + ce.mean(), r["c_loss.total"]) <= 1e-5


@pytest.mark.parametrize("name", GAMMA_DIRS)
def test_official_score_entropy_is_hdlm_dwdse_only_at_gamma_0(name):
    """The documented γ deviation: on the recorded log-scores, the official QGamma score entropy
    equals hdlm's exact DWDSE of Q_γ when γ = 0 (pure absorb, where its shortcut is exact), and
    differs for the published γ = 0.01 (its MASK ratios ignore the uniform part, its real-token
    ratios use the total σ̄ instead of γσ̄)."""
    r = ref(name)
    xt, x0, sigma = r["input.xt"], r["input.clean_ids"], r["a.sigma"].double()
    log_score = r["a.log_score.float32"].double()
    for gamma, same in ((0.0, True), (0.01, False)):
        official = gamma_score_entropy(log_score, sigma, xt, x0, gamma)
        exact = sedd_dwdse(log_score[..., :MASK], xt, x0, sigma, gamma)
        if same:  # up to the official 1e-12 guards inside its ratios
            assert torch.allclose(official, exact, rtol=1e-9, atol=1e-12)
            assert (official > 0).sum() >= 10  # MASK positions carry the loss
        else:
            assert max_abs(official, exact) > 1e-3


@pytest.mark.parametrize("name", GAMMA_DIRS)
def test_hdlm_settled_ce_leaves_the_mask_column_out(name):
    """hdlm's settled cross-entropy (on the N real columns) is the official one with the MASK column
    dropped: the −1000 hack and its off-by-one have nothing left to act on."""
    r, (model, cfg) = ref(name), loaded(name)
    log_score = r["c_loss.log_score"]
    settled = r["b.settled"]
    _, ce_no_mask = gamma_loss(log_score, r["c_loss.sigma"], r["b.dsigma"], r["c_loss.perturbed"],
                               r["input.clean_ids"], settled, r["b.weight_mask"], width=4, gamma=0.01,
                               mask_column=False)
    from hdlm.processes import cross_entropy

    eq11 = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=log_score.dtype)  # Eq. (11), d = 8, ω = 4, by hand
    hdlm_ce = (cross_entropy(log_score[:, settled, :MASK], r["input.clean_ids"][:, settled]) * eq11).mean(-1)
    assert rel(hdlm_ce, ce_no_mask) <= 1e-6
    assert max_abs(hdlm_ce, r["c_loss.ce_loss"]) > 1e-6  # the last settled position's MASK logit mattered


def test_sedd_log_score_of_a_loaded_model_is_the_official_output_on_real_columns():
    """What hdlm's γ samplers read (process.log_score of the model's N real outputs) is the official
    log-score, except hdlm's definitional s_x = 1 and the MASK column convention."""
    r, (model, cfg) = ref("gamma"), loaded("gamma")
    process = make_process(cfg.process, 61)
    xt, pos, sigma = r["input.xt"], r["input.positions"], r["a.sigma"]
    with torch.no_grad():
        raw = model(xt, sigma, pos, keep=torch.exp(-0.01 * sigma))
    t = -torch.expm1(-sigma) / (1 - cfg.process.noise_eps)  # the level whose σ̄ is the reference σ
    ls = process.log_score(raw.double(), xt, t.double())
    official = r["a.log_score.float32"].double()
    real = torch.ones_like(official, dtype=torch.bool)
    real[..., MASK] = False
    real &= ~torch.nn.functional.one_hot(xt.clamp(max=60), 62).bool() | (xt == MASK).unsqueeze(-1)
    assert max_abs(ls[real], official[real]) <= 2e-5
    direct = sedd_log_score(raw.double(), xt, sigma.double(), MASK)
    finite = torch.isfinite(ls)
    assert torch.equal(finite, torch.isfinite(direct)) and max_abs(direct[finite], ls[finite]) <= 1e-5
