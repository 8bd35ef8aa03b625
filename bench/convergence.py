"""Convergence against a source whose entropy is known (issue #14, item 4).

A seeded random sparse Markov chain over a few hundred word types (:mod:`hdlm.synthetic`) writes
a corpus (documents of random length, one EOS each) and a word-level tokenizer; every model
family below is trained on it at the same token budgets and evaluated on the same test tokens:

- every perplexity estimate hdlm has (discrete bound, continuous estimate; exact for AR) against
  the exact per-token perplexity of the source on those tokens (with the true context) and
  against the attainable limit after packing (the first token of each d-token block scored under
  the stream's exact marginal at that offset: no model that sees one block can do better);
- the fraction of sampled transitions that the source allows, at ρ = 1/2, 1, 2;
- a picture of estimate ÷ limit (perplexities) against training tokens.

Models: AR (Quench + SHIFTED, exact NLL), MDLM (Flat), SEDD-absorb (Flat), γ-hybrid (γ = 0.01)
Flat and Block, ε-hybrid (ε = 0.01) Block, and Stage 2: γ-hybrid Block + SHIFTED fine-tuned from
the AR model, where the AR pretraining counts towards the budget (``--stage2-fraction`` of it is
fine-tuning). Runs are resumable: finished trainings and evaluations are skipped (evaluations are
redone when hdlm's code or the evaluation settings change).

    python bench/convergence.py --quick                 # smoke run, a few minutes
    python bench/convergence.py --out bench/out/convergence   # the full run

Writes OUT/results.json, OUT/results.md and OUT/bound_vs_limit.png.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hdlm import synthetic
from hdlm.errors import HDLMError

ROOT = Path(__file__).resolve().parent.parent

# name -> overrides over the base config (Stage 2 also gets train.init_from, see run_plan)
MODELS: dict[str, list[str]] = {
    "ar": ["schedule.kind=quench", "model.configuration=shifted"],
    "mdlm": ["process.kind=mdlm", "schedule.kind=flat", "model.time_conditioning=false"],
    "sedd-absorb": ["process.kind=absorb", "schedule.kind=flat"],
    "gamma-flat": ["process.kind=gamma", "process.gamma=0.01", "schedule.kind=flat"],
    "gamma-block": ["process.kind=gamma", "process.gamma=0.01", "schedule.kind=block"],
    "epsilon-block": ["process.kind=epsilon", "process.epsilon=0.01", "schedule.kind=block",
                      "model.time_conditioning=false", "model.weighted_embedding=false"],
    "stage2-block": ["process.kind=gamma", "process.gamma=0.01", "schedule.kind=block",
                     "model.configuration=shifted"],
}
STAGE1 = "ar"  # Stage 2 starts from this model


@dataclass(frozen=True)
class Scale:
    """Everything the run's size depends on."""

    words: int
    length: int
    width: int
    layers: int
    hidden: int
    batch: int
    budgets: tuple[int, ...]
    eval_blocks: int
    mc_samples: int
    num_samples: int


SCALES = {
    # ~30 min on 2 quiet cores (measured there: 1M training tokens take ~48 s for MDLM, ~60 s for a
    # Block model; one run's evaluation a few seconds);
    # 4 budgets of 256 to 2048 steps of 16 x 64 tokens (diffusion models leave the unigram plateau
    # after ~300 steps at this size)
    "full": Scale(words=300, length=64, width=8, layers=2, hidden=128, batch=16,
                  budgets=(262144, 524288, 1048576, 2097152), eval_blocks=256, mc_samples=8, num_samples=32),
    # smoke run: every code path, a few minutes
    "quick": Scale(words=60, length=32, width=8, layers=1, hidden=64, batch=8,
                   budgets=(4096, 8192, 16384), eval_blocks=16, mc_samples=2, num_samples=4),
}


@dataclass(frozen=True)
class Run:
    model: str
    tokens: int  # training tokens of this run, its Stage-1 model's included
    init_from: "Run | None" = None

    @property
    def name(self) -> str:
        return f"{self.model}-{self.tokens}"


