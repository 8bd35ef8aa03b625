"""Samplers (paper §3.4, App. B.4, App. D, App. F.2) against exact references, no neural model.

The network is replaced by the EXACT denoiser of a toy data distribution p_data over all N^d
sequences (N = 3, d = 3), computed by enumerating every clean sequence y and every noisy state
x under the process's per-position forward marginals q(x_i | y_i, s_i):

- score family: raw[i, z] = log p_s(x with z at i), so that softmax(raw) gives the exact ratios
  p_s(x^{i<-z}) / p_s(x) through ``process.log_score`` (its parametrisation: the real token given
  "not masked");
- mean family: raw[i, z] = log p(y_i = z | x_s) by Bayes' rule.

Each sampler is then run over Flat and Block hyperschedules on one big seeded batch and the
distribution of its outputs is compared with p_data in total variation. The bounds leave room
for the Monte-Carlo noise (about 0.015 at 4000 samples here) and for the time-discretisation
error of the sampler (several positions updated in one step), both measured, while a sampler
that ignores the scores, draws positions independently or mixes up levels lands far outside.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hdlm.errors import HDLMError
from hdlm.hyperschedule import block, flat, quench
from hdlm.noise import LogLinear
from hdlm.processes import MDLM, Absorb, EpsilonHybrid, GammaHybrid, Uniform
from hdlm.sampling.samplers import (
    AncestralSampler,
    ARSampler,
    Categorical,
    ScoreSampler,
    gumbel_max_draw,
    inverse_cdf_draw,
    make_sampler,
    shape_log_probs,
)

F64 = torch.float64
N, D = 3, 3
NOISE = LogLinear(1e-3)

# a strongly correlated toy distribution: 7 of the 27 sequences carry all the mass
SUPPORT = {(0, 0, 0): 0.25, (0, 1, 2): 0.20, (1, 1, 1): 0.15, (2, 0, 1): 0.15,
           (2, 2, 0): 0.10, (1, 0, 2): 0.10, (0, 2, 1): 0.05}


def seq_index(x: torch.Tensor, base: int) -> torch.Tensor:
    w = base ** torch.arange(x.shape[-1] - 1, -1, -1)
    return (x * w).sum(-1)


def p_data() -> torch.Tensor:
    p = torch.zeros(N**D, dtype=F64)
    for seq, w in SUPPORT.items():
        p[int(seq_index(torch.tensor(seq), N))] = w
    return p


class ExactDenoiser:
    """The exact network output for p_data under a process, by enumeration (see module docstring)."""

    def __init__(self, process, pdata: torch.Tensor, d: int = D):
        self.process, self.pdata, self.d = process, pdata, d
        self.Y = torch.tensor(list(itertools.product(range(N), repeat=d)))  # (N^d, d)
        self.X = torch.tensor(list(itertools.product(range(N + 1), repeat=d)))  # ((N+1)^d, d)
        self.w = (N + 1) ** torch.arange(d - 1, -1, -1)

    def joint(self, s: torch.Tensor) -> torch.Tensor:
        """p(y, x_s) ((N^d, (N+1)^d)) with position i at level s[i]."""
        J = self.pdata[:, None].clone()
        for i in range(self.d):
            m = self.process.marginal(torch.arange(N), torch.full((N,), float(s[i]), dtype=F64))  # (N, N+1)
            J = J * m[self.Y[:, i]][:, self.X[:, i]]
        return J

    def table(self, s: torch.Tensor) -> torch.Tensor:
        """raw for every state: ((N+1)^d, d, N)."""
        J = self.joint(s)
        S = self.X.shape[0]
        out = torch.empty(S, self.d, N, dtype=F64)
        if self.process.family == "score":
            p_x = J.sum(0)
            for i in range(self.d):
                for z in range(N):
                    swapped = torch.arange(S) + (z - self.X[:, i]) * self.w[i]
                    out[:, i, z] = p_x[swapped]
        else:
            for i in range(self.d):
                for z in range(N):
                    out[:, i, z] = (J * (self.Y[:, i] == z).to(F64)[:, None]).sum(0)
        return torch.log(out.clamp_min(1e-300))  # unreachable states: uniform, never NaN

    def __call__(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.table(s)[seq_index(x, N + 1)]


def run_sampler(sampler, process, hs, batch: int, seed: int, prompt: torch.Tensor | None = None,
                record: bool = False):
    """Generate ``batch`` sequences with the exact denoiser; the sampler sees all d positions and
    their per-position levels (prompt positions are settled: level 0 at every step)."""
    den = ExactDenoiser(process, p_data())
    gen = torch.Generator().manual_seed(seed)
    x = process.prior((batch, D), generator=gen)
    P = 0 if prompt is None else prompt.numel()
    if P:
        x[:, :P] = prompt
    states = [x.clone()]
    for t in range(hs.T):
        s_now, s_next = hs.level_at_step(t, F64).clone(), hs.level_at_step(t + 1, F64).clone()
        s_now[:P] = 0.0
        s_next[:P] = 0.0
        x = sampler.step(den(x, s_now), x, s_now, s_next, gen)
        if record:
            states.append(x.clone())
    return (x, states) if record else x


def tv_to(x: torch.Tensor, target: torch.Tensor) -> float:
    assert int(x.max()) < N, "a MASK survived the last step"
    counts = torch.bincount(seq_index(x, N), minlength=N**D).to(F64)
    return 0.5 * float((counts / counts.sum() - target).abs().sum())


BATCH = 4000
FLAT = flat(D, steps=64)
BLOCK = block(D, width=2, rho=2 / 32)  # 32 levels per block, T = 64
SCHEDULES = {"flat": FLAT, "block": BLOCK}
# TV bounds at BATCH samples: the 99.9% quantile of the Monte-Carlo TV of an exact sampler is
# 0.032 (simulated), plus the discretisation error measured at 40000 samples and T = 64
# (Flat: up to 0.024 for the uniform process; Block: up to 0.011)
TV_BOUND = {"flat": 0.06, "block": 0.045}


# ------------------------------------------------------------------------------------------
# exactness of the samplers with the exact denoiser


def test_exact_denoiser_sanity():
    """The reference itself: at level 0 the mean-family posterior is a point mass on x, and the
    score-family raw at a fully masked state is the data marginal of each position."""
    den = ExactDenoiser(MDLM(N, NOISE), p_data())
    x = torch.tensor([[0, 1, 2], [2, 2, 0]])
    post = torch.softmax(den(x, torch.zeros(D, dtype=F64)), -1)
    torch.testing.assert_close(post, torch.nn.functional.one_hot(x, N).to(F64))
    den = ExactDenoiser(Absorb(N, NOISE), p_data())
    raw = den(torch.full((1, D), N), torch.full((D,), 0.7, dtype=F64))
    pd = p_data().view(N, N, N)
    marg = torch.stack([pd.sum((1, 2)), pd.sum((0, 2)), pd.sum((0, 1))])
    torch.testing.assert_close(torch.softmax(raw[0], -1), marg)


@pytest.mark.parametrize("kind", ["flat", "block"])
@pytest.mark.parametrize("process", [Absorb(N, NOISE), GammaHybrid(N, NOISE, 0.3), Uniform(N, NOISE)],
                         ids=["absorb", "gamma0.3", "uniform"])
def test_analytic_sampler_reproduces_data(process, kind):
    x = run_sampler(ScoreSampler(process, rule="analytic"), process, SCHEDULES[kind], BATCH, seed=1)
    assert tv_to(x, p_data()) < TV_BOUND[kind]


@pytest.mark.parametrize("kind", ["flat", "block"])
def test_posterior_kernel_sampler_reproduces_data(kind):
    process = GammaHybrid(N, NOISE, 0.3)
    x = run_sampler(make_sampler("posterior", process), process, SCHEDULES[kind], BATCH, seed=1)
    assert tv_to(x, p_data()) < TV_BOUND[kind]


@pytest.mark.parametrize("kind", ["flat", "block"])
def test_euler_sampler_reproduces_data(kind):
    process = GammaHybrid(N, NOISE, 0.3)
    hs = flat(D, steps=128) if kind == "flat" else block(D, width=2, rho=2 / 64)  # many small steps
    x = run_sampler(ScoreSampler(process, rule="euler"), process, hs, BATCH, seed=2)
    assert tv_to(x, p_data()) < TV_BOUND[kind]


@pytest.mark.parametrize("kind", ["flat", "block"])
def test_ancestral_sampler_reproduces_data(kind):
    process = MDLM(N, NOISE)
    x = run_sampler(AncestralSampler(process), process, SCHEDULES[kind], BATCH, seed=3)
    assert tv_to(x, p_data()) < TV_BOUND[kind]


def test_ar_sampler_on_quench_is_exact_ancestral_sampling():
    """Quench: one position per step, drawn from the exact p(y_i | y_<i): no discretisation error."""
    process = MDLM(N, NOISE)
    x = run_sampler(ARSampler(process), process, quench(D), BATCH, seed=4)
    assert tv_to(x, p_data()) < 0.035


def test_one_step_follows_each_positions_own_level_change():
    """One step from all-MASK with a different (s_now, s_next) per position, against hand-derived
    laws for the log-linear schedule (1 - alpha(s) = (1 - eps) s):
    MDLM reveals with p_transfer = 1 - s_next / s_now (Alg. 3's 1 - s/t); absorb keeps MASK with
    the same s_next / s_now (Bayes) and otherwise draws from softmax(raw)."""
    B = 20000
    s_now = torch.tensor([1.0, 0.5, 0.3, 0.8], dtype=F64)
    s_next = torch.tensor([0.5, 0.5, 0.1, 0.0], dtype=F64)
    stay = torch.tensor([0.5, 1.0, 1 / 3, 0.0], dtype=F64)
    gen = torch.Generator().manual_seed(14)
    raw = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0], [2.0, 1.0, 0.5], [-1.0, 0.5, 0.0]], dtype=F64)
    x = torch.full((B, 4), N)
    for sampler in (AncestralSampler(MDLM(N, NOISE)), ScoreSampler(Absorb(N, NOISE))):
        out = sampler.step(raw.expand(B, -1, -1), x, s_now, s_next, gen)
        still = (out == N).to(F64).mean(0)
        assert torch.all((still - stay).abs() < 4.5 * torch.sqrt(stay * (1 - stay) / B) + 1e-12), still
        for i in (0, 2, 3):
            revealed = out[:, i][out[:, i] < N]
            freq = torch.bincount(revealed, minlength=N).to(F64) / len(revealed)
            assert (freq - torch.softmax(raw[i], -1)).abs().max() < 0.03


def test_broken_sampler_is_caught():
    """The TV bound is meaningful: positions drawn independently in one step (Flat with T = 1)
    give the product of the marginals, far from p_data."""
    process = MDLM(N, NOISE)
    x = run_sampler(AncestralSampler(process), process, flat(D, steps=1), BATCH, seed=5)
    assert tv_to(x, p_data()) > 0.3


@pytest.mark.parametrize("make", [
    lambda: ScoreSampler(GammaHybrid(N, NOISE, 0.3), rule="analytic"),
    lambda: ScoreSampler(GammaHybrid(N, NOISE, 0.3), rule="euler"),
    lambda: AncestralSampler(MDLM(N, NOISE)),
], ids=["analytic", "euler", "ancestral"])
def test_prompted_sampling_reproduces_the_conditional(make):
    """Prompt tokens are settled at every step: the samples follow p_data( . | prompt) and the
    prompt itself never changes."""
    sampler = make()
    prompt = torch.tensor([0])
    x = run_sampler(sampler, sampler.process, BLOCK, BATCH, seed=6, prompt=prompt)
    assert torch.all(x[:, 0] == 0)
    cond = p_data().clone()
    cond[N ** (D - 1):] = 0.0  # sequences starting with 0 come first
    cond /= cond.sum()
    assert tv_to(x, cond) < TV_BOUND["block"]


# ------------------------------------------------------------------------------------------
# ACS (Algorithm 4)


@pytest.mark.parametrize("kind", ["flat", "block"])
@pytest.mark.parametrize("shaping", [{}, {"temperature": 0.7, "top_k": 2}], ids=["plain", "shaped"])
def test_acs_with_eta_zero_is_algorithm3_step_for_step(kind, shaping):
    process = EpsilonHybrid(N, NOISE, 0.1)
    cat = Categorical(**shaping)
    _, a = run_sampler(AncestralSampler(process, cat), process, SCHEDULES[kind], 500, seed=7, record=True)
    _, b = run_sampler(AncestralSampler(process, cat, eta=0.0), process, SCHEDULES[kind], 500, seed=7, record=True)
    assert len(a) == len(b)
    for xa, xb in zip(a, b):
        assert torch.equal(xa, xb)


def test_acs_corrects_revealed_tokens_and_respects_prompts():
    process = EpsilonHybrid(N, NOISE, 0.1)
    prompt = torch.tensor([2])
    acs = make_sampler("acs", process, eta=0.3)
    x, states = run_sampler(acs, process, SCHEDULES["flat"], 500, seed=8, prompt=prompt, record=True)
    assert all(torch.all(s[:, :1] == prompt) for s in states)
    assert int(x.max()) < N
    # ACS changes tokens that were already revealed; Algorithm 3 never does
    stacked = torch.stack(states)  # (T+1, B, d)
    revealed_then_changed = ((stacked[:-1] != N) & (stacked[1:] != stacked[:-1])).any()
    assert revealed_then_changed
    _, plain = run_sampler(AncestralSampler(process), process, SCHEDULES["flat"], 500, seed=8, prompt=prompt,
                           record=True)
    plain = torch.stack(plain)
    assert not ((plain[:-1] != N) & (plain[1:] != plain[:-1])).any()


@pytest.mark.parametrize("name", ["analytic", "euler", "ancestral", "acs", "ar"])
def test_prompt_never_altered_and_seed_reproducible(name):
    process = GammaHybrid(N, NOISE, 0.5) if name in ("analytic", "euler") else EpsilonHybrid(N, NOISE, 0.2)
    sampler = make_sampler(name, process, eta=0.5, temperature=1.3)
    prompt = torch.tensor([1])
    x1, states = run_sampler(sampler, process, FLAT, 300, seed=9, prompt=prompt, record=True)
    assert all(torch.all(s[:, 0] == 1) for s in states)
    x2 = run_sampler(sampler, process, FLAT, 300, seed=9, prompt=prompt)
    x3 = run_sampler(sampler, process, FLAT, 300, seed=10, prompt=prompt)
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, x3)


def test_step_leaves_positions_whose_level_does_not_move():
    """Settled (0 -> 0) and worthless (1 -> 1) positions are returned unchanged, even by ACS."""
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([[0, 1, N, N], [2, 0, N, N]])
    s_now = torch.tensor([0.0, 0.5, 0.5, 1.0], dtype=F64)
    for sampler in (make_sampler("acs", EpsilonHybrid(N, NOISE, 0.3), eta=1.0),
                    make_sampler("analytic", GammaHybrid(N, NOISE, 0.5)), make_sampler("ar", MDLM(N, NOISE))):
        out = sampler.step(torch.randn(2, 4, N, generator=gen, dtype=F64), x, s_now, s_now, gen)
        assert torch.equal(out, x)
        s_next = torch.tensor([0.0, 0.5, 0.0, 1.0], dtype=F64)  # only position 2 moves
        out = sampler.step(torch.randn(2, 4, N, generator=gen, dtype=F64), x, s_now, s_next, gen)
        assert torch.equal(out[:, [0, 1, 3]], x[:, [0, 1, 3]]) and int(out[:, 2].max()) < N


# ------------------------------------------------------------------------------------------
# categorical draws


@pytest.mark.parametrize("draw", [inverse_cdf_draw, lambda p, g: gumbel_max_draw(p, g, F64)], ids=["cdf", "gumbel64"])
def test_float64_draws_are_exact(draw):
    """Chi-square against the weights (unnormalised, with a zero-weight class that must never appear)."""
    w = torch.tensor([3.0, 0.0, 1.0, 0.5, 2.5, 0.0, 1e-3 + 1.0], dtype=F64)
    M = 40000
    gen = torch.Generator().manual_seed(11)
    idx = draw(w.expand(M, -1), gen)
    counts = torch.bincount(idx, minlength=len(w)).to(F64)
    assert counts[1] == 0 and counts[5] == 0
    p = w / w.sum()
    live = p > 0
    chi2 = float(((counts[live] - M * p[live]) ** 2 / (M * p[live])).sum())
    assert chi2 < 20.5  # chi-square with 4 dof: P(> 20.5) < 4e-4


def test_inverse_cdf_handles_rows_independently_and_edge_rows():
    gen = torch.Generator().manual_seed(12)
    probs = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1e-300, 0.0]], dtype=F64)
    for _ in range(20):
        assert inverse_cdf_draw(probs, gen).tolist() == [2, 0, 1]


def test_shape_log_probs_matches_hand_computation():
    p = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=F64)
    lp = p.log().unsqueeze(0)
    # temperature: p^(1/T) normalised
    t = 0.5
    ref = p ** (1 / t) / (p ** (1 / t)).sum()
    torch.testing.assert_close(torch.softmax(shape_log_probs(lp, temperature=t), -1)[0], ref)
    # top-k = 2: renormalised top two
    got = torch.softmax(shape_log_probs(lp, top_k=2), -1)[0]
    torch.testing.assert_close(got, torch.tensor([2 / 3, 1 / 3, 0, 0], dtype=F64))
    # top-p: smallest prefix reaching p (0.5 -> {0}; 0.6 -> {0, 1}; 0.75 -> {0, 1}; 0.76 -> {0, 1, 2})
    for top_p, keep in [(0.5, 1), (0.6, 2), (0.75, 2), (0.76, 3), (1.0, 4)]:
        got = torch.softmax(shape_log_probs(lp, top_p=top_p), -1)[0]
        ref = torch.zeros(4, dtype=F64)
        ref[:keep] = p[:keep] / p[:keep].sum()
        torch.testing.assert_close(got, ref)
    # order of classes does not matter
    perm = torch.tensor([2, 0, 3, 1])
    got = torch.softmax(shape_log_probs(lp[:, perm], top_p=0.6), -1)[0]
    torch.testing.assert_close(got, torch.tensor([0.0, 0.5 / 0.75, 0.0, 0.25 / 0.75], dtype=F64))


def test_samplers_apply_temperature_top_k_top_p():
    """top-k = 1 turns every sampler's token choice into the argmax of its distribution."""
    gen = torch.Generator().manual_seed(13)
    raw = torch.randn(64, 1, N, generator=gen, dtype=F64)
    best = raw.argmax(-1)
    x = torch.full((64, 1), N)
    one, zero = torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)
    for name, proc in [("ancestral", MDLM(N, NOISE)), ("ar", MDLM(N, NOISE)), ("analytic", Absorb(N, NOISE))]:
        out = make_sampler(name, proc, top_k=1).step(raw, x, one, zero, gen)
        assert torch.equal(out, best), name
        out = make_sampler(name, proc, top_p=1e-6).step(raw, x, one, zero, gen)
        assert torch.equal(out, best), name
    # temperature -> 0 concentrates, temperature large flattens (empirical frequencies over a batch)
    raw1 = torch.tensor([[[2.0, 0.0, -1.0]]], dtype=F64).expand(20000, 1, N)
    x1 = torch.full((20000, 1), N)
    freq = {}
    for t in (0.5, 1.0, 3.0):
        out = make_sampler("ar", MDLM(N, NOISE), temperature=t).step(raw1, x1, one, zero, gen)
        freq[t] = float((out == 0).to(F64).mean())
        ref = float(torch.softmax(raw1[0, 0] / t, -1)[0])
        assert abs(freq[t] - ref) < 0.015


