"""gamma-hybrid process (paper §3.2, App. A, Eq. (7g); DWDSE of Lou et al.; Tweedie tau-leaping).

Every reference here is built independently of hdlm.processes: dense rate matrices written from
the definitions, torch.linalg.matrix_exp, SEDD's absorb / uniform score entropies written out by
hand, Bayes' rule for the reverse posterior.
"""

from __future__ import annotations

import functools
import math

import mpmath  # a dependency of torch (through sympy)
import pytest
import torch

from hdlm.config import ProcessConfig
from hdlm.errors import HDLMError
from hdlm.noise import Geometric, LogLinear
from hdlm.processes import (
    MDLM,
    Absorb,
    EpsilonHybrid,
    GammaHybrid,
    Uniform,
    cross_entropy,
    make_process,
)

F64 = torch.float64
GAMMAS = [0.0, 0.01, 0.3, 1.0]


def dense_q(N: int, gamma: float) -> torch.Tensor:
    """Q_gamma (N+1, N+1) in the column convention, entry by entry from the definitions."""
    M = N
    q_absorb = torch.zeros(N + 1, N + 1, dtype=F64)
    q_uniform = torch.zeros(N + 1, N + 1, dtype=F64)
    for col in range(N + 1):
        q_absorb[M, col] += 1.0  # e_M 1^T
        q_absorb[col, col] -= 1.0  # - I
    for col in range(N):
        for row in range(N):
            q_uniform[row, col] += 1.0 / N
        q_uniform[col, col] -= 1.0
    return (1.0 - gamma) * q_absorb + gamma * q_uniform


def expm(c: float, N: int, gamma: float) -> torch.Tensor:
    return torch.linalg.matrix_exp(c * dense_q(N, gamma))


@functools.lru_cache(maxsize=None)
def _expm_exact_cached(c: float, N: int, gamma: float) -> torch.Tensor:
    with mpmath.workdps(40):
        E = mpmath.expm(mpmath.matrix(dense_q(N, gamma).tolist()) * mpmath.mpf(c))
        return torch.tensor([[float(E[i, j]) for j in range(N + 1)] for i in range(N + 1)], dtype=F64)


def expm_exact(c: float, N: int, gamma: float) -> torch.Tensor:
    """exp(c Q_gamma) in 40-digit arithmetic: torch.linalg.matrix_exp is only ~1e-11 accurate in
    absolute terms, i.e. ~1e-9 relative on the small entries whose ratios the score entropy uses."""
    return _expm_exact_cached(float(c), N, float(gamma)).clone()


def sigma_bar(noise, s: float) -> float:
    return float(noise.sigma_bar(torch.tensor(s, dtype=F64)))


def dsigma_bar(noise, s: float) -> float:
    return float(noise.dsigma_bar(torch.tensor(s, dtype=F64)))


# ------------------------------------------------------------------------------------------
# evolution operator, Eq. (7g)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("delta", [0.01, 0.5, 3.0])
def test_transition_matches_matrix_exp(gamma, delta):
    N = 5
    proc = GammaHybrid(N, LogLinear(), gamma)
    got = proc.transition(torch.tensor(delta, dtype=F64))
    torch.testing.assert_close(got, expm(delta, N, gamma), atol=1e-10, rtol=0)
    torch.testing.assert_close(got.sum(0), torch.ones(N + 1, dtype=F64), atol=1e-12, rtol=0)


