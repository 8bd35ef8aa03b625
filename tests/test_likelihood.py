"""Perplexity bounds (hdlm.evaluation.likelihood; paper App. C.1, Alg. 1, Remark 1; DESIGN.md §3, §7).

The central check is by exhaustive enumeration on a tiny problem (N = 2 real tokens + MASK,
d = 3, a random float64 HDLMTransformer): the exact NLL −log P(y) of the model's T-step
generative process (forward algorithm over all 27 states per step, with the sampler's kernel)
must not exceed the discrete bound; the bound is computed twice, once from the library's
per-step KL terms and once independently from dense forward transition matrices
(torch.linalg.matrix_exp / the paper's substitution and masking matrices), as
E_q[log q(x_{0:T-1}|y) − log p(x_{0:T-1}, y)] over trajectories.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hdlm.config import Config, ModelConfig, ProcessConfig
from hdlm.evaluation.discrete import ReverseChain, variational_chain
from hdlm.evaluation.likelihood import NLLSums, nll_sums, perplexity_bound, resolve_data_spec
from hdlm.errors import HDLMError
from hdlm.hyperschedule import block, flat, quench, slide
from hdlm.model import HDLMTransformer
from hdlm.noise import make_noise

N, D = 2, 3
S = N + 1  # states per position (MASK = N)
STATES = torch.tensor(list(itertools.product(range(S), repeat=D)))  # (27, D)
REAL = torch.tensor(list(itertools.product(range(N), repeat=D)))  # (8, D): every clean sequence
GEOMETRIC = dict(noise="geometric", sigma_min=1e-3, sigma_max=1.0)  # moderate steps: Tweedie never clamps here


def make_cfg(kind: str, configuration: str = "aligned", **process) -> Config:
    model = ModelConfig(vocab_size=N, length=D, n_layers=1, hidden=8, n_heads=2, cond_dim=8, dropout=0.0,
                        pad_vocab_to=1, configuration=configuration)
    return Config(model=model, process=ProcessConfig(kind=kind, **process))


def random_model(cfg: Config, seed: int = 0, scale: float = 0.25) -> HDLMTransformer:
    torch.manual_seed(seed)
    model = HDLMTransformer(cfg.model).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    return model.eval()


# ------------------------------------------------------------------------------------------
# an independent description of the forward (noising) chains, from dense matrices


def dense_rates() -> tuple[torch.Tensor, torch.Tensor]:
    """Q_absorb = e_M 1ᵀ − I and Q_uniform = (1/N) u uᵀ − diag(u) (DESIGN.md §3), column convention."""
    q_abs = -torch.eye(S, dtype=torch.float64)
    q_abs[N, :] += 1.0
    u = torch.ones(S, dtype=torch.float64)
    u[N] = 0.0
    return q_abs, torch.outer(u, u) / N - torch.diag(u)


class DenseChain:
    """Per-position forward transitions F(s_lo → s_hi)[a, b] = q(a at s_hi | b at s_lo), with the
    top level replaced by the sampler's prior (the discrete bound's variational chain)."""

    def __init__(self, cfg: Config, variational: str = "forward"):
        p = cfg.process
        self.noise = make_noise(p.noise, eps=p.noise_eps, sigma_min=p.sigma_min, sigma_max=p.sigma_max)
        self.kind = {"absorb": "gamma", "uniform": "gamma", "mdlm": "epsilon"}.get(p.kind, p.kind)
        self.gamma = {"absorb": 0.0, "uniform": 1.0}.get(p.kind, p.gamma)
        self.epsilon = 0.0 if p.kind == "mdlm" else p.epsilon
        self.variational = variational
        self.prior = torch.zeros(S, dtype=torch.float64)
        if self.kind == "gamma" and self.gamma == 1.0:
            self.prior[:N] = 1.0 / N
        else:
            self.prior[N] = 1.0

    def sigma(self, s: float) -> float:
        return 0.0 if s == 0 else float(self.noise.sigma_bar(torch.tensor(s, dtype=torch.float64)))

    def F(self, s_lo: float, s_hi: float) -> torch.Tensor:
        q_abs, q_uni = dense_rates()
        eye = torch.eye(S, dtype=torch.float64)
        if s_lo == s_hi:
            return eye
        if s_hi == 1.0:
            return self.prior.unsqueeze(1).expand(S, S).clone()
        if self.kind == "gamma" and self.variational == "forward":
            q = (1 - self.gamma) * q_abs + self.gamma * q_uni
            return torch.linalg.matrix_exp((self.sigma(s_hi) - self.sigma(s_lo)) * q)
        # substitute-then-mask (paper §3.2): keep probability alpha = exp(-rate * sigma)
        rate = (1 - self.gamma) if self.kind == "gamma" else 1.0
        eps = self.epsilon if (self.kind == "epsilon" and self.variational == "forward") else 0.0
        a_hi, a_lo = math.exp(-rate * self.sigma(s_hi)), math.exp(-rate * self.sigma(s_lo))
        if s_lo == 0:
            return (eye + eps * q_uni) @ (eye + (1 - a_hi) * q_abs)
        return eye + (1 - a_hi / a_lo) * q_abs


def position_levels(hs) -> torch.Tensor:
    return hs.table.to(torch.float64) / hs.levels


def pairwise(dc: DenseChain, hs, y: torch.Tensor):
    """Per position i and step t: F_t^i (x_t | x_{t+1}) and the marginal m_t^i of the variational chain."""
    lev = position_levels(hs)
    T = hs.T
    F = [[None] * D for _ in range(T)]
    m = [[None] * D for _ in range(T + 1)]
    for i in range(D):
        m[T][i] = torch.nn.functional.one_hot(y[i], S).to(torch.float64)
        for t in range(T - 1, -1, -1):
            F[t][i] = dc.F(float(lev[t + 1, i]), float(lev[t, i]))
            m[t][i] = F[t][i] @ m[t + 1][i]
    return F, m


def over_states(per_pos) -> torch.Tensor:
    """Π_i v_i[x_i] over the 27 joint states, for per-position vectors v_i (S,)."""
    out = torch.ones(len(STATES), dtype=torch.float64)
    for i in range(D):
        out = out * per_pos[i][STATES[:, i]]
    return out


def kernels(rc: ReverseChain) -> list[torch.Tensor]:
    """P_t[a, b] = p_θ(x_{t+1} = b | x_t = a) over the 27 states (the generative process)."""
    out = []
    with torch.no_grad():
        for t in range(rc.schedule.T):
            K = rc.kernel_matrix(STATES, torch.full((len(STATES),), t))  # (27, D, S)
            P = torch.ones(len(STATES), len(STATES), dtype=torch.float64)
            for i in range(D):
                P = P * K[:, i, STATES[:, i]]
            out.append(P)
    return out


def exact_nll(P: list[torch.Tensor], prior: torch.Tensor, y: torch.Tensor) -> float:
    """−log P(y) of the T-step chain by the forward algorithm."""
    pi = over_states([prior] * D)
    for P_t in P:
        pi = pi @ P_t
    idx = int((STATES == y).all(1).nonzero())
    return -math.log(float(pi[idx]))


def trajectory_nelbo(dc: DenseChain, hs, P: list[torch.Tensor], y: torch.Tensor) -> float:
    """E_q[log q(x_{0:T-1}|y) − log p(x_{0:T-1}, y)] with q(traj|y) = Π_t F_t(x_t|x_{t+1}), x_T = y."""
    F, m = pairwise(dc, hs, y)
    total = 0.0
    for t in range(hs.T):
        J = torch.ones(len(STATES), len(STATES), dtype=torch.float64)
        log_f = torch.zeros_like(J)
        for i in range(D):
            a, b = STATES[:, i].unsqueeze(1), STATES[:, i].unsqueeze(0)
            J = J * F[t][i][a, b] * m[t + 1][i][b]
            log_f = log_f + torch.log(F[t][i][a, b])
        live = J > 0
        total += float(torch.where(live, J * (log_f - torch.log(P[t])), torch.zeros_like(J)).sum())
    log_prior = torch.log(over_states([dc.prior] * D))
    q0 = over_states(m[0])
    total -= float(torch.where(q0 > 0, q0 * log_prior, torch.zeros_like(q0)).sum())
    return total


def library_bound(rc: ReverseChain, chain, dc: DenseChain, y: torch.Tensor) -> float:
    """Σ_t E_{q(x_t|y)} Σ_i KL_t from the library's step terms, x_t enumerated with the dense marginals."""
    _, m = pairwise(dc, rc.schedule, y)
    total = 0.0
    with torch.no_grad():
        for t in range(rc.schedule.T):
            w = over_states(m[t])
            rows = (w > 0).nonzero().squeeze(1)
            kl = rc.step_kl(y.expand(len(rows), D), STATES[rows], torch.full((len(rows),), t), chain)
            total += float((w[rows] * kl).sum())
    return total