# ------------------------------------------------------------------------------------------
# float32 Gumbel lowers the entropy (App. F.2, Zheng et al. 2024)


def step_distribution(V: int, delta: float, seed: int = 0) -> torch.Tensor:
    """A sampler-step distribution over V real classes + MASK: a near-uniform real part of total
    mass delta (logits 0.1 * N(0, 1)) and 1 - delta on "stay MASK"."""
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(0.1 * torch.randn(V, generator=g, dtype=F64), 0)
    return torch.cat([delta * q, torch.tensor([1.0 - delta], dtype=F64)])


def entropy_of_draws(p: torch.Tensor, rows: int, dtype, device="cpu", chunk: int = 2000,
                     seed: int = 0) -> tuple[float, float, int]:
    """Monte-Carlo estimate of E[-log p(drawn class)] (= H(p) for an exact sampler), its standard
    error, and the number of real (non-MASK) draws."""
    gen = torch.Generator(device=device).manual_seed(seed)
    pd = p.to(device)
    nll, real = [], 0
    for start in range(0, rows, chunk):
        m = min(chunk, rows - start)
        idx = gumbel_max_draw(pd.expand(m, -1), gen, dtype) if dtype is not None else \
            inverse_cdf_draw(pd.expand(m, -1), gen)
        nll.append(-torch.log(pd[idx]))
        real += int((idx < len(p) - 1).sum())
    nll = torch.cat(nll).cpu()
    return float(nll.mean()), float(nll.std() / math.sqrt(len(nll))), real