def test_transition_batched():
    N, gamma = 4, 0.2
    proc = GammaHybrid(N, LogLinear(), gamma)
    deltas = torch.tensor([[0.1, 1.0], [2.0, 0.0]], dtype=F64)
    got = proc.transition(deltas)
    assert got.shape == (2, 2, N + 1, N + 1)
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(got[i, j], expm(float(deltas[i, j]), N, gamma), atol=1e-10, rtol=0)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_apply_exp_and_exp_row_match_dense(gamma):
    N = 5
    proc = GammaHybrid(N, LogLinear(), gamma)
    gen = torch.Generator().manual_seed(0)
    cs = torch.tensor([-1.3, -0.2, 0.0, 0.4, 2.5], dtype=F64)
    v = torch.randn(len(cs), N + 1, generator=gen, dtype=F64)
    got = proc.apply_exp(v, cs)
    for k, c in enumerate(cs.tolist()):
        torch.testing.assert_close(got[k], expm(c, N, gamma) @ v[k], atol=1e-10, rtol=1e-10)
    for c in cs.tolist():
        x = torch.arange(N + 1)
        rows = proc.exp_row(x, torch.full((N + 1,), c, dtype=F64))
        torch.testing.assert_close(rows, expm(c, N, gamma), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("noise", [LogLinear(1e-3), Geometric(1e-3, 5.0)], ids=["loglinear", "geometric"])
def test_marginal_matches_matrix_exp(gamma, noise):
    N = 5
    proc = GammaHybrid(N, noise, gamma)
    y = torch.arange(N)
    for s in [0.0, 0.05, 0.5, 1.0]:
        got = proc.marginal(y, torch.full((N,), s, dtype=F64))
        ref = expm(sigma_bar(noise, s), N, gamma)[:, :N].T  # row y = column y of exp(sigma_bar Q)
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_sample_forward_frequencies_match_marginal(gamma):
    N, n = 5, 200_000
    proc = GammaHybrid(N, LogLinear(), gamma)
    gen = torch.Generator().manual_seed(1)
    y = torch.full((n,), 2)
    s = torch.full((n,), 0.6, dtype=F64)
    x, aux = proc.sample_forward(y, s, generator=gen)
    assert aux == {} and x.dtype == torch.long
    freq = torch.bincount(x, minlength=N + 1).to(F64) / n
    p = expm(sigma_bar(proc.noise, 0.6), N, gamma)[:, 2]
    tol = 5.0 * torch.sqrt(p * (1 - p) / n) + 1e-12
    assert torch.all((freq - p).abs() <= tol), (freq, p)


def test_sample_forward_clean_at_zero_noise():
    proc = GammaHybrid(6, LogLinear(), 0.5)
    y = torch.randint(0, 6, (50,), generator=torch.Generator().manual_seed(0))
    x, _ = proc.sample_forward(y, torch.zeros(50, dtype=F64), generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------
# DWDSE against SEDD's absorb / uniform score entropies, written out by hand


def _random_problem(N, B, seed, s_lo=0.02, s_hi=0.98):
    gen = torch.Generator().manual_seed(seed)
    raw = 2.0 * torch.randn(B, N, generator=gen, dtype=F64)
    y = torch.randint(0, N, (B,), generator=gen)
    s = s_lo + (s_hi - s_lo) * torch.rand(B, generator=gen, dtype=F64)
    return raw, y, s, gen


def test_absorb_dwdse_equals_sedd_absorb_score_entropy():
    N, B = 7, 64
    noise = LogLinear(1e-3)
    proc = Absorb(N, noise)
    raw, y, s, gen = _random_problem(N, B, 0)
    x = torch.where(torch.rand(B, generator=gen) < 0.6, torch.full_like(y, N), y)
    got = proc.diffusion_loss(raw, x, y, s, 1.0)
    for i in range(B):
        sb, dsb = sigma_bar(noise, float(s[i])), dsigma_bar(noise, float(s[i]))
        if int(x[i]) != N:
            assert float(got[i]) == 0.0  # absorb: nothing moves into a real token
            continue
        scores = torch.softmax(raw[i], -1) / math.expm1(sb)  # SEDD: s_theta scaled by 1/(e^sigma - 1)
        r = 1.0 / math.expm1(sb)
        ref = scores.sum() - r * torch.log(scores[y[i]]) + r * (math.log(r) - 1.0)
        assert abs(float(got[i]) - dsb * float(ref)) <= 1e-10 * max(1.0, abs(dsb * float(ref)))


def test_uniform_dwdse_equals_sedd_uniform_score_entropy():
    N, B = 6, 64
    noise = LogLinear(1e-3)
    proc = Uniform(N, noise)
    raw, y, s, gen = _random_problem(N, B, 1)
    other = torch.randint(0, N, (B,), generator=gen)
    x = torch.where(torch.rand(B, generator=gen) < 0.5, other, y)  # both x == y and x != y
    got = proc.diffusion_loss(raw, x, y, s, 1.0)
    for i in range(B):
        sb, dsb = sigma_bar(noise, float(s[i])), dsigma_bar(noise, float(s[i]))
        xi, yi = int(x[i]), int(y[i])
        p = torch.softmax(raw[i], -1)
        em1 = math.expm1(sb)
        ref = 0.0
        for z in range(N):
            if z == xi:
                continue
            # uniform-graph ratios p_sigma(z|y)/p_sigma(x|y), hand-derived from (1-e^-s)/N + e^-s [z=y]
            if xi == yi:
                r = em1 / (em1 + N)
            elif z == yi:
                r = 1.0 + N / em1
            else:
                r = 1.0
            sz = float(p[z] / p[xi])
            ref += (1.0 / N) * (sz - r * math.log(sz) + r * (math.log(r) - 1.0))
        assert abs(float(got[i]) - dsb * ref) <= 1e-10 * max(1.0, abs(dsb * ref))


@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.3, 0.7, 1.0])
def test_dwdse_brute_force_over_dense_rates(gamma):
    """sum_{z != x} Q[x, z] [s_z - r_z log s_z + r_z (log r_z - 1)] by looping over a dense Q_gamma."""
    N = 3
    noise = LogLinear(1e-3)
    proc = GammaHybrid(N, noise, gamma)
    Q = dense_q(N, gamma)
    gen = torch.Generator().manual_seed(2)
    for s in [0.03, 0.4, 0.95]:
        sb, dsb = sigma_bar(noise, s), dsigma_bar(noise, s)
        P = expm_exact(sb, N, gamma)
        for y in range(N):
            for x in range(N + 1):
                raw = 1.5 * torch.randn(N, generator=gen, dtype=F64)
                rate = 0.3 + float(torch.rand((), generator=gen))
                got = float(proc.diffusion_loss(raw, torch.tensor(x), torch.tensor(y),
                                                torch.tensor(s, dtype=F64), torch.tensor(rate, dtype=F64)))
                if P[x, y] <= 0:  # unreachable state: no loss
                    assert got == 0.0
                    continue
                p = torch.softmax(raw, -1)
                if x == N:
                    a = 1.0 - float(P[N, y])
                    scores = [float(p[z]) * a / (1 - a) for z in range(N)] + [1.0]
                else:
                    scores = [float(p[z] / p[x]) for z in range(N)] + [0.0]
                ref = 0.0
                for z in range(N + 1):
                    if z == x or Q[x, z] == 0:
                        continue
                    r = float(P[z, y] / P[x, y])
                    term = scores[z] - (r * math.log(scores[z]) if r > 0 else 0.0)
                    term += r * (math.log(r) - 1.0) if r > 0 else 0.0
                    ref += float(Q[x, z]) * term
                ref *= rate * dsb
                assert abs(got - ref) <= 1e-10 * max(1.0, abs(ref)), (s, y, x, got, ref)


