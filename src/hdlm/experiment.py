"""One experiment end to end: train, sample (KV cache), evaluate; shared by ``hdlm run`` and ``hdlm repro``.

Every number it returns carries what produced it (config, tokenizer, training tokens, seeds,
estimator, judge) so that a report can say how to reproduce it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .config import Config
from .progress import Progress


@dataclass
class SampleSetting:
    """One way to sample: a sampler at a rate ρ (the checkpoint's hyperschedule kind and ω)."""

    sampler: str = "auto"
    rho: float = 1.0
    eta: float | None = None

    @property
    def label(self) -> str:
        eta = f", η={self.eta:g}" if self.eta is not None else ""
        return f"{self.sampler}{eta}, ρ={self.rho:g}"


@dataclass
class ExperimentPlan:
    """What to measure after training."""

    num_samples: int = 8
    sample_seed: int = 0
    settings: Sequence[SampleSetting] = (SampleSetting(),)
    estimators: Sequence[str] = ("discrete", "continuous")
    mc_samples: int = 4
    eval_data: str = "ptb:test"
    eval_sequences: int | None = None  # None: the whole split
    judge: str | None = "smollm2"
    cache_dir: str = ".hdlm_cache"
    trace: bool = True
    pictures: bool = True
    progress: bool = True  # bars on a terminal, progress lines in logs (hdlm.progress)
    extra: dict = field(default_factory=dict)


def _log_default(msg: str) -> None:
    print(f"hdlm: {msg}", flush=True)


def _train_or_reuse(cfg: Config, run_dir: Path, skip_training: bool, resume: bool, log, progress: bool = True) -> dict:
    """Train into ``run_dir``; ``skip_training``: reuse any checkpoint there; ``resume``: reuse a finished
    run, continue an interrupted one exactly (:func:`hdlm.train.train` with ``resume``), else train."""
    from .checkpoint import list_checkpoints
    from .train import train

    found = list_checkpoints(run_dir)
    if skip_training and (run_dir / "latest").exists():
        log(f"reusing the trained model in {run_dir}")
        return {"checkpoint": str(run_dir)}
    if resume and found:
        step = int(found[-1].name.split("-")[-1])
        if step >= cfg.train.steps:
            log(f"reusing the finished training in {run_dir} (step {step})")
            return {"checkpoint": str(found[-1]), "step": step}
        log(f"continuing the training in {run_dir} from step {step}")
        return train(cfg, resume=str(run_dir), progress=progress)
    log(f"training -> {run_dir}")
    return train(cfg, progress=progress)


def run_experiment(cfg: Config, out: Path, plan: ExperimentPlan, *, log: Callable[[str], None] = _log_default,
                   judge=None, skip_training: bool = False, resume: bool = False) -> dict:
    """Train ``cfg`` into ``out/run``, then sample and evaluate as ``plan`` says; returns a JSON-able dict.

    ``skip_training``: reuse whatever checkpoint ``out/run`` holds; ``resume``: reuse it when training
    finished, continue it exactly when it was cut short (``hdlm repro`` sweeps)."""
    from .sampling import HDLMPipeline

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    cfg = cfg.replace({"train.out_dir": str(run_dir)})
    result: dict = {"config": cfg.to_dict()}
    t0 = time.perf_counter()
    stats = _train_or_reuse(cfg, run_dir, skip_training, resume, log, plan.progress)
    result["train"] = {k: v for k, v in stats.items() if k in ("step", "loss", "valid_loss", "tokens_per_s", "checkpoint")}
    result["train"]["seconds"] = time.perf_counter() - t0
    result["train"]["tokens"] = cfg.train.steps * cfg.train.batch_size * cfg.model.length

    pipe = HDLMPipeline.from_pretrained(run_dir)
    result["tokenizer"] = pipe.tokenizer.identity()
    if plan.pictures:
        _schedule_pictures(pipe, run_dir, out)
    result.update(_bounds(pipe, plan, log))
    if plan.judge and judge is None:
        from .evaluation.judge import load_judge

        judge = load_judge(plan.judge, cache_dir=plan.cache_dir)
    result["samples"] = [_samples(pipe, plan, st, k, judge, out, log) for k, st in enumerate(plan.settings)]
    result["seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _schedule_pictures(pipe, run_dir: Path, out: Path) -> None:
    """The hyperschedule (Fig. 2 style) and a copy of the training curves."""
    from .plots.schedule import plot_hyperschedule

    hs = pipe.hyperschedule()
    plot_hyperschedule(hs, out / "hyperschedule.png",
                       title=f"{hs.kind} ω={hs.width} ρ={float(hs.rho):g}: T={hs.T} steps, {hs.levels} levels")
    if (run_dir / "curves.png").exists():
        (out / "curves.png").write_bytes((run_dir / "curves.png").read_bytes())


def _bounds(pipe, plan: ExperimentPlan, log: Callable[[str], None]) -> dict:
    """Perplexity bounds on held-out data, one per estimator of the plan."""
    from .data import load_split
    from .evaluation.likelihood import perplexity_bound, resolve_data_spec

    mcfg = pipe.config
    data_cfg, split, label = resolve_data_spec(plan.eval_data, mcfg.data)
    dataset = load_split(data_cfg, split, pipe.tokenizer, mcfg.model.length)
    data = dataset.head(plan.eval_sequences)
    n = data.shape[0]
    bounds = {}
    for est in plan.estimators:
        t1 = time.perf_counter()
        log(f"perplexity bound ({est}) on {label}: {n} sequences x {plan.mc_samples} draws")
        r = perplexity_bound(pipe.model, mcfg, data, estimator=est, mc_samples=plan.mc_samples, batch_size=16,
                             seed=0, progress=plan.progress)
        bounds[r.estimator] = dict(r.to_dict(), seconds=time.perf_counter() - t1)
    return {"eval_data": {"spec": label, "sequences": n, "tokens": n * mcfg.model.length}, "bounds": bounds}


def _samples(pipe, plan: ExperimentPlan, st: SampleSetting, k: int, judge, out: Path,
             log: Callable[[str], None]) -> dict:
    """One set of samples (KV cache) with its entropy, generative perplexity and (first set) trace."""
    from .evaluation.quality import generative_perplexity, token_entropy

    log(f"sampling {plan.num_samples} x {pipe.length} tokens ({st.label}, KV cache)")
    with Progress(plan.num_samples, "sample", "seq", enabled=plan.progress) as bar:  # a line per batch in logs
        gen = pipe.generate_ids(plan.num_samples, sampler=st.sampler, rho=st.rho, eta=st.eta, seed=plan.sample_seed,
                                kv_cache=True, trace=plan.trace and k == 0, progress=plan.progress,
                                on_batch=bar.update)
    texts = pipe.decode(gen.tokens)
    entry = {"setting": st.label, "sampler": gen.sampler, "rho": st.rho, "eta": st.eta,
             "steps": gen.steps, "model_calls": gen.n_model_calls, "wall_time": gen.wall_time,
             "tokens_per_s": gen.tokens_per_s, "texts": texts, "token_ids": gen.tokens.tolist(),
             "entropy": token_entropy(gen.tokens.tolist())["mean"]}
    if judge is not None:
        gp = generative_perplexity(texts, judge, progress=plan.progress)
        entry["gen_ppl"] = {key: gp[key] for key in ("ppl_token_weighted", "ppl_mean_per_sample", "n_tokens",
                                                     "n_samples", "judge") if key in gp}
    if plan.pictures and k == 0 and gen.trace:
        from .plots.trace import plot_trace

        tok, hs = pipe.tokenizer, gen.hyperschedule
        plot_trace(gen, out / "trace.png", mask_id=tok.vocab_size,
                   decode=lambda i: tok.decode([i]) if i < tok.vocab_size else "·",
                   title=f"denoising trace ({gen.sampler}, {hs.kind} ω={hs.width})")
    return entry
