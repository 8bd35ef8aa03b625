"""Training-step throughput: the efficient layout (App. B.3) vs one interval per sequence.

Measures, side by side in one run (the variants interleaved step by step, one model and
optimizer, so a change of machine load hits them alike), denoised tokens per second (positions
that receive the diffusion loss, per second of forward + backward + AdamW step) for Block
ω = d/4 and ω = d/16 at d = 1024 on a small model, each layout with dense SDPA (boolean mask)
and with block-sparse attention (hdlm.sparse_attention on CPU, FlexAttention on CUDA). Printed:
the efficient ÷ single ratio beside the ideal (d/ω)/2 and 0.8× of it, the fraction of
query-key pairs the attention computes, the machine's fp32 GEMM rate measured in the same run
(before and after), GFLOP/s and the fraction of GEMM (FLOPs counted analytically: matmuls of
the blocks, attention scores/values over the allowed mask entries, the output head at the
trained cells), and a FLOP model: FLOPs per denoised token of both layouts and the ratio the
FLOP count itself allows.

    python bench/bench_train.py [--length 1024] [--batch 2] [--steps 3] [--profile] [--json out.json]
    python bench/bench_train.py --variants [--profile]   # issue #16.3: head/loss/optimizer variants
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import time

import torch

from hdlm import head_loss
from hdlm.allocator import keep_freed_memory
from hdlm.config import load_config
from hdlm.masks import block_sparse_mask, dense_mask
from hdlm.conditioning import Conditioning
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


def flop_parts(cfg, L: int, n_out: int, mask_true: int, B: int) -> dict:
    """Forward + backward FLOPs (3× forward) of one training step: transformer (linears + attention over
    ``mask_true`` allowed pairs) and output head."""
    h, n = cfg.model.hidden, cfg.model.n_layers
    mlp = cfg.model.mlp_ratio
    per_cell = n * (2 * 4 * h * h + 2 * 2 * h * mlp * h)  # qkv+out projections, MLP
    attn = n * 2 * 2 * mask_true * h  # QK^T and AV over allowed entries
    head = 2 * h * cfg.model.vocab_size * n_out
    return {"transformer": 3.0 * B * (per_cell * L + attn), "head": 3.0 * B * head}


def measure_interleaved(cfg, B: int, steps: int, settings: list[tuple], device: str = "cpu",
                        fused_adamw: bool = True, profile: bool = False, single: bool = False) -> list[dict]:
    """Mean seconds per training step (after one warm-up) of each setting (logits per head chunk: 0 the
    plain unchunked head, None the objective's default; the linear head path; adaLN once per noise
    level) on one model and optimizer, interleaved step by step so that a change of load hits them alike."""
    torch.manual_seed(0)
    model = HDLMTransformer(cfg.model).to(device)
    obj = build_objective(cfg, cfg.model.vocab_size)
    default_chunk = obj.head_chunk
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **(adamw_kernel(list(model.parameters())) if fused_adamw
                                                           else {"foreach": False}))
    d = cfg.model.length
    y = torch.randint(cfg.model.vocab_size, (B, d), device=device)
    acc = [{"seconds": 0.0, "denoised": 0, "flops": 0.0, "faults": 0} for _ in settings]
    for k in range(steps + 1):
        for (chunk, linear, per_level), a in zip(settings, acc):
            obj.head_chunk = default_chunk if chunk is None else chunk
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with generic_head(not linear), adaln_per_cell(not per_level):
                dt, what = timed_step(model, opt, obj, y, k, single, obj.attention, device)
            if k:  # step 0 is the warm-up
                a["faults"] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                a["seconds"] += dt
                a["denoised"] += what["denoised"]
                a["flops"] += what["transformer"] + what["head"]
    out = []
    for (chunk, linear, per_level), a in zip(settings, acc):
        total = a["seconds"]
        r = {"layout": "single" if single else "efficient", "seconds_per_step": total / steps,
             "denoised_tokens_per_s": a["denoised"] / total, "tokens_per_s": B * d * steps / total,
             "gflops_per_s": a["flops"] / total / 1e9, "page_faults_per_step": a["faults"] / steps}
        if profile:
            obj.head_chunk = default_chunk if chunk is None else chunk
            with generic_head(not linear), adaln_per_cell(not per_level):
                r["top_ops"] = profile_step(model, obj, opt, y, B)
        out.append(r)
    return out


def profile_step(model, obj, opt, y, B: int, top: int = 6, attention: str | None = None) -> list[tuple[str, float]]:
    """The ``top`` ops by self CPU time (ms) of one efficient-layout training step (torch.profiler);
    ``opt`` None: no optimizer step; ``attention``: the objective's attention switch for this step."""
    from torch.profiler import ProfilerActivity, profile

    obj.attention = attention
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss, _ = obj(model, y, torch.arange(B) + 7, 99)
        loss.backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [(e.key, e.self_cpu_time_total / 1e3) for e in events]