def test_dwdse_nonnegative():
    N, B = 8, 400
    noise = LogLinear(1e-3)
    for gamma in [0.0, 0.01, 0.1, 0.5, 0.9, 1.0]:
        proc = GammaHybrid(N, noise, gamma)
        raw, y, s, gen = _random_problem(N, B, 3, s_lo=1e-4, s_hi=1.0)
        raw = raw * 3.0
        x, _ = proc.sample_forward(y, s, generator=gen)
        loss = proc.diffusion_loss(raw, x, y, s, 1.0)
        assert torch.isfinite(loss).all()
        assert (loss >= -1e-12).all()


@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.3, 1.0])
def test_dwdse_zero_at_true_ratios(gamma):
    """Single-token problem with p_0 = delta_y: raw = log of the true real marginal makes log_score
    reproduce log p_s(z)/p_s(x) exactly, and the loss vanishes."""
    N = 5
    noise = LogLinear(1e-3)
    proc = GammaHybrid(N, noise, gamma)
    for s in [0.01, 0.3, 0.9]:
        P = expm_exact(sigma_bar(noise, s), N, gamma)
        for y in range(N):
            raw = torch.log(P[:N, y])  # -inf where unreachable (gamma = 0)
            for x in range(N + 1):
                if P[x, y] <= 0:
                    continue
                xs, ys, ss = torch.tensor(x), torch.tensor(y), torch.tensor(s, dtype=F64)
                log_s = proc.log_score(raw, xs, ss)
                true = torch.log(P[:, y] / P[x, y])
                check = slice(None) if x == N else slice(0, N)  # at a real x MASK is never a target
                finite = torch.isfinite(true[check])
                torch.testing.assert_close(log_s[check][finite], true[check][finite], atol=1e-10, rtol=1e-10)
                assert torch.all(log_s[check][~finite] == float("-inf"))
                assert abs(float(proc.diffusion_loss(raw, xs, ys, ss, 1.0))) <= 1e-10


@pytest.mark.parametrize("gamma", [0.0, 0.2, 1.0])
def test_true_scores_minimise_expected_dwdse(gamma):
    """Denoising score entropy: for a single token with data p_0, E_{y ~ p(y|x)} DWDSE(raw; x, y) is
    minimised (zero gradient) by the true ratios p_s(z)/p_s(x), i.e. raw = log p_s(real)."""
    N = 4
    noise = LogLinear(1e-3)
    proc = GammaHybrid(N, noise, gamma)
    p0 = torch.tensor([0.5, 0.1, 0.15, 0.25], dtype=F64)
    s = 0.45
    P = expm_exact(sigma_bar(noise, s), N, gamma)
    ps = P[:, :N] @ p0
    for x in range(N + 1):
        if ps[x] <= 0:
            continue

        def expected_loss(raw):
            ys = torch.arange(N)
            xs = torch.full((N,), x)
            losses = proc.diffusion_loss(raw.expand(N, N), xs, ys, torch.full((N,), s, dtype=F64), 1.0)
            return (p0 * P[x, :N] * losses).sum()  # proportional to E_{y|x}

        raw = torch.log(ps[:N]).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(expected_loss(raw), raw)
        assert grad.abs().max() <= 1e-10
        bumped = raw.detach() + 0.3 * torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=F64)
        if x == N or gamma > 0:  # (absorb: nothing to learn at a real position)
            assert expected_loss(bumped) > expected_loss(raw.detach())


