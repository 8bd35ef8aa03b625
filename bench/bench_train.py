"""Training-step throughput: the efficient layout (App. B.3) vs one interval per sequence.

Measures, side by side in one run, denoised tokens per second (positions that receive the
diffusion loss, per second of forward + backward + optimizer step) for Block ω = d/4 and
ω = d/16 at d = 1024 on a small model, and the fraction of this machine's measured fp32 GEMM
rate that the model step achieves (FLOPs counted analytically: matmuls of the blocks, attention
scores/values over the allowed mask entries, the output head at the trained cells).

    python bench/bench_train.py [--length 1024] [--batch 2] [--steps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from hdlm.config import load_config
from hdlm.model import HDLMTransformer
from hdlm.objective import build_objective
from hdlm.optim import adamw_kernel


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_rate(device: str, n: int = 2048, reps: int = 5) -> float:
    """Measured fp32 GEMM rate of this machine (FLOP/s), best of `reps`."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = 0.0
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def step_flops(cfg, L: int, n_out: int, mask_true: int, B: int) -> float:
    """Forward + backward FLOPs (3× forward) of one training step."""
    h, n = cfg.model.hidden, cfg.model.n_layers
    mlp = cfg.model.mlp_ratio
    per_cell = n * (2 * 4 * h * h + 2 * 2 * h * mlp * h)  # qkv+out projections, MLP
    attn = n * 2 * 2 * mask_true * h  # QK^T and AV over allowed entries
    head = 2 * h * cfg.model.vocab_size * n_out
    return 3.0 * B * (per_cell * L + attn + head)


def measure(cfg, single: bool, B: int, steps: int, device: str = "cpu", head_chunk: int | None = None,
            fused_adamw: bool = True, profile: bool = False) -> dict:
    """Mean over ``steps`` (after one warm-up) of a training step; ``head_chunk`` logits per chunk of the
    fused head + loss (0: the plain unchunked head; None: the objective's default)."""
    torch.manual_seed(0)
    model = HDLMTransformer(cfg.model).to(device)
    obj = build_objective(cfg, cfg.model.vocab_size)
    if head_chunk is not None:
        obj.head_chunk = head_chunk
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **(adamw_kernel(list(model.parameters())) if fused_adamw
                                                           else {"foreach": False}))
    d = cfg.model.length
    y = torch.randint(cfg.model.vocab_size, (B, d), device=device)
    times, denoised, flops = [], 0, 0.0
    for k in range(steps + 1):
        seeds = torch.arange(B) + 1000 * k
        _sync(device)
        t0 = time.perf_counter()
        loss, _ = obj(model, y, seeds, k, single=single)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        dt = time.perf_counter() - t0
        if k == 0:
            continue  # warm-up
        tc = obj.cells(y, seeds, k, single=single)
        from hdlm.masks import dense_mask

        mask = dense_mask(tc.cells.layout, tc.cells.layout)
        n_out = tc.diff_index.numel() + tc.ce_index.numel()
        times.append(dt)
        denoised += B * tc.diff_index.numel()
        flops += step_flops(cfg, mask.shape[0], n_out, int(mask.sum()), B)
    total = sum(times)
    out = {"layout": "single" if single else "efficient", "seconds_per_step": total / steps,
           "denoised_tokens_per_s": denoised / total, "tokens_per_s": B * d * steps / total,
           "gflops_per_s": flops / total / 1e9}
    if profile:
        out["top_ops"] = profile_step(model, obj, opt, y, B)
    return out


