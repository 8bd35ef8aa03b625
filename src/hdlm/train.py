"""Training (paper App. B.1): one loop for Stage 1 (Flat) and Stage 2 (Block/Slide fine-tuning).

The step, on one screen (:func:`train`): draw this rank's shard of the global batch, split it into
``grad_accum`` micro-batches, call the objective (Eq. 10) on each with per-sample seeds, average
the gradients (DDP/FSDP across ranks), clip, AdamW, LR schedule, EMA. Around it: validation on fixed
batches, metrics, crash-safe checkpoints with the full training state, and exact resume.

Determinism: every random choice of a sample (its noise levels, its masking) comes from its own
seed ``sample_seed(seed, step, g)`` where ``g`` is the sample's index in the global batch, and the
choices shared by a batch (e.g. which intervals) from ``batch_seed(seed, step)``. A sample thus gets
the same noise whichever rank or micro-batch it lands on, which is what makes K processes equal to
one and a resumed run equal to an uninterrupted one.

Run it as ``hdlm train ...`` or, on several processes, ``torchrun --nproc_per_node=K -m hdlm.train ...``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import Checkpoint, list_checkpoints, load_checkpoint, load_weights, save_checkpoint, unwrap_model
from .config import Config, TrainConfig
from .errors import HDLMError

KEEP_CHECKPOINTS = 2
METRICS_FILE = "metrics.jsonl"

# --------------------------------------------------------------------------------------------
# seeds: a 64-bit mix (SplitMix64 finaliser) of (seed, purpose, step, index)

_M64 = (1 << 64) - 1
_TRAIN, _BATCH, _EVAL, _EVAL_BATCH, _TORCH = 1, 2, 3, 4, 5


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A deterministic 63-bit hash of a tuple of integers (non-negative, fits an int64)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _M64))
    return h >> 1


SEED_BITS = 32  # seeds handed to the objective stay small, so it may offset or scale them freely


def sample_seeds(seed: int, step: int, indices: Tensor | list[int], purpose: int = _TRAIN) -> Tensor:
    """Per-sample seeds (B,) int64 in [0, 2^32) for global batch indices ``indices`` at ``step``."""
    return torch.tensor([mix_seed(seed, purpose, step, g) >> (63 - SEED_BITS) for g in list(map(int, indices))],
                        dtype=torch.int64)


def batch_seed(seed: int, step: int, purpose: int = _BATCH) -> int:
    """The seed in [0, 2^32) of the randomness shared by the batch of ``step`` (same on every rank)."""
    return mix_seed(seed, purpose, step) >> (63 - SEED_BITS)


# --------------------------------------------------------------------------------------------
# learning rate, EMA


def lr_factor(step: int, tc: TrainConfig) -> float:
    """Multiplier of ``tc.lr`` for optimizer update ``step`` (0-based): linear warmup over
    ``tc.warmup`` updates, then constant or cosine decay to ``tc.min_lr_ratio`` at ``tc.steps``."""
    if step < tc.warmup:
        return (step + 1) / tc.warmup
    if tc.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    return tc.min_lr_ratio + (1.0 - tc.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
# processes and devices


@dataclass
class Dist:
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


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA (this process's GPU) when available, else CPU; or an explicit device."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise HDLMError(f"config train.device = {spec!r}: not a device (auto | cpu | cuda | cuda:K)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HDLMError(f"config train.device = {spec!r}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def setup_distributed(device_spec: str) -> Dist:
    """Join the process group when launched with WORLD_SIZE > 1 (torchrun sets the env vars)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank=rank, world=world, local_rank=local, active=True)


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on CUDA (or when asked); fp32 elsewhere (bf16 matmul is slow on CPUs, DESIGN §9)."""
    bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def micro_batch_size(tc: TrainConfig, world: int) -> int:
    """Per-rank micro-batch = global batch / (world · grad_accum); an error when not divisible."""
    if tc.batch_size % (world * tc.grad_accum):
        raise HDLMError(f"config train.batch_size = {tc.batch_size}: must be divisible by "
                        f"processes x train.grad_accum = {world} x {tc.grad_accum}")
    return tc.batch_size // (world * tc.grad_accum)


def resolve_vocab(cfg: Config, vocab_size: int) -> Config:
    """Fill ``model.vocab_size`` from the tokenizer (N), refusing a different explicit value."""
    if cfg.model.vocab_size == 0:
        return cfg.replace({"model.vocab_size": vocab_size})
    if cfg.model.vocab_size != vocab_size:
        raise HDLMError(f"config model.vocab_size = {cfg.model.vocab_size}: the tokenizer "
                        f"'{cfg.data.tokenizer}' has N = {vocab_size} tokens")
    return cfg


# --------------------------------------------------------------------------------------------
# state: weights and optimizer state as full (unsharded) dicts keyed by parameter name


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


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# metrics


class Metrics:
    """``metrics.jsonl`` rows (kept in memory too, so a checkpoint can restore the file exactly),
    plus TensorBoard when ``torch.utils.tensorboard`` imports. Only rank 0 writes."""

    def __init__(self, out_dir: Path, rows: list[dict], write: bool) -> None:
        self.path = out_dir / METRICS_FILE
        self.rows = list(rows)
        self.write = write
        self.tb = None
        if write:
            out_dir.mkdir(parents=True, exist_ok=True)
            # rewrite from the checkpoint's rows: a resumed run has no rows past its step
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=rows[-1]["step"] + 1 if rows else None)
            except Exception:  # tensorboard is optional
                self.tb = None

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if not self.write:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "split"):
                    self.tb.add_scalar(f"{row.get('split', 'train')}/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------------------------
# the training loop


def _global_indices(rank: int, per_rank: int) -> list[int]:
    """Global batch indices of this rank's samples: ranks hold consecutive slices of the batch,
    as :class:`hdlm.data.BatchIterator` shards it."""
    return list(range(rank * per_rank, (rank + 1) * per_rank))


@torch.no_grad()
def evaluate(model: nn.Module, objective: Any, batches: list[Tensor], cfg: Config, dist: Dist,
             device: torch.device, ema: EMA | None) -> dict:
    """Mean validation stats over fixed batches with fixed seeds (EMA weights when EMA is on)."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    with ema.swapped() if ema is not None else contextlib.nullcontext():
        for i, y in enumerate(batches):
            seeds = sample_seeds(cfg.train.seed, i, _global_indices(dist.rank, len(y)), _EVAL).to(device)
            with autocast(device, cfg.train.dtype):
                loss, stats = objective(model, y, seeds, batch_seed(cfg.train.seed, i, _EVAL_BATCH))
            stats = dict(stats, loss=loss.item())
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(batches)
    model.train(was_training)
    keys = sorted(totals)
    return dict(zip(keys, dist.mean([totals[k] for k in keys], device)))


