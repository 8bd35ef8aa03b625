"""Small-scale reproduction of the paper's ladder (Tables 1, 6-9) at equal token budget and model size.

Trains SEDD-absorb (γ = 0), γ-hybrids (γ = 0.01, 0.05), the ε-hybrid (ε = 0.01), MDLM, AR
(Quench + SHIFTED) and Block / Slide variants from one base config, then reports side by side the
perplexity bounds on PTB test and, for each sampler (Alg. 3 vs ACS for the ε family) and rate
ρ ∈ {1/2, 1, 2, 4}, generative perplexity and entropy. Whether the paper's orderings hold at this
scale is a finding, not a foregone conclusion.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from . import add_config_help

# name -> (overrides over the base, sampler settings: list of (sampler, eta))
LADDER: dict[str, tuple[list[str], list[tuple[str, float | None]]]] = {
    "sedd-absorb-flat": (["process.kind=absorb", "schedule.kind=flat"], [("analytic", None)]),
    "gamma0.01-flat": (["process.kind=gamma", "process.gamma=0.01", "schedule.kind=flat"], [("analytic", None)]),
    "gamma0.05-flat": (["process.kind=gamma", "process.gamma=0.05", "schedule.kind=flat"], [("analytic", None)]),
    "gamma0.01-block": (["process.kind=gamma", "process.gamma=0.01", "schedule.kind=block"], [("analytic", None)]),
    "gamma0.01-slide": (["process.kind=gamma", "process.gamma=0.01", "schedule.kind=slide"], [("analytic", None)]),
    "gamma0.01-block-shifted": (["process.kind=gamma", "process.gamma=0.01", "schedule.kind=block",
                                 "model.configuration=shifted"], [("analytic", None)]),
    "mdlm-flat": (["process.kind=mdlm", "schedule.kind=flat", "model.time_conditioning=false"], [("ancestral", None)]),
    "epsilon0.01-flat": (["process.kind=epsilon", "process.epsilon=0.01", "schedule.kind=flat",
                          "model.time_conditioning=false"], [("ancestral", None), ("acs", 0.01)]),
    "epsilon0.01-block": (["process.kind=epsilon", "process.epsilon=0.01", "schedule.kind=block",
                           "model.time_conditioning=false"], [("ancestral", None), ("acs", 0.01)]),
    "ar": (["schedule.kind=quench", "model.configuration=shifted"], [("ar", None)]),
}

SCALES = {
    # tiny: minutes per model on a 2-core CPU
    "tiny": ("tiny-ptb", ["model.length=64", "model.n_layers=2", "model.hidden=128", "model.n_heads=2",
                          "model.cond_dim=64", "schedule.width=8", "train.steps=150", "train.batch_size=16",
                          "train.lr=2e-3", "train.warmup=20", "train.eval_every=50", "train.save_every=150"]),
    # the paper's size (GPUs): OWT, d = 1024, 12 x 768
    "paper": ("owt-gamma-110m", ["schedule.width=256"]),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_help(p)
    p.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE", help="overrides applied to every entry")
    p.add_argument("--out", default="repro", help="output folder (default: repro)")
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny", help="tiny (CPU) or paper (GPUs)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(LADDER)}")
    p.add_argument("--rhos", default="0.5,1,2,4", help="generation rates ρ to sample at (default 0.5,1,2,4)")
    p.add_argument("--num-samples", type=int, default=4, help="samples per (model, sampler, ρ)")
    p.add_argument("--mc-samples", type=int, default=2, help="Monte-Carlo draws per test sequence")
    p.add_argument("--eval-sequences", type=int, default=128, help="PTB test sequences for the bounds")
    p.add_argument("--judge", default="smollm2", help="judge LM ('none' to skip generative perplexity)")
    p.add_argument("--reuse", action="store_true", help="reuse trained models found in OUT/NAME/run")


def _cell(entry: dict) -> str:
    gp = entry.get("gen_ppl", {}).get("ppl_token_weighted")
    g = "n/a" if gp is None else f"{gp:.0f}"
    return f"{g} / {entry['entropy']:.2f}"


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..errors import HDLMError
    from ..experiment import ExperimentPlan, SampleSetting, run_experiment

    names = list(LADDER) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in LADDER]
    if unknown:
        raise HDLMError(f"--only: unknown entry '{unknown[0]}' (entries: {', '.join(LADDER)})")
    try:
        rhos = [float(r) for r in args.rhos.split(",")]
    except ValueError:
        raise HDLMError(f"--rhos = {args.rhos!r}: expected comma-separated numbers") from None
    preset, scale_overrides = SCALES[args.scale]
    out = Path(args.out)
    judge = None
    if args.judge.lower() != "none":
        from ..evaluation.judge import load_judge

        judge = load_judge(args.judge)
    results = {}
    for name in names:
        overrides, samplers = LADDER[name]
        cfg = load_config(preset, scale_overrides + overrides + list(args.overrides))
        ar = cfg.schedule.kind == "quench"
        settings = [SampleSetting(sampler=s, rho=r, eta=eta) for s, eta in samplers for r in ([1.0] if ar else rhos)]
        plan = ExperimentPlan(num_samples=args.num_samples, settings=settings, mc_samples=args.mc_samples,
                              eval_sequences=args.eval_sequences, judge=None, trace=False, pictures=False)
        print(f"hdlm repro: {name}: {' '.join(overrides)}", flush=True)
        results[name] = run_experiment(cfg, out / name, plan, judge=judge, skip_training=args.reuse)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))

    lines = ["# Small-scale reproduction (PTB)", "",
             f"Command: `{' '.join(shlex.quote(a) for a in getattr(args, '_argv', ['hdlm', 'repro']))}`", "",
             f"Base: preset `{preset}` with `{' '.join(scale_overrides)}`; every entry sees the same training tokens.",
             "", "## Perplexity upper bounds on PTB test (lower is better)", "",
             "| model | training tokens | discrete bound | continuous bound |", "|---|---|---|---|"]
    for name, r in results.items():
        b = r["bounds"]
        fmt = lambda k: f"{b[k]['ppl']:.1f} ± {b[k]['ppl'] * b[k]['stderr']:.1f}" if k in b else "—"  # noqa: E731
        exact = f"{b['exact']['ppl']:.1f} (exact)" if "exact" in b else None
        lines.append(f"| {name} | {r['train']['tokens']:,} | {exact or fmt('discrete')} | {exact or fmt('continuous')} |")
    lines += ["", "## Samples: generative perplexity (judge, token-weighted) / entropy", "",
              "| model | sampler | " + " | ".join(f"ρ = {r:g}" for r in rhos) + " |",
              "|---|---|" + "---|" * len(rhos)]
    for name, r in results.items():
        by_sampler: dict = {}
        for e in r["samples"]:
            by_sampler.setdefault(e["setting"].split(", ρ=")[0], {})[e["rho"]] = e
        for sampler, per_rho in by_sampler.items():
            cells = [(_cell(per_rho[rho]) if rho in per_rho else "—") for rho in rhos]
            lines.append(f"| {name} | {sampler} | " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"hdlm repro: report written to {out / 'report.md'}")
    return 0
