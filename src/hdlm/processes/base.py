"""The interface every noising process implements, and the maths they share (paper §2.2, §3.2).

States: N real tokens ``0..N-1`` and MASK = ``N``. Column convention: q(x' | x) is the x-th
column of a matrix. The network outputs ``raw`` (..., N) over the real tokens only; a process
says how to read it. A :class:`Process` owns, as methods, the equations of its process:

* continuous time (training): ``marginal``, ``sample_forward``, ``embed_keep`` (Eq. 12),
  ``diffusion_loss`` (DWDSE / HDCE);
* the forward chain over a hyperschedule's levels (discrete time, level 0 = the clean token
  exactly): ``chain_marginal``, ``chain_row``, ``chain_sample`` and, by Bayes on them, the
  posterior q(x_s | x_t, y) (:meth:`Process.posterior`);
* the model's reverse kernels p_θ(x_s | x_t), selected by name (:meth:`Process.reverse_kernel`):
  the samplers draw from them and the discrete perplexity bound scores them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..errors import HDLMError
from ..noise import NoiseSchedule

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# small pure helpers


def cross_entropy(raw: Tensor, y: Tensor) -> Tensor:
    """-log softmax(raw)_y per token, (...): the settled-token term of Eq. (10)."""
    return -torch.log_softmax(raw, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def noise_like(s, shape, dtype: torch.dtype, device) -> Tensor:
    """The per-token noise level (or rate) ``s`` as a tensor of ``shape`` (broadcast)."""
    return torch.broadcast_to(torch.as_tensor(s, dtype=dtype, device=device), shape)


def float_dtype(s) -> torch.dtype:
    """The dtype of a floating tensor ``s``, else torch's default float dtype."""
    if isinstance(s, Tensor) and s.is_floating_point():
        return s.dtype
    return torch.get_default_dtype()


def levels64(s, x: Tensor) -> Tensor:
    """Per-position levels broadcast to x's shape, in float64 (levels are compared exactly)."""
    return noise_like(s, x.shape, torch.float64, x.device)


