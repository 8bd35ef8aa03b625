"""Hyperschedules (paper §3.1, Fig. 2, Eq. (1)) checked against brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hdlm.config import ScheduleConfig
from hdlm.errors import HDLMError
from hdlm.hyperschedule import (Hyperschedule, block, custom, flat, from_config, make_hyperschedule, quench,
                                slide)

# ------------------------------------------------------------------ brute-force references


def brute_width(tab: list[list[int]], levels: int) -> int:
    """The paper's ω: max over t of #{i : (τ_t^i, τ_{t+1}^i) is neither (0,0) nor (𝒯,𝒯)}."""
    best = 0
    for t in range(len(tab) - 1):
        n = sum(1 for i in range(len(tab[0])) if (tab[t][i], tab[t + 1][i]) not in ((0, 0), (levels, levels)))
        best = max(best, n)
    return best


def brute_split(tab: list[list[int]], levels: int, t: int) -> tuple[int, int]:
    """Eq. (1) by walking positions: longest (0,0) prefix, longest (𝒯,𝒯) suffix."""
    d = len(tab[0])
    s = 0
    while s < d and tab[t][s] == 0 and tab[t + 1][s] == 0:
        s += 1
    a = d
    while a > s and tab[t][a - 1] == levels and tab[t + 1][a - 1] == levels:
        a -= 1
    return s, a


def assert_valid(hs: Hyperschedule) -> None:
    """The §3.1 conditions: τ[0] = 𝒯, τ[T] = 0, values in [0, 𝒯], non-increasing in t."""
    tab = hs.table.tolist()
    L = hs.levels
    assert hs.table.dtype == torch.long and hs.table.shape == (hs.T + 1, hs.d)
    assert all(v == L for v in tab[0])
    assert all(v == 0 for v in tab[-1])
    for t in range(hs.T):
        for i in range(hs.d):
            assert 0 <= tab[t + 1][i] <= tab[t][i] <= L


def all_schedules():
    out = [quench(d) for d in (1, 5, 12)]
    out += [flat(d) for d in (1, 6, 12)] + [flat(12, rho=3), flat(6, rho=0.5), flat(7, steps=3)]
    for d, w in [(12, 4), (13, 4), (10, 3), (7, 7), (5, 1), (16, 8)]:
        for rho in (0.25, 0.5, 1.0, 2.0, 4.0):
            if (w / rho).is_integer() and w / rho >= 1:
                out += [block(d, w, rho), slide(d, w, rho)]
    return out


SCHEDULES = all_schedules()

# ------------------------------------------------------------------ the four kinds of Fig. 2


@pytest.mark.parametrize("d", [1, 2, 7, 16])
def test_quench_is_autoregressive(d):
    hs = quench(d)
    expected = [[1 if i >= t else 0 for i in range(d)] for t in range(d + 1)]
    assert hs.table.tolist() == expected
    assert (hs.T, hs.levels, hs.width, hs.rho, hs.rate) == (d, 1, 1, 1.0, 1.0)
    # the AR split: t tokens settled, token t active, the rest worthless
    assert [hs.split(t) for t in range(d)] == [(t, t + 1) for t in range(d)]


@pytest.mark.parametrize("d", [1, 5, 16])
def test_flat_is_standard_diffusion(d):
    hs = flat(d)
    assert hs.table.tolist() == [[d - t] * d for t in range(d + 1)]
    assert (hs.T, hs.levels, hs.width, hs.rho) == (d, d, d, 1.0)


def test_block_and_slide_width_one_are_quench():
    for d in (1, 4, 9):
        q = quench(d).table
        assert torch.equal(block(d, 1).table, q)
        assert torch.equal(slide(d, 1).table, q)


def test_block_table_matches_definition():
    # d = 7, ω = 3: blocks {0,1,2}, {3,4,5}, {6}, each annealed over 𝒯 = 3 steps
    hs = block(7, 3)
    L = 3
    for t in range(hs.T + 1):
        for i in range(7):
            b = i // 3
            assert hs.table[t, i] == min(max(L - (t - b * L), 0), L)
    assert (hs.T, hs.levels, hs.width) == (9, 3, 3)


