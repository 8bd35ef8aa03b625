"""Sampling speed: KV cache vs no cache against the ideal, Flat output reuse, model calls / tokens per second.

Side by side in one run, on one machine:
1. Block ω = d/4 and ω = d/16 (paper Table 10: 2.08× for ω = d/4 on an A100), with and without the
   KV cache (same seed: the tokens are identical, which is asserted here too). Columns: end-to-end
   seconds and transformer seconds (the blocks only, timed by hooks), their ratios, the ideal
   (n+1)/2 for n = d/ω blocks and 90% of it, and the ratio of cells fed through the blocks.
   Baselines: "no cache" is ``generate(kv_cache=False)``: every step re-runs the clean prefix and
   the active window (non-lazy in the transformer for the γ kernels, which need every active
   position; for the ancestral sampler a sequence that reveals nothing in a step is left out, in
   both columns). "KV cache" runs the clean cells settled since the last call and the window. The
   ideal (n+1)/2 is the cells ratio of those two for one call per step; "cells ×" is the measured one,
   "FLOP ×" the ratio of the blocks' dense-equivalent FLOPs (attention scores every (query, key) pair
   its SDPA call sees, so a cached window against a long cache costs more than its cells say), and
   the blocks' GFLOP/s sit beside the GEMM rate printed first.
   ``--repeat R`` interleaves the two R times and keeps each one's fastest run (a shared machine).
2. Flat at ρ = 1 on a model without time conditioning (and no Eq. (12) weighting, as the ε models):
   eager head (before #16.1), lazy, lazy + output reuse (issue #16.4): model calls, sequence passes,
   tokens/s; the three give identical tokens (asserted).
3. Flat, Block and Slide at ρ ∈ {1/2, 1, 2, 4}: number of model calls and generated tokens/s (cached).
4. ``--kernel-speed``: one sampler step of the γ posterior kernel (the default for 0 < γ < 1) and of
   the analytic one (γ = 0, 1) over M active positions, composed from their definitions vs in closed
   form (hdlm.processes.gamma_kernel), interleaved, in float32 as the sampler runs them; they agree to
   float32 rounding (asserted).

The fp32 GEMM rate of this machine is measured in the same run and printed first. A randomly
initialised model is enough for speed (what is measured is compute per step, not text); the
vocabulary is kept small by default so that the transformer, not the 50k-way draw, is timed.

    python bench/bench_sample.py [--length 1024] [--vocab 4096] [--batch 2] [--process gamma|mdlm]
                                 [--device cpu] [--json out.json] [--skip-rho] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from hdlm.allocator import keep_freed_memory
from hdlm.config import load_config
from hdlm.hyperschedule import make_hyperschedule
from hdlm.model import HDLMTransformer
from hdlm.processes import make_process
from hdlm.sampling import SequenceGenerators, generate, make_sampler


def build(args, d: int, untimed: bool = False):
    extra = ["model.time_conditioning=false", "model.weighted_embedding=false"] if untimed else []
    cfg = load_config(None, [f"model.length={d}", f"model.vocab_size={args.vocab}", f"model.n_layers={args.layers}",
                             f"model.hidden={args.hidden}", "model.n_heads=4", "model.dropout=0",
                             f"process.kind={args.process}", *extra])
    torch.manual_seed(0)
    model = HDLMTransformer(cfg.model).to(args.device).eval()
    model.timer = BlockTimer(model, args.device)
    return model, make_process(cfg.process, args.vocab)


class BlockTimer:
    """Seconds spent in the transformer blocks (first block's input to last block's output)."""

    def __init__(self, model, device: str) -> None:
        self.seconds, self.t0, self.cuda = 0.0, 0.0, device.startswith("cuda")
        self.cells = self.head_cells = self.rows = 0  # cells through the blocks / the head, sequence passes
        self.pairs = 0  # (query cell, key cell) pairs scored by attention, per layer
        cfg = model.cfg
        self.flops_per_cell = 2 * cfg.n_layers * (4 + 2 * cfg.mlp_ratio) * cfg.hidden ** 2  # qkv, proj, MLP
        self.flops_per_pair = 4 * cfg.n_layers * cfg.hidden  # q·k and p·v, as SDPA computes them (masked too)
        model.blocks[0].register_forward_pre_hook(self._start)
        model.blocks[-1].register_forward_hook(self._stop)
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, _module, args, kwargs):
        tokens, index = args[0], kwargs.get("out_index")
        cache = kwargs.get("cache")
        self.rows += tokens.shape[0]
        self.cells += tokens.numel()
        self.pairs += tokens.numel() * ((cache.length if cache is not None else 0) + tokens.shape[1])
        self.head_cells += tokens.numel() if index is None else tokens.shape[0] * index.shape[-1]

    @property
    def gflop(self) -> float:
        """Dense-equivalent GFLOP of the blocks' matmuls and attention (adaLN and norms left out)."""
        return (self.cells * self.flops_per_cell + self.pairs * self.flops_per_pair) / 1e9

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _start(self, *_):
        self._sync()
        self.t0 = time.perf_counter()

    def _stop(self, *_):
        self._sync()
        self.seconds += time.perf_counter() - self.t0