CASES = [  # (process kind, process args, schedule, configuration, variational)
    ("gamma", dict(gamma=0.2, **GEOMETRIC), flat(D, steps=2), "aligned", "forward"),
    ("gamma", dict(gamma=0.2, **GEOMETRIC), flat(D, steps=3), "aligned", "absorb"),
    ("gamma", dict(gamma=0.2, **GEOMETRIC), block(D, 2), "shifted", "forward"),
    ("gamma", dict(gamma=0.2, **GEOMETRIC), slide(D, 2), "aligned", "forward"),
    ("absorb", dict(GEOMETRIC), flat(D, steps=3), "aligned", "forward"),
    ("absorb", {}, block(D, 2), "aligned", "forward"),
    ("uniform", dict(GEOMETRIC), flat(D, steps=2), "aligned", "forward"),
    ("epsilon", dict(epsilon=0.2), flat(D, steps=3), "aligned", "forward"),
    ("epsilon", dict(epsilon=0.2), block(D, 2), "shifted", "forward"),
    ("epsilon", dict(epsilon=0.2), slide(D, 2), "aligned", "absorb"),
    ("mdlm", {}, flat(D, steps=2), "aligned", "forward"),
]


@pytest.mark.parametrize("kind,proc,hs,configuration,variational", CASES,
                         ids=[f"{c[0]}-{c[2].kind}{c[2].T}-{c[3]}-{c[4]}" for c in CASES])