# (logits per head chunk: 0 unchunked, None the default; fused AdamW; the linear head's in-place path;
# hdlm.allocator.keep_freed_memory; adaLN once per noise level (hdlm.conditioning.Conditioning))
VARIANTS = {"before (unchunked head, AdamW loop)": (0, False, True, False, False),
            "chunked head + loss (16 MiB chunks, generic head)": (1 << 22, False, False, False, False),
            "+ fused AdamW": (1 << 22, True, False, False, False),
            "+ linear head: weight gradient in place, 28 MiB chunks": (None, True, True, False, False),
            "+ malloc keeps freed memory (no page faults)": (7 << 20, True, True, True, False),
            "+ adaLN once per noise level": (7 << 20, True, True, True, True),
            "+ 112 MiB head chunks (the default once memory is kept)": (None, True, True, True, True)}


@contextlib.contextmanager
def adaln_per_cell(on: bool):
    """With ``on``, the noise embedding and adaLN run on every cell (before hdlm.conditioning.Conditioning
    computed them once per distinct level), to time the two side by side."""
    saved = Conditioning.__dict__["of"]  # the classmethod itself, restored as it was
    if on:
        Conditioning.of = Conditioning.per_cell
    try:
        yield
    finally:
        Conditioning.of = saved


@contextlib.contextmanager
def generic_head(on: bool):
    """With ``on``, hdlm.head_loss treats F.linear as an arbitrary head (the path before LinearHead:
    a fresh weight gradient per chunk, added), to time the two side by side."""
    saved = head_loss._as_linear
    if on:
        head_loss._as_linear = lambda head: None
    try:
        yield
    finally:
        head_loss._as_linear = saved


def run_variants(args, rate_before: float, device: str) -> list[dict]:
    """#16.3: the head/loss/optimizer/allocator changes one after another, at the default preset and at
    4 × 256 GPT-2. The variants that share an optimizer kind and the allocator setting run interleaved
    step by step on one model; the groups run in order (the allocator setting is not undone in a process)."""
    sizes = {"default preset (d=128, 4x256, BERT 30522, block w=4, batch 16)":
             (["model.length=128", "model.vocab_size=30522", "schedule.width=4"], 16),
             "4x256 GPT-2 (d=256, vocab 50257, block w=64, batch 4)":
             (["model.length=256", "model.vocab_size=50257", "schedule.width=64"], 4)}
    groups: dict[tuple, list[str]] = {}
    for variant, (_, fused, _, keep, _) in VARIANTS.items():
        groups.setdefault((fused, keep), []).append(variant)
    rows = []
    for (fused, keep), names in groups.items():
        if keep:
            assert keep_freed_memory(), "glibc mallopt unavailable (or HDLM_MALLOC=system)"
        for size, (over, B) in sizes.items():
            cfg = load_config(None, [*over, "model.dropout=0", "schedule.kind=block", "process.kind=gamma"])
            settings = [(VARIANTS[n][0], VARIANTS[n][2], VARIANTS[n][4]) for n in names]
            for variant, r in zip(names, measure_interleaved(cfg, B, args.steps, settings, device, fused,
                                                              args.profile)):
                r.update(size=size, variant=variant, gemm_fraction=r["gflops_per_s"] * 1e9 / rate_before)
                rows.append(r)
                print(f"| {size} | {variant} | {r['seconds_per_step']:.3f} | {r['tokens_per_s']:.0f} | "
                      f"{r['gflops_per_s']:.1f} | {100 * r['gemm_fraction']:.0f}% | {r['page_faults_per_step']:.0f} |",
                      flush=True)
    return sorted(rows, key=lambda r: list(sizes).index(r["size"]))  # stable: variants in order per size