# ------------------------------------------------------------------------------------------
# sampler maths


@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.3, 1.0])
@pytest.mark.parametrize("s_next", [0.35, 0.0])
def test_analytic_probs_equals_bayes_posterior_for_one_token(gamma, s_next):
    N = 5
    noise = LogLinear(1e-3)
    proc = GammaHybrid(N, noise, gamma)
    p0 = torch.tensor([0.3, 0.05, 0.4, 0.15, 0.1], dtype=F64)
    s_now = 0.8
    sb_now, sb_next = sigma_bar(noise, s_now), sigma_bar(noise, s_next)
    p_next = expm_exact(sb_next, N, gamma)[:, :N] @ p0
    step = expm_exact(sb_now - sb_next, N, gamma)  # q(x_now | x_next) = column x_next
    p_now = step @ p_next
    raw = torch.log(p_now[:N])  # exact scores of the single-token distribution
    for x in range(N + 1):
        if p_now[x] <= 0:
            continue
        xs = torch.tensor(x)
        ls = proc.log_score(raw, xs, torch.tensor(s_now, dtype=F64))
        got = proc.analytic_probs(ls, xs, torch.tensor(s_now, dtype=F64), torch.tensor(s_next, dtype=F64))
        posterior = p_next * step[x, :] / p_now[x]  # Bayes
        torch.testing.assert_close(got, posterior, atol=1e-10, rtol=1e-10)
        # same with the exact ratio also on MASK at a real x (it must not matter)
        exact = torch.log(p_now / p_now[x])
        got2 = proc.analytic_probs(exact, xs, torch.tensor(s_now, dtype=F64), torch.tensor(s_next, dtype=F64))
        torch.testing.assert_close(got2, posterior, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("gamma", [0.01, 0.3])
@pytest.mark.parametrize("s_next", [0.35, 0.0])
def test_posterior_kernel_is_the_posterior_mean_of_its_clean_token_estimate(gamma, s_next):
    """From exact single-token scores, p̂ = (1 − κ) Bayes + κ m̃ (κ = 1 − e^{−γσ̄}, m̃ ∝ p_now(ŷ) q(x | ŷ))
    and the kernel is Σ_ŷ p̂(ŷ) q(z | x, ŷ), all from dense 40-digit matrix exponentials."""
    N, s_now = 5, 0.8
    noise = LogLinear(1e-3)
    proc = GammaHybrid(N, noise, gamma)
    p0 = torch.tensor([0.3, 0.05, 0.4, 0.15, 0.1], dtype=F64)
    sb_now, sb_next = sigma_bar(noise, s_now), (sigma_bar(noise, s_next) if s_next > 0 else 0.0)
    F_now, F_next = expm_exact(sb_now, N, gamma), expm_exact(sb_next, N, gamma)
    step = expm_exact(sb_now - sb_next, N, gamma)  # q(x_now | x_next) = column x_next
    p_now = F_now[:, :N] @ p0
    raw = torch.log(p_now[:N])
    kappa = 1.0 - math.exp(-gamma * sb_now)
    for x in range(N + 1):
        bayes = p0 * F_now[x, :N] / p_now[x]
        m = p_now[:N] * F_now[x, :N]
        p_hat = (1 - kappa) * bayes + kappa * m / m.sum()
        ref = sum(p_hat[y] * F_next[:, y] * step[x, :] / F_now[x, y] for y in range(N))  # Σ_ŷ p̂ q(z | x, ŷ)
        xs, a, b = torch.tensor(x), torch.tensor(s_now, dtype=F64), torch.tensor(s_next, dtype=F64)
        torch.testing.assert_close(proc.clean_probs(raw, xs, a)[0], p_hat, atol=1e-10, rtol=1e-10)
        got = proc.reverse_kernel(raw, xs, a, b, "posterior")
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
        reachable = step[x, :] * (F_next[:, :N].sum(1)) > 0  # states z with q(x | z) q(z | some ŷ) > 0
        assert torch.all(got[reachable] > 0) and torch.all(got[~reachable] == 0)


def _kernel_problem(N, M, gamma, seed=3):
    """Rows over every corner a kernel has: levels with no step, the last step, level 0 and 1, MASK and
    real tokens (and MASK for γ = 1, whose chain never reaches it: a prompt may hold one), logits from
    flat to 300 wide (a 300-wide softmax underflows to denormals)."""
    gen = torch.Generator().manual_seed(seed)
    width = torch.tensor([0.01, 1.0, 30.0, 300.0], dtype=F64)[torch.randint(4, (M,), generator=gen)]
    raw = width[:, None] * torch.randn(M, N, generator=gen, dtype=F64)
    x = torch.randint(N + 1, (M,), generator=gen)
    levels = torch.tensor([0.0, 1e-7, 0.1, 0.5, 0.9, 1.0], dtype=F64)
    s_now = levels[torch.randint(6, (M,), generator=gen)]
    return raw, x, s_now, torch.minimum(s_now, levels[torch.randint(6, (M,), generator=gen)])


def _assert_same_kernel(fast, ref):
    torch.testing.assert_close(fast, ref, atol=1e-13, rtol=1e-12)
    tiny = torch.finfo(F64).tiny  # below it: underflow, not a zero of the kernel
    assert torch.equal(fast < tiny, ref < tiny)


@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.3, 1.0])
@pytest.mark.parametrize("noise", [LogLinear(1e-3), Geometric(1e-4, 20.0)], ids=["loglinear", "geometric"])
def test_closed_form_kernels_equal_their_composition(gamma, noise):
    """The closed-form posterior kernel, Tweedie step and analytic kernel (hdlm.processes.gamma_kernel:
    a few O(N) passes) equal the kernels composed from log_score, clean_probs, apply_exp and exp_row (tested above
    against dense matrix exponentials): values to 1e-13 and the same zeros, also for any
    log-scores (the "sedd" parametrisation's) and any leading shape; float32 stays close."""
    N, M = 7, 600
    proc = GammaHybrid(N, noise, gamma)
    raw, x, s_now, s_next = _kernel_problem(N, M, gamma)
    fast = proc.kernel_posterior(raw, x, s_now, s_next)
    _assert_same_kernel(fast, proc._posterior_composed(raw, x, s_now, s_next))
    torch.testing.assert_close(proc.kernel_posterior(raw.view(20, 30, N), x.view(20, 30), s_now.view(20, 30),
                                                     s_next.view(20, 30)), fast.view(20, 30, N + 1))
    torch.testing.assert_close(proc.kernel_posterior(raw.float(), x, s_now, s_next).double(), fast, atol=2e-6, rtol=0)
    # the analytic kernel from raw outputs, without forming the log-scores
    _assert_same_kernel(proc.kernel_analytic(raw, x, s_now, s_next),
                        proc._analytic_composed(proc.log_score(raw, x, s_now), x, s_now, s_next))
    gen = torch.Generator().manual_seed(4)
    for log_score in (proc.log_score(raw, x, s_now), 5.0 * torch.randn(M, N + 1, generator=gen, dtype=F64)):
        step = proc.analytic_probs(log_score, x, s_now, s_next)
        _assert_same_kernel(step, proc._analytic_composed(log_score, x, s_now, s_next))
        torch.testing.assert_close(proc.analytic_probs(log_score.view(20, 30, N + 1), x.view(20, 30),
                                                       s_now.view(20, 30), s_next.view(20, 30)), step.view(20, 30, N + 1))