def test_discrete_bound_bounds_exact_nll(kind, proc, hs, configuration, variational):
    cfg = make_cfg(kind, configuration, **proc)
    # the uniform process's Tweedie step clamps p_z < (1 - e^{-Δσ̄})/N to 0: keep p near uniform
    model = random_model(cfg, seed=len(kind) + hs.T, scale=0.08 if kind == "uniform" else 0.25)
    # the ε posterior kernel against either chain (Algorithm 3's kernel needs the absorbing one: see below)
    rc = ReverseChain.from_config(model, cfg, schedule=hs, kernel="posterior" if kind == "epsilon" else None)
    chain = variational_chain(rc.process, variational)
    dc = DenseChain(cfg, variational)
    P = kernels(rc)
    assert torch.allclose(torch.stack(P).sum(-1), torch.ones(1, dtype=torch.float64))
    gaps = []
    for y in REAL:
        nll = exact_nll(P, dc.prior, y)
        reference = trajectory_nelbo(dc, hs, P, y)
        bound = library_bound(rc, chain, dc, y)
        assert math.isfinite(bound)
        assert bound == pytest.approx(reference, rel=1e-9, abs=1e-10)
        assert bound >= nll - 1e-10
        gaps.append(bound - nll)
    assert max(gaps) > 1e-4  # a latent-variable bound is not tight here: the check has teeth


DEFAULT_NOISE_CASES = [  # (kind, process args, schedule, configuration, variational, kernel): log-linear, α(1) > 0
    ("gamma", {}, flat(D, steps=3), "aligned", "absorb", "posterior"),  # the default γ = 0.01
    ("gamma", dict(gamma=0.2), block(D, 2), "shifted", "absorb", "posterior"),
    ("gamma", dict(gamma=0.2), slide(D, 2), "aligned", "forward", "posterior"),
    ("absorb", {}, flat(D, steps=3), "aligned", "forward", "posterior"),
    ("absorb", {}, flat(D, steps=3), "aligned", "forward", "analytic"),
    ("epsilon", {}, block(D, 2), "shifted", "forward", "posterior"),  # the default ε = 0.01
    ("epsilon", {}, block(D, 2), "shifted", "absorb", "ancestral"),  # the default kernel: Algorithm 3
    ("epsilon", dict(epsilon=0.2), flat(D, steps=3), "aligned", "absorb", "ancestral"),
    ("mdlm", {}, slide(D, 2), "aligned", "forward", "posterior"),
]


@pytest.mark.parametrize("kind,proc,hs,configuration,variational,kernel", DEFAULT_NOISE_CASES,
                         ids=[f"{c[0]}{c[1].get('gamma', '')}-{c[2].kind}-{c[3]}-{c[4]}-{c[5]}"
                              for c in DEFAULT_NOISE_CASES])