# ------------------------------------------------------------------------------------------
# the plan and the configs


def run_plan(models: list[str], budgets: tuple[int, ...], stage2_fraction: float) -> list[Run]:
    """Every run to train, each after the run it starts from (Stage 2 after its AR model)."""
    runs: list[Run] = []
    for tokens in budgets:
        for m in models:
            if m == "stage2-block":
                base = Run(STAGE1, int(round(tokens * (1 - stage2_fraction))))
                if base not in runs:
                    runs.append(base)
                runs.append(Run(m, tokens, init_from=base))
            elif Run(m, tokens) not in runs:
                runs.append(Run(m, tokens))
    return runs


def base_overrides(scale: Scale, corpus: Path, cache: Path) -> list[str]:
    return [f"data.dataset={corpus}/{{split}}.txt", f"data.tokenizer={corpus}", f"data.cache_dir={cache}",
            f"model.length={scale.length}", f"model.n_layers={scale.layers}", f"model.hidden={scale.hidden}",
            "model.n_heads=2", f"model.cond_dim={min(64, scale.hidden)}", "model.dropout=0.0",
            f"schedule.width={scale.width}", f"train.batch_size={scale.batch}", "train.lr=2e-3",
            "train.lr_schedule=cosine", "train.eval_batches=4", "train.seed=0", "train.ema=0.0"]


def run_config(run: Run, scale: Scale, corpus: Path, out: Path):
    from hdlm.config import load_config

    own_tokens = run.tokens - (run.init_from.tokens if run.init_from else 0)
    steps = max(1, round(own_tokens / (scale.batch * scale.length)))
    overrides = base_overrides(scale, corpus, out / "cache") + MODELS[run.model] + [
        f"train.steps={steps}", f"train.warmup={max(1, min(40, steps // 10))}", f"train.eval_every={steps}",
        f"train.save_every={steps}", f"train.log_every={max(1, steps // 10)}",
        f"train.out_dir={out / 'runs' / run.name}"]
    if run.init_from is not None:
        overrides.append(f"train.init_from={out / 'runs' / run.init_from.name}")
    return load_config("tiny-ptb", overrides)


# ------------------------------------------------------------------------------------------
# training and evaluation, each skipped when already done


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def ensure_trained(run: Run, cfg, out: Path) -> dict:
    """Train ``run`` (resuming an interrupted training) unless its marker says it is done."""
    from hdlm.checkpoint import list_checkpoints, load_checkpoint
    from hdlm.train import train

    marker = out / "runs" / f"{run.name}.train.json"
    if marker.exists():
        return json.loads(marker.read_text())
    run_dir = Path(cfg.train.out_dir)
    t0 = time.perf_counter()
    if list_checkpoints(run_dir) and load_checkpoint(run_dir).step >= cfg.train.steps:
        stats = {"step": cfg.train.steps}
    else:
        stats = train(cfg, resume=str(run_dir) if list_checkpoints(run_dir) else None)
    record = {"step": stats.get("step"), "valid_loss": stats.get("valid_loss"),
              "tokens_per_s": stats.get("tokens_per_s"), "seconds": time.perf_counter() - t0,
              "tokens": run.tokens, "own_tokens": cfg.train.steps * cfg.train.batch_size * cfg.model.length}
    _write_json(marker, record)
    return record


