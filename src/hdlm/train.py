"""Training (paper App. B.1): one loop for Stage 1 (Flat) and Stage 2 (Block/Slide fine-tuning).

Read it like nanoGPT: :func:`setup` builds a :class:`TrainState` (model, optimizer, data, metrics,
resumed exactly from a checkpoint when asked), :func:`train_step` is one optimizer step (this
rank's shard of the global batch in ``grad_accum`` micro-batches, the objective of Eq. (10) with
per-sample seeds, clip, AdamW, LR schedule, EMA), and :func:`train` is the loop on one screen:
step, log, evaluate on fixed validation batches, checkpoint (crash-safe, with the full training
state), stop.

Determinism: every random choice of a sample (its noise levels, its masking) comes from its own
seed ``sample_seeds(seed, step, g)`` where ``g`` is the sample's index in the global batch, and the
choices shared by a batch (e.g. which intervals) from ``batch_seed(seed, step)``. A sample thus gets
the same noise whichever rank or micro-batch it lands on, which is what makes K processes equal to
one and a resumed run equal to an uninterrupted one.

Run it as ``hdlm train ...`` or, on several processes, ``torchrun --nproc_per_node=K -m hdlm train ...``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import Checkpoint, load_weights, save_checkpoint
from .config import Config, TrainConfig
from .data import BatchIterator, check_splits, load_split
from .errors import HDLMError
from .faults import crash_point
from .resume import restore, resume_changes, resume_point
from .backbone import build_model
from .hub import init_checkpoint
from .objective import Objective, build_objective
from .optim import EMA, full_optimizer_state, full_weights, make_optimizer, no_sync, wrap_model
from .progress import Progress
from .runtime import (Dist, Stream, autocast, mix_seed, resolve_device, rng_state, seed_everything,
                      setup_distributed, small_seed)
from .tokenizers import load_tokenizer

KEEP_CHECKPOINTS = 2
METRICS_FILE = "metrics.jsonl"


# --------------------------------------------------------------------------------------------
# seeds and shapes


def sample_seeds(seed: int, step: int, indices: Tensor | list[int], purpose: int = Stream.TRAIN_SAMPLE) -> Tensor:
    """Per-sample seeds (B,) int64 in [0, 2^32) for global batch indices ``indices`` at ``step``."""
    return torch.tensor([small_seed(seed, purpose, step, g) for g in list(map(int, indices))], dtype=torch.int64)


def batch_seed(seed: int, step: int, purpose: int = Stream.TRAIN_BATCH) -> int:
    """The seed in [0, 2^32) of the randomness shared by the batch of ``step`` (same on every rank)."""
    return small_seed(seed, purpose, step)


def _global_indices(rank: int, per_rank: int) -> list[int]:
    """Global batch indices of this rank's samples: ranks hold consecutive slices of the batch,
    as :class:`hdlm.data.BatchIterator` shards it."""
    return list(range(rank * per_rank, (rank + 1) * per_rank))


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
# metrics


class Metrics:
    """``metrics.jsonl`` rows (kept in memory too, so a checkpoint can restore the file exactly),
    each also sent to the ``train.logger`` tracker (:mod:`hdlm.tracking`). Only rank 0 writes."""

    def __init__(self, out_dir: Path, rows: list[dict], write: bool, cfg: Config | None = None) -> None:
        from .tracking import make_tracker

        self.path = out_dir / METRICS_FILE
        self.rows = list(rows)
        self.write = write
        self.tracker = None
        if write:
            out_dir.mkdir(parents=True, exist_ok=True)
            # rewrite from the checkpoint's rows: a resumed run has no rows past its step
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
            tc = cfg.train if cfg is not None else TrainConfig()
            self.tracker = make_tracker(tc.logger, out_dir, project=tc.logger_project,
                                        config=cfg.to_dict() if cfg is not None else None,
                                        resume_step=rows[-1]["step"] if rows else None)

    def log(self, row: dict) -> None:
        """Append one row to metrics.jsonl and send the same row to the tracker (the one place rows go)."""
        self.rows.append(row)
        if not self.write:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.tracker.log(row)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


def _log_line(row: dict) -> str:
    parts = [f"{row.get('split', 'train')} step {row['step']}", f"loss {row['loss']:.4f}"]
    if "tokens_per_s" in row:
        parts.append(f"{row['tokens_per_s']:.0f} tok/s")
    if "lr" in row:
        parts.append(f"lr {row['lr']:.2e}")
    return " | ".join(parts)


# --------------------------------------------------------------------------------------------
# the state of a run


@dataclass
class TrainState:
    """Everything a training run holds; :func:`setup` builds it, :func:`train_step` advances it."""

    cfg: Config
    dist: Dist
    device: torch.device
    tokenizer: Any
    model: nn.Module  # the bare backbone (HDLMTransformer or HFBackbone)
    net: nn.Module  # what runs the step: compiled and/or wrapped in DDP / FSDP
    ema: EMA | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    objective: Objective
    batches: BatchIterator
    valid_batches: list[Tensor]
    metrics: Metrics
    out_dir: Path
    step: int  # optimizer steps done
    start: int  # the step this call started from
    elapsed0: float = 0.0  # seconds spent before this call (resumed runs)
    t0: float = field(default_factory=time.perf_counter)
    window: dict = field(default_factory=dict)  # sums of step metrics since the last train row
    t_window: float = field(default_factory=time.perf_counter)
    last_train: dict = field(default_factory=dict)
    last_valid: dict = field(default_factory=dict)
    checkpoint: Path | None = None
    nonfinite_skips: int = 0  # steps skipped for a non-finite loss or gradient norm (train.max_nonfinite_skips)

    @property
    def micro(self) -> int:
        return micro_batch_size(self.cfg.train, self.dist.world)

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t0


def _build_model(cfg: Config, ckpt: Checkpoint | None, tokenizer, dist: Dist,
                 device: torch.device) -> tuple[nn.Module, nn.Module, EMA | None]:
    """The model (identical init on every rank), its weights (resumed, or Stage 2's init_from), the
    wrapped network, and the EMA of the wrapped parameters."""
    tc = cfg.train
    seed_everything(tc.seed)
    model = build_model(cfg.model)
    init = ckpt
    if init is None and tc.init_from:  # Stage 2 (App. B.1): the Stage-1 weights, a fresh optimizer; any
        init = init_checkpoint(tc.init_from)  # hdlm checkpoint, folder or Hub id (official models too)
        tokenizer.check_matches(init.tokenizer)
    if init is not None:
        load_weights(model, init.model_state, init.path)
    model.to(device)
    net = wrap_model(model, cfg, dist, device)
    ema = EMA(model, tc.ema) if tc.ema > 0 else None
    if ema is not None and init is not None:  # Stage 2 starts its EMA from the Stage-1 EMA
        ema.load(init.ema_state if init.ema_state is not None else init.model_state)
    return model, net, ema


def setup(cfg: Config, resume: str | None = None, dist: Dist | None = None) -> TrainState:
    """Everything a run needs, validated before the first step; resumed exactly from ``resume``."""
    dist = dist or Dist()
    tc = cfg.train
    check_splits(cfg.data, (cfg.data.train_split, cfg.data.valid_split))
    device = resolve_device(tc.device, dist.local_rank, name="config train.device")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32
    micro = micro_batch_size(tc, dist.world)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg = resolve_vocab(cfg, tokenizer.vocab_size)
    ckpt, cfg, out_dir = resume_point(cfg, resume, tokenizer)
    model, net, ema = _build_model(cfg, ckpt, tokenizer, dist, device)
    opt, sched = make_optimizer(model, tc)
    d = cfg.model.length
    train_data = load_split(cfg.data, cfg.data.train_split, tokenizer, d)
    valid = BatchIterator(load_split(cfg.data, cfg.data.valid_split, tokenizer, d), micro, tc.seed,
                          rank=dist.rank, world_size=dist.world)
    saved = ckpt.train_state if ckpt is not None else {}
    state = TrainState(cfg=cfg, dist=dist, device=device, tokenizer=tokenizer, model=model, net=net, ema=ema, opt=opt,
                       sched=sched, objective=build_objective(cfg, tokenizer.vocab_size),
                       batches=BatchIterator(train_data, micro * tc.grad_accum, tc.seed, rank=dist.rank,
                                             world_size=dist.world),
                       valid_batches=[next(valid).to(device) for _ in range(tc.eval_batches)],
                       metrics=Metrics(out_dir, saved.get("metrics", []), write=dist.main, cfg=cfg), out_dir=out_dir,
                       step=ckpt.step if ckpt else 0, start=ckpt.step if ckpt else 0,
                       elapsed0=float(saved.get("elapsed", 0.0)), checkpoint=ckpt.path if ckpt else None,
                       window=dict(saved.get("window", {})), nonfinite_skips=int(saved.get("nonfinite_skips", 0)))
    if ckpt is not None:
        restore(state, saved)
        changed = {k: v for k, v in resume_changes(ckpt.config, cfg).items() if k != "train.out_dir"}
        if changed and dist.main:
            print("hdlm train: resuming with " + ", ".join(f"{k} = {new!r} (was {old!r})"
                                                        for k, (old, new) in changed.items()), flush=True)
    else:
        seed_everything(mix_seed(tc.seed, Stream.TORCH, dist.rank))  # dropout differs across ranks
    return state


# --------------------------------------------------------------------------------------------
# one step, evaluation, checkpoint


def train_step(state: TrainState, y: Tensor) -> dict:
    """One optimizer step on this rank's shard ``y`` of the global batch; returns its metrics
    (the objective's stats averaged over micro-batches, ``grad_norm``, and the ``lr`` it used)."""
    tc, micro = state.cfg.train, state.micro
    seeds = sample_seeds(tc.seed, state.step, _global_indices(state.dist.rank, len(y))).to(state.device)
    bseed = batch_seed(tc.seed, state.step)
    out: dict[str, float] = {}
    for m in range(tc.grad_accum):
        part = slice(m * micro, (m + 1) * micro)
        with no_sync(state.net, state.cfg, last=m == tc.grad_accum - 1):
            with autocast(state.device, tc.dtype):
                loss, stats = state.objective(state.net, y[part], seeds[part], bseed)
            (loss / tc.grad_accum).backward()
        for k, v in dict(stats, loss=loss.item()).items():
            out[k] = out.get(k, 0.0) + float(v) / tc.grad_accum
    grad_norm = float(torch.nn.utils.clip_grad_norm_(state.model.parameters(),
                                                     tc.grad_clip if tc.grad_clip > 0 else math.inf))
    out["lr"] = state.opt.param_groups[0]["lr"]
    if _nonfinite(state, out["loss"], grad_norm):
        _skip_step(state, out["loss"], grad_norm)
        return {}
    state.opt.step()
    state.sched.step()
    state.opt.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update()
    state.step += 1
    out["grad_norm"] = grad_norm
    return out


def _nonfinite(state: TrainState, loss: float, grad_norm: float) -> bool:
    """Whether this step's loss or gradient norm is nan/inf on any rank (a collective when distributed)."""
    bad = float(not (math.isfinite(loss) and math.isfinite(grad_norm)))
    return state.dist.mean([bad], state.device)[0] > 0


def _skip_step(state: TrainState, loss: float, grad_norm: float) -> None:
    """Drop a non-finite step (no update; data, LR schedule and step count move on), or stop the run
    with one line once more than ``train.max_nonfinite_skips`` steps were dropped."""
    state.opt.zero_grad(set_to_none=True)
    state.nonfinite_skips += 1
    limit = state.cfg.train.max_nonfinite_skips
    what = f"step {state.step + 1}: non-finite loss {loss} (gradient norm {grad_norm})"
    if state.nonfinite_skips > limit:
        kept = f"the last finite checkpoint is {state.checkpoint}" if state.checkpoint else "no checkpoint was written"
        raise HDLMError(f"{what}; stopped after {state.nonfinite_skips - 1} skipped step(s) "
                        f"(train.max_nonfinite_skips = {limit}); {kept}; lower train.lr or raise the skip limit")
    if state.dist.main:
        print(f"hdlm train: {what}: skipped ({state.nonfinite_skips} of at most {limit})", flush=True)
    with warnings.catch_warnings():  # no optimizer step on purpose
        warnings.simplefilter("ignore", UserWarning)
        state.sched.step()
    state.step += 1


@torch.no_grad()
def evaluate(state: TrainState) -> dict:
    """Mean validation stats over the fixed batches with fixed seeds (EMA weights when EMA is on)."""
    tc, net = state.cfg.train, state.net
    was_training = net.training
    net.eval()
    totals: dict[str, float] = {}
    with state.ema.swapped() if state.ema is not None else contextlib.nullcontext():
        for i, y in enumerate(state.valid_batches):
            seeds = sample_seeds(tc.seed, i, _global_indices(state.dist.rank, len(y)), Stream.EVAL_SAMPLE)
            with autocast(state.device, tc.dtype):
                loss, stats = state.objective(net, y, seeds.to(state.device), batch_seed(tc.seed, i, Stream.EVAL_BATCH))
            for k, v in dict(stats, loss=loss.item()).items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(state.valid_batches)
    net.train(was_training)
    keys = sorted(totals)
    return dict(zip(keys, state.dist.mean([totals[k] for k in keys], state.device)))


def save(state: TrainState) -> Path | None:
    """A crash-safe checkpoint with the full training state (a collective: call it on every rank)."""
    net, ema, dist = state.net, state.ema, state.dist
    weights = full_weights(net)
    _check_finite(weights, state)
    ema_weights = None
    if ema is not None:
        with ema.swapped():
            ema_weights = full_weights(net)
    train_state = {
        "optimizer": full_optimizer_state(net, state.opt), "scheduler": state.sched.state_dict(),
        "ema": {"decay": ema.decay} if ema is not None else None,
        "rng": dist.gather(rng_state()), "data": dist.gather(state.batches.state_dict()),
        "metrics": state.metrics.rows, "elapsed": state.elapsed(), "world_size": dist.world,
        "window": state.window, "nonfinite_skips": state.nonfinite_skips,  # a resumed run logs the same rows
    }
    path = None
    if dist.main:
        path = save_checkpoint(state.out_dir, state.step, weights, state.cfg, state.tokenizer, train_state,
                               ema=ema_weights, keep=KEEP_CHECKPOINTS)  # the whole tokenizer: the folder samples alone
    dist.barrier()
    return path


def _check_finite(weights: dict[str, Tensor], state: TrainState) -> None:
    """Refuse to write a checkpoint whose weights hold nan/inf (the last finite one stays the latest)."""
    bad = next((k for k, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        kept = f"the last finite checkpoint is {state.checkpoint}" if state.checkpoint else "no checkpoint was written"
        raise HDLMError(f"step {state.step}: weight {bad} is not finite, checkpoint not written; {kept}; "
                        f"lower train.lr")


def _train_row(state: TrainState) -> dict:
    """The metrics row of the steps since the last one (means over steps and ranks), then a new window."""
    window, now = state.window, time.perf_counter()
    n, lr = window.pop("_steps"), window.pop("lr")
    keys = sorted(window)
    means = dict(zip(keys, state.dist.mean([window[k] / n for k in keys], state.device)))
    tokens = n * state.cfg.train.batch_size * state.cfg.model.length
    row = {"step": state.step, "split": "train", **means, "lr": lr,
           "tokens_per_s": tokens / max(now - state.t_window, 1e-9), "elapsed": state.elapsed()}
    state.window, state.t_window, state.last_train = {}, now, row
    return row


def _accumulate(window: dict, metrics: dict) -> None:
    for k, v in metrics.items():
        window[k] = v if k == "lr" else window.get(k, 0.0) + v
    window["_steps"] = window.get("_steps", 0) + 1


# --------------------------------------------------------------------------------------------
# the loop


def train(cfg: Config, resume: str | None = None, stop_after: int | None = None, progress: bool = True) -> dict:
    """Train ``cfg`` (App. B.1) and return the final stats.

    ``resume``: a run folder or checkpoint folder; training continues in that run folder exactly
    where the checkpoint left it (model, optimizer, LR schedule, EMA, RNG, data position, metrics).
    ``cfg.train.init_from``: Stage 2, start from another checkpoint's weights (fresh optimizer).
    ``stop_after``: stop (as if killed) after this many optimizer steps of this call; for tests.
    ``progress``: a bar on a terminal, progress lines with total and ETA on stderr elsewhere
    (:mod:`hdlm.progress`); False: neither.
    """
    dist = setup_distributed(cfg.train.device)
    try:
        state = setup(cfg, resume, dist)
        _announce(state, resume)
        return _loop(state, stop_after, progress)
    finally:
        if dist.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _loop(state: TrainState, stop_after: int | None, progress: bool = True) -> dict:
    """Step, log, evaluate, checkpoint, stop: the whole run on one screen."""
    tc = state.cfg.train
    bar = Progress(tc.steps, "train", "step", initial=state.step, enabled=progress and state.dist.main)
    try:
        return _steps(state, stop_after, bar)
    finally:
        bar.close()
        state.metrics.close()


def _steps(state: TrainState, stop_after: int | None, bar: Progress) -> dict:
    tc, show = state.cfg.train, state.dist.main
    state.net.train()
    while state.step < tc.steps:
        metrics = train_step(state, next(state.batches).to(state.device))
        if metrics:  # {} for a skipped non-finite step
            _accumulate(state.window, metrics)
        bar.update(1)
        crash_point(f"step-{state.step}")
        final = state.step == tc.steps
        if (state.step % tc.log_every == 0 or final) and state.window:
            row = _train_row(state)
            state.metrics.log(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if show and not bar.is_bar:  # on a terminal the bar shows the loss
                print("hdlm train: " + _log_line(row), flush=True)
        if state.step % tc.eval_every == 0 or final:
            state.last_valid = {"step": state.step, "split": "valid", **evaluate(state), "elapsed": state.elapsed()}
            state.metrics.log(state.last_valid)
            if show:
                bar.write("hdlm train: " + _log_line(state.last_valid))
        if state.step % tc.save_every == 0 or final:
            state.checkpoint = save(state)
        if stop_after is not None and state.step - state.start >= stop_after and not final:
            return _summary(state, stopped=True)
    bar.close()
    _finish(state)
    return _summary(state, stopped=False)


def _announce(state: TrainState, resume: str | None) -> None:
    if not state.dist.main:
        return
    cfg, tc = state.cfg, state.cfg.train
    n_params = sum(p.numel() for p in state.model.parameters())
    origin = f"resuming at step {state.start}" if resume else "from " + (tc.init_from or "scratch")
    print(f"hdlm train: {n_params / 1e6:.1f}M parameters, N = {state.tokenizer.vocab_size}, d = {cfg.model.length}, "
          f"{tc.batch_size} sequences/step on {state.dist.world} x {state.device} ({origin}) -> {state.out_dir}",
          flush=True)


def _finish(state: TrainState) -> None:
    """The training curves, and one closing line."""
    if not (state.dist.main and state.metrics.rows):
        return
    from .plots.curves import plot_curves

    curves = state.out_dir / "curves.png"
    plot_curves(state.metrics.path, curves)
    print(f"hdlm train: done at step {state.step}; valid loss {state.last_valid.get('loss', float('nan')):.4f}; "
          f"checkpoint {state.checkpoint}; curves {curves}", flush=True)


def _summary(state: TrainState, stopped: bool) -> dict:
    out = {"step": state.step, "stopped": stopped, "train": state.last_train, "valid": state.last_valid,
           "out_dir": str(state.out_dir), "checkpoint": str(state.checkpoint) if state.checkpoint else None}
    if not stopped:
        out.update(loss=state.last_train.get("loss"), valid_loss=state.last_valid.get("loss"),
                   tokens_per_s=state.last_train.get("tokens_per_s"))
    return out


if __name__ == "__main__":  # `python -m hdlm.train ...` is `hdlm train ...` (an entry point: the library never imports the CLI)
    from hdlm.cli import main as _cli_main

    sys.exit(_cli_main(["train", *sys.argv[1:]]))
