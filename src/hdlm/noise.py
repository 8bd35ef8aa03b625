"""Scalar noise schedules: noise s in [0, 1] -> total noise sigma_bar(s) and keep-probability alpha(s).

SEDD (Lou et al.) speaks of a cumulative noise sigma_bar(s); MDLM (Sahoo et al.) of the
probability alpha(s) that a token survives masking. For the absorbing process the two are
the same thing, alpha = exp(-sigma_bar), so every schedule here exposes both views and the
processes pick whichever their formulas use (paper §2.2).

A hyperschedule gives each position i its own noise s = l_i(u) (paper §3.1); these
objects map that s to sigma_bar / alpha elementwise, so they accept tensors of any shape.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .errors import HDLMError


class NoiseSchedule(ABC):
    """A monotone map s in [0, 1] -> sigma_bar(s) >= 0 with sigma_bar(0) = 0 (clean)."""

    name: str = "abstract"

    @abstractmethod
    def sigma_bar(self, s: Tensor) -> Tensor:
        """Total noise sigma_bar(s)."""

    @abstractmethod
    def dsigma_bar(self, s: Tensor) -> Tensor:
        """Rate d sigma_bar / ds (>= 0)."""

    def alpha(self, s: Tensor) -> Tensor:
        """Keep-probability alpha(s) = exp(-sigma_bar(s)) of the absorbing process."""
        return torch.exp(-self.sigma_bar(s))

    def dalpha(self, s: Tensor) -> Tensor:
        """d alpha / ds = -sigma_bar'(s) alpha(s) (<= 0)."""
        return -self.dsigma_bar(s) * self.alpha(s)

    def mask_weight(self, s: Tensor) -> Tensor:
        """MDLM's continuous-time weight -alpha'(s) / (1 - alpha(s)) = sigma_bar' / expm1(sigma_bar).

        Infinite at s = 0, where no token is masked; callers only evaluate it on masked tokens.
        """
        return self.dsigma_bar(s) / torch.expm1(self.sigma_bar(s))

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class LogLinear(NoiseSchedule):
    """SEDD's log-linear schedule sigma_bar(s) = -log(1 - (1 - eps) s).

    Equivalently alpha(s) = 1 - (1 - eps) s: MDLM's linear schedule with the usual eps clipping,
    so sigma_bar(1) = -log(eps) stays finite.
    """

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        if not 0.0 < eps < 1.0:
            raise HDLMError(f"noise eps = {eps}: must be in (0, 1)")
        self.eps = float(eps)

    def sigma_bar(self, s: Tensor) -> Tensor:
        return -torch.log1p(-(1.0 - self.eps) * s)

    def dsigma_bar(self, s: Tensor) -> Tensor:
        return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * s)

    def alpha(self, s: Tensor) -> Tensor:
        return 1.0 - (1.0 - self.eps) * s

    def dalpha(self, s: Tensor) -> Tensor:
        return torch.full_like(s, -(1.0 - self.eps)) if isinstance(s, Tensor) else -(1.0 - self.eps)


class Linear(LogLinear):
    """MDLM's linear alpha(s) = 1 - (1 - eps) s: the same map as :class:`LogLinear`, named for MDLM."""

    name = "linear"


class Geometric(NoiseSchedule):
    """SEDD's geometric schedule sigma_bar(s) = sigma_min^(1-s) sigma_max^s.

    Note sigma_bar(0) = sigma_min > 0: SEDD's convention, kept so that published settings match.
    """

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        if not 0.0 < sigma_min < sigma_max:
            raise HDLMError(f"geometric noise: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def sigma_bar(self, s: Tensor) -> Tensor:
        return self.sigma_min ** (1.0 - s) * self.sigma_max**s

    def dsigma_bar(self, s: Tensor) -> Tensor:
        return self.sigma_bar(s) * math.log(self.sigma_max / self.sigma_min)


class Cosine(NoiseSchedule):
    """MDLM's cosine schedule alpha(s) = eps + (1 - eps) cos(pi s / 2)."""

    name = "cosine"

    def __init__(self, eps: float = 1e-3):
        if not 0.0 < eps < 1.0:
            raise HDLMError(f"noise eps = {eps}: must be in (0, 1)")
        self.eps = float(eps)

    def alpha(self, s: Tensor) -> Tensor:
        return self.eps + (1.0 - self.eps) * torch.cos(0.5 * math.pi * s)

    def dalpha(self, s: Tensor) -> Tensor:
        return -(1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * s)

    def sigma_bar(self, s: Tensor) -> Tensor:
        # 1 - cos(x) = 2 sin²(x/2): keeps float32 precision near s = 0, where -log(alpha) cancels
        return -torch.log1p(-(1.0 - self.eps) * 2.0 * torch.sin(0.25 * math.pi * s) ** 2)

    def dsigma_bar(self, s: Tensor) -> Tensor:
        return -self.dalpha(s) / self.alpha(s)

    def mask_weight(self, s: Tensor) -> Tensor:
        # -alpha'/(1 - alpha) = (pi/2) sin(pi s/2) / (2 sin²(pi s/4)) = (pi/2) / tan(pi s/4)
        return 0.5 * math.pi / torch.tan(0.25 * math.pi * s)


class Scaled(NoiseSchedule):
    """c · sigma_bar(s) of another schedule: e.g. the absorbing part (1 - gamma) sigma_bar of a gamma-hybrid."""

    def __init__(self, inner: NoiseSchedule, factor: float):
        if not factor > 0.0:
            raise HDLMError(f"scaled noise: factor = {factor} must be > 0")
        self.inner = inner
        self.factor = float(factor)
        self.name = f"{factor:g}x{inner.name}"

    def sigma_bar(self, s: Tensor) -> Tensor:
        return self.factor * self.inner.sigma_bar(s)

    def dsigma_bar(self, s: Tensor) -> Tensor:
        return self.factor * self.inner.dsigma_bar(s)


NOISE_SCHEDULES = {c.name: c for c in (LogLinear, Linear, Geometric, Cosine)}


def make_noise(name: str, **kwargs) -> NoiseSchedule:
    """Build a schedule by name ('loglinear', 'linear', 'geometric', 'cosine')."""
    if name not in NOISE_SCHEDULES:
        raise HDLMError(f"noise schedule '{name}': must be one of {sorted(NOISE_SCHEDULES)}")
    cls = NOISE_SCHEDULES[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})