def test_posterior_kernel_keeps_every_reachable_state_where_the_analytic_step_clamps():
    """Scores far from any γ-hybrid marginal: the Tweedie step gives reachable tokens probability 0,
    the posterior kernel gives them all positive probability; γ = 0 is MDLM's ancestral kernel."""
    N, B = 6, 40
    noise = LogLinear(1e-3)
    proc = GammaHybrid(N, noise, 0.2)
    gen = torch.Generator().manual_seed(0)
    raw = 8.0 * torch.randn(B, N, generator=gen, dtype=F64)
    x = torch.randint(N + 1, (B,), generator=gen)
    a, b = torch.full((B,), 0.9, dtype=F64), torch.full((B,), 0.6, dtype=F64)
    ana = proc.reverse_kernel(raw, x, a, b, "analytic")
    post = proc.reverse_kernel(raw, x, a, b, "posterior")
    real_reach = torch.ones(B, N + 1, dtype=torch.bool)
    real_reach[:, N] = x == N  # a real token never becomes MASK again
    assert (ana[real_reach] == 0).any()
    assert torch.all(post[real_reach] > 0) and torch.all(post[~real_reach] == 0)
    torch.testing.assert_close(post.sum(-1), torch.ones(B, dtype=F64))
    final = proc.reverse_kernel(raw, x, a, torch.zeros(B, dtype=F64), "posterior")
    assert torch.all(final[:, :N] > 0) and torch.all(final[:, N] == 0)
    absorb, mdlm = GammaHybrid(N, noise, 0.0), MDLM(N, noise)
    torch.testing.assert_close(absorb.reverse_kernel(raw, x, a, b, "posterior"), mdlm.reverse_kernel(raw, x, a, b))


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_euler_probs_matches_dense_reverse_rates(gamma):
    N, B = 5, 12
    noise = LogLinear(1e-3)
    proc = GammaHybrid(N, noise, gamma)
    Q = dense_q(N, gamma)
    raw, y, s, gen = _random_problem(N, B, 4, s_lo=0.3, s_hi=0.9)
    raw = 0.5 * raw
    x, _ = proc.sample_forward(y, s, generator=gen)
    s_next = s - 1e-3  # small enough that no probability is clamped
    ls = proc.log_score(raw, x, s)
    got = proc.euler_probs(ls, x, s, s_next)
    for i in range(B):
        xi = int(x[i])
        delta = sigma_bar(noise, float(s[i])) - sigma_bar(noise, float(s_next[i]))
        ref = torch.zeros(N + 1, dtype=F64)
        for z in range(N + 1):
            if z != xi and Q[xi, z] > 0:
                ref[z] = delta * Q[xi, z] * torch.exp(ls[i, z])  # reverse rate x -> z = Q[x, z] s_z
        ref[xi] = 1.0 - ref.sum()
        assert ref[xi] > 0
        torch.testing.assert_close(got[i], ref, atol=1e-12, rtol=1e-10)
    # Euler and Tweedie agree to first order in the step
    ana = proc.analytic_probs(ls, x, s, s - 1e-5)
    eul = proc.euler_probs(ls, x, s, s - 1e-5)
    assert (ana - eul).abs().max() < 1e-6


