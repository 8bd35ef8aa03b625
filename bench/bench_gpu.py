"""GPU training throughput in one run (issue #16.5): FlexAttention block-sparse training masks, bf16, torch.compile.

For Block ω = d/4 and d/16 it measures, side by side, the efficient layout (clean ⁀ d/ω noisy
intervals) and one interval per sequence, in fp32 and under bf16 autocast (and compiled with
``--compile``): seconds per step, tokens/s, denoised tokens/s, the efficient ÷ single ratio beside
its ideal (d/ω)/2, and MFU = model FLOPs / s ÷ the device's dense bf16 peak. On CUDA the training
masks are FlexAttention BlockMasks (hdlm.layout.attention_mask), so masked blocks are skipped; the
fraction of (128 × 128) blocks computed is printed. It also checks, forward only, that FlexAttention
over the training mask equals dense SDPA with the boolean mask (the one rule of hdlm.masks).

``--dry-run``: tiny sizes on the CPU, every code path above (FlexAttention eager, torch.compile with
the eager backend) so that the script does not fail on first contact with a GPU.

    python bench/bench_gpu.py [--length 1024] [--batch 8] [--compile] [--json out.json] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from hdlm.config import load_config
from hdlm.masks import dense_mask, flex_attention, flex_block_mask
from hdlm.model import HDLMTransformer
from hdlm.objective import build_objective
from hdlm.optim import adamw_kernel
from hdlm.runtime import autocast

#: dense bf16 peak FLOP/s (no sparsity) by device-name substring; others use the measured bf16 GEMM rate
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Measured GEMM rate (FLOP/s), best of 5."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def bf16_peak(device: torch.device, measured: float) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in BF16_PEAK.items():
            if key in name:
                return peak, f"{name} dense bf16 peak"
    return measured, "measured bf16 GEMM rate"


def step_flops(cfg, n_cells: int, mask_true: int, n_out: int, B: int) -> float:
    """Forward + backward (3 × forward) FLOPs: block matmuls per cell, attention over allowed entries, head."""
    m = cfg.model
    per_cell = m.n_layers * (2 * 4 * m.hidden**2 + 2 * 2 * m.mlp_ratio * m.hidden**2)
    attn = m.n_layers * 2 * 2 * mask_true * m.hidden
    return 3.0 * B * (per_cell * n_cells + attn + 2 * m.hidden * m.vocab_size * n_out)


def check_flex_equals_dense(obj, y: torch.Tensor, device: torch.device) -> float:
    """Max |FlexAttention − SDPA| over the efficient layout's mask on random q, k, v (forward)."""
    lay = obj.cells(y, torch.arange(y.shape[0]), 0).cells.layout.to(device)
    q, k, v = (torch.randn(1, 2, len(lay), 16, device=device) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(lay, lay, device=device))
    flex = flex_attention(q, k, v, flex_block_mask(lay, lay, device=device))
    return float((flex - dense).abs().max())