def test_discrete_bound_is_finite_and_bounds_exact_nll_with_default_noise(kind, proc, hs, configuration,
                                                                          variational, kernel):
    """The enumeration check with the default noise (log-linear, α(1) = 10⁻³ > 0): the bound of the
    named kernel is finite for every sequence, equals the dense trajectory reference and is ≥ the
    exact NLL of the sampler that uses that kernel."""
    cfg = make_cfg(kind, configuration, **proc)
    model = random_model(cfg, seed=11 + hs.T)
    rc = ReverseChain.from_config(model, cfg, schedule=hs, kernel=kernel)
    chain, dc = variational_chain(rc.process, variational), DenseChain(cfg, variational)
    P = kernels(rc)
    for y in REAL:
        nll, bound = exact_nll(P, dc.prior, y), library_bound(rc, chain, dc, y)
        assert math.isfinite(bound)
        assert bound == pytest.approx(trajectory_nelbo(dc, hs, P, y), rel=1e-9, abs=1e-10)
        assert bound >= nll - 1e-10


def test_analytic_kernel_bound_is_infinite_where_the_posterior_kernel_is_finite():
    """Issue #14's γ = 0.2, Block ω = 2, SHIFTED case with the default noise, by enumeration: the
    analytic (Tweedie) step clamps negative weights, so sequences of finite NLL get an infinite bound;
    the posterior-mean kernel's bound is finite and ≥ its own sampler's NLL for every sequence."""
    cfg = make_cfg("gamma", "shifted", gamma=0.2)
    model = random_model(cfg, seed=0)
    hs = block(D, 2)
    dc = DenseChain(cfg, "absorb")
    results = {}
    for kernel in ("analytic", "posterior"):
        rc = ReverseChain.from_config(model, cfg, schedule=hs, kernel=kernel)
        chain, P = variational_chain(rc.process, "auto"), kernels(rc)
        results[kernel] = [(exact_nll(P, dc.prior, y), library_bound(rc, chain, dc, y)) for y in REAL]
    assert all(math.isfinite(nll) for nll, _ in results["analytic"])
    assert sum(math.isinf(b) for _, b in results["analytic"]) >= 4
    assert all(math.isfinite(b) and b >= nll - 1e-10 for nll, b in results["posterior"])
    res = perplexity_bound(model, cfg, REAL, schedule=hs, mc_samples=4, kernel="posterior", progress=False)
    assert res.n_infinite == 0 and res.kernel == "posterior" and res.variational == "absorb"


@pytest.mark.parametrize("kind,configuration,proc", [
    ("absorb", "aligned", {}), ("gamma", "aligned", dict(gamma=0.2)), ("epsilon", "aligned", dict(epsilon=0.2)),
    ("gamma", "shifted", dict(gamma=0.2)), ("mdlm", "shifted", {})])
def test_quench_bound_is_exact(kind, configuration, proc):
    """𝒯 = 1 with an all-MASK prior: the variational chain is deterministic, so the bound is the NLL."""
    cfg = make_cfg(kind, configuration, **proc)
    model = random_model(cfg, seed=3, scale=0.6)
    hs = quench(D)
    rc = ReverseChain.from_config(model, cfg, schedule=hs)
    chain = variational_chain(rc.process)
    dc = DenseChain(cfg)
    P = kernels(rc)
    nlls = torch.tensor([exact_nll(P, dc.prior, y) for y in REAL], dtype=torch.float64)
    bounds = torch.tensor([library_bound(rc, chain, dc, y) for y in REAL], dtype=torch.float64)
    assert torch.allclose(bounds, nlls, rtol=1e-9, atol=1e-10)
    res = perplexity_bound(model, cfg, REAL, schedule=hs, mc_samples=4, progress=False)
    if configuration == "shifted":  # Quench + SHIFTED: reported as exact, one forward pass
        assert res.estimator == "exact" and res.stderr == 0.0
        assert res.nll_per_token * res.n_tokens == pytest.approx(float(nlls.sum()), rel=1e-9)
        cont = perplexity_bound(model, cfg, REAL, schedule=hs, estimator="continuous", progress=False)
        assert cont.nll_per_token == pytest.approx(res.nll_per_token, rel=1e-9)