def test_slide_rho_one_matches_fig3_caption():
    for d, w in [(8, 4), (16, 4), (10, 1), (9, 9), (20, 7)]:
        hs = slide(d, w)
        assert hs.T == d + w - 1  # the ω - 1 step overhead of Fig. 3
        assert hs.levels == w
        expected = [[min(max(w - (t - i), 0), w) for i in range(d)] for t in range(hs.T + 1)]
        assert hs.table.tolist() == expected


@pytest.mark.parametrize("kind", ["quench", "flat", "block", "slide"])
def test_defaults_have_rate_one(kind):
    hs = make_hyperschedule(kind, 16)
    assert hs.rho == 1.0
    assert hs.kind == kind
    if kind in ("block", "slide"):
        assert hs.width == 4  # default max(1, d // 4)


@pytest.mark.parametrize("d,w", [(12, 4), (13, 4), (10, 3), (16, 8), (8, 8), (17, 2)])
@pytest.mark.parametrize("rho", [0.25, 0.5, 1.0, 2.0, 4.0])
def test_block_and_slide_report_their_width(d, w, rho):
    if not ((w / rho).is_integer() and w / rho >= 1):
        for build in (block, slide):
            with pytest.raises(HDLMError, match="rho"):
                build(d, w, rho)
        return
    for build in (block, slide):
        hs = build(d, w, rho)
        assert hs.width == w == brute_width(hs.table.tolist(), hs.levels)
        assert hs.levels == w / rho
        assert hs.rho == rho


@pytest.mark.parametrize("rho", [0.25, 0.5, 2.0, 4.0])
def test_quick_draft_and_think_hard_give_about_d_over_rho_steps(rho):
    d, w = 64, 8
    for hs in (flat(d, rho=rho), block(d, w, rho), slide(d, w, rho)):
        assert hs.rho == rho
        if hs.kind == "slide":  # overhead of at most one window: 𝒯 = ω/ρ steps
            assert d / rho <= hs.T <= d / rho + w / rho
        else:
            assert hs.T == d / rho
        assert_valid(hs)


def test_block_and_slide_at_rho_half_and_two_by_hand():
    # ρ = 2, ω = 4 => 𝒯 = 2 levels; slide starts position i at ⌊i/2⌋
    hs = slide(4, 4, rho=2.0)
    assert hs.table.tolist() == [[2, 2, 2, 2], [1, 1, 2, 2], [0, 0, 1, 1], [0, 0, 0, 0]]
    # ρ = 1/2, ω = 1 => 𝒯 = 2; slide starts position i at 2i
    hs = slide(2, 1, rho=0.5)
    assert hs.table.tolist() == [[2, 2], [1, 2], [0, 2], [0, 1], [0, 0]]
    hs = block(4, 2, rho=2.0)  # 𝒯 = 1: one block per step
    assert hs.table.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]]


def test_custom_rho_one_third_is_exact():
    hs = slide(6, 1, rho=1 / 3)  # 𝒯 = 3, starts at 0, 3, 6, ...: T = 15 + 3
    assert (hs.levels, hs.T) == (3, 18)
    assert hs.width == 1


@pytest.mark.parametrize("hs", SCHEDULES, ids=lambda h: f"{h.kind}-d{h.d}-w{h.width}-r{h.rho:g}")
def test_every_table_is_valid_and_width_matches_brute_force(hs):
    assert_valid(hs)
    tab = hs.table.tolist()
    assert hs.width == brute_width(tab, hs.levels)
    assert math.isclose(hs.rate, hs.d / hs.T)


# ------------------------------------------------------------------ errors


def test_quench_rejects_other_rates():
    for rho in (0.5, 2.0):
        with pytest.raises(HDLMError, match="quench has rho = 1 by construction"):
            quench(8, rho=rho)
        with pytest.raises(HDLMError, match="rho"):
            make_hyperschedule("quench", 8, rho=rho)