def block_fraction(obj, y: torch.Tensor, device: torch.device) -> float:
    """Fraction of FlexAttention blocks the training mask computes (1 = dense)."""
    lay = obj.cells(y, torch.arange(y.shape[0]), 0).cells.layout.to(device)
    bm = flex_block_mask(lay, lay, device=device)
    n_q, n_kv = -(-len(lay) // bm.BLOCK_SIZE[0]), -(-len(lay) // bm.BLOCK_SIZE[1])
    full = bm.full_kv_num_blocks.sum() if bm.full_kv_num_blocks is not None else 0
    return float(bm.kv_num_blocks.sum() + full) / (n_q * n_kv)


def measure(cfg, single: bool, bf16: bool, compiled: bool, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = HDLMTransformer(cfg.model).to(device)
    net = torch.compile(model, backend=args.compile_backend) if compiled else model
    obj = build_objective(cfg, cfg.model.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw_kernel(list(model.parameters())))
    B, d = args.batch, cfg.model.length
    y = torch.randint(cfg.model.vocab_size, (B, d), device=device)
    seconds, flops, denoised = 0.0, 0.0, 0
    for k in range(args.steps + args.warmup):  # warm-up steps: compilation, mask building
        seeds = torch.arange(B) + 1000 * k
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, "bf16" if bf16 else "fp32"):
            loss, _ = obj(net, y, seeds, k, single=single)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if k < args.warmup:
            continue
        seconds += time.perf_counter() - t0
        tc = obj.cells(y, seeds, k, single=single)
        n_out = tc.ce_index.numel() + tc.diff_index.numel()
        mask = dense_mask(tc.cells.layout, tc.cells.layout)
        flops += step_flops(cfg, mask.shape[0], int(mask.sum()), n_out, B)
        denoised += B * tc.diff_index.numel()
    return {"layout": "single" if single else "efficient", "dtype": "bf16" if bf16 else "fp32", "compiled": compiled,
            "seconds_per_step": seconds / args.steps, "tokens_per_s": B * d * args.steps / seconds,
            "denoised_tokens_per_s": denoised / seconds, "flops_per_s": flops / seconds}


def config(args, width: int):
    return load_config(None, [f"model.length={args.length}", f"model.vocab_size={args.vocab}",
                              f"model.n_layers={args.layers}", f"model.hidden={args.hidden}",
                              f"model.n_heads={args.heads}", "model.dropout=0", "schedule.kind=block",
                              f"schedule.width={width}", "process.kind=gamma"])


def run(args) -> dict:
    device = torch.device(args.device)
    rate16 = gemm_rate(device, torch.bfloat16, args.gemm_n)
    peak, peak_name = bf16_peak(device, rate16)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "bf16_gemm_flops": rate16, "peak": peak, "peak_name": peak_name, "rows": []}
    print(f"{out['device']}: bf16 GEMM {rate16 / 1e12:.2f} TFLOP/s measured; MFU against {peak_name} "
          f"{peak / 1e12:.1f} TFLOP/s")
    print("| ω | layout | dtype | compiled | s/step | tokens/s | denoised tok/s | eff ÷ single (ideal) | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    variants = [(False, False), (True, False)] + ([(True, True)] if args.compile else [])
    for div in args.divs:
        cfg = config(args, args.length // div)
        obj, y = build_objective(cfg, args.vocab), torch.randint(args.vocab, (args.batch, args.length))
        out.setdefault("flex_max_abs_diff", []).append(check_flex_equals_dense(obj, y, device))
        out.setdefault("block_fraction", []).append(block_fraction(obj, y, device))
        for bf16, compiled in variants:
            pair = [measure(cfg, single, bf16, compiled, args, device) for single in (False, True)]
            ratio = pair[0]["denoised_tokens_per_s"] / pair[1]["denoised_tokens_per_s"]
            for r in pair:
                r.update(width=f"d/{div}", ratio=ratio, ideal=div / 2, mfu=r["flops_per_s"] / peak)
                out["rows"].append(r)
                print(f"| d/{div} | {r['layout']} | {r['dtype']} | {compiled} | {r['seconds_per_step']:.3f} | "
                      f"{r['tokens_per_s']:.0f} | {r['denoised_tokens_per_s']:.0f} | {ratio:.2f}× ({div / 2:g}×) | "
                      f"{100 * r['mfu']:.1f}% |", flush=True)
    print(f"FlexAttention vs dense SDPA on the training masks: max |diff| {max(out['flex_max_abs_diff']):.2e}; "
          f"blocks computed: {', '.join(f'd/{v} {f:.2f}' for v, f in zip(args.divs, out['block_fraction']))}")
    assert max(out["flex_max_abs_diff"]) < 1e-4, "FlexAttention and dense SDPA disagree on the training mask"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--divs", type=int, nargs="+", default=[4, 16], help="ω = d/div for each div")
    ap.add_argument("--gemm-n", type=int, default=8192)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile(model) (bf16)")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, every code path")
    args = ap.parse_args()
    if args.dry_run:
        args.length, args.batch, args.layers, args.hidden, args.heads, args.vocab = 32, 2, 1, 32, 2, 97
        args.steps, args.gemm_n, args.device, args.compile, args.compile_backend = 1, 64, "cpu", True, "eager"
        args.warmup, args.divs = 1, [4]
    out = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