def test_low_precision_gumbel_lowers_entropy_float64_does_not():
    """The mechanism of App. F.2 at a resolution a CPU test can afford.

    With uniforms on a grid of spacing 2^-b, E = -log U >= 2^-b, so a real class whose weight is
    ~2^-b times that of "stay MASK" is under-drawn and the draws' entropy drops. For float32
    (b = 24) one affected draw costs ~2^24 uniforms, i.e. ~10^9 uniforms for a clear signal
    (tested on CUDA below); float16 uniforms (b = 11) show the same effect with 2^13 fewer.
    Here the real part is near-uniform over V = 64 classes with delta = V 2^-12.
    """
    V = 64
    p = step_distribution(V, delta=V * 2.0**-12)
    H = float(-(p * p.log()).sum())
    rows = 60000
    low, low_se, low_real = entropy_of_draws(p, rows, torch.float16, chunk=20000)
    hi, hi_se, hi_real = entropy_of_draws(p, rows, F64, chunk=20000)
    cdf, cdf_se, _ = entropy_of_draws(p, rows, None, chunk=20000)
    assert abs(hi - H) < 4 * hi_se and abs(cdf - H) < 4 * cdf_se
    assert low < H - 8 * low_se  # clearly lower entropy
    assert low_real < 0.6 * hi_real  # because real tokens are under-drawn


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: ~2e10 float32 uniforms")
def test_float32_gumbel_lowers_entropy_at_50k_classes_cuda():
    """App. F.2 at full size: a step distribution over 50k near-uniform real classes (mass delta =
    V 2^-25, about half a float32 quantum each) and "stay MASK". The float32 race under-draws the
    real classes (about a third of their exact rate), the float64 paths do not."""
    V = 50_000
    p = step_distribution(V, delta=V * 2.0**-25)
    H = float(-(p * p.log()).sum())
    rows = 400_000
    f32, f32_se, f32_real = entropy_of_draws(p, rows, torch.float32, device="cuda", chunk=10_000)
    f64, f64_se, f64_real = entropy_of_draws(p, rows, F64, device="cuda", chunk=10_000)
    cdf, cdf_se, cdf_real = entropy_of_draws(p, rows, None, device="cuda", chunk=10_000)
    expected_real = rows * float(p[:V].sum())
    for real in (f64_real, cdf_real):
        assert abs(real - expected_real) < 5 * math.sqrt(expected_real)
    assert abs(f64 - H) < 5 * f64_se and abs(cdf - H) < 5 * cdf_se
    assert f32_real < expected_real - 10 * math.sqrt(expected_real)
    assert f32 < H - 8 * f32_se