ATTENTION = ("dense", "sparse")  # boolean-mask SDPA vs block-sparse (hdlm.sparse_attention / FlexAttention)


def layout_config(args, width: int):
    return load_config(None, [f"model.length={args.length}", f"model.vocab_size={args.vocab}",
                              f"model.n_layers={args.layers}", f"model.hidden={args.hidden}", "model.n_heads=4",
                              "model.dropout=0", "schedule.kind=block", f"schedule.width={width}",
                              "process.kind=gamma"])


def timed_step(model, opt, obj, y, k: int, single: bool, mode: str | None, device: str) -> tuple[float, dict]:
    """One training step with attention ``mode``: its seconds and what it computed (denoised tokens,
    query-key pairs computed, analytic FLOPs)."""
    B = y.shape[0]
    seeds = torch.arange(B) + 1000 * k
    obj.attention = mode
    _sync(device)
    t0 = time.perf_counter()
    loss, _ = obj(model, y, seeds, k, single=single)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    dt = time.perf_counter() - t0
    tc = obj.cells(y, seeds, k, single=single)
    lay = tc.cells.layout
    pairs = len(lay) ** 2
    computed = block_sparse_mask(lay, lay).computed if mode == "sparse" else pairs  # None: auto, as dense here
    n_out = tc.diff_index.numel() + tc.ce_index.numel()
    parts = flop_parts(obj.cfg, len(lay), n_out, int(dense_mask(lay, lay).sum()), B)
    return dt, {"denoised": B * tc.diff_index.numel(), "computed": computed, "pairs": pairs, **parts}


