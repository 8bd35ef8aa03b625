"""Sampling speed: KV cache vs no cache, and model calls / tokens per second per hyperschedule and ρ.

Side by side in one run, on one machine:
1. Block ω = d/4 and ω = d/16 at d = 1024 (paper Table 10: 2.08× for ω = d/4 on an A100), with and
   without the KV cache (same seed: the tokens are identical, which is asserted here too);
2. Flat, Block and Slide at ρ ∈ {1/2, 1, 2, 4}: number of model calls and generated tokens/s (cached).

A randomly initialised model is enough for speed (what is measured is compute per step, not text);
the vocabulary is kept small by default so that the transformer, not the 50k-way draw, is timed.

    python bench/bench_sample.py [--length 1024] [--vocab 4096] [--batch 2] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from hdlm.config import load_config
from hdlm.hyperschedule import make_hyperschedule
from hdlm.model import HDLMTransformer
from hdlm.processes import make_process
from hdlm.sampling import generate, make_sampler


def build(args, d: int):
    cfg = load_config(None, [f"model.length={d}", f"model.vocab_size={args.vocab}", f"model.n_layers={args.layers}",
                             f"model.hidden={args.hidden}", "model.n_heads=4", "model.dropout=0", "process.kind=gamma"])
    torch.manual_seed(0)
    model = HDLMTransformer(cfg.model).to(args.device).eval()
    return model, make_process(cfg.process, args.vocab)


def run_one(model, process, hs, args, kv_cache: bool):
    sampler = make_sampler("auto", process, hyperschedule=hs)
    gen = torch.Generator(device=args.device).manual_seed(0)
    with torch.no_grad():
        return generate(model, process, hs, sampler, args.batch, generator=gen, kv_cache=kv_cache, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--rho-length", type=int, default=256, help="d for the ρ sweep")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                      f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}",
           "args": vars(args), "cache": [], "rho": []}

    d = args.length
    model, process = build(args, d)
    print(f"KV cache, d = {d}, batch {args.batch}, {args.layers}x{args.hidden}, vocab {args.vocab}, {out['machine']}")
    print("| ω | steps | no cache (s) | KV cache (s) | speed-up |\n|---|---|---|---|---|")
    for div in (4, 16):
        hs = make_hyperschedule("block", d, width=d // div)
        plain = run_one(model, process, hs, args, kv_cache=False)
        cached = run_one(model, process, hs, args, kv_cache=True)
        assert torch.equal(plain.tokens, cached.tokens), "cached and uncached generation differ"
        row = {"width": f"d/{div}", "steps": hs.T, "uncached_s": plain.wall_time, "cached_s": cached.wall_time,
               "speedup": plain.wall_time / cached.wall_time}
        out["cache"].append(row)
        print(f"| d/{div} | {hs.T} | {plain.wall_time:.1f} | {cached.wall_time:.1f} | {row['speedup']:.2f}× |")

    d = args.rho_length
    model, process = build(args, d)
    print(f"\nρ sweep, d = {d} (KV cache on)\n| schedule | ρ | model calls | tokens/s |\n|---|---|---|---|")
    for kind in ("flat", "block", "slide"):
        for rho in (0.5, 1.0, 2.0, 4.0):
            hs = make_hyperschedule(kind, d, width=None if kind == "flat" else d // 4, rho=rho)
            r = run_one(model, process, hs, args, kv_cache=True)
            out["rho"].append({"schedule": kind, "rho": rho, "model_calls": r.n_model_calls,
                               "tokens_per_s": r.tokens_per_s, "seconds": r.wall_time})
            print(f"| {kind} | {rho:g} | {r.n_model_calls} | {r.tokens_per_s:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