def _wrap(model: nn.Module, cfg: Config, dist: Dist, device: torch.device) -> nn.Module:
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


def _no_sync(model: nn.Module, cfg: Config, last: bool):
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


def _load_init(source: str, tokenizer: Any) -> Checkpoint:
    """Stage 2 (App. B.1): the Stage-1 checkpoint whose weights we start from (fresh optimizer)."""
    ckpt = load_checkpoint(source)
    tokenizer.check_matches(ckpt.tokenizer)
    return ckpt


def _log_line(row: dict) -> str:
    parts = [f"{row.get('split', 'train')} step {row['step']}", f"loss {row['loss']:.4f}"]
    if "tokens_per_s" in row:
        parts.append(f"{row['tokens_per_s']:.0f} tok/s")
    if "lr" in row:
        parts.append(f"lr {row['lr']:.2e}")
    return " | ".join(parts)


def train(cfg: Config, resume: str | None = None, stop_after: int | None = None) -> dict:
    """Train ``cfg`` (App. B.1) and return the final stats.

    ``resume``: a run folder or checkpoint folder; training continues in that run folder exactly
    where the checkpoint left it (model, optimizer, LR schedule, EMA, RNG, data position, metrics).
    ``cfg.train.init_from``: Stage 2, start from another checkpoint's weights (fresh optimizer).
    ``stop_after``: stop (as if killed) after this many optimizer steps of this call; for tests.
    """
    dist = setup_distributed(cfg.train.device)
    try:
        return _train(cfg, dist, resume, stop_after)
    finally:
        if dist.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: Config, dist: Dist, resume: str | None, stop_after: int | None) -> dict:
    from .data import BatchIterator, load_split
    from .model import build_model
    from .objective import build_objective
    from .tokenizers import load_tokenizer

    tc = cfg.train
    device = resolve_device(tc.device, dist.local_rank)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32
    micro = micro_batch_size(tc, dist.world)
    per_rank = micro * tc.grad_accum
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg = resolve_vocab(cfg, tokenizer.vocab_size)
    d = cfg.model.length

    ckpt: Checkpoint | None = None
    out_dir = Path(tc.out_dir)
    if resume:
        ckpt = load_checkpoint(resume)
        tokenizer.check_matches(ckpt.tokenizer)
        out_dir = ckpt.path.parent  # continue in the run folder that holds the checkpoint
        cfg = cfg.replace({"train.out_dir": str(out_dir)})
    elif list_checkpoints(out_dir):
        raise HDLMError(f"run folder {out_dir} already holds checkpoints: continue it with --resume {out_dir}, "
                        f"or choose another --out")
    start = ckpt.step if ckpt is not None else 0
    if start >= tc.steps and stop_after is None:
        raise HDLMError(f"checkpoint {ckpt.path} is at step {start} >= train.steps = {tc.steps}: "
                        f"nothing to do (raise train.steps to continue)")

    state = ckpt.train_state if ckpt is not None else {}

    # model (identical init on every rank) and its weights, then wrappers, then EMA of the wrapped params
    seed_everything(tc.seed)
    model = build_model(cfg.model)
    init = ckpt if ckpt is not None else (_load_init(tc.init_from, tokenizer) if tc.init_from else None)
    if init is not None:
        load_weights(model, init.model_state, init.path)
    model.to(device)
    net = _wrap(model, cfg, dist, device)
    ema = EMA(model, tc.ema) if tc.ema > 0 else None
    if ema is not None and init is not None:  # Stage 2 starts its EMA from the Stage-1 EMA
        ema.load(init.ema_state if init.ema_state is not None else init.model_state)

    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, tc))
    objective = build_objective(cfg, tokenizer.vocab_size)

    train_data = load_split(cfg.data, cfg.data.train_split, tokenizer, d)
    batches = BatchIterator(train_data, per_rank, tc.seed, rank=dist.rank, world_size=dist.world)
    if ckpt is not None:
        load_optimizer_state(model, opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("world_size") == dist.world:
            batches.load_state_dict(state["data"][dist.rank])
            set_rng_state(state["rng"][dist.rank])
        else:  # data positions count global-batch entries, so they hold for any number of processes
            batches.load_state_dict(state["data"][0])
            seed_everything(mix_seed(tc.seed, _TORCH, start, dist.rank))
            if dist.main:
                print(f"hdlm train: resuming a {state.get('world_size')}-process checkpoint on {dist.world} "
                      f"processes: same data order, but dropout draws differ from an uninterrupted run", flush=True)
    else:
        seed_everything(mix_seed(tc.seed, _TORCH, dist.rank))  # dropout differs across ranks
    valid_batches: list[Tensor] | None = None

    metrics = Metrics(out_dir, state.get("metrics", []), write=dist.main)
    elapsed0 = float(state.get("elapsed", 0.0))
    if dist.main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"hdlm train: {n_params / 1e6:.1f}M parameters, N = {tokenizer.vocab_size}, d = {d}, "
              f"{tc.batch_size} sequences/step on {dist.world} x {device} "
              f"({'resuming at step ' + str(start) if ckpt else 'from ' + (tc.init_from or 'scratch')}) "
              f"-> {out_dir}", flush=True)

    from tqdm.auto import tqdm

    bar = tqdm(total=tc.steps, initial=start, unit="step", disable=None if dist.main else True, dynamic_ncols=True)
    show_lines = dist.main and bar.disable
    t0 = time.perf_counter()
    t_window, window = time.perf_counter(), {}
    step, last_train, last_valid, ckpt_path = start, {}, {}, None
    net.train()

    def save() -> Path | None:
        weights = full_weights(net)
        ema_weights = None
        if ema is not None:
            with ema.swapped():
                ema_weights = full_weights(net)
        train_state = {
            "optimizer": full_optimizer_state(net, opt), "scheduler": sched.state_dict(),
            "ema": {"decay": ema.decay} if ema is not None else None,
            "rng": dist.gather(rng_state()), "data": dist.gather(batches.state_dict()),
            "metrics": metrics.rows, "elapsed": elapsed0 + time.perf_counter() - t0, "world_size": dist.world,
        }
        path = None
        if dist.main:
            path = save_checkpoint(out_dir, step, weights, cfg, tokenizer.identity(), train_state,
                                   ema=ema_weights, keep=KEEP_CHECKPOINTS)
        dist.barrier()
        return path

    while step < tc.steps:
        # ---- one optimizer step: this rank's shard of the global batch, in micro-batches
        y = next(batches).to(device)
        seeds = sample_seeds(tc.seed, step, _global_indices(dist.rank, per_rank)).to(device)
        bseed = batch_seed(tc.seed, step)
        for m in range(tc.grad_accum):
            part = slice(m * micro, (m + 1) * micro)
            with _no_sync(net, cfg, last=m == tc.grad_accum - 1):
                with autocast(device, tc.dtype):
                    loss, stats = objective(net, y[part], seeds[part], bseed)
                (loss / tc.grad_accum).backward()
            for k, v in dict(stats, loss=loss.item()).items():
                window[k] = window.get(k, 0.0) + float(v) / tc.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        step += 1
        window["grad_norm"] = window.get("grad_norm", 0.0) + float(grad_norm)
        window["_steps"] = window.get("_steps", 0) + 1
        bar.update(1)

        # ---- log, evaluate, checkpoint
        final = step == tc.steps
        if step % tc.log_every == 0 or final:
            n = window.pop("_steps")
            keys = sorted(window)
            means = dict(zip(keys, dist.mean([window[k] / n for k in keys], device)))
            now = time.perf_counter()
            row = {"step": step, "split": "train", **means, "lr": lr,
                   "tokens_per_s": n * tc.batch_size * d / max(now - t_window, 1e-9),
                   "elapsed": elapsed0 + now - t0}
            metrics.log(row)
            last_train, window, t_window = row, {}, now
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if show_lines:
                print("hdlm train: " + _log_line(row), flush=True)
        if step % tc.eval_every == 0 or final:
            if valid_batches is None:
                valid_data = load_split(cfg.data, cfg.data.valid_split, tokenizer, d)
                it = BatchIterator(valid_data, micro, tc.seed, rank=dist.rank, world_size=dist.world)
                valid_batches = [next(it).to(device) for _ in range(tc.eval_batches)]
            stats = evaluate(net, objective, valid_batches, cfg, dist, device, ema)
            row = {"step": step, "split": "valid", **stats, "elapsed": elapsed0 + time.perf_counter() - t0}
            metrics.log(row)
            last_valid = row
            if dist.main:
                (print if bar.disable else bar.write)("hdlm train: " + _log_line(row))
        if step % tc.save_every == 0 or final:
            ckpt_path = save()
        if stop_after is not None and step - start >= stop_after and not final:
            bar.close()
            metrics.close()
            return {"step": step, "stopped": True, "train": last_train, "valid": last_valid,
                    "out_dir": str(out_dir), "checkpoint": str(ckpt_path) if ckpt_path else None}
    bar.close()
    metrics.close()
    if dist.main and metrics.rows:
        from .plots.curves import plot_curves

        plot_curves(metrics.path, out_dir / "curves.png")
        print(f"hdlm train: done at step {step}; valid loss {last_valid.get('loss', float('nan')):.4f}; "
              f"checkpoint {ckpt_path}; curves {out_dir / 'curves.png'}", flush=True)
    return {"step": step, "stopped": False, "loss": last_train.get("loss"), "valid_loss": last_valid.get("loss"),
            "tokens_per_s": last_train.get("tokens_per_s"), "train": last_train, "valid": last_valid,
            "out_dir": str(out_dir), "checkpoint": str(ckpt_path) if ckpt_path else None}


def main(argv: list[str] | None = None) -> int:
    """``python -m hdlm.train`` / ``torchrun -m hdlm.train``: the arguments of ``hdlm train``."""
    import argparse

    from .commands import train as command

    parser = argparse.ArgumentParser(prog="python -m hdlm.train", description=__doc__.strip().splitlines()[0])
    command.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(command.run(args) or 0)
    except HDLMError as e:
        print(f"hdlm train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