def compare_layouts(args, rate: float) -> None:
    """#16.2: efficient vs one interval, dense vs block-sparse attention, at ω = d/4 and d/16, interleaved."""
    divs = [div for div in (4, 16) if args.length // div >= 1]
    objs = {div: build_objective(layout_config(args, args.length // div), args.vocab) for div in divs}
    variants = [(div, single, mode) for div in divs for single in (False, True) for mode in ATTENTION]
    torch.manual_seed(0)
    model = HDLMTransformer(objs[divs[0]].cfg.model).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw_kernel(list(model.parameters())))
    y = torch.randint(args.vocab, (args.batch, args.length), device=args.device)
    acc = {v: {"seconds": 0.0} for v in variants}
    for k in range(args.steps + 1):  # step 0 of every variant is a warm-up
        for div, single, mode in variants:
            dt, info = timed_step(model, opt, objs[div], y, k, single, mode, args.device)
            if k:
                a = acc[(div, single, mode)]
                a["seconds"] += dt
                for key, value in info.items():
                    a[key] = a.get(key, 0) + value
    after = gemm_rate(args.device)
    rows = [summarise(div, single, mode, acc[(div, single, mode)], args, rate) for div, single, mode in variants]
    report(args, rows, rate, after, model, objs[divs[0]], y)


def summarise(div: int, single: bool, mode: str, a: dict, args, rate: float) -> dict:
    flops = a["transformer"] + a["head"]
    return {"width": f"d/{div}", "div": div, "layout": "single" if single else "efficient", "attention": mode,
            "seconds_per_step": a["seconds"] / args.steps, "denoised_tokens_per_s": a["denoised"] / a["seconds"],
            "tokens_per_s": args.batch * args.length * args.steps / a["seconds"],
            "gflops_per_s": flops / a["seconds"] / 1e9, "gemm_fraction": flops / a["seconds"] / rate,
            "pairs_computed": a["computed"] / a["pairs"],
            "gflop_per_denoised": {"transformer": a["transformer"] / a["denoised"] / 1e9,
                                   "head": a["head"] / a["denoised"] / 1e9}}


def ratios(rows: list[dict]) -> list[dict]:
    """Per ω: efficient ÷ single denoised tokens/s per attention mode and best ÷ best, the ideal, the FLOP model."""
    out = []
    for div in sorted({r["div"] for r in rows}):
        get = {(r["layout"], r["attention"]): r for r in rows if r["div"] == div}
        fpt = {lay: sum(get[(lay, "dense")]["gflop_per_denoised"].values()) for lay in ("efficient", "single")}
        best = {lay: max(get[(lay, m)]["denoised_tokens_per_s"] for m in ATTENTION) for lay in fpt}
        for mode in (*ATTENTION, "best ÷ best"):
            num, den = ((best["efficient"], best["single"]) if mode not in ATTENTION else
                        (get[("efficient", mode)]["denoised_tokens_per_s"], get[("single", mode)]["denoised_tokens_per_s"]))
            out.append({"width": f"d/{div}", "attention": mode, "ratio": num / den, "ideal": div / 2,
                        "target": 0.8 * div / 2, "flop_model": fpt["single"] / fpt["efficient"]})
    return out


def report(args, rows: list[dict], rate: float, after: float, model, obj, y) -> None:
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    machine = f"{platform.machine()}, {dev}, torch {torch.__version__}"
    print(f"fp32 GEMM: {rate / 1e9:.1f} GFLOP/s before, {after / 1e9:.1f} after ({machine}); "
          f"d = {args.length}, batch {args.batch}, {args.layers}x{args.hidden}, vocab {args.vocab}, {args.steps} steps")
    print("| ω | layout | attention | pairs computed | s/step | denoised tok/s | GFLOP/s | of GEMM |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['width']} | {r['layout']} | {r['attention']} | {100 * r['pairs_computed']:.0f}% | "
              f"{r['seconds_per_step']:.2f} | {r['denoised_tokens_per_s']:.0f} | {r['gflops_per_s']:.1f} | "
              f"{100 * r['gemm_fraction']:.0f}% |")
    rat = ratios(rows)
    print("\n| ω | attention | efficient ÷ single | ideal (d/ω)/2 | 0.8 × ideal | FLOP model allows |")
    print("|---|---|---|---|---|---|")
    for r in rat:
        print(f"| {r['width']} | {r['attention']} | {r['ratio']:.2f}× | {r['ideal']:.2f}× | {r['target']:.2f}× | "
              f"{r['flop_model']:.2f}× |")
    for r in rows:
        if r["attention"] == "dense":
            g = r["gflop_per_denoised"]
            print(f"FLOP model {r['width']} {r['layout']}: {g['transformer'] + g['head']:.4f} GFLOP per denoised "
                  f"token (transformer {g['transformer']:.4f} + head {g['head']:.4f}), forward + backward")
    top = {mode: profile_step(model, obj, None, y, args.batch, attention=mode) for mode in ATTENTION} if args.profile else {}
    for mode, ops in top.items():
        print(f"profile, efficient d/{rows[0]['div']} {mode}:", "; ".join(f"{k} {v:.0f} ms" for k, v in ops))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "gemm_gflops": [rate / 1e9, after / 1e9], "length": args.length,
                       "batch": args.batch, "model": f"{args.layers}x{args.hidden}, vocab {args.vocab}",
                       "rows": rows, "ratios": rat, "profile": top}, f, indent=2)


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
    ap.add_argument("--variants", action="store_true",
                    help="#16.3 table: unchunked head / chunked / fused AdamW / linear head, weight gradient in place / "
                    "malloc keeping freed memory / adaLN once per noise level / 112 MiB head chunks")
    ap.add_argument("--profile", action="store_true", help="top ops of one step (per variant with --variants, "
                    "per attention mode otherwise)")
    args = ap.parse_args()
    rate = gemm_rate(args.device)
    if args.variants:
        print(f"fp32 GEMM: {rate / 1e9:.1f} GFLOP/s")
        print("| size | variant | s/step | tokens/s | GFLOP/s | of GEMM | page faults/step |\n|---|---|---|---|---|---|---|")
        rows = run_variants(args, rate, args.device)
        after = gemm_rate(args.device)
        print(f"fp32 GEMM after: {after / 1e9:.1f} GFLOP/s")
        for r in rows if args.profile else []:
            print(r["size"], "|", r["variant"], "|", "; ".join(f"{k} {v:.0f} ms" for k, v in r["top_ops"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"gemm_gflops": [rate / 1e9, after / 1e9], "rows": rows}, f, indent=2)
        return
    compare_layouts(args, rate)


if __name__ == "__main__":
    main()