# ------------------------------------------------------------------------------------------
# construction


def test_make_sampler_auto_and_errors():
    assert make_sampler("auto", GammaHybrid(N, NOISE, 0.1)).name == "posterior"  # full support, finite bound
    assert make_sampler("auto", Uniform(N, NOISE)).name == "analytic"
    assert make_sampler("auto", MDLM(N, NOISE)).name == "ancestral"
    assert make_sampler("auto", MDLM(N, NOISE), hyperschedule=quench(4)).name == "ar"
    assert make_sampler("auto", Absorb(N, NOISE), hyperschedule=quench(4)).name == "ar"
    assert make_sampler("auto", Absorb(N, NOISE), hyperschedule=flat(4)).name == "analytic"
    acs = make_sampler("acs", MDLM(N, NOISE), eta=0.25)
    assert isinstance(acs, AncestralSampler) and acs.eta == 0.25
    assert make_sampler("ancestral", MDLM(N, NOISE), eta=0.25).eta == 0.0
    assert make_sampler("euler", Uniform(N, NOISE)).rule == "euler"
    for bad in [lambda: make_sampler("analytic", MDLM(N, NOISE)),
                lambda: make_sampler("acs", Absorb(N, NOISE)),
                lambda: make_sampler("nucleus", Absorb(N, NOISE)),
                lambda: make_sampler("acs", MDLM(N, NOISE), eta=1.5),
                lambda: make_sampler("ar", MDLM(N, NOISE), temperature=0.0),
                lambda: make_sampler("ar", MDLM(N, NOISE), top_p=0.0),
                lambda: make_sampler("ar", MDLM(N, NOISE), top_k=-1),
                lambda: make_sampler("ar", MDLM(N, NOISE), method="magic")]:
        with pytest.raises(HDLMError):
            bad()