def test_sampler_steps_edge_rules():
    N = 4
    proc = GammaHybrid(N, LogLinear(1e-3), 0.1)
    gen = torch.Generator().manual_seed(5)
    raw = torch.randn(6, N, generator=gen, dtype=F64)
    x = torch.tensor([N, N, 1, 2, N, 0])
    s = torch.full((6,), 0.5, dtype=F64)
    ls = proc.log_score(raw, x, s)
    onehot = torch.nn.functional.one_hot(x, N + 1).to(F64)
    for fn in (proc.analytic_probs, proc.euler_probs):
        torch.testing.assert_close(fn(ls, x, s, s), onehot, atol=0, rtol=0)  # delta = 0: stay
        final = fn(ls, x, s, torch.zeros(6, dtype=F64))
        assert torch.all(final[:, N] == 0) and torch.allclose(final.sum(-1), torch.ones(6, dtype=F64))
        assert torch.all(final >= 0)


@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.3])
def test_denoise_probs_is_tweedie_bayes_denoiser_for_one_token(gamma):
    """The last step with exact scores returns p(y | x) ∝ p0(y) q(x | y, s) exactly (dense matrix_exp)."""
    N, s = 5, 0.6
    noise = LogLinear(1e-3)
    proc = GammaHybrid(N, noise, gamma)
    p0 = torch.tensor([0.3, 0.05, 0.4, 0.15, 0.1], dtype=F64)
    fwd = expm_exact(sigma_bar(noise, s), N, gamma)  # column y: q(. | y, s)
    p_now = fwd[:, :N] @ p0
    raw = torch.log(p_now[:N])
    for x in range(N + 1):
        xs, st = torch.tensor(x), torch.tensor(s, dtype=F64)
        got = proc.denoise_probs(proc.log_score(raw, xs, st), xs, st)
        ref = torch.zeros(N + 1, dtype=F64)
        ref[:N] = p0 * fwd[x, :N] / p_now[x]
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)


def test_uniform_last_step_never_outputs_mask():
    """MASK is outside the uniform process's states; should one reach the last step, it takes the
    model's real-token distribution rather than staying MASK."""
    N = 4
    proc = Uniform(N, LogLinear(1e-3))
    raw = torch.tensor([[0.0, 1.0, -1.0, 2.0]], dtype=F64)
    x = torch.tensor([N])
    s, zero = torch.tensor([0.5], dtype=F64), torch.zeros(1, dtype=F64)
    ls = proc.log_score(raw, x, s)
    for fn in (proc.analytic_probs, proc.euler_probs):
        probs = fn(ls, x, s, zero)
        torch.testing.assert_close(probs[0, :N], torch.softmax(raw[0], -1))
        assert float(probs[0, N]) == 0.0
        assert float(fn(ls, x, s, 0.5 * s)[0, N]) == 1.0  # before the last step it stays


