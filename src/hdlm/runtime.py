"""Where the code runs: devices, number formats, seeds and processes (one place for each).

- :func:`resolve_device`: ``auto`` → this process's CUDA device when there is one, else the CPU.
- :func:`autocast`: bf16 autocast on CUDA, fp32 on CPUs (bf16 matmul is slow there, DESIGN.md §9).
- Seeds: every random choice is seeded by :func:`mix_seed` of (seed, :class:`Stream`, indices…), so a
  draw does not depend on batching, rank or resumption. The streams are named below.
- RNG states for exact resume: :func:`rng_state` / :func:`set_rng_state`, and
  :func:`to_weights_only` / :func:`from_weights_only`, which let such (NumPy-holding) state trees go
  through ``torch.load(weights_only=True)`` unchanged.
- :class:`Dist` / :func:`setup_distributed`: the torch.distributed process group under torchrun.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import torch

from .errors import HDLMError

# --------------------------------------------------------------------------------------------
# devices and number formats


def resolve_device(spec: Any = "auto", local_rank: int | None = None, *, name: str = "device") -> torch.device:
    """A torch device from ``auto`` | ``cpu`` | ``cuda`` | ``cuda:K`` (or a torch.device).

    ``auto`` (or None) is CUDA when available, else the CPU. A bare ``cuda`` is ``cuda:local_rank``
    when a rank is given (torchrun), else the current CUDA device. ``name`` is the setting the
    error message names (e.g. ``config train.device``).
    """
    if spec is None or str(spec) == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise HDLMError(f"{name} = {spec!r}: not a device (auto | cpu | cuda | cuda:K)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HDLMError(f"{name} = {str(spec)!r}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)
    return device


def autocast(device: torch.device, dtype: str = "auto"):
    """bf16 autocast on CUDA (or when ``dtype == "bf16"``); fp32 elsewhere (DESIGN.md §9)."""
    bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


# --------------------------------------------------------------------------------------------
# seeds: a 64-bit mix (SplitMix64 finaliser) of (seed, stream, indices)


class Stream(IntEnum):
    """What a mixed seed is for: two streams never share draws, whatever their indices."""

    TRAIN_SAMPLE = 1  # one training sample's noise: (seed, step, global batch index)
    TRAIN_BATCH = 2  # what a training batch shares, e.g. its intervals: (seed, step)
    EVAL_SAMPLE = 3  # one validation sample's noise: (seed, batch, index)
    EVAL_BATCH = 4  # what a validation batch shares: (seed, batch)
    TORCH = 5  # a rank's global torch RNG (dropout): (seed, [step,] rank)
    BOUND_DRAW = 6  # a discrete-bound draw (step t and x_t): (seed, sequence, draw)
    BOUND_SAMPLE = 7  # a continuous-estimate draw of one sequence: (seed, sequence, draw)
    BOUND_BATCH = 8  # what a continuous-estimate draw shares: (seed, draw)
    FORWARD_NOISE = 9  # a sample's forward-process draws, apart from its interval phases: (sample seed,)
    GENERATE = 10  # one generated sequence's draws: (seed, sequence index)


_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 / golden ratio
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64's finaliser multipliers
SEED_BITS = 32  # seeds handed to the objective and generators' callers stay small


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * _MIX1) & _M64
    x = ((x ^ (x >> 27)) * _MIX2) & _M64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A deterministic 63-bit hash of a tuple of integers (non-negative, fits an int64)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _M64))
    return h >> 1


def small_seed(*values: int) -> int:
    """:func:`mix_seed` cut to ``SEED_BITS`` bits."""
    return mix_seed(*values) >> (63 - SEED_BITS)


def generator(seed: int, device: Any = None) -> torch.Generator:
    """A torch.Generator on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(int(seed))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global generators' states (Python, NumPy, torch, CUDA), for exact resume."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_weights_only(obj: Any) -> Any:
    """Make a state tree loadable with ``torch.load(weights_only=True)``: numpy values become
    tensors/ints with a marker so :func:`from_weights_only` can restore them exactly."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj).copy()), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_weights_only(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_weights_only(v) for v in obj]}
    if isinstance(obj, list):
        return [to_weights_only(v) for v in obj]
    return obj


def from_weights_only(obj: Any) -> Any:
    """The inverse of :func:`to_weights_only`."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj and set(obj) == {"__ndarray__", "dtype"}:
            return obj["__ndarray__"].numpy().astype(obj["dtype"], copy=False)
        if set(obj) == {"__tuple__"}:
            return tuple(from_weights_only(v) for v in obj["__tuple__"])
        return {k: from_weights_only(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_weights_only(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# processes (torch.distributed)


@dataclass
class Dist:
    """This process's place in a torch.distributed group (one process: rank 0 of 1, inactive)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def mean(self, values: list[float], device: torch.device) -> list[float]:
        """Average python floats over ranks (float64 so the average does not round differently)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return (t / self.world).tolist()

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def current_dist() -> Dist:
    """The already-initialised process group as a :class:`Dist` (rank 0 of 1 when there is none)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return Dist(rank=dist.get_rank(), world=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), active=True)
    return Dist()


def setup_distributed(device_spec: str = "auto") -> Dist:
    """Join the process group when launched with WORLD_SIZE > 1 (torchrun sets the env vars)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available():
        return Dist()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = str(device_spec).startswith("cuda") or (str(device_spec) == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank=rank, world=world, local_rank=local, active=True)
