"""The main job: train the default model on PTB, sample from it with the KV cache, evaluate, write a report.

Writes OUT/report.md with the numbers and the commands that reproduce them, the training curve,
the hyperschedule, a denoising trace and the sample texts, and prints where the report is.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from pathlib import Path

from .._version import __version__
from ..errors import HDLMError
from . import add_config_help, add_progress_option, check_at_least, check_judge, check_output_folder


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_help(p)
    p.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE",
                   help="dotted config overrides, e.g. train.steps=200 schedule.width=8")
    p.add_argument("--config", default="tiny-ptb", help="preset name or YAML file (default: tiny-ptb)")
    p.add_argument("--out", default="report", help="report folder (default: report)")
    p.add_argument("--steps", type=int, default=None, help="training steps (overrides train.steps)")
    p.add_argument("--num-samples", type=int, default=8, help="samples to generate (default 8)")
    p.add_argument("--rho", type=float, default=1.0, help="generation rate ρ for the samples (default 1)")
    p.add_argument("--mc-samples", type=int, default=4, help="Monte-Carlo draws per test sequence for the bound")
    p.add_argument("--eval-sequences", type=int, default=None,
                   help="evaluate the bound on the first N test sequences only (default: all of PTB test)")
    p.add_argument("--judge", default="smollm2", help="judge LM for generative perplexity ('none' to skip)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--reuse", action="store_true", help="skip training if OUT/run already holds a checkpoint")
    add_progress_option(p)


def _fmt(x, nd=1) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def write_report(out: Path, res: dict, command: str, unigram: dict | None) -> Path:
    cfg = res["config"]
    m, pr, sc, tr = cfg["model"], cfg["process"], cfg["schedule"], cfg["train"]
    tok = res["tokenizer"]
    lines = [
        "# hdlm report", "",
        f"Command: `{command}`  ", f"hdlm {__version__}, {platform.machine()}, Python {platform.python_version()}", "",
        "## Model and training", "",
        "| | |", "|---|---|",
        f"| process | {pr['kind']} (γ = {pr['gamma']}, ε = {pr['epsilon']}), noise {pr['noise']} |",
        f"| hyperschedule | {sc['kind']}, ω = {sc['width']}, ρ = {sc['rho']} |",
        f"| transformer | {m['configuration'].upper()}, {m['n_layers']} layers × {m['hidden']}, {m['n_heads']} heads, d = {m['length']} |",
        f"| tokenizer | {tok['name']} (N = {tok['vocab_size']}, vocab sha256 {tok['vocab_hash'][:12]}…) |",
        f"| data | {cfg['data']['dataset']} (train split) |",
        f"| training | {res['train'].get('step')} steps × {tr['batch_size']} sequences × {m['length']} tokens "
        f"= **{res['train']['tokens']:,} training tokens**, {res['train']['seconds'] / 60:.1f} min |",
        f"| final losses | train {_fmt(res['train'].get('loss'), 3)}, valid {_fmt(res['train'].get('valid_loss'), 3)} (nats/token) |",
        "",
        "## Perplexity on " + res["eval_data"]["spec"], "",
        f"{res['eval_data']['sequences']} sequences, {res['eval_data']['tokens']:,} tokens.", "",
        "| estimator | what it is | certifies (sampler) | NLL/token | perplexity | 95% interval | MC draws |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for est, b in res["bounds"].items():
        lines.append(f"| {est} | {b.get('kind', 'bound')} | {b.get('certifies') or '— (an estimate)'} | "
                     f"{b['nll_per_token']:.4f} ± {b['stderr']:.4f} | **{b['ppl']:.1f}** | "
                     f"{b['ppl_low']:.1f} – {b['ppl_high']:.1f} | {b['mc_samples']} |")
        if b.get("n_infinite"):
            notes.append(f"`{est}`: {b['n_infinite']} of {b['n_sequences'] * b['mc_samples']} draws were infinite: "
                         f"the {b.get('kernel')} kernel gives probability 0 to a transition of the bound's noising "
                         "chain, so the bound of that sampler is honestly infinite (docs/likelihood.md).")
    lines += [""] + notes if notes else []
    if unigram:
        lines += ["", f"Reference: add-one unigram perplexity of the same test tokens (fitted on train, "
                      f"one EOS per line): **{unigram['ppl']:.1f}**."]
    lines += ["", "`discrete` is an upper bound on the NLL of the sampler it names (the samples below use the "
                  "default sampler); `continuous` is Algorithm 1's *estimate* on the training NELBO, comparable with "
                  "published tables but not a bound (it omits the prior term). See docs/likelihood.md.",
              "", "## Samples", "",
              "| setting | steps | model calls (all batches) | tokens/s | gen. PPL (token-weighted) | gen. PPL (mean per sample) | entropy |",
              "|---|---|---|---|---|---|---|"]
    for s in res["samples"]:
        gp = s.get("gen_ppl", {})
        lines.append(f"| {s['setting']} ({s['sampler']}) | {s['steps']} | {s['model_calls']} | {s['tokens_per_s']:.0f} | "
                     f"{_fmt(gp.get('ppl_token_weighted'))} | {_fmt(gp.get('ppl_mean_per_sample'))} | {s['entropy']:.2f} |")
    judge = next((s["gen_ppl"].get("judge") for s in res["samples"] if s.get("gen_ppl")), None)
    if judge:
        lines += ["", f"Judge: {judge}. Entropy: mean per-sample entropy of the generated token ids (nats)."]
    lines += ["", "## Pictures", "", "![training curve](curves.png)", "", "![hyperschedule](hyperschedule.png)", "",
              "![denoising trace](trace.png)", "", "## Sample texts", ""]
    for i, text in enumerate(res["samples"][0]["texts"][:4]):
        lines += [f"**Sample {i}**", "", "> " + text.replace("\n", " ").strip()[:1500], ""]
    lines += ["## Reproduce", "", "```bash", command,
              f"hdlm eval ppl --checkpoint {out / 'run'} --data {res['eval_data']['spec']} --mc-samples "
              f"{next(iter(res['bounds'].values()))['mc_samples']}",
              f"hdlm sample --checkpoint {out / 'run'} --num-samples {len(res['samples'][0]['texts'])} --seed 0", "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..experiment import ExperimentPlan, SampleSetting, run_experiment

    for value, flag, low in ((args.num_samples, "--num-samples", 1), (args.mc_samples, "--mc-samples", 1),
                             (args.eval_sequences, "--eval-sequences", 1), (args.seed, "--seed", 0),
                             (args.steps, "--steps", 1)):
        check_at_least(value, flag, low)
    if args.rho <= 0:
        raise HDLMError(f"--rho {args.rho}: must be > 0")
    check_output_folder(args.out, "--out")
    if args.judge.lower() != "none":
        check_judge(args.judge)
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(args.config, overrides)
    out = Path(args.out)
    plan = ExperimentPlan(num_samples=args.num_samples, sample_seed=args.seed,
                          settings=(SampleSetting(rho=args.rho),), mc_samples=args.mc_samples,
                          eval_sequences=args.eval_sequences,
                          judge=None if args.judge.lower() == "none" else args.judge, progress=not args.no_progress)
    res = run_experiment(cfg, out, plan, skip_training=args.reuse)
    unigram = None
    try:
        from ..data import load_token_stream
        from ..evaluation.quality import unigram_stats
        from ..tokenizers import load_tokenizer

        if cfg.data.dataset == "ptb":
            tok = load_tokenizer(cfg.data.tokenizer)
            train_s = load_token_stream("ptb", "train", tok, cfg.data.cache_dir)
            test_s = load_token_stream("ptb", "test", tok, cfg.data.cache_dir)
            unigram = unigram_stats(test_s, tok.vocab_size, fit=train_s)
    except Exception as e:  # the reference line is a nicety; the report stands without it
        print(f"hdlm run: unigram reference skipped ({e})", file=sys.stderr)
    command = " ".join(shlex.quote(a) for a in getattr(args, "_argv", ["hdlm", "run"]))
    path = write_report(out, res, command, unigram)
    print(f"hdlm run: report written to {path}")
    return 0