def test_posterior_sampler_draws_the_kernel_the_discrete_bound_certifies():
    """One step of the ε posterior sampler has the law of the process's "posterior" kernel (the bound's),
    including the final step where revealed tokens are redrawn; for ε = 0 it is Algorithm 3's law."""
    from hdlm.noise import Linear
    from hdlm.processes import EpsilonHybrid
    from hdlm.sampling import make_sampler

    N, M = 4, 40000
    proc = EpsilonHybrid(N, Linear(1e-3), epsilon=0.2)
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(1, 1, N, dtype=torch.float64).expand(M, 2, N)
    x = torch.tensor([N, 2]).expand(M, 2)  # a MASK and a revealed token
    for (s_now, s_next), name in itertools.product([(0.6, 0.3), (0.3, 0.0)], ["posterior", "ancestral"]):
        out = make_sampler(name, proc).step(raw, x, s_now, s_next, gen)  # "ancestral": Algorithm 3's own code
        probs = proc.reverse_kernel(raw[:1], x[:1], s_now, s_next, name)[0]
        for j in range(2):
            freq = torch.bincount(out[:, j], minlength=N + 1).double() / M
            assert torch.allclose(freq, probs[j], atol=4.5 * (probs[j] * (1 - probs[j]) / M).sqrt().max() + 1e-12)
    assert make_sampler("posterior", EpsilonHybrid(N, Linear(1e-3), epsilon=0.0)).name == "posterior"
