"""epsilon-hybrid process and HDCE (paper §3.2, App. B.2 Eq. (8)-(9), Alg. 3).

References are written independently: the paper's matrix product for the marginal, MDLM's
continuous-time loss, Eq. (9) case by case.
"""

from __future__ import annotations

import math

import pytest
import torch

from hdlm.errors import HDLMError
from hdlm.noise import Cosine, Linear
from hdlm.processes import MDLM, EpsilonHybrid

F64 = torch.float64


def q_absorb(N):
    Q = -torch.eye(N + 1, dtype=F64)
    Q[N, :] += 1.0
    return Q


def q_uniform(N):
    Q = torch.zeros(N + 1, N + 1, dtype=F64)
    Q[:N, :N] = 1.0 / N
    Q[:N, :N] -= torch.eye(N, dtype=F64)
    return Q


def test_marginal_is_the_papers_matrix_product():
    """§3.2: the y-th column of (1 + eps Q_uniform)(1 + (1 - alpha) Q_absorb); y itself at s = 0."""
    N, eps = 6, 0.15
    noise = Linear(1e-3)
    proc = EpsilonHybrid(N, noise, eps)
    y = torch.arange(N)
    for s in [0.0, 1e-6, 0.3, 1.0]:
        got = proc.marginal(y, torch.full((N,), s, dtype=F64))
        if s == 0:
            ref = torch.eye(N + 1, dtype=F64)
        else:
            alpha = 1.0 - (1.0 - 1e-3) * s
            eye = torch.eye(N + 1, dtype=F64)
            ref = (eye + eps * q_uniform(N)) @ (eye + (1 - alpha) * q_absorb(N))
        torch.testing.assert_close(got, ref[:, :N].T, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.2, 1.0])
def test_sample_forward_frequencies_match_marginal(eps):
    N, n, s = 5, 200_000, 0.4
    proc = EpsilonHybrid(N, Cosine(1e-3), eps)
    gen = torch.Generator().manual_seed(0)
    y = torch.full((n,), 3)
    x, aux = proc.sample_forward(y, torch.full((n,), s, dtype=F64), generator=gen)
    freq = torch.bincount(x, minlength=N + 1).to(F64) / n
    p = proc.marginal(torch.tensor(3), torch.tensor(s, dtype=F64))
    alpha = 1e-3 + (1 - 1e-3) * math.cos(math.pi * s / 2)
    ref = torch.tensor([alpha * eps / N] * N + [1 - alpha], dtype=F64)
    ref[3] = alpha * (1 - eps + eps / N)
    torch.testing.assert_close(p, ref, atol=1e-12, rtol=1e-12)
    tol = 5.0 * torch.sqrt(p * (1 - p) / n) + 1e-12
    assert torch.all((freq - p).abs() <= tol), (freq, p)
    sub = aux["substituted"].to(F64).mean()
    assert abs(float(sub) - eps) <= 5 * math.sqrt(eps * (1 - eps) / n) + 1e-12
    # an unmasked, unsubstituted token is y
    kept = (x != N) & ~aux["substituted"]
    assert torch.all(x[kept] == 3)


def test_sample_forward_clean_at_zero_noise():
    proc = EpsilonHybrid(7, Linear(1e-3), 0.5)
    y = torch.randint(0, 7, (100,), generator=torch.Generator().manual_seed(1))
    x, aux = proc.sample_forward(y, torch.zeros(100, dtype=F64), generator=torch.Generator().manual_seed(2))
    assert torch.equal(x, y) and not aux["substituted"].any()


def test_mdlm_hdce_equals_mdlm_continuous_time_loss():
    """eps = 0: -alpha'/(1 - alpha) CE on masked tokens, 0 on unmasked (linear alpha, rate 1)."""
    N, B, e = 8, 64, 1e-3
    proc = MDLM(N, Linear(e), lam=0.7)
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(0, N, (B,), generator=gen)
    s = torch.rand(B, generator=gen, dtype=F64) * 0.98 + 0.01
    x, aux = proc.sample_forward(y, s, generator=gen)
    assert (x == N).any() and (x != N).any()
    raw = torch.randn(B, N, generator=gen, dtype=F64)
    got = proc.diffusion_loss(raw, x, y, s, 1.0, aux)
    for i in range(B):
        alpha = 1 - (1 - e) * float(s[i])
        ce = -(float(raw[i, y[i]]) - math.log(sum(math.exp(v) for v in raw[i].tolist())))
        ref = (1 - e) / (1 - alpha) * ce if int(x[i]) == N else 0.0
        assert abs(float(got[i]) - ref) <= 1e-10 * max(1.0, ref)


