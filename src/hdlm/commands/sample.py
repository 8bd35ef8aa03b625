"""Generate text from a checkpoint with the KV-cached hyperschedule samplers (paper §3.3-3.4, App. B.4).

Examples::

    hdlm sample --checkpoint runs/ptb --num-samples 4
    hdlm sample --checkpoint runs/owt --prompt "The city of" --schedule block --width 256 --rho 2
    hdlm sample --checkpoint runs/owt-eps --sampler acs --eta 0.01 --out samples.jsonl   # hdlm eval gen reads it
    hdlm sample --checkpoint runs/ptb --num-samples 1 --trace denoising.png
    hdlm sample --checkpoint runs/owt --schedule block --length 4096 --bos-eos --stop-at-eos
    hdlm sample --checkpoint runs/owt-eps --schedule flat --infill "the [MASK:12] of the city"
    hdlm sample --checkpoint hdlm-group/hdlm-base-gamma-0.01 --num-samples 2   # a published model

Unset options come from the checkpoint's config (``schedule.*`` and ``sample.*``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..config import DRAW_METHODS, SAMPLER_NAMES
from ..errors import HDLMError
from ..progress import Progress
from . import add_progress_option, add_schedule_options, check_at_least, check_output_path


SAMPLER_OPTIONS = ("sampler", "eta", "temperature", "top_k", "top_p", "draw")


def add_sampler_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """--sampler/--eta/--temperature/--top-k/--top-p/--draw, shared by ``hdlm sample`` and
    ``hdlm eval gen --checkpoint`` (unset: the checkpoint's ``sample.*``)."""
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                   help=f"{prefix}auto: posterior (0<gamma<1), analytic (gamma 0 or 1), ancestral (epsilon), ar (quench)")
    p.add_argument("--eta", type=float, default=None, metavar="E", help=f"{prefix}ACS correction strength eta")
    p.add_argument("--temperature", type=float, default=None, metavar="X",
                   help=f"{prefix}sampling temperature (1 = off)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help=f"{prefix}keep the K most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help=f"{prefix}nucleus sampling (1 = off)")
    p.add_argument("--draw", choices=DRAW_METHODS, default=None,
                   help=f"{prefix}token draws (sample.draw): cdf = exact float64 inverse CDF (default), gumbel = "
                        "float64 Gumbel-max, float32-gumbel = the reference code's flawed draws (App. F.2, Table 5)")
    p.add_argument("--float32-gumbel", dest="draw", action="store_const", const="float32-gumbel",
                   help=argparse.SUPPRESS)  # older spelling of --draw float32-gumbel


def load_pipeline(checkpoint: str, device: str | None) -> tuple[Any, str]:
    """The :class:`hdlm.sampling.HDLMPipeline` of ``checkpoint`` and the sha256 of its weights file."""
    from ..hub import load_pretrained, weights_sha256
    from ..runtime import resolve_device
    from ..sampling.pipeline import HDLMPipeline

    dev = resolve_device(device)
    pre = load_pretrained(checkpoint, device=dev)
    return HDLMPipeline(pre.model, pre.config, pre.tokenizer, dev), weights_sha256(pre)