def code_fingerprint() -> str:
    """A hash of hdlm's Python sources: a cached evaluation is redone when any of them changes."""
    import hdlm

    h = hashlib.sha256()
    for f in sorted(Path(hdlm.__file__).parent.rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def evaluate(run: Run, source: synthetic.MarkovSource, test: "np.ndarray", args, scale: Scale,
             out: Path) -> dict:
    """Every estimate on the test blocks and the allowed-transition fraction of samples at each ρ."""
    import torch

    from hdlm.evaluation.likelihood import perplexity_bound
    from hdlm.sampling import HDLMPipeline

    settings = {"code": code_fingerprint(), "estimators": args.estimators, "mc_samples": scale.mc_samples,
                "eval_blocks": len(test), "num_samples": scale.num_samples, "rhos": args.rhos, "seed": 0}
    cache = out / "runs" / f"{run.name}.eval.json"
    if cache.exists() and not args.reeval:
        old = json.loads(cache.read_text())
        if old.get("settings") == settings:
            return old
    pipe = HDLMPipeline.from_pretrained(out / "runs" / run.name)
    data = torch.as_tensor(test, dtype=torch.long)
    bounds = {}
    for est in args.estimators:
        t0 = time.perf_counter()
        r = perplexity_bound(pipe.model, pipe.config, data, estimator=est, mc_samples=scale.mc_samples,
                             batch_size=32, seed=0, progress=False)
        bounds[r.estimator] = {"nll_per_token": r.nll_per_token, "stderr": r.stderr, "ppl": r.ppl,
                               "n_infinite": r.n_infinite, "mc_samples": r.mc_samples, "variational": r.variational,
                               "notes": list(r.notes), "seconds": time.perf_counter() - t0}
        if r.estimator == "exact":  # Quench + SHIFTED: every estimator is this one number
            break
    samples = {}
    ar = pipe.config.schedule.kind == "quench"
    for rho in args.rhos:
        if ar and rho != 1.0:
            continue  # an AR model generates one token per step: ρ = 1 only
        t0 = time.perf_counter()
        gen = pipe.generate_ids(scale.num_samples, rho=rho, seed=0, batch_size=scale.num_samples)
        allowed, total = synthetic.allowed_fraction(source, gen.tokens.tolist())
        samples[f"{rho:g}"] = {"sampler": gen.sampler, "steps": gen.steps, "allowed": allowed, "transitions": total,
                               "fraction": allowed / total if total else math.nan,
                               "seconds": time.perf_counter() - t0}
    record = {"settings": settings, "bounds": bounds, "samples": samples}
    _write_json(cache, record)
    return record


# ------------------------------------------------------------------------------------------
# the exact reference on the test tokens


def test_blocks(corpus: Path, cfg, n_blocks: int) -> np.ndarray:
    """The first ``n_blocks`` test blocks as hdlm's pipeline serves them, checked to be the source's tokens."""
    from hdlm.data import load_split
    from hdlm.tokenizers import load_tokenizer

    d = cfg.model.length
    ds = load_split(cfg.data, "test", load_tokenizer(cfg.data.tokenizer), d)
    n = min(n_blocks, len(ds))
    blocks = ds.gather(np.arange(n)).numpy()
    if not np.array_equal(blocks.ravel(), synthetic.load_stream(corpus, "test")[: n * d]):
        raise HDLMError(f"test tokens of {corpus} differ from the source's stream: clear {cfg.data.cache_dir}")
    return blocks


def reference(source: synthetic.MarkovSource, blocks: np.ndarray) -> dict:
    """Exact per-token NLLs on the test blocks: the source with context, the packing limit, and
    two context-free yardsticks (π for every block's first token; the stationary unigram)."""
    n_tok = blocks.size
    exact = synthetic.reference_nll(source, blocks)
    pi = synthetic.stationary(source)
    with np.errstate(divide="ignore"):
        unigram = float(-np.log(pi[blocks]).sum() / n_tok)
    support = (source.transition > 0) & source.emitted[:, None]
    values = {"source": float(exact["source"].sum() / n_tok), "limit": float(exact["limit"].sum() / n_tok),
              "limit_stationary_first": float(synthetic.sequence_nll(source, blocks, pi).sum() / n_tok),
              "unigram": unigram, "entropy_rate": synthetic.entropy_rate(source)}
    return {"n_tokens": int(n_tok), "n_blocks": int(len(blocks)), "d": int(blocks.shape[1]), "N": source.N,
            "nll_per_token": values, "ppl": {k: math.exp(v) for k, v in values.items()},
            "uniform_allowed_fraction": float(support.sum() / source.N ** 2)}


# ------------------------------------------------------------------------------------------
# the report: JSON, markdown, picture


def _fmt_ppl(nll: float) -> str:
    return "inf" if not math.isfinite(nll) else f"{math.exp(nll):.3f}"


def _ratio(nll: float, ref: float) -> str:
    return "inf" if not math.isfinite(nll) else f"{math.exp(nll - ref):.3f}"


def markdown(results: dict) -> str:
    ref = results["reference"]
    nll = ref["nll_per_token"]
    lines = [
        f"Source: random sparse Markov chain, N = {ref['N']} tokens (words + EOS + an unused [UNK]); test: the first "
        f"{ref['n_blocks']} packed blocks of d = {ref['d']} ({ref['n_tokens']} tokens).",
        "",
        "| exact reference on the test tokens | NLL/token | PPL |", "|---|---:|---:|",
        f"| source, with context (the data's exact NLL) | {nll['source']:.4f} | {ref['ppl']['source']:.3f} |",
        f"| attainable limit after packing (block's first token under m_k) | {nll['limit']:.4f} | "
        f"{ref['ppl']['limit']:.3f} |",
        f"| same, first token under π instead of m_k | {nll['limit_stationary_first']:.4f} | "
        f"{ref['ppl']['limit_stationary_first']:.3f} |",
        f"| entropy rate of the chain (population value) | {nll['entropy_rate']:.4f} | "
        f"{ref['ppl']['entropy_rate']:.3f} |",
        f"| stationary unigram (no context at all) | {nll['unigram']:.4f} | {ref['ppl']['unigram']:.3f} |",
        "",
        "| model | training tokens | estimator | NLL/token | stderr | PPL | ÷ source | ÷ limit | infinite draws |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        for est, b in r["bounds"].items():
            v = b["nll_per_token"]
            lines.append(f"| {r['model']} | {r['tokens']:,} | {est} | {v:.4f} | {b['stderr']:.4f} | {_fmt_ppl(v)} | "
                         f"{_ratio(v, nll['source'])} | {_ratio(v, nll['limit'])} | {b['n_infinite']} |")
    rhos = results["settings"]["rhos"]
    lines += ["", f"Fraction of sampled transitions the source allows ({results['settings']['num_samples']} samples "
                  f"of d tokens per cell; uniformly random tokens: {ref['uniform_allowed_fraction']:.4f}; "
                  f"the source's own samples: 1):", "",
              "| model | training tokens | sampler | " + " | ".join(f"ρ = {r:g}" for r in rhos) + " |",
              "|---|---:|---|" + "---:|" * len(rhos)]
    for r in results["runs"]:
        cells = [f"{r['samples'][f'{rho:g}']['fraction']:.4f}" if f"{rho:g}" in r["samples"] else "—" for rho in rhos]
        sampler = next(iter(r["samples"].values()))["sampler"] if r["samples"] else "—"
        lines.append(f"| {r['model']} | {r['tokens']:,} | {sampler} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Estimate ÷ limit (perplexity ratio) against training tokens, one line per model and estimator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limit = results["reference"]["nll_per_token"]["limit"]
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in results["runs"]:
        for est, b in r["bounds"].items():
            lines.setdefault((r["model"], est), []).append((r["tokens"], b["nll_per_token"]))
    fig, ax = plt.subplots(figsize=(10, 5.5))
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(dict.fromkeys(m for m, _ in lines))}
    for (model, est), pts in lines.items():
        finite = [(t, math.exp(v - limit)) for t, v in sorted(pts) if math.isfinite(v)]
        n_inf = len(pts) - len(finite)
        label = f"{model} ({est})" + (f", {n_inf} infinite" if n_inf else "")
        style = {"exact": "-", "discrete": "-", "continuous": "--"}.get(est, ":")
        if finite:
            ax.plot(*zip(*finite), style, marker="o", color=colours[model], label=label)
    source = results["reference"]["nll_per_token"]["source"]
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(math.exp(source - limit), color="k", lw=0.8, ls=":", label="source with context")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("perplexity ÷ attainable limit")
    ax.set_title("Estimates against the exact limit (1 = limit after packing)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny chain and models, two small budgets")
    p.add_argument("--out", default=None, help="output folder (default bench/out/convergence[-quick])")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--budgets", default=None, help="training tokens per run, comma-separated (default by scale)")
    p.add_argument("--estimators", default="discrete,continuous", help="perplexity estimators to report")
    p.add_argument("--rhos", default="0.5,1,2", help="generation rates ρ for the allowed-transition fraction")
    p.add_argument("--stage2-fraction", type=float, default=0.5, help="share of a Stage-2 budget spent fine-tuning")
    p.add_argument("--seed", type=int, default=0, help="seed of the source and of the corpus")
    p.add_argument("--reeval", action="store_true", help="redo every evaluation (trainings are kept)")
    args = p.parse_args(argv)
    scale = SCALES["quick" if args.quick else "full"]
    if args.budgets:
        scale = Scale(**{**scale.__dict__, "budgets": tuple(int(float(b)) for b in args.budgets.split(","))})
    args.scale = scale
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model {unknown[0]} (choose from {', '.join(MODELS)})")
    if not 0 < args.stage2_fraction < 1:
        p.error("--stage2-fraction must be in (0, 1)")
    args.estimators = [e for e in args.estimators.split(",") if e]
    args.rhos = [float(r) for r in args.rhos.split(",")]
    args.out = Path(args.out or ROOT / "bench" / "out" / ("convergence-quick" if args.quick else "convergence"))
    return args


def prepare_corpus(args) -> tuple[Path, synthetic.MarkovSource]:
    scale = args.scale
    corpus = args.out / "corpus"
    source = synthetic.random_markov_source(scale.words, seed=args.seed)
    held_out = max(scale.eval_blocks * scale.length + scale.length, 4096)
    synthetic.write_corpus(source, corpus, {"train": max(max(scale.budgets), 65536), "valid": held_out,
                                            "test": held_out}, seed=args.seed)
    return corpus, synthetic.load_source(corpus)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scale, out = args.scale, args.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    corpus, source = prepare_corpus(args)
    runs = run_plan(args.models, scale.budgets, args.stage2_fraction)
    configs = {run: run_config(run, scale, corpus, out) for run in runs}
    blocks = test_blocks(corpus, next(iter(configs.values())), scale.eval_blocks)
    ref = reference(source, blocks)
    print(f"convergence: {len(runs)} runs on {corpus}; source PPL {ref['ppl']['source']:.3f}, "
          f"limit {ref['ppl']['limit']:.3f} on {ref['n_tokens']} test tokens -> {out}", flush=True)
    work = [r.tokens - (r.init_from.tokens if r.init_from else 0) for r in runs]
    t0, done, rows = time.perf_counter(), 0, []
    for i, (run, own) in enumerate(zip(runs, work)):
        train_rec = ensure_trained(run, configs[run], out)
        eval_rec = evaluate(run, source, blocks, args, scale, out)
        done += own
        elapsed = time.perf_counter() - t0
        eta = elapsed / done * (sum(work) - done) if done else math.nan
        best = min(b["nll_per_token"] for b in eval_rec["bounds"].values())
        print(f"convergence: [{i + 1}/{len(runs)}] {run.name}: best estimate ÷ limit "
              f"{_ratio(best, ref['nll_per_token']['limit'])}; elapsed {elapsed:.0f} s, ETA {eta:.0f} s", flush=True)
        if run.model in args.models and not (run.model == STAGE1 and run.tokens not in scale.budgets):
            rows.append({"model": run.model, "tokens": run.tokens, "train": train_rec, **eval_rec})
    results = {"command": "python bench/convergence.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "date": datetime.date.today().isoformat(), "commit": _commit(),
               "settings": {**scale.__dict__, "models": args.models, "estimators": args.estimators,
                            "rhos": args.rhos, "stage2_fraction": args.stage2_fraction, "seed": args.seed},
               "reference": ref, "runs": rows}
    _write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "bound_vs_limit.png")
    print(markdown(results))
    print(f"convergence: wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'bound_vs_limit.png'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HDLMError as e:
        print(f"convergence: error: {e}", file=sys.stderr)
        sys.exit(2)