def test_monte_carlo_estimate_matches_exact_bound():
    cfg = make_cfg("epsilon", epsilon=0.2)
    model = random_model(cfg, seed=5, scale=0.5)
    hs = block(D, 2)
    rc = ReverseChain.from_config(model, cfg, schedule=hs)  # the defaults: Algorithm 3's kernel, absorbing chain
    assert rc.kernel == "ancestral"
    chain, dc = variational_chain(rc.process, "auto"), DenseChain(cfg, "absorb")
    exact = sum(library_bound(rc, chain, dc, y) for y in REAL)
    for stratified in (False, True):  # t ~ U{0..T-1}, or spread over [0, T) across a sequence's draws
        res = perplexity_bound(model, cfg, REAL, schedule=hs, mc_samples=300, batch_size=64, seed=1,
                               stratified=stratified, progress=False)
        total, se = res.nll_per_token * res.n_tokens, res.stderr * res.n_tokens
        assert res.estimator == "discrete" and res.n_tokens == len(REAL) * D and res.n_sequences == len(REAL)
        assert 0 < se < 0.1 * exact
        assert abs(total - exact) < 4 * se
        assert res.ppl == pytest.approx(math.exp(res.nll_per_token))
        assert res.ppl_low < res.ppl < res.ppl_high


def test_standard_error_shrinks_like_inverse_sqrt_m():
    cfg = make_cfg("gamma", gamma=0.2, **GEOMETRIC)
    model = random_model(cfg, seed=7)
    data = torch.cat([REAL, REAL, REAL])  # 24 sequences (each copy gets its own draws)
    kw = dict(schedule=flat(D, steps=3), batch_size=64, seed=0, progress=False)
    se4 = perplexity_bound(model, cfg, data, mc_samples=4, **kw).stderr
    se64 = perplexity_bound(model, cfg, data, mc_samples=64, **kw).stderr
    assert 2.5 < se4 / se64 < 6.5


def test_aggregation_sums_nll_and_token_counts():
    cfg = make_cfg("absorb", **GEOMETRIC)
    model = random_model(cfg, seed=2)
    kw = dict(schedule=flat(D, steps=3), mc_samples=6, seed=4, progress=False)
    one = perplexity_bound(model, cfg, REAL, batch_size=8, **kw)
    two = perplexity_bound(model, cfg, REAL, batch_size=5, **kw)  # batches of 5 and 3
    assert two.nll_per_token == pytest.approx(one.nll_per_token, rel=1e-12)
    assert two.stderr == pytest.approx(one.stderr, rel=1e-12)
    assert (two.n_tokens, two.n_sequences) == (one.n_tokens, one.n_sequences) == (24, 8)
    # two ranks, each summing its share, give the one-process sums
    parts = [nll_sums(model, cfg, REAL, rank=r, world_size=2, batch_size=3, **kw)[0] for r in range(2)]
    whole = nll_sums(model, cfg, REAL, batch_size=8, **kw)[0]
    merged = parts[0] + parts[1]
    for f in NLLSums.FIELDS:
        assert getattr(merged, f) == pytest.approx(getattr(whole, f), rel=1e-12)
    # the accumulator itself: NLLs and counts add up, per-token NLL is total / tokens
    a, b = NLLSums(), NLLSums()
    a.add(torch.tensor([[1.0, 3.0], [2.0, 2.0]]), 4)
    a.add(torch.tensor([[5.0, 7.0]]), 4)
    b.add(torch.tensor([[1.0, 3.0], [2.0, 2.0], [5.0, 7.0]]), 4)
    assert (a.nll, a.n_tokens, a.n_sequences) == (b.nll, b.n_tokens, b.n_sequences) == (10.0, 12, 3)
    assert a.mc_var == pytest.approx(b.mc_var) and a.mc_var == pytest.approx((2.0 + 0.0 + 2.0) / 2)


def test_continuous_estimator_runs_and_is_batch_independent():
    cfg = make_cfg("gamma", gamma=0.2, **GEOMETRIC)
    model = random_model(cfg, seed=8)
    kw = dict(estimator="continuous", schedule=block(D, 2), mc_samples=5, seed=3, progress=False)
    one = perplexity_bound(model, cfg, REAL, batch_size=8, **kw)
    two = perplexity_bound(model, cfg, REAL, batch_size=3, **kw)
    assert one.estimator == "continuous" and math.isfinite(one.nll_per_token) and one.stderr > 0
    assert two.nll_per_token == pytest.approx(one.nll_per_token, rel=1e-9)