def test_log_score_parametrisation():
    N = 5
    for gamma in [0.0, 0.4]:
        noise = LogLinear(1e-3)
        proc = GammaHybrid(N, noise, gamma)
        raw, y, s, gen = _random_problem(N, 8, 6)
        x = torch.tensor([N, 0, 1, N, 4, 2, N, 3])
        ls = proc.log_score(raw, x, s)
        lsm = torch.log_softmax(raw, -1)
        for i in range(8):
            xi = int(x[i])
            if xi == N:
                odds = -math.log(math.expm1((1 - gamma) * sigma_bar(noise, float(s[i]))))
                torch.testing.assert_close(ls[i, :N], lsm[i] + odds)
                assert float(ls[i, N]) == 0.0
            else:
                torch.testing.assert_close(ls[i, :N], lsm[i] - lsm[i, xi])
                assert float(ls[i, xi]) == 0.0 and float(ls[i, N]) == float("-inf")


# ------------------------------------------------------------------------------------------
# numerical safety, small API


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_no_nan_or_inf_in_losses_and_gradients(dtype):
    N, B = 6, 24
    gen = torch.Generator().manual_seed(7)
    procs = [GammaHybrid(N, LogLinear(1e-3), g) for g in (0.0, 0.3, 1.0)]
    procs += [GammaHybrid(N, Geometric(1e-4, 20.0), 0.1), EpsilonHybrid(N, LogLinear(1e-3), 0.1),
              MDLM(N, LogLinear(1e-3))]
    for proc in procs:
        for s_val in [0.0, 1e-6, 0.5, 1.0]:
            y = torch.randint(0, N, (B,), generator=gen)
            s = torch.full((B,), s_val, dtype=dtype)
            x, aux = proc.sample_forward(y, s, generator=gen)
            # also states the forward process cannot reach here: MASK at s = 0, x != y
            x[:3] = N
            x[3:6] = (y[3:6] + 1) % N
            rate = torch.rand(B, generator=gen, dtype=dtype)
            rate[-2:] = 0.0
            raw = (3 * torch.randn(B, N, generator=gen, dtype=dtype)).requires_grad_(True)
            loss = proc.diffusion_loss(raw, x, y, s, rate, aux)
            assert torch.isfinite(loss).all(), (proc, s_val, loss)
            assert torch.all(loss[-2:] == 0)
            (grad,) = torch.autograd.grad(loss.sum(), raw)
            assert torch.isfinite(grad).all(), (proc, s_val)
            if proc.family == "score":
                ls = proc.log_score(raw.detach(), x, s)
                for fn in (proc.analytic_probs, proc.euler_probs):
                    for s_next in (0.5 * s, torch.zeros_like(s)):
                        probs = fn(ls, x, s, s_next)
                        assert torch.isfinite(probs).all() and (probs >= 0).all(), (proc, s_val, fn)
                        torch.testing.assert_close(probs.sum(-1), torch.ones(B, dtype=dtype))


def test_float32_matches_float64():
    N, B = 8, 200
    for gamma in [0.0, 0.05, 0.5, 1.0]:
        proc = GammaHybrid(N, LogLinear(1e-3), gamma)
        raw, y, s, gen = _random_problem(N, B, 9, s_lo=1e-3, s_hi=1.0)
        x, _ = proc.sample_forward(y, s, generator=gen)
        l64 = proc.diffusion_loss(raw, x, y, s, 1.0)
        l32 = proc.diffusion_loss(raw.float(), x, y, s.float(), 1.0).double()
        torch.testing.assert_close(l32, l64, rtol=1e-4, atol=1e-5)


def test_sampler_steps_survive_extreme_scores():
    N, B = 6, 16
    gen = torch.Generator().manual_seed(10)
    for gamma in [0.0, 0.3, 1.0]:
        proc = GammaHybrid(N, Geometric(1e-4, 20.0), gamma)
        y = torch.randint(0, N, (B,), generator=gen)
        x, _ = proc.sample_forward(y, torch.full((B,), 0.9), generator=gen)
        raw = 200.0 * torch.randn(B, N, generator=gen)
        ls = proc.log_score(raw, x, torch.ones(B))
        for fn in (proc.analytic_probs, proc.euler_probs):
            probs = fn(ls, x, torch.ones(B), torch.zeros(B))
            assert torch.isfinite(probs).all() and (probs >= 0).all() and (probs[:, N] == 0).all()
            torch.testing.assert_close(probs.sum(-1), torch.ones(B))