def one_hot(x: Tensor, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.nn.functional.one_hot(x, n).to(dtype)


# --------------------------------------------------------------------------------------------
# the interface


class Process(ABC):
    """A per-token forward noising process q(x | y, s), its posterior, its losses and reverse kernels.

    ``s`` is the noise level in [0, 1] of each token (a hyperschedule gives every position its
    own, paper §3.1); ``self.noise`` maps it to sigma_bar(s) / alpha(s).
    """

    family: str = "abstract"
    #: names of the reverse kernels p_θ(x_s | x_t) this process offers (:meth:`reverse_kernel`);
    #: each is the method ``kernel_<name>``. "ar" (𝒯 = 1: draw the token from softmax(raw)) is common to all.
    kernels: tuple[str, ...] = ("ar",)
    #: the kernel the samplers and the discrete bound use when none is named (𝒯 > 1)
    default_kernel: str = "ar"

    def __init__(self, N: int, noise: NoiseSchedule):
        if int(N) != N or N < 1:
            raise HDLMError(f"process: vocabulary size N = {N} must be a positive integer")
        if not isinstance(noise, NoiseSchedule):
            raise HDLMError(f"process: noise must be a NoiseSchedule, got {type(noise).__name__}")
        self.N = int(N)
        self.noise = noise

    @property
    def mask_id(self) -> int:
        return self.N

    # ---- continuous time: forward process and training loss -------------------------------

    @abstractmethod
    def sample_forward(self, y: Tensor, s, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        """Draw x ~ q(x | y, s) per token; also return what the loss needs (``aux``)."""

    @abstractmethod
    def marginal(self, y: Tensor, s) -> Tensor:
        """q(x | y, s) as probabilities (..., N+1)."""

    @abstractmethod
    def prior(self, shape, generator: torch.Generator | None = None, device=None) -> Tensor:
        """A draw from the full-noise state (generation starts there)."""

    @abstractmethod
    def embed_keep(self, x: Tensor, s) -> Tensor:
        """Keep weight of the weighted token embedding, Eq. (12), per input token (...)."""

    @abstractmethod
    def diffusion_loss(self, raw: Tensor, x: Tensor, y: Tensor, s, rate, aux: dict | None = None) -> Tensor:
        """Per-token diffusion loss (...), multiplied by ``rate`` = |dl_i/du| and 0 where rate == 0."""

    # ---- discrete time: the forward chain over a hyperschedule's levels --------------------

    @abstractmethod
    def chain_marginal(self, y: Tensor, s) -> Tensor:
        """q(x_s | y) of the level chain (..., N+1): exactly e_y at level 0."""

    @abstractmethod
    def chain_row(self, x: Tensor, s_lo, s_hi) -> Tensor:
        """The vector over z of q(x at level s_hi | z at level s_lo), s_lo <= s_hi, (..., N+1)."""

    def chain_sample(self, y: Tensor, s, generator: torch.Generator | None = None) -> Tensor:
        """x_s ~ q(x_s | y) of the level chain: :meth:`sample_forward`, and y itself at level 0."""
        s = levels64(s, y)
        x, _ = self.sample_forward(y, s, generator)
        return torch.where(s > 0, x, y)

    def posterior(self, x_t: Tensor, y: Tensor, s_now, s_next) -> Tensor:
        """q(x_s | x_t, y) per token (..., N+1) by Bayes on the chain, s = s_next <= s_now:

            q(z | x_t, y) ∝ q(z at s_next | y) · q(x_t at s_now | z at s_next).

        Where s_now = s_next (or x_t is unreachable from y) the token stays.
        """
        s_now, s_next = levels64(s_now, x_t), levels64(s_next, x_t)
        post = self.chain_marginal(y, s_next) * self.chain_row(x_t, s_next, s_now)
        total = post.sum(-1, keepdim=True)
        stay = one_hot(x_t, self.N + 1, post.dtype)
        post = torch.where(total > 0, post / torch.where(total > 0, total, torch.ones_like(total)), stay)
        return torch.where((s_now == s_next).unsqueeze(-1), stay, post)

    def absorbing_part(self) -> "Process":
        """The masking-only chain of this process (MDLM at the rate this process masks with).

        A valid variational chain for the discrete bound whose trajectories never hold a wrong
        token (docs/likelihood.md).
        """
        raise HDLMError(f"{type(self).__name__} has no absorbing part")

    # ---- the model's reverse kernels p_θ(x_s | x_t) ---------------------------------------

    def reverse_kernel(self, raw: Tensor, x: Tensor, s_now, s_next, kernel: str | None = None) -> Tensor:
        """p_θ(x_s | x_t) per token (..., N+1) from raw outputs (..., N), by kernel name.

        ``kernel`` is one of :attr:`kernels` (default :attr:`default_kernel`). Computed in raw's
        dtype (pass float64 for exact values); a position whose level does not decrease keeps its token.
        """
        name = kernel or self.default_kernel
        if name not in self.kernels:
            raise HDLMError(f"reverse kernel '{name}': {type(self).__name__} offers {', '.join(self.kernels)}")
        probs = getattr(self, f"kernel_{name}")(raw, x, s_now, s_next)
        moving = levels64(s_next, x) < levels64(s_now, x)
        if bool(moving.all()):  # the samplers pass moving positions only: no (…, N+1) one-hot to build
            return probs
        return torch.where(moving.unsqueeze(-1), probs, one_hot(x, self.N + 1, probs.dtype))

    def kernel_stay(self, x: Tensor, s_now, s_next, kernel: str) -> Tensor | None:
        """P(x_s = x_t) under ``kernel`` where it does not depend on the model's output, NaN where it
        does (float64, x's shape), or None when it always does: the samplers decide those positions
        before the model runs and read no output where a token cannot change (issue #16.4)."""
        return None

    def kernel_ar(self, raw: Tensor, x: Tensor, s_now, s_next) -> Tensor:
        """𝒯 = 1 (Quench): the token is drawn from softmax(raw); training fits raw by cross-entropy there."""
        return torch.cat([torch.softmax(raw, -1), torch.zeros_like(raw[..., :1])], dim=-1)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        extra = {k: v for k, v in vars(self).items() if k not in ("N", "noise")}
        args = ", ".join(f"{k}={v}" for k, v in extra.items())
        return f"{type(self).__name__}(N={self.N}, noise={self.noise!r}{', ' if args else ''}{args})"