@pytest.mark.parametrize("noise", [Linear(1e-3), Cosine(1e-3)], ids=["linear", "cosine"])
def test_hdce_weights_case_by_case(noise):
    """Eq. (9), with the factor rate * (-alpha'(s)) that makes it a continuous-time integrand."""
    N, eps, lam = 5, 0.2, 0.5
    proc = EpsilonHybrid(N, noise, eps, lam=lam)
    raw = torch.tensor([[0.3, -1.0, 2.0, 0.0, 0.5]] * 4, dtype=F64)
    y = torch.tensor([2, 2, 2, 2])
    x = torch.tensor([N, 4, 2, 2])  # masked / substituted / substituted back to y / kept
    aux = {"substituted": torch.tensor([False, True, True, False])}
    s_val, rate_val = 0.3, 0.7
    got = proc.diffusion_loss(raw, x, y, torch.full((4,), s_val, dtype=F64), torch.full((4,), rate_val, dtype=F64), aux)
    if isinstance(noise, Linear):
        p_mask, minus_dalpha = (1 - 1e-3) * s_val, 1 - 1e-3
    else:
        p_mask = (1 - 1e-3) * (1 - math.cos(math.pi * s_val / 2))
        minus_dalpha = (1 - 1e-3) * math.pi / 2 * math.sin(math.pi * s_val / 2)
    ce = 2.0 - math.log(sum(math.exp(v) for v in raw[0].tolist()))
    ce = -ce
    w = [1 / p_mask, lam * (1 - eps) / (1 - p_mask), lam * (1 - eps) / (1 - p_mask), lam * eps / (1 - p_mask)]
    ref = torch.tensor([rate_val * minus_dalpha * wi * ce for wi in w], dtype=F64)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)


def test_hdce_zero_where_rate_or_noise_is_zero_and_needs_aux():
    N = 4
    proc = EpsilonHybrid(N, Linear(1e-3), 0.1)
    raw = torch.randn(3, N, dtype=F64)
    y = torch.tensor([0, 1, 2])
    x = torch.tensor([N, 1, N])
    aux = {"substituted": torch.tensor([False, False, True])}
    s, rate = torch.tensor([0.0, 0.5, 0.5], dtype=F64), torch.tensor([1.0, 0.0, 1.0], dtype=F64)
    loss = proc.diffusion_loss(raw, x, y, s, rate, aux)
    assert float(loss[0]) == 0.0 and float(loss[1]) == 0.0 and float(loss[2]) > 0
    with pytest.raises(HDLMError):
        proc.diffusion_loss(raw, x, y, 0.5, 1.0, None)


def test_transfer_prob_is_one_minus_s_over_t_for_linear_alpha():
    proc = EpsilonHybrid(5, Linear(1e-3), 0.1)
    t = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.01, 0.3, 0.0], dtype=F64)
    s = torch.tensor([0.9, 0.4, 0.25, 0.0, 0.005, 0.3, 0.0], dtype=F64)
    got = proc.transfer_prob(t, s)
    ref = torch.tensor([1 - 0.9, 1 - 0.5, 0.5, 1.0, 0.5, 0.0, 1.0], dtype=F64)
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=0)
    # cosine: (alpha(s) - alpha(t)) / (1 - alpha(t)) written out
    cos = EpsilonHybrid(5, Cosine(1e-3), 0.1)
    a = lambda u: 1e-3 + (1 - 1e-3) * math.cos(math.pi * u / 2)  # noqa: E731
    got = cos.transfer_prob(torch.tensor(0.7, dtype=F64), torch.tensor(0.2, dtype=F64))
    assert abs(float(got) - (a(0.2) - a(0.7)) / (1 - a(0.7))) < 1e-12


def test_prior_embed_keep_log_probs():
    proc = EpsilonHybrid(6, Linear(1e-3), 0.1)
    assert torch.all(proc.prior((2, 5)) == 6)
    assert torch.all(proc.embed_keep(torch.tensor([0, 6, 3]), torch.tensor([0.1, 0.5, 0.9])) == 1)
    raw = torch.randn(2, 6, dtype=F64)
    torch.testing.assert_close(proc.log_probs(raw).exp().sum(-1), torch.ones(2, dtype=F64))
    assert proc.family == "mean"
