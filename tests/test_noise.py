"""Scalar noise schedules (hdlm.noise) against closed forms written out here and finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from hdlm.errors import HDLMError
from hdlm.noise import Cosine, Geometric, Linear, LogLinear, make_noise

EPS = 1e-3
SMIN, SMAX = 1e-4, 20.0


def ref_alpha(name: str, s: torch.Tensor) -> torch.Tensor:
    """Keep-probabilities from the papers (SEDD, MDLM), written independently of hdlm.noise."""
    if name in ("loglinear", "linear"):
        return 1 - (1 - EPS) * s
    if name == "geometric":
        return torch.exp(-(SMIN ** (1 - s)) * SMAX**s)
    if name == "cosine":
        return EPS + (1 - EPS) * torch.cos(math.pi * s / 2)
    raise KeyError(name)


SCHEDULES = {
    "loglinear": LogLinear(EPS),
    "linear": Linear(EPS),
    "geometric": Geometric(SMIN, SMAX),
    "cosine": Cosine(EPS),
}
NAMES = list(SCHEDULES)
S_INNER = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)


def central(f, s: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    return (f(s + h) - f(s - h)) / (2 * h)


@pytest.mark.parametrize("name", NAMES)
def test_matches_closed_form(name):
    sch = SCHEDULES[name]
    torch.testing.assert_close(sch.alpha(S_INNER), ref_alpha(name, S_INNER), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sch.sigma_bar(S_INNER), -torch.log(ref_alpha(name, S_INNER)), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_alpha_is_exp_minus_sigma_bar(name):
    sch = SCHEDULES[name]
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(sch.alpha(s), torch.exp(-sch.sigma_bar(s)), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_central_differences(name):
    sch = SCHEDULES[name]
    torch.testing.assert_close(sch.dsigma_bar(S_INNER), central(sch.sigma_bar, S_INNER), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(sch.dalpha(S_INNER), central(sch.alpha, S_INNER), rtol=1e-6, atol=1e-8)
    # against the independent closed form as well
    torch.testing.assert_close(sch.dalpha(S_INNER), central(lambda x: ref_alpha(name, x), S_INNER),
                               rtol=1e-6, atol=1e-8)
    assert torch.all(sch.dsigma_bar(S_INNER) > 0) and torch.all(sch.dalpha(S_INNER) < 0)


@pytest.mark.parametrize("name", NAMES)
def test_finite_at_both_ends(name):
    sch = SCHEDULES[name]
    for dtype in (torch.float32, torch.float64):
        s = torch.tensor([0.0, 1.0], dtype=dtype)
        for fn in (sch.sigma_bar, sch.dsigma_bar, sch.alpha, sch.dalpha):
            v = fn(s)
            assert v.shape == s.shape and torch.all(torch.isfinite(v)), (fn.__name__, v)
        # mask_weight is documented infinite at s = 0 (nothing masked), finite at s = 1
        assert torch.isfinite(sch.mask_weight(s[1:])).all()
    assert torch.all(sch.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64)) <= 1)


def test_loglinear_and_linear_end_values():
    for sch in (LogLinear(EPS), Linear(EPS)):
        one = torch.tensor(1.0, dtype=torch.float64)
        assert math.isclose(sch.sigma_bar(one).item(), -math.log(EPS), rel_tol=1e-12)
        assert math.isclose(sch.alpha(one).item(), EPS, rel_tol=1e-12)
        assert sch.sigma_bar(torch.tensor(0.0, dtype=torch.float64)).item() == 0.0


def test_cosine_end_values():
    sch = Cosine(EPS)
    assert sch.alpha(torch.tensor(0.0, dtype=torch.float64)).item() == 1.0
    assert math.isclose(sch.alpha(torch.tensor(1.0, dtype=torch.float64)).item(), EPS, rel_tol=1e-12)
    assert sch.sigma_bar(torch.tensor(0.0, dtype=torch.float64)).item() == 0.0


def test_geometric_end_values():
    sch = Geometric(SMIN, SMAX)
    s = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sch.sigma_bar(s), torch.tensor([SMIN, SMAX], dtype=torch.float64))


@pytest.mark.parametrize("name", NAMES)
def test_mask_weight_is_minus_alpha_prime_over_one_minus_alpha(name):
    sch = SCHEDULES[name]
    a = ref_alpha(name, S_INNER)
    da = central(lambda x: ref_alpha(name, x), S_INNER)
    torch.testing.assert_close(sch.mask_weight(S_INNER), -da / (1 - a), rtol=1e-6, atol=1e-8)


def test_mask_weight_by_hand_for_loglinear():
    # α = 1 - (1-ε)s  =>  -α'/(1-α) = (1-ε) / ((1-ε) s) = 1/s
    s = S_INNER
    torch.testing.assert_close(LogLinear(EPS).mask_weight(s), 1 / s, rtol=1e-10, atol=0)


def test_broadcasts_over_any_shape():
    s = torch.rand(2, 3, 5, dtype=torch.float64)
    for sch in SCHEDULES.values():
        for fn in (sch.sigma_bar, sch.dsigma_bar, sch.alpha, sch.dalpha, sch.mask_weight):
            assert fn(s).shape == s.shape


def test_make_noise():
    assert isinstance(make_noise("loglinear", eps=0.01), LogLinear) and make_noise("loglinear", eps=0.01).eps == 0.01
    assert isinstance(make_noise("cosine"), Cosine)
    g = make_noise("geometric", sigma_min=0.1, sigma_max=5.0, eps=0.5)  # irrelevant kwargs are ignored
    assert (g.sigma_min, g.sigma_max) == (0.1, 5.0)
    with pytest.raises(HDLMError, match="zigzag"):
        make_noise("zigzag")


@pytest.mark.parametrize("call", [lambda: LogLinear(0.0), lambda: Cosine(1.0), lambda: Geometric(1.0, 0.5),
                                  lambda: Geometric(0.0, 1.0)])
def test_bad_parameters_raise(call):
    with pytest.raises(HDLMError):
        call()


def test_cosine_mask_weight_float32_near_zero():
    s = torch.tensor([1e-4, 1e-3, 1e-2], dtype=torch.float32)
    # -α'/(1-α) = (π/2) sin(πs/2) / (1 - cos(πs/2)) = (π/2) cot(πs/4), by the half-angle identities
    ref = (math.pi / 2) / torch.tan(math.pi * s.double() / 4)
    torch.testing.assert_close(Cosine(EPS).mask_weight(s).double(), ref, rtol=1e-4, atol=0)
