"""Optimisation (paper App. B.1): AdamW with warmup + cosine LR, EMA of the weights, DDP / FSDP wrapping,
and the full (unsharded) optimizer and model states that checkpoints hold.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import Tensor, nn

from .checkpoint import unwrap_model
from .config import Config, TrainConfig
from .errors import HDLMError

# --------------------------------------------------------------------------------------------
# learning rate, optimizer, EMA


def lr_factor(step: int, tc: TrainConfig) -> float:
    """Multiplier of ``tc.lr`` for optimizer update ``step`` (0-based): linear warmup over
    ``tc.warmup`` updates, then constant or cosine decay to ``tc.min_lr_ratio`` at ``tc.steps``."""
    if step < tc.warmup:
        return (step + 1) / tc.warmup
    if tc.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    return tc.min_lr_ratio + (1.0 - tc.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, tc: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the model's parameters and its :func:`lr_factor` schedule (the fused kernel where it runs)."""
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                            **adamw_kernel(params))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, tc))


def adamw_kernel(params: list[Tensor]) -> dict[str, bool]:
    """``fused=True`` (one kernel for all parameters) when every parameter is a plain floating tensor on
    CPU or CUDA; else ``foreach`` on CUDA; else the default per-parameter loop. Same update either way."""
    devices = {p.device.type for p in params}
    plain = all(p.is_floating_point() and not hasattr(p, "device_mesh") for p in params)  # no FSDP DTensors
    if params and plain and devices <= {"cpu", "cuda"}:
        return {"fused": True}
    return {"foreach": True} if devices == {"cuda"} else {}


class EMA:
    """Exponential moving average of the parameters, shadow ← decay·shadow + (1 − decay)·θ."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def load(self, state: dict[str, Tensor]) -> None:
        """Set the shadow from a model state dict (e.g. a checkpoint's ``ema.safetensors``)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise HDLMError(f"EMA weights lack parameter {missing[0]}")
        for s, n in zip(self.shadow, self.names):
            full = state[n].to(s.device, s.dtype)
            if hasattr(s, "device_mesh"):  # FSDP: the shadow is a DTensor shard
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, s.device_mesh, s.placements)
            s.copy_(full)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the model (evaluation, saving)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)


# --------------------------------------------------------------------------------------------
# distributed wrapping and full states


def wrap_model(model: nn.Module, cfg: Config, dist, device: torch.device) -> nn.Module:
    """torch.compile (optional), then DDP or FSDP (fully_shard per block, then the root)."""
    if cfg.train.compile:
        model = torch.compile(model)
    if not dist.active:
        return model
    if cfg.train.fsdp:
        from torch.distributed.fsdp import fully_shard

        bare = unwrap_model(model)
        for block in getattr(bare, "blocks", []):
            fully_shard(block)
        fully_shard(bare)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: nn.Module, cfg: Config, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if last:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if cfg.train.fsdp and hasattr(unwrap_model(model), "set_requires_gradient_sync"):
        bare = unwrap_model(model)

        @contextlib.contextmanager
        def fsdp_no_sync():
            bare.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                bare.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return contextlib.nullcontext()


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_weights(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the full model state dict on CPU (a collective under FSDP: call it on every rank).

    Copied, because on CPU the state dict holds the live parameters (think of the EMA swap)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(unwrap_model(model), options=_state_options(cpu_offload=True))
    return {k: v.detach().clone() for k, v in state.items()}


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap_model(model), opt, options=_state_options(cpu_offload=True))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(unwrap_model(model), opt, optim_state_dict=state, options=_state_options())
