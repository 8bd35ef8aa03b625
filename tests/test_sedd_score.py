"""The SEDD / official ("sedd") parametrisation of the gamma family (hdlm.sedd_score).

References are independent of the code under test: the DWDSE summed entry by entry over a dense
Q_gamma and exact matrix-exponential marginals (mpmath), and the subs parametrisation, whose own
DWDSE is checked against the same brute force in test_processes.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from hdlm.noise import LogLinear
from hdlm.processes import GammaHybrid, make_process
from hdlm.config import ProcessConfig
from hdlm.sedd_score import log_expm1, log_expm1_official, sedd_log_score, sedd_offset
from test_processes import dense_q, expm_exact

F64 = torch.float64
NOISE = LogLinear(5e-3)


def test_log_expm1_is_accurate_where_the_naive_forms_fail():
    """log(e^σ − 1): exact at tiny σ (where exp − 1 loses every digit) and at large σ (where it overflows)."""
    s = torch.tensor([1e-12, 1e-4, 0.3, 0.5, 2.0, 50.0, 800.0], dtype=F64)
    ref = torch.tensor([math.log(math.expm1(v)) if v < 700 else v for v in s.tolist()], dtype=F64)
    assert torch.allclose(log_expm1(s), ref, rtol=1e-14, atol=0)
    # the official branch form agrees where it is accurate (σ ≥ 1e-4, below overflow)
    mid = s[1:5]
    assert torch.allclose(log_expm1_official(mid), ref[1:5], rtol=1e-12)


def test_sedd_log_score_conventions():
    """Real columns: raw − log(e^σ̄ − 1) − log N; the token's own ratio is 1; MASK: 0 at MASK, −inf elsewhere."""
    N = 5
    raw = torch.randn(3, N, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = torch.tensor([N, 2, 0])
    sb = torch.tensor([0.2, 1.5, 3.0], dtype=F64)
    ls = sedd_log_score(raw, x, sb, N)
    expected = raw - torch.log(torch.expm1(sb)).unsqueeze(-1) - math.log(N)
    assert torch.allclose(ls[0, :N], expected[0], rtol=1e-14) and ls[0, N] == 0
    for b, xb in ((1, 2), (2, 0)):
        assert ls[b, xb] == 0 and ls[b, N] == float("-inf")
        others = [z for z in range(N) if z != xb]
        assert torch.allclose(ls[b, others], expected[b, others], rtol=1e-14)
    assert torch.allclose(sedd_offset(sb, N), -torch.log(torch.expm1(sb)) - math.log(N), rtol=1e-14)


@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.3, 1.0])
def test_sedd_dwdse_brute_force_over_dense_rates(gamma):
    """Σ_{z≠x} Q[x, z] [s_z − r_z log s_z + r_z (log r_z − 1)] by a loop over a dense Q_γ, with the
    model's free (unnormalised) log-ratios s = exp(sedd_log_score) and exact marginals r."""
    N = 3
    proc = GammaHybrid(N, NOISE, gamma, parametrisation="sedd")
    Q = dense_q(N, gamma)
    gen = torch.Generator().manual_seed(4)
    for s in [0.02, 0.5, 0.97]:
        st = torch.tensor(s, dtype=F64)
        sb, dsb = float(NOISE.sigma_bar(st)), float(NOISE.dsigma_bar(st))
        P = expm_exact(sb, N, gamma)
        for y in range(N):
            for x in range(N + 1):
                raw = 2.0 * torch.randn(N, generator=gen, dtype=F64)
                rate = 0.5 + float(torch.rand((), generator=gen))
                got = float(proc.diffusion_loss(raw, torch.tensor(x), torch.tensor(y), st,
                                                torch.tensor(rate, dtype=F64)))
                if P[x, y] <= 0:
                    assert got == 0.0
                    continue
                log_s = sedd_log_score(raw, torch.tensor(x), torch.tensor(sb, dtype=F64), N)
                ref = 0.0
                for z in range(N + 1):
                    if z == x or Q[x, z] == 0:
                        continue
                    sz, r = math.exp(float(log_s[z])), float(P[z, y] / P[x, y])
                    term = sz - (r * math.log(sz) if r > 0 else 0.0) + (r * (math.log(r) - 1.0) if r > 0 else 0.0)
                    ref += float(Q[x, z]) * term
                ref *= rate * dsb
                assert abs(got - ref) <= 1e-10 * max(1.0, abs(ref)), (gamma, s, y, x, got, ref)


@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.3, 1.0])
def test_sedd_and_subs_readings_of_the_same_scores_give_the_same_loss_and_step(gamma):
    """SUBS outputs turned into the equivalent SEDD outputs (the subs log-ratios minus the SEDD
    offset): the DWDSE and the analytic step probabilities agree, at N = 50 and random states."""
    N, B = 50, 64
    gen = torch.Generator().manual_seed(1)
    subs = GammaHybrid(N, NOISE, gamma)
    sedd = GammaHybrid(N, NOISE, gamma, parametrisation="sedd")
    raw = 2 * torch.randn(B, N, generator=gen, dtype=F64)
    y = torch.randint(0, N, (B,), generator=gen)
    s = 0.02 + 0.95 * torch.rand(B, generator=gen, dtype=F64)
    x, _ = subs.sample_forward(y, s, generator=gen)
    x[:8] = N  # some MASK states whatever the draw
    sb = NOISE.sigma_bar(s)
    raw_sedd = subs.log_score(raw, x, s)[..., :N] - sedd_offset(sb, N).unsqueeze(-1)
    l_subs = subs.diffusion_loss(raw, x, y, s, 1.0)
    l_sedd = sedd.diffusion_loss(raw_sedd, x, y, s, 1.0)
    assert torch.allclose(l_sedd, l_subs, rtol=1e-9, atol=1e-12)
    s_next = s * 0.7
    p_subs = subs.analytic_probs(subs.log_score(raw, x, s), x, s, s_next)
    p_sedd = sedd.analytic_probs(sedd.log_score(raw_sedd, x, s), x, s, s_next)
    assert torch.allclose(p_sedd, p_subs, rtol=1e-9, atol=1e-12)


def test_sedd_loss_is_finite_with_gradients_off_the_live_cells():
    """Cells at level 0 (rate 0, σ̄ = 0 where log(e^σ̄ − 1) = −inf) give 0 and no NaN gradient."""
    N = 7
    proc = GammaHybrid(N, NOISE, 0.01, parametrisation="sedd")
    raw = torch.randn(4, N, dtype=torch.float32, requires_grad=True)
    x, y = torch.tensor([N, 3, 2, N]), torch.tensor([1, 3, 2, 5])
    s = torch.tensor([0.0, 0.0, 0.4, 0.6])
    rate = torch.tensor([0.0, 1.0, 1.0, 1.0])
    loss = proc.diffusion_loss(raw, x, y, s, rate)
    assert loss[0] == 0 and loss[1] == 0 and torch.isfinite(loss).all() and loss[3] > 0
    loss.sum().backward()
    assert torch.isfinite(raw.grad).all() and (raw.grad[:2] == 0).all()


def test_make_process_passes_the_parametrisation():
    for kind in ("gamma", "absorb", "uniform"):
        proc = make_process(ProcessConfig(kind=kind, parametrisation="sedd"), 10)
        assert proc.parametrisation == "sedd"
    assert make_process(ProcessConfig(kind="gamma"), 10).parametrisation == "subs"
