"""Generation beyond the training length (paper §4.5; issue #15): tokens/s and generative perplexity per
d-token segment as the generated length L grows.

A Block (or Slide) checkpoint generates L = d, 2d, 4d tokens with the KV cache (a window of the last d
positions, rotary positions continuing). Each sample is cut into its d-token segments; every segment is
decoded and scored by the judge LM on its own, so segment k's generative perplexity says whether text
far beyond the trained length stays as good as the first d tokens.

    python bench/long_generation.py --checkpoint runs/bench-convert-block/dit/latest
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from hdlm.evaluation.judge import load_judge
from hdlm.evaluation.quality import generative_perplexity, token_entropy
from hdlm.sampling import HDLMPipeline


def segments(rows: list[list[int]], d: int) -> list[list[list[int]]]:
    """``out[k]`` = the k-th d-token segment of every row (rows of equal length L = m·d)."""
    return [[row[k * d:(k + 1) * d] for row in rows] for k in range(len(rows[0]) // d)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a Block or Slide checkpoint folder")
    ap.add_argument("--multiples", default="1,2,4", help="L as multiples of d, comma-separated")
    ap.add_argument("--samples", type=int, default=8, help="samples per length")
    ap.add_argument("--judge", default=None, help="judge LM (default: hdlm's default judge)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = HDLMPipeline.from_pretrained(args.checkpoint)
    d = pipe.length
    judge = load_judge(args.judge)
    rows_out = []
    for m in [int(x) for x in args.multiples.split(",")]:
        res = pipe.generate_ids(args.samples, length=m * d, seed=args.seed, batch_size=args.samples)
        parts = segments(res.tokens.tolist(), d)
        per_seg = []
        for k, seg in enumerate(parts):
            texts = pipe.decode(torch.tensor(seg))
            gp = generative_perplexity(texts, judge, progress=False)
            per_seg.append({"segment": k + 1, "gen_ppl": gp["ppl_token_weighted"],
                            "entropy": token_entropy(seg)["mean"]})
        rows_out.append({"length": m * d, "tokens_per_s": res.tokens_per_s, "model_calls": res.n_model_calls,
                         "sampler": res.sampler, "segments": per_seg})
        print(json.dumps(rows_out[-1]), flush=True)
    hs = pipe.hyperschedule()
    print(f"\n`python bench/long_generation.py --checkpoint {args.checkpoint}` — {platform.machine()}, "
          f"torch {torch.__version__}; {hs.kind} ω = {hs.width}, d = {d}, {args.samples} samples per L, "
          f"judge {judge.name}; gen. PPL of each d-token segment scored alone (token-weighted).\n")
    width = max(len(r["segments"]) for r in rows_out)
    print("| L | tokens/s | model calls | " + " | ".join(f"seg. {k + 1} gen. PPL" for k in range(width)) + " |")
    print("|---:|---:|---:|" + "---:|" * width)
    for r in rows_out:
        cells = [f"{s['gen_ppl']:.0f}" for s in r["segments"]] + [""] * (width - len(r["segments"]))
        print(f"| {r['length']} | {r['tokens_per_s']:.1f} | {r['model_calls']} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=1))


if __name__ == "__main__":
    main()
