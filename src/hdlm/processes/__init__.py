"""Noising processes, one class per process whose methods are its equations (paper §2.2, §3.2, App. A).

- :mod:`.base`: the :class:`Process` interface (forward process, level chain, posterior, reverse kernels).
- :mod:`.gamma`: :class:`GammaHybrid` (SEDD framework, DWDSE; :class:`Absorb`, :class:`Uniform`).
- :mod:`.epsilon`: :class:`EpsilonHybrid` (MDM framework, HDCE; :class:`MDLM`).
"""

from __future__ import annotations

from ..config import ProcessConfig
from ..errors import HDLMError
from ..noise import make_noise
from .base import Process, cross_entropy
from .epsilon import MDLM, EpsilonHybrid
from .gamma import Absorb, GammaHybrid, Uniform

__all__ = ["Absorb", "EpsilonHybrid", "GammaHybrid", "MDLM", "Process", "Uniform", "cross_entropy", "make_process"]


def make_process(cfg: ProcessConfig, N: int) -> Process:
    """Build the process named by ``cfg.kind`` over N real tokens (MASK = N)."""
    noise = make_noise(cfg.noise, eps=cfg.noise_eps, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)
    if cfg.kind == "absorb":
        return Absorb(N, noise, parametrisation=cfg.parametrisation)
    if cfg.kind == "uniform":
        return Uniform(N, noise, parametrisation=cfg.parametrisation)
    if cfg.kind == "gamma":
        return GammaHybrid(N, noise, cfg.gamma, parametrisation=cfg.parametrisation)
    if cfg.kind == "epsilon":
        return EpsilonHybrid(N, noise, cfg.epsilon, cfg.lam)
    if cfg.kind == "mdlm":
        return MDLM(N, noise, lam=cfg.lam)
    raise HDLMError(f"config process.kind = {cfg.kind!r}: must be one of absorb, uniform, gamma, epsilon, mdlm")