def profile_step(model, obj, opt, y, B: int, top: int = 6) -> list[tuple[str, float]]:
    """The ``top`` ops by self CPU time (ms) of one training step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss, _ = obj(model, y, torch.arange(B) + 7, 99)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [(e.key, e.self_cpu_time_total / 1e3) for e in events]


VARIANTS = {"before (unchunked head, AdamW loop)": (0, False), "chunked head + loss": (None, False),
            "chunked head + loss, fused AdamW": (None, True)}


def run_variants(args, rate_before: float, device: str) -> list[dict]:
    """#16.3: the head/loss/optimizer changes one after another, at the default preset and at 4 × 256 GPT-2."""
    sizes = {"default preset (d=128, 4x256, BERT 30522, block w=4, batch 16)":
             ["model.length=128", "model.vocab_size=30522", "schedule.width=4"],
             "4x256 GPT-2 (d=256, vocab 50257, block w=64, batch 4)":
             ["model.length=256", "model.vocab_size=50257", "schedule.width=64"]}
    rows = []
    for (name, over), B in zip(sizes.items(), (16, 4)):
        cfg = load_config(None, [*over, "model.dropout=0", "schedule.kind=block", "process.kind=gamma"])
        for variant, (chunk, fused) in VARIANTS.items():
            r = measure(cfg, False, B, args.steps, device, head_chunk=chunk, fused_adamw=fused, profile=args.profile)
            r.update(size=name, variant=variant, gemm_fraction=r["gflops_per_s"] * 1e9 / rate_before)
            rows.append(r)
            print(f"| {name} | {variant} | {r['seconds_per_step']:.3f} | {r['tokens_per_s']:.0f} | "
                  f"{r['gflops_per_s']:.1f} | {100 * r['gemm_fraction']:.0f}% |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", action="store_true", help="#16.3 table: unchunked head / chunked / fused AdamW")
    ap.add_argument("--profile", action="store_true", help="with --variants: top ops of one step per variant")
    args = ap.parse_args()
    rate = gemm_rate(args.device)
    if args.variants:
        print(f"fp32 GEMM: {rate / 1e9:.1f} GFLOP/s")
        print("| size | variant | s/step | tokens/s | GFLOP/s | of GEMM |\n|---|---|---|---|---|---|")
        rows = run_variants(args, rate, args.device)
        after = gemm_rate(args.device)
        print(f"fp32 GEMM after: {after / 1e9:.1f} GFLOP/s")
        for r in rows if args.profile else []:
            print(r["size"], "|", r["variant"], "|", "; ".join(f"{k} {v:.0f} ms" for k, v in r["top_ops"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"gemm_gflops": [rate / 1e9, after / 1e9], "rows": rows}, f, indent=2)
        return
    rows = []
    for div in (4, 16):
        width = args.length // div
        cfg = load_config(None, [f"model.length={args.length}", f"model.vocab_size={args.vocab}",
                                 f"model.n_layers={args.layers}", f"model.hidden={args.hidden}", "model.n_heads=4",
                                 "model.dropout=0", "schedule.kind=block", f"schedule.width={width}",
                                 "process.kind=gamma"])
        pair = [measure(cfg, single, args.batch, args.steps, args.device) for single in (False, True)]
        speedup = pair[0]["denoised_tokens_per_s"] / pair[1]["denoised_tokens_per_s"]
        for r in pair:
            r.update(width=f"d/{div}", speedup_vs_single=speedup, gemm_fraction=r["gflops_per_s"] * 1e9 / rate)
            rows.append(r)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    out = {"machine": f"{platform.machine()}, {dev}, torch {torch.__version__}",
           "gemm_gflops": rate / 1e9, "length": args.length, "batch": args.batch,
           "model": f"{args.layers}x{args.hidden}, vocab {args.vocab}", "rows": rows}
    print(f"fp32 GEMM: {rate / 1e9:.1f} GFLOP/s ({out['machine']})")
    print("| ω | layout | s/step | denoised tok/s | speed-up | GFLOP/s | of GEMM |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['width']} | {r['layout']} | {r['seconds_per_step']:.2f} | {r['denoised_tokens_per_s']:.0f} | "
              f"{r['speedup_vs_single']:.2f}× | {r['gflops_per_s']:.1f} | {100 * r['gemm_fraction']:.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
