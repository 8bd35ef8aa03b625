"""Resuming a run (``hdlm train --resume``): which checkpoint and run folder to continue, which config
fields may change on resume (the rest are refused with one line), and the exact restore of the
optimizer, LR schedule, data position and RNG, with the run's possibly overridden optimizer settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, list_checkpoints, load_checkpoint
from .config import Config
from .errors import HDLMError
from .optim import load_optimizer_state, lr_factor
from .runtime import Stream, mix_seed, seed_everything, set_rng_state

# what a resumed run may change (how long, how fast, how often it logs/evaluates/saves, where it runs);
# every other field defines the run and is refused on --resume
RESUMABLE = tuple(f"train.{k}" for k in (
    "steps", "lr", "lr_schedule", "warmup", "min_lr_ratio", "weight_decay", "betas", "grad_clip", "grad_accum",
    "log_every", "eval_every", "eval_batches", "save_every", "device", "dtype", "compile", "fsdp", "logger",
    "logger_project", "max_nonfinite_skips", "out_dir")) + ("sample.",)


def resume_point(cfg: Config, resume: str | None, tokenizer) -> tuple[Checkpoint | None, Config, Path]:
    """The checkpoint to continue (and its run folder), or None for a fresh run; refuses to mix runs."""
    out_dir = Path(cfg.train.out_dir)
    if not resume:
        if out_dir.exists() and not out_dir.is_dir():
            raise HDLMError(f"run folder {out_dir} is an existing file: choose another --out (train.out_dir)")
        if list_checkpoints(out_dir):
            raise HDLMError(f"run folder {out_dir} already holds checkpoints: continue it with --resume {out_dir}, "
                            f"or choose another --out")
        return None, cfg, out_dir
    ckpt = load_checkpoint(resume)
    tokenizer.check_matches(ckpt.tokenizer)
    _check_resumable(ckpt.config, cfg, ckpt.path)
    if ckpt.step >= cfg.train.steps:
        raise HDLMError(f"checkpoint {ckpt.path} is at step {ckpt.step} >= train.steps = {cfg.train.steps}: "
                        f"nothing to do (raise train.steps to continue)")
    out_dir = ckpt.path.parent  # continue in the run folder that holds the checkpoint
    return ckpt, cfg.replace({"train.out_dir": str(out_dir)}), out_dir


def _dotted(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def resume_changes(saved: Config, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (checkpoint's value, new value)} of the fields ``cfg`` changes."""
    a, b = _dotted(saved.to_dict()), _dotted(cfg.to_dict())
    return {k: (a.get(k), b[k]) for k in b if a.get(k) != b[k]}


def _check_resumable(saved: Config, cfg: Config, path: Path) -> None:
    """Refuse, in one line, a change on --resume of a field that defines the run (not in RESUMABLE)."""
    fixed = {k: v for k, v in resume_changes(saved, cfg).items() if not k.startswith(RESUMABLE)}
    if fixed:
        k, (old, new) = next(iter(fixed.items()))
        more = f" (and {', '.join(list(fixed)[1:])})" if len(fixed) > 1 else ""
        raise HDLMError(f"config {k} = {new!r}{more}: cannot change on --resume (checkpoint {path} has {old!r}); "
                        f"only {', '.join(r.rstrip('.') for r in RESUMABLE)} can, or start a new run with --init-from")


def restore(state: Any, saved: dict) -> None:
    """Continue exactly where a checkpoint left off: optimizer, LR schedule, data position, RNG."""
    tc, dist = state.cfg.train, state.dist
    load_optimizer_state(state.model, state.opt, saved["optimizer"])
    state.sched.load_state_dict(saved["scheduler"])
    apply_optimizer_settings(state)
    if saved.get("world_size") == dist.world:
        state.batches.load_state_dict(saved["data"][dist.rank])
        set_rng_state(saved["rng"][dist.rank])
        return
    # data positions count global-batch entries, so they hold for any number of processes
    state.batches.load_state_dict(saved["data"][0])
    seed_everything(mix_seed(tc.seed, Stream.TORCH, state.step, dist.rank))
    if dist.main:
        print(f"hdlm train: resuming a {saved.get('world_size')}-process checkpoint on {dist.world} processes: "
              f"same data order, but dropout draws differ from an uninterrupted run", flush=True)


def apply_optimizer_settings(state: Any) -> None:
    """The run's (possibly overridden) lr, LR schedule, betas and weight decay over the restored optimizer
    and scheduler, which hold the checkpoint's; with no override this rewrites the same values."""
    tc, sched = state.cfg.train, state.sched
    sched.base_lrs = [tc.lr for _ in state.opt.param_groups]
    for g in state.opt.param_groups:
        g.update(initial_lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                 lr=tc.lr * lr_factor(sched.last_epoch, tc))