@pytest.mark.parametrize("call,name", [
    (lambda: block(8, 0), "width"),
    (lambda: slide(8, -1), "width"),
    (lambda: block(8, 9), "width"),
    (lambda: slide(8, 9), "width"),
    (lambda: block(0, 1), "length"),
    (lambda: slide(-3, 1), "length"),
    (lambda: quench(0), "length"),
    (lambda: flat(0), "length"),
    (lambda: block(8, 4, rho=0.0), "rho"),
    (lambda: slide(8, 4, rho=-1.0), "rho"),
    (lambda: flat(8, rho=-2.0), "rho"),
    (lambda: flat(8, rho=float("nan")), "rho"),
    (lambda: block(8, 4, rho=3.0), "rho"),   # 𝒯 = 4/3
    (lambda: slide(8, 4, rho=8.0), "rho"),   # 𝒯 = 1/2
    (lambda: flat(8, rho=3.0), "rho"),       # T = 8/3
    (lambda: flat(8, steps=0), "steps"),
    (lambda: flat(8, steps=4, rho=1.0), "rho"),  # d/steps = 2 disagrees
    (lambda: make_hyperschedule("zigzag", 8), "kind"),
    (lambda: make_hyperschedule("block", 8, steps=3), "steps"),
    (lambda: make_hyperschedule("quench", 8, width=3), "width"),
])
def test_invalid_arguments_name_the_argument(call, name):
    with pytest.raises(HDLMError, match=name):
        call()


@pytest.mark.parametrize("table,levels,problem", [
    ([3, 2, 1, 0], None, "2-D"),
    ([[2, 2]], None, "at least 2 rows"),
    ([[2, 2], [1, 1.5], [0, 0]], None, "integers"),
    ([[2, 2], [1, 3], [0, 0]], 2, r"values must be in \[0, levels = 2\]"),
    ([[2, 2], [-1, 1], [0, 0]], None, r"values must be in \[0"),
    ([[2, 1], [1, 1], [0, 0]], None, r"τ\[0\] must equal levels"),
    ([[2, 2], [1, 1], [0, 1]], None, r"τ\[T\] must be 0"),
    ([[2, 2, 2], [1, 1, 0], [1, 1, 1], [0, 0, 0]], None, r"not non-increasing in t at position 2 \(step 2\)"),
    ([[0, 0], [0, 0]], None, "maximum"),
    ([[2, 2], [0, 0]], 0, "levels must be a positive integer"),
])
def test_custom_rejects_bad_tables(table, levels, problem):
    with pytest.raises(HDLMError, match=problem) as info:
        custom(table, levels)
    assert str(info.value).startswith("custom hyperschedule:")
    assert "\n" not in str(info.value)