# ------------------------------------------------------------------------------------------
# the per-token formulas against dense Bayes


def dense_posterior(dc: DenseChain, x: int, y: int, s_now: float, s_next: float) -> torch.Tensor:
    """q(z | x_t = x, y) ∝ F(s_next → s_now)[x, z] · F(0 → s_next)[z, y]."""
    joint = dc.F(s_next, s_now)[x] * dc.F(0.0, s_next)[:, y]
    return joint / joint.sum()


@pytest.mark.parametrize("kind,proc", [("gamma", dict(gamma=0.3)), ("epsilon", dict(epsilon=0.3)), ("mdlm", {})])
def test_forward_posterior_matches_dense_bayes(kind, proc):
    cfg = make_cfg(kind, **proc)
    process = ReverseChain.from_config(random_model(cfg), cfg, schedule=flat(D, steps=2)).process
    dc = DenseChain(cfg)
    for s_now, s_next in [(0.9, 0.4), (0.5, 0.0), (0.3, 0.3), (0.7, 0.2)]:
        for x, y in itertools.product(range(S), range(N)):
            ref = dense_posterior(dc, x, y, s_now, s_next) if dc.F(s_next, s_now)[x] @ dc.F(0.0, s_next)[:, y] > 0 \
                else None
            got = process.posterior(torch.tensor([x]), torch.tensor([y]), s_now, s_next)[0]
            if ref is not None:
                assert torch.allclose(got, ref, atol=1e-12), (s_now, s_next, x, y)


def test_epsilon_kernel_is_posterior_mean_and_mdlm_at_epsilon_zero():
    torch.manual_seed(0)
    raw = torch.randn(1, N, dtype=torch.float64)
    p_hat = torch.softmax(raw, -1)[0]
    for kind, proc in [("epsilon", dict(epsilon=0.3)), ("mdlm", {})]:
        cfg = make_cfg(kind, **proc)
        process = ReverseChain.from_config(random_model(cfg), cfg, schedule=flat(D, steps=2)).process
        dc = DenseChain(cfg)
        for s_now, s_next in [(0.8, 0.3), (0.4, 0.0)]:
            a_now, a_next = (math.exp(-dc.sigma(s)) for s in (s_now, s_next))
            transfer = (a_next - a_now) / (1 - a_now)
            for x in range(S):
                got = process.reverse_kernel(raw, torch.tensor([x]), s_now, s_next, "posterior")[0]
                if kind == "epsilon":  # Σ_ŷ q(x_{t+1} | x_t, ŷ) p̂(ŷ), q from dense Bayes
                    ref = sum(p_hat[v] * dense_posterior(dc, x, v, s_now, s_next) for v in range(N))
                elif x == N:  # MDLM Algorithm 3: reveal with p_transfer, then draw from p̂
                    ref = torch.cat([transfer * p_hat, torch.tensor([1 - transfer], dtype=torch.float64)])
                else:  # revealed tokens stay
                    ref = torch.nn.functional.one_hot(torch.tensor(x), S).to(torch.float64)
                assert torch.allclose(got, ref, atol=1e-12), (kind, s_now, s_next, x)


def test_data_spec_and_errors():
    cfg = make_cfg("absorb")
    dc, split, _ = resolve_data_spec("ptb:valid", cfg.data)
    assert (dc.dataset, split) == ("ptb", "valid")
    dc, split, _ = resolve_data_spec("pubmed", cfg.data)
    assert (dc.dataset, dc.text_field, split) == ("hf:scientific_papers:pubmed", "article", "test")
    dc, split, _ = resolve_data_spec("hf:wikitext:wikitext-103-raw-v1:valid", cfg.data)
    assert (dc.dataset, split) == ("hf:wikitext:wikitext-103-raw-v1", "valid")
    model = random_model(cfg)
    with pytest.raises(HDLMError, match="estimator"):
        perplexity_bound(model, cfg, REAL, estimator="bogus", progress=False)
    with pytest.raises(HDLMError, match="does not match"):
        perplexity_bound(model, cfg, REAL, schedule=flat(4, steps=2), progress=False)


