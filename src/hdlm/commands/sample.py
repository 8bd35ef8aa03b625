"""Generate text from a checkpoint with the KV-cached hyperschedule samplers (paper §3.3-3.4, App. B.4).

Examples::

    hdlm sample --checkpoint runs/ptb --num-samples 4
    hdlm sample --checkpoint runs/owt --prompt "The city of" --schedule block --width 256 --rho 2
    hdlm sample --checkpoint runs/owt-eps --sampler acs --eta 0.01 --json --out samples.json
    hdlm sample --checkpoint runs/ptb --num-samples 1 --trace denoising.png
    hdlm sample --checkpoint runs/owt --schedule block --length 4096 --bos-eos --stop-at-eos
    hdlm sample --checkpoint runs/owt-eps --schedule flat --infill "the [MASK:12] of the city"
    hdlm sample --checkpoint hdlm-group/hdlm-base-gamma-0.01 --num-samples 2   # a published model

Unset options come from the checkpoint's config (``schedule.*`` and ``sample.*``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import DRAW_METHODS, SAMPLER_NAMES
from ..errors import HDLMError
from . import add_schedule_options, check_at_least, check_output_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR|ORG/NAME",
                   help="checkpoint, pretrained or run folder, an official checkpoint, or a Hugging Face Hub id "
                        "(e.g. hdlm-group/hdlm-base-gamma-0.01; HF_HUB_OFFLINE=1 uses the HF cache only)")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="condition on this text (settled from the start)")
    p.add_argument("--num-samples", type=int, default=None, metavar="N", help="number of samples (sample.num_samples)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B", help="samples per batch (sample.batch_size)")
    add_schedule_options(p)
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                   help="auto: posterior (0<gamma<1), analytic (gamma 0 or 1), ancestral (epsilon), ar (quench)")
    p.add_argument("--eta", type=float, default=None, metavar="E", help="ACS correction strength eta")
    p.add_argument("--temperature", type=float, default=None, metavar="X", help="sampling temperature (1 = off)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="keep the K most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling (1 = off)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed: the same seed gives the same text on the same device")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:K (default: auto)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the settled prefix at every step")
    p.add_argument("--draw", choices=DRAW_METHODS, default=None,
                   help="token draws (sample.draw): cdf = exact float64 inverse CDF (default), gumbel = float64 "
                        "Gumbel-max, float32-gumbel = the reference code's flawed draws (App. F.2, Table 5)")
    p.add_argument("--float32-gumbel", dest="draw", action="store_const", const="float32-gumbel",
                   help=argparse.SUPPRESS)  # older spelling of --draw float32-gumbel
    p.add_argument("--json", action="store_true",
                   help="print JSON (texts, token ids, steps, model calls, wall time, tokens/s)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the texts / JSON to FILE instead of stdout")
    p.add_argument("--trace", default=None, metavar="FILE.png",
                   help="draw the denoising of the first sample (rows = steps, columns = positions), like Fig. 3")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    from ..sampling.pipeline import HDLMPipeline

    for value, flag, low in ((args.num_samples, "--num-samples", 1), (args.batch_size, "--batch-size", 1),
                             (args.seed, "--seed", 0), (args.top_k, "--top-k", 0)):
        check_at_least(value, flag, low)
    check_output_path(args.out, "--out")
    check_output_path(args.trace, "--trace")
    pipe = HDLMPipeline.from_pretrained(args.checkpoint, device=args.device)
    result = pipe.generate_ids(
        args.num_samples, args.prompt, schedule=args.schedule, width=args.width, rho=args.rho, steps=args.steps,
        sampler=args.sampler, eta=args.eta, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, kv_cache=False if args.no_kv_cache else None, batch_size=args.batch_size,
        draw=args.draw, trace=args.trace is not None, progress=not args.no_progress,
        length=args.length, stop_at_eos=args.stop_at_eos, bos_eos=args.bos_eos, infill=args.infill)
    texts = pipe.decode(result)
    hs = result.hyperschedule
    summary = (f"{len(texts)} samples, d = {hs.d}, {hs.kind} (T = {hs.T}, width = {hs.width}, rho = {hs.rho:g}), "
               f"sampler {result.sampler}: {result.n_model_calls} model calls in {result.wall_time:.2f} s "
               f"({result.tokens_per_s:.1f} tokens/s)")
    if args.json:
        out = json.dumps({
            "samples": [{"text": t, "ids": ids} for t, ids in zip(texts, result.texts_ids())],
            "prompt": args.prompt, "prompt_tokens": result.prompt_len,
            "hyperschedule": {k: v for k, v in hs.to_dict().items() if k != "table"},
            "sampler": result.sampler, "steps": result.steps, "n_model_calls": result.n_model_calls,
            "wall_time": result.wall_time, "tokens_per_s": result.tokens_per_s,
            "kv_cache": not args.no_kv_cache, "draw": args.draw or pipe.config.sample.draw,
        }, ensure_ascii=False)
    else:
        out = "\n\n".join(f"=== sample {k} ===\n{t}" for k, t in enumerate(texts))
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(out + "\n")
        except OSError as e:
            raise HDLMError(f"cannot write '{args.out}': {e.strerror or e}") from None
        print(f"wrote {args.out}: {summary}", file=sys.stderr)
    else:
        print(out)
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