def generate_samples(args: argparse.Namespace, pipe: Any, checkpoint_sha: str, **kwargs: Any) -> tuple[Any, list]:
    """Sample with the schedule and sampler options of ``args`` (``kwargs``: num_samples, prompt,
    batch_size, kv_cache, trace, progress, length, stop_at_eos, bos_eos, infill) and return the result and its records in the one
    samples format (:mod:`hdlm.sample_file`)."""
    from dataclasses import replace

    from ..sample_file import sample_records

    chosen = {name: getattr(args, name, None) for name in SAMPLER_OPTIONS + ("seed",)}
    total = kwargs.get("num_samples") or pipe.config.sample.num_samples
    with Progress(total, "sample", "seq", enabled=bool(kwargs.get("progress"))) as bar:  # a line per batch
        result = pipe.generate_ids(schedule=args.schedule, width=args.width, rho=args.rho, steps=args.steps,
                                   on_batch=bar.update, **chosen, **kwargs)
    opts = replace(pipe.config.sample, **{k: v for k, v in chosen.items() if v is not None})
    kv_cache = kwargs.get("kv_cache")
    sampler = {"name": result.sampler, **{k: getattr(opts, k) for k in SAMPLER_OPTIONS if k != "sampler"},
               "kv_cache": opts.kv_cache if kv_cache is None else kv_cache,
               "hyperschedule": {k: v for k, v in result.hyperschedule.to_dict().items() if k != "table"}}
    records = sample_records(pipe.decode(result), result.texts_ids(), prompt_length=result.prompt_len,
                             sampler=sampler, seed=opts.seed, checkpoint=checkpoint_sha)
    return result, records


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR|ORG/NAME",
                   help="checkpoint, pretrained or run folder, an official checkpoint, or a Hugging Face Hub id "
                        "(e.g. hdlm-group/hdlm-base-gamma-0.01; HF_HUB_OFFLINE=1 uses the HF cache only)")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="condition on this text (settled from the start)")
    p.add_argument("--num-samples", type=int, default=None, metavar="N", help="number of samples (sample.num_samples)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B", help="samples per batch (sample.batch_size)")
    add_schedule_options(p)
    add_sampler_options(p)
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed: the same seed gives the same text on the same device")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:K (default: auto)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the settled prefix at every step")
    p.add_argument("--json", action="store_true",
                   help="samples as JSONL, one per line (text, token_ids, prompt_length, sampler, seed, "
                        "checkpoint): the format `hdlm eval gen --samples` reads")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the samples to FILE instead of stdout (FILE.jsonl: the JSONL samples format)")
    p.add_argument("--trace", default=None, metavar="FILE.png",
                   help="draw the denoising of the first sample (rows = steps, columns = positions), like Fig. 3")
    add_progress_option(p)
    p.add_argument("--length", type=int, default=None, metavar="L",
                   help="generate L tokens (default: the model's d); L > d with block, slide or quench keeps "
                        "the last d positions in view")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="stop once every sample has settled an EOS and print the text before it")
    p.add_argument("--bos-eos", action="store_true",
                   help="start from an EOS prompt, so that samples begin a document (the model saw packed text)")
    p.add_argument("--infill", default=None, metavar="TEMPLATE",
                   help='flat only: keep the text and generate the gaps, e.g. "the [MASK:12] of the city"')


def run(args: argparse.Namespace) -> int:
    from ..sample_file import SAMPLES_SUFFIX, dumps_samples

    for value, flag, low in ((args.num_samples, "--num-samples", 1), (args.batch_size, "--batch-size", 1),
                             (args.seed, "--seed", 0), (args.top_k, "--top-k", 0)):
        check_at_least(value, flag, low)
    check_output_path(args.out, "--out")
    check_output_path(args.trace, "--trace")
    if args.out and Path(args.out).suffix == ".json":
        raise HDLMError(f"--out '{args.out}': samples are JSONL, one per line; name the file {SAMPLES_SUFFIX}")
    pipe, sha = load_pipeline(args.checkpoint, args.device)
    result, records = generate_samples(
        args, pipe, sha, num_samples=args.num_samples, prompt=args.prompt, batch_size=args.batch_size,
        kv_cache=False if args.no_kv_cache else None, trace=args.trace is not None, progress=not args.no_progress,
        length=args.length, stop_at_eos=args.stop_at_eos, bos_eos=args.bos_eos, infill=args.infill)
    hs = result.hyperschedule
    summary = (f"{len(records)} samples, d = {hs.d}, {hs.kind} (T = {hs.T}, width = {hs.width}, rho = {hs.rho:g}), "
               f"sampler {result.sampler}: {result.n_model_calls} model calls in {result.wall_time:.2f} s "
               f"({result.tokens_per_s:.1f} tokens/s)")
    if args.json or (args.out and Path(args.out).suffix == SAMPLES_SUFFIX):
        out = dumps_samples(records)
    else:
        out = "\n\n".join(f"=== sample {k} ===\n{r['text']}" for k, r in enumerate(records)) + "\n"
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(out, encoding="utf-8")
        except OSError as e:
            raise HDLMError(f"cannot write '{args.out}': {e.strerror or e}") from None
        print(f"wrote {args.out}: {summary}", file=sys.stderr)
    else:
        sys.stdout.write(out)
        print(summary, file=sys.stderr)
    if args.trace:
        from ..plots.trace import plot_trace

        def one_token(i: int) -> str:
            return pipe.tokenizer.decode([i])

        try:
            path = plot_trace(result, args.trace, mask_id=pipe.process.mask_id, decode=one_token)
        except OSError as e:
            raise HDLMError(f"cannot write '{args.trace}': {e.strerror or e}") from None
        print(f"wrote {path}", file=sys.stderr)
    return 0