def test_kernel_chunks_do_not_change_the_bound(monkeypatch):
    import hdlm.evaluation.discrete as lik

    cfg = make_cfg("gamma", gamma=0.2, **GEOMETRIC)
    model = random_model(cfg, seed=9)
    kw = dict(schedule=flat(D, steps=3), mc_samples=3, seed=2, progress=False)
    whole = perplexity_bound(model, cfg, REAL, **kw)
    monkeypatch.setattr(lik, "CHUNK_ELEMENTS", 1)  # one position at a time
    assert perplexity_bound(model, cfg, REAL, **kw).nll_per_token == pytest.approx(whole.nll_per_token, rel=1e-12)


def test_cli_writes_table_and_json(tmp_path, capsys):
    import json

    from hdlm.checkpoint import save_pretrained
    from hdlm.cli import build_parser
    from hdlm.commands.eval import run_ppl
    from hdlm.tokenizers import load_tokenizer

    tok = load_tokenizer("gpt2")
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, length=8, n_layers=1, hidden=8, n_heads=2, cond_dim=8,
                                   dropout=0.0),
                 process=ProcessConfig(kind="mdlm"))
    cfg = cfg.replace({"data.cache_dir": str(tmp_path / "cache"), "schedule.kind": "block", "schedule.width": 4})
    ckpt = save_pretrained(HDLMTransformer(cfg.model), cfg, tok.identity(), tmp_path / "ckpt")
    text = tmp_path / "eval.txt"
    text.write_text("\n".join(f" the cat sat on mat number {i} ." for i in range(6)) + "\n")
    out = tmp_path / "ppl.json"
    args = build_parser().parse_args(["eval", "ppl", "--checkpoint", str(ckpt), "--data", str(text), "--mc-samples", "8",
                                      "--schedule", "flat", "--steps", "4", "--estimator", "discrete",
                                      "--batch-size", "4", "--seed", "0", "--json", str(out)])
    assert run_ppl(args) == 0
    assert "| discrete bound | ancestral, flat T = 4 |" in capsys.readouterr().out  # names the certified sampler
    record = json.loads(out.read_text())
    assert record["kind"] == "bound" and record["certifies"] == "ancestral, flat T = 4"
    assert record["checkpoint_sha256"] and record["hdlm_version"] and record["command"]
    assert record["schedule"]["kind"] == "flat" and record["schedule"]["T"] == 4
    assert record["estimator"] == "discrete" and record["n_tokens"] % 8 == 0 and math.isfinite(record["nll_per_token"])
    # an untrained (all-zero head) model predicts uniformly: its NLL is exactly log N per token
    assert record["nll_per_token"] + 4 * record["stderr"] >= math.log(tok.vocab_size)
    wrong = build_parser().parse_args(["eval", "ppl", "--checkpoint", str(ckpt), "--data", str(text), "--kernel", "euler"])
    with pytest.raises(HDLMError, match="reverse kernel 'euler': MDLM offers ancestral, posterior, ar"):
        run_ppl(wrong)
    bad = build_parser().parse_args(["eval", "ppl", "--checkpoint", str(ckpt), "--data", "hf:no_such_dataset_xyz:test"])
    with pytest.raises(HDLMError, match="no_such_dataset_xyz"):
        run_ppl(bad)

    # --max-sequences N: the first N sequences only, the same draws as the bound on those N by hand
    from hdlm.data import load_split
    from hdlm.hub import load_pretrained

    args = build_parser().parse_args(["eval", "ppl", "--checkpoint", str(ckpt), "--data", str(text), "--mc-samples", "8",
                                      "--schedule", "flat", "--steps", "4", "--batch-size", "4", "--seed", "0",
                                      "--max-sequences", "2", "--json", str(out)])
    assert run_ppl(args) == 0
    two = json.loads(out.read_text())
    pre = load_pretrained(ckpt)
    data_cfg, split, _ = resolve_data_spec(str(text), pre.config.data, "auto")
    blocks = load_split(data_cfg, split, pre.tokenizer, 8)
    assert len(blocks) > 2 and two["n_sequences"] == 2 and two["n_tokens"] == 16
    ref = perplexity_bound(pre.model, pre.config, blocks.gather([0, 1]), mc_samples=8, schedule=flat(8, 4),
                           batch_size=4, seed=0, progress=False)
    assert two["nll_per_token"] == pytest.approx(ref.nll_per_token, rel=1e-12)