def test_custom_accepts_a_valid_table_and_derives_its_properties():
    tab = [[3, 3, 3], [3, 1, 3], [2, 0, 3], [0, 0, 1], [0, 0, 0]]
    hs = custom(tab)
    assert (hs.kind, hs.levels, hs.T, hs.d) == ("custom", 3, 4, 3)
    assert hs.width == brute_width(tab, 3) == 2
    assert hs.rho == 3 / 4
    # an explicit, larger 𝒯 changes which positions count as worthless
    hs4 = custom([[4, 4], [4, 2], [0, 0]], levels=4)
    assert hs4.width == 2 and hs4.split(0) == (0, 2)
    # ω counts positions resting at an intermediate level too, not only those that change
    plateau = [[2, 2, 2], [1, 2, 2], [1, 1, 2], [1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert custom(plateau).width == brute_width(plateau, 2) == 3


# ------------------------------------------------------------------ Eq. (1) splits


@pytest.mark.parametrize("hs", SCHEDULES + [custom([[3, 3, 3, 3], [0, 3, 2, 3], [0, 0, 0, 3], [0, 0, 0, 0]]),
                                custom([[2, 2, 2], [0, 2, 0], [0, 1, 0], [0, 0, 0]])],
                         ids=lambda h: f"{h.kind}-d{h.d}-w{h.width}-r{h.rho:g}")
def test_split_matches_brute_force(hs):
    tab = hs.table.tolist()
    settled, active = hs.splits()
    assert settled.shape == active.shape == (hs.T,)
    for t in range(hs.T):
        expected = brute_split(tab, hs.levels, t)
        assert hs.split(t) == expected
        assert (int(settled[t]), int(active[t])) == expected
        s, a = expected
        assert a - s >= sum(1 for i in range(hs.d) if (tab[t][i], tab[t + 1][i]) not in ((0, 0), (hs.levels,) * 2))
    with pytest.raises(HDLMError):
        hs.split(hs.T)


def test_regular_schedules_have_contiguous_windows_of_width_at_most_omega():
    for hs in (block(13, 4), slide(13, 4), slide(16, 4, 2.0), slide(16, 4, 0.5), block(16, 8, 0.5)):
        settled, active = hs.splits()
        assert int((active - settled).max()) == hs.width
        assert torch.all(settled[1:] >= settled[:-1]) and torch.all(active[1:] >= active[:-1])


# ------------------------------------------------------------------ continuous view


@pytest.mark.parametrize("hs", [quench(6), flat(5), block(7, 3), slide(9, 4), slide(8, 4, 2.0), block(8, 2, 0.5)],
                         ids=lambda h: f"{h.kind}-d{h.d}-w{h.width}-r{h.rho:g}")
def test_level_at_grid_points_equals_table(hs):
    u = torch.arange(hs.T + 1, dtype=torch.float64) / hs.T
    lev = hs.level(u)
    assert lev.shape == (hs.T + 1, hs.d) and lev.dtype == torch.float64
    ref = torch.tensor(hs.table.tolist(), dtype=torch.float64) / hs.levels
    torch.testing.assert_close(lev, ref, rtol=0, atol=1e-12)
    for t in range(hs.T + 1):
        torch.testing.assert_close(hs.level_at_step(t, torch.float64), ref[t], rtol=0, atol=0)
    # float32 input works too and u = 0 is full noise, u = 1 clean
    ends = hs.level(torch.tensor([0.0, 1.0]))
    assert ends.dtype == torch.float32
    assert torch.all(ends[0] == 1) and torch.all(ends[1] == 0)


@pytest.mark.parametrize("hs", [flat(5), block(7, 3), slide(9, 4), slide(8, 4, 2.0)],
                         ids=lambda h: f"{h.kind}-d{h.d}")
def test_level_is_linear_between_steps_and_rate_is_its_derivative(hs):
    T, L = hs.T, hs.levels
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, T, (50,), generator=gen)
    frac = 0.05 + 0.9 * torch.rand(50, generator=gen, dtype=torch.float64)
    u = (t + frac) / T
    tab = hs.table.double()
    ref = ((1 - frac)[:, None] * tab[t] + frac[:, None] * tab[t + 1]) / L
    torch.testing.assert_close(hs.level(u), ref, rtol=0, atol=1e-12)
    h = 1e-6 / T  # central difference inside one linear piece
    fd = (hs.level(u + h) - hs.level(u - h)).abs() / (2 * h)
    torch.testing.assert_close(hs.level_rate(u), fd, rtol=1e-6, atol=1e-6)
    start, end = hs.window(u)
    assert start.shape == end.shape == u.shape
    for k in range(50):
        assert (int(start[k]), int(end[k])) == hs.split(int(t[k]))


@pytest.mark.parametrize("hs", [slide(19, 1), flat(12), slide(90, 11), flat(49)], ids=lambda h: f"{h.kind}-T{h.T}")
def test_window_at_u_equal_t_over_T_is_step_t(hs):
    # u = t/T rounded to float32 / float64 often lands a hair below t/T; it still means step t
    for dtype in (torch.float32, torch.float64):
        u = torch.arange(hs.T, dtype=dtype) / hs.T
        start, end = hs.window(u)
        settled, active = hs.splits()
        assert torch.equal(start, settled) and torch.equal(end, active), dtype
        ref = hs.table[: hs.T].to(dtype) / hs.levels
        torch.testing.assert_close(hs.level(u), ref)


def test_continuous_view_keeps_the_shape_of_u():
    hs = slide(10, 3)
    u = torch.rand(2, 3, 4)
    assert hs.level(u).shape == (2, 3, 4, 10)
    assert hs.level_rate(u).shape == (2, 3, 4, 10)
    start, end = hs.window(u)
    assert start.shape == (2, 3, 4) and start.dtype == torch.long
    # u = 1 belongs to the last transition
    assert hs.window(torch.tensor(1.0)) == (torch.tensor(hs.split(hs.T - 1)[0]), torch.tensor(hs.split(hs.T - 1)[1]))


def _expected_loss(hs: Hyperschedule, f, positions: slice = slice(None), n_nodes: int = 8) -> float:
    """E_{u~U[0,1]} Σ_i level_rate_i(u) f(level_i(u)) by Gauss-Legendre on each step [t/T, (t+1)/T].

    ℓ is linear and the rate constant on each piece, so n nodes integrate polynomial f of degree
    < 2n exactly, and smooth f to near machine precision.
    """
    x, wts = np.polynomial.legendre.leggauss(n_nodes)
    T = hs.T
    t = np.arange(T)[:, None]
    u = torch.tensor(((t + (x[None, :] + 1) / 2) / T).ravel(), dtype=torch.float64)
    w = torch.tensor(np.tile(wts / 2 / T, T), dtype=torch.float64)
    integrand = (hs.level_rate(u) * f(hs.level(u)))[:, positions].sum(-1)
    return float((w * integrand).sum())


@pytest.mark.parametrize("d,w", [(12, 4), (13, 4), (10, 3), (9, 9)])
def test_block_continuous_estimator_equals_sum_of_per_block_flat_losses(d, w):
    """One block is active per u (weight n_blocks via the rate); by hand, for f(ℓ) = ℓ²:
    each position contributes ∫_0^1 ℓ² dℓ = 1/3, so a block of size m gives m/3, and the
    sum over blocks is Σ_b m_b / 3 = d/3 (= n_blocks ω / 3 when ω | d)."""
    hs = block(d, w)
    sizes = [min(w, d - b) for b in range(0, d, w)]
    per_block = [m / 3 for m in sizes]
    assert math.isclose(_expected_loss(hs, lambda l: l**2), sum(per_block), rel_tol=0, abs_tol=1e-12)
    if d % w == 0:
        assert math.isclose(sum(per_block), (d // w) * w / 3)
    # a non-polynomial f: ∫_0^1 cos(ℓ) dℓ = sin(1); tolerance 1e-12 (8-node Gauss per piece)
    assert math.isclose(_expected_loss(hs, torch.cos), d * math.sin(1.0), rel_tol=0, abs_tol=1e-12)
    # each block alone: restrict the sum to its positions; ℓ³ → ∫ = 1/4 per position
    for b, m in enumerate(sizes):
        got = _expected_loss(hs, lambda l: l**3, positions=slice(b * w, b * w + m))
        assert math.isclose(got, m / 4, rel_tol=0, abs_tol=1e-12)


@pytest.mark.parametrize("hs", [flat(6), flat(8, rho=2.0), slide(9, 3), slide(16, 4), quench(5)],
                         ids=lambda h: f"{h.kind}-d{h.d}-r{h.rho:g}")
def test_continuous_estimator_is_d_times_integral_for_flat_and_slide(hs):
    # Σ_i ∫ |ℓ_i'| f(ℓ_i) du = Σ_i ∫_0^1 f(ℓ) dℓ because each ℓ_i falls monotonically from 1 to 0.
    assert math.isclose(_expected_loss(hs, lambda l: l**2), hs.d / 3, rel_tol=0, abs_tol=1e-12)
    assert math.isclose(_expected_loss(hs, torch.exp), hs.d * (math.e - 1), rel_tol=0, abs_tol=1e-11)


# ------------------------------------------------------------------ config and export


def test_from_config():
    hs = from_config(ScheduleConfig(kind="slide", width=4, rho=2.0), 16)
    assert (hs.kind, hs.width, hs.levels, hs.rho) == ("slide", 4, 2, 2.0)
    hs = from_config(ScheduleConfig(kind="block"), 16)
    assert hs.width == 4  # default d // 4
    hs = from_config(ScheduleConfig(kind="block"), 3)
    assert hs.width == 1  # default max(1, d // 4)
    hs = from_config(ScheduleConfig(kind="flat", steps=8), 16)
    assert (hs.T, hs.levels, hs.rho) == (8, 8, 2.0)
    hs = from_config(ScheduleConfig(kind="flat", width=4), 16)  # width is a block/slide setting
    assert hs.width == 16
    with pytest.raises(HDLMError, match="rho"):
        from_config(ScheduleConfig(kind="quench", rho=2.0), 16)
    with pytest.raises(HDLMError, match="width"):
        from_config(ScheduleConfig(kind="slide", width=32), 16)


def test_to_dict_is_json_and_consistent():
    import json

    hs = slide(8, 4, rho=2.0)
    d = json.loads(json.dumps(hs.to_dict()))
    assert d["kind"] == "slide" and d["d"] == 8 and d["T"] == hs.T and d["levels"] == 2
    assert d["width"] == 4 and d["rho"] == 2.0 and math.isclose(d["rate"], 8 / hs.T)
    assert d["table"] == hs.table.tolist()


def test_hyperschedule_is_immutable():
    hs = slide(8, 4)
    with pytest.raises(Exception):
        hs.levels = 3  # type: ignore[misc]