def profile(model, process, hs, args) -> None:
    """Top ops by self time of one cached run, eager head (before) and lazy head (after)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for lazy in (False, True):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            run_one(model, process, hs, args, kv_cache=True, lazy=lazy)
        print(f"\nprofile ω = {hs.width}, KV cache, lazy = {lazy}:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def run_one(model, process, hs, args, kv_cache: bool, lazy: bool = True, reuse: bool = True):
    sampler = make_sampler("auto", process, hyperschedule=hs)
    gen = SequenceGenerators(0, range(args.batch), args.device)
    timer = model.timer
    timer.seconds, timer.cells, timer.head_cells, timer.rows, timer.pairs = 0.0, 0, 0, 0, 0
    with torch.no_grad():
        res = generate(model, process, hs, sampler, args.batch, generator=gen, kv_cache=kv_cache, progress=False,
                       lazy=lazy, reuse=reuse)
    res.transformer_s, res.cells, res.head_cells, res.rows = timer.seconds, timer.cells, timer.head_cells, timer.rows
    res.gflop = timer.gflop
    return res


def fastest(runs):
    """The run with the smallest wall time, its transformer time the smallest of all (shared machine)."""
    best = min(runs, key=lambda r: r.wall_time)
    best.transformer_s = min(r.transformer_s for r in runs)
    return best


def kernel_speed(args, out, reps: int = 10) -> None:
    """The γ kernels, composed from their definitions vs in closed form, per sampler step (ms), interleaved."""
    print("\nγ reverse kernels (γ = 0.01, 70% MASK rows, random float32 raw), ms per step; best of 3 rounds")
    print("| kernel | M rows | N | composed | closed form | × |")
    print("|---|---|---|---|---|---|")
    for n in (args.vocab, 50257):
        proc = make_process(load_config(None, ["process.kind=gamma"]).process, n)
        for m in (128, 512):
            gen = torch.Generator().manual_seed(0)
            raw = 3 * torch.randn(m, n, generator=gen)
            x = torch.where(torch.rand(m, generator=gen) < 0.7, n, torch.randint(0, n, (m,), generator=gen))
            s_now = torch.full((m,), 0.5, dtype=torch.float64)
            s_next = s_now - 1 / 64
            kernels = {
                "posterior": (lambda: proc._posterior_composed(raw, x, s_now, s_next),
                              lambda: proc.kernel_posterior(raw, x, s_now, s_next)),
                "analytic": (lambda: proc._analytic_composed(proc.log_score(raw, x, s_now), x, s_now, s_next),
                             lambda: proc.kernel_analytic(raw, x, s_now, s_next))}
            for name, (composed, closed) in kernels.items():
                torch.testing.assert_close(closed(), composed(), atol=1e-5, rtol=0)
                best = [float("inf"), float("inf")]
                for _ in range(3):
                    for i, f in enumerate((composed, closed)):
                        t0 = time.perf_counter()
                        for _ in range(reps):
                            f()
                        best[i] = min(best[i], (time.perf_counter() - t0) / reps * 1e3)
                out["kernel"].append({"kernel": name, "rows": m, "vocab": n, "composed_ms": best[0], "closed_ms": best[1]})
                print(f"| {name} | {m} | {n} | {best[0]:.1f} | {best[1]:.1f} | {best[0] / best[1]:.1f} |")


def gemm_rate(device: str, n: int = 1024, reps: int = 10) -> float:
    """fp32 GFLOP/s of an n × n × n matmul on this device, now."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def cache_table(args, out) -> None:
    """Table 1: Block ω = d/4, d/16, cached against uncached, beside the ideal (n+1)/2."""
    d = args.length
    model, process = build(args, d)
    print(f"\nKV cache, d = {d}, batch {args.batch}, {args.layers}x{args.hidden}, vocab {args.vocab}, "
          f"{args.process}, best of {args.repeat} interleaved")
    print("| ω | n | steps | calls | no cache e2e / blocks (s) | KV cache e2e / blocks (s) | e2e × | blocks × "
          "| ideal (n+1)/2 | 90% ideal | blocks ÷ ideal | cells × | FLOP × | blocks GFLOP/s no cache / cache |"
          "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    run_one(model, process, make_hyperschedule("block", d, width=d // 4, rho=d // 8), args, kv_cache=True)  # warm-up
    for div in args.blocks:
        hs = make_hyperschedule("block", d, width=d // div)
        if args.profile:
            profile(model, process, hs, args)
        runs = [(run_one(model, process, hs, args, kv_cache=False), run_one(model, process, hs, args, kv_cache=True))
                for _ in range(args.repeat)]
        plain, cached = fastest([p for p, _ in runs]), fastest([c for _, c in runs])
        if args.eager_cache:  # the KV cache before issue #16.1a: the head at every active position
            eager = run_one(model, process, hs, args, kv_cache=True, lazy=False)
            print(f"(ω = d/{div}, KV cache, eager head: {eager.wall_time:.1f} s e2e, {eager.transformer_s:.1f} s blocks, "
                  f"{eager.head_cells} head cells vs {cached.head_cells} lazy)")
        assert torch.equal(plain.tokens, cached.tokens), "cached and uncached generation differ"
        ideal = (div + 1) / 2
        row = {"width": f"d/{div}", "blocks": div, "steps": hs.T, "calls": cached.n_model_calls,
               "uncached_s": plain.wall_time, "cached_s": cached.wall_time,
               "uncached_blocks_s": plain.transformer_s, "cached_blocks_s": cached.transformer_s,
               "speedup": plain.wall_time / cached.wall_time,
               "blocks_speedup": plain.transformer_s / cached.transformer_s, "ideal": ideal,
               "uncached_cells": plain.cells, "cached_cells": cached.cells, "head_cells": cached.head_cells,
               "uncached_gflop": plain.gflop, "cached_gflop": cached.gflop,
               "uncached_gflops": plain.gflop / plain.transformer_s, "cached_gflops": cached.gflop / cached.transformer_s}
        out["cache"].append(row)
        print(f"| d/{div} | {div} | {hs.T} | {row['calls']} | {plain.wall_time:.1f} / {plain.transformer_s:.1f} "
              f"| {cached.wall_time:.1f} / {cached.transformer_s:.1f} | {row['speedup']:.2f} "
              f"| {row['blocks_speedup']:.2f} | {ideal:.1f} | {0.9 * ideal:.2f} | {row['blocks_speedup'] / ideal:.0%} "
              f"| {plain.cells / cached.cells:.2f} | {plain.gflop / cached.gflop:.2f} "
              f"| {row['uncached_gflops']:.0f} / {row['cached_gflops']:.0f} |")


def flat_table(args, out) -> None:
    """Table 2: Flat without time conditioning: eager head, lazy, lazy + output reuse (issue #16.4)."""
    d = args.rho_length
    model, process = build(args, d, untimed=True)
    print(f"\nFlat, d = {d}, {args.process} ({make_sampler('auto', process, hyperschedule=make_hyperschedule('flat', d)).name}), "
          f"no time conditioning\n| ρ | head | reuse | model calls | sequence passes | reused | head cells | tokens/s |"
          f"\n|---|---|---|---|---|---|---|---|")
    modes = (("eager", False, False), ("lazy", True, False), ("lazy", True, True))
    for rho in args.flat_rho:
        hs = make_hyperschedule("flat", d, rho=rho)
        runs = [run_one(model, process, hs, args, kv_cache=True, lazy=lazy, reuse=reuse) for _, lazy, reuse in modes]
        for (name, lazy, reuse), r in zip(modes, runs):
            assert torch.equal(runs[0].tokens, r.tokens), "eager, lazy and reusing generation differ"
            out["lazy"].append({"rho": rho, "lazy": lazy, "reuse": reuse, "model_calls": r.n_model_calls,
                                "rows": r.rows, "reused": r.n_reused, "head_cells": r.head_cells,
                                "tokens_per_s": r.tokens_per_s, "seconds": r.wall_time})
            print(f"| {rho:g} | {name} | {reuse} | {r.n_model_calls} | {r.rows} | {r.n_reused} | {r.head_cells} "
                  f"| {r.tokens_per_s:.1f} |")


def rho_sweep(args, out) -> None:
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


def long_table(args, out) -> None:
    d = args.rho_length
    model, process = build(args, d)
    print(f"\nbeyond d = {d}: Block ω = d/4, KV cache (window of d)\n| L | L/d | model calls | tokens/s |"
          f"\n|---|---|---|---|")
    for mult in (1, 2, 4):
        hs = make_hyperschedule("block", mult * d, width=d // 4)
        r = run_one(model, process, hs, args, kv_cache=True)
        out.setdefault("long", []).append({"length": mult * d, "model_calls": r.n_model_calls,
                                           "tokens_per_s": r.tokens_per_s, "seconds": r.wall_time})
        print(f"| {mult * d} | {mult} | {r.n_model_calls} | {r.tokens_per_s:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--rho-length", type=int, default=256, help="d for the Flat table and the ρ sweep")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--process", default="gamma", help="process.kind: gamma, epsilon or mdlm")
    ap.add_argument("--flat-rho", type=float, nargs="*", default=[1.0, 0.25],
                    help="ρ of the Flat reuse table (none: no Flat table)")
    ap.add_argument("--blocks", type=int, nargs="*", default=[4, 16], metavar="N",
                    help="Block with n blocks (ω = d/n) in the KV-cache table (none: no KV-cache table)")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved repeats of the KV-cache table (best kept)")
    ap.add_argument("--profile", action="store_true", help="print the top ops of a cached run, eager and lazy")
    ap.add_argument("--eager-cache", action="store_true", help="also time the cached run with the head everywhere")
    ap.add_argument("--long", action="store_true", help="Block at L = d, 2d, 4d (beyond the training length)")
    ap.add_argument("--skip-rho", action="store_true", help="leave out the ρ sweep")
    ap.add_argument("--kernel-speed", action="store_true", help="time the γ kernels, composed vs closed form")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc's malloc defaults (hdlm's CLI keeps freed memory: hdlm.allocator)")
    args = ap.parse_args()
    if not args.system_malloc:
        keep_freed_memory()  # as every hdlm command does
    out = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                      f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}",
           "args": vars(args), "cache": [], "lazy": [], "rho": [], "kernel": []}
    out["gemm_gflops"] = gemm_rate(args.device)
    print(f"{out['machine']}; fp32 GEMM 1024³: {out['gemm_gflops']:.0f} GFLOP/s (measured now)")
    if args.kernel_speed:
        kernel_speed(args, out)
    if args.blocks:
        cache_table(args, out)
    if args.flat_rho:
        flat_table(args, out)
    if not args.skip_rho:
        rho_sweep(args, out)
    if args.long:
        long_table(args, out)
    out["gemm_gflops_end"] = gemm_rate(args.device)
    print(f"\nfp32 GEMM 1024³ at the end: {out['gemm_gflops_end']:.0f} GFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