def test_prior_and_embed_keep():
    N = 5
    noise = LogLinear(1e-3)
    gen = torch.Generator().manual_seed(8)
    assert torch.all(Absorb(N, noise).prior((2, 3)) == N)
    assert torch.all(GammaHybrid(N, noise, 0.5).prior((4,)) == N)
    u = Uniform(N, noise).prior((1000,), generator=gen)
    assert u.min() >= 0 and u.max() < N and len(torch.unique(u)) == N
    proc = GammaHybrid(N, noise, 0.3)
    x = torch.tensor([0, N, 3])
    s = torch.tensor([0.5, 0.5, 0.2], dtype=F64)
    keep = proc.embed_keep(x, s)
    ref = torch.tensor([math.exp(-0.3 * sigma_bar(noise, 0.5)), 1.0, math.exp(-0.3 * sigma_bar(noise, 0.2))], dtype=F64)
    torch.testing.assert_close(keep, ref)
    assert torch.all(Absorb(N, noise).embed_keep(x, s) == 1)


def test_cross_entropy_helper():
    raw = torch.tensor([[1.0, 2.0, 0.5]], dtype=F64)
    y = torch.tensor([1])
    ref = -(2.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5)))
    assert abs(float(cross_entropy(raw, y)) - ref) < 1e-12


def test_make_process_kinds():
    kinds = {"absorb": (Absorb, 0.0), "uniform": (Uniform, 1.0), "gamma": (GammaHybrid, 0.25)}
    for kind, (cls, gamma) in kinds.items():
        proc = make_process(ProcessConfig(kind=kind, gamma=0.25, noise="geometric", sigma_max=10.0), 7)
        assert type(proc) is cls and proc.gamma == gamma and proc.N == 7 and proc.mask_id == 7
        assert proc.family == "score" and proc.noise.sigma_max == 10.0
    eps = make_process(ProcessConfig(kind="epsilon", epsilon=0.2, lam=0.5, noise="linear", noise_eps=0.01), 9)
    assert type(eps) is EpsilonHybrid and eps.epsilon == 0.2 and eps.lam == 0.5 and eps.family == "mean"
    assert eps.noise.eps == 0.01
    mdlm = make_process(ProcessConfig(kind="mdlm", noise="cosine"), 9)
    assert type(mdlm) is MDLM and mdlm.epsilon == 0.0


def test_bad_arguments_raise_hdlm_error():
    with pytest.raises(HDLMError):
        GammaHybrid(5, LogLinear(), 1.5)
    with pytest.raises(HDLMError):
        EpsilonHybrid(5, LogLinear(), -0.1)
    with pytest.raises(HDLMError):
        Absorb(0, LogLinear())
    with pytest.raises(HDLMError):
        Absorb(5, "loglinear")


def test_reverse_kernels_by_name_reach_samplers_and_the_bound_without_touching_callers():
    """The kernel seam: ``Process.reverse_kernel(raw, x, s_now, s_next, name)`` dispatches to
    ``kernel_<name>``; a kernel a subclass adds is a sampler (make_sampler) and a bound (ReverseChain)."""
    from hdlm.evaluation.discrete import ReverseChain
    from hdlm.hyperschedule import flat
    from hdlm.sampling import KernelSampler, make_sampler

    N = 5
    proc = GammaHybrid(N, LogLinear(), 0.2)
    gen = torch.Generator().manual_seed(0)
    raw, x = torch.randn(4, N, generator=gen, dtype=F64), torch.tensor([N, 1, N, 3])
    s_now, s_next = torch.full((4,), 0.7, dtype=F64), torch.tensor([0.4, 0.4, 0.7, 0.0], dtype=F64)
    got = proc.reverse_kernel(raw, x, s_now, s_next, "analytic")
    ref = proc.kernel_analytic(raw, x, s_now, s_next)
    torch.testing.assert_close(got[[0, 1, 3]], ref[[0, 1, 3]], rtol=0, atol=0)
    assert torch.equal(got[2], torch.nn.functional.one_hot(x[2], N + 1).double())  # level does not move: stays
    assert torch.equal(proc.reverse_kernel(raw, x, s_now, s_next), proc.reverse_kernel(raw, x, s_now, s_next, "posterior"))  # the default (0 < γ < 1)
    with pytest.raises(HDLMError, match="offers analytic, euler, posterior, ar"):
        proc.reverse_kernel(raw, x, s_now, s_next, "ancestral")

    class WithPosterior(GammaHybrid):  # a subclass's kernel_<name> is what samplers and the bound run
        def kernel_posterior(self, raw, x, s_now, s_next):
            return torch.full(raw.shape[:-1] + (self.N + 1,), 1.0 / (self.N + 1), dtype=raw.dtype)

    new = WithPosterior(N, LogLinear(), 0.2)
    sampler = make_sampler("posterior", new)
    assert isinstance(sampler, KernelSampler) and sampler.kernel == "posterior"
    chain = ReverseChain(model=None, process=new, schedule=flat(3, steps=2), kernel="posterior")
    probs = chain.probs(raw, x, s_now, s_next)
    assert torch.allclose(probs[0], torch.full((N + 1,), 1.0 / (N + 1), dtype=F64))
