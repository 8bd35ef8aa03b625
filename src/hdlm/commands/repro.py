"""Small-scale reproduction of the paper's tables: the ladder (Tables 1, 6-9), or any grid from a YAML file.

The ladder trains SEDD-absorb (γ = 0), γ-hybrids (γ = 0.01, 0.05), the ε-hybrid (ε = 0.01), MDLM,
AR (Quench + SHIFTED) and Block / Slide variants from one base config at equal token budget and
model size, and samples each at every ρ of ``--rhos`` (Alg. 3 vs ACS for the ε family). ``--grid
FILE`` instead sweeps γ, ε, ω, ρ, η, the configuration (and any config field) as the file says
(:mod:`hdlm.sweep`). Either way: resumable (finished cells are skipped), one table (OUT/report.md:
bounds on PTB test, generative perplexity, entropy per cell and setting) and one Pareto picture
(OUT/pareto.png: gen. PPL vs entropy, Fig. 4 left). Whether the paper's orderings hold at this
scale is a finding, not a foregone conclusion.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from . import add_config_help

SCALES = {
    # tiny: minutes per model on a 2-core CPU
    "tiny": ("tiny-ptb", ["model.length=64", "model.n_layers=2", "model.hidden=128", "model.n_heads=2",
                          "model.cond_dim=64", "schedule.width=8", "train.steps=150", "train.batch_size=16",
                          "train.lr=2e-3", "train.warmup=20", "train.eval_every=50", "train.save_every=150"]),
    # the paper's size (GPUs): OWT, d = 1024, 12 x 768
    "paper": ("owt-gamma-110m", ["schedule.width=256"]),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..sweep import LADDER

    add_config_help(p)
    p.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE", help="overrides applied to every entry")
    p.add_argument("--out", default="repro", help="output folder (default: repro); rerunning skips finished cells")
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny", help="tiny (CPU) or paper (GPUs)")
    p.add_argument("--grid", default=None, metavar="FILE",
                   help="sweep the grid of this YAML file (base, overrides, grid: gamma, epsilon, width, schedule, "
                        "configuration, rho, eta, or any dotted config field) instead of the ladder")
    p.add_argument("--only", default=None, help=f"ladder: comma-separated subset of: {', '.join(LADDER)}")
    p.add_argument("--rhos", default="0.5,1,2,4", help="ladder: generation rates ρ to sample at (default 0.5,1,2,4)")
    p.add_argument("--num-samples", type=int, default=4, help="samples per (model, sampler, ρ)")
    p.add_argument("--mc-samples", type=int, default=2, help="Monte-Carlo draws per test sequence")
    p.add_argument("--eval-sequences", type=int, default=128, help="test sequences for the bounds (default 128)")
    p.add_argument("--eval-data", default="ptb:test", metavar="SPEC",
                   help="data of the bounds, as eval ppl --data (default ptb:test)")
    p.add_argument("--judge", default="smollm2", help="judge LM ('none' to skip generative perplexity)")
    p.add_argument("--reuse", action="store_true",
                   help="(kept for old scripts: finished trainings and cells are always reused now)")


def _cells(args: argparse.Namespace):
    """(cells, base preset, base overrides) of the ladder or of ``--grid``."""
    from ..config import load_config
    from ..errors import HDLMError
    from ..sweep import LADDER, grid_cells, ladder_cells, read_grid

    preset, scale_overrides = SCALES[args.scale]
    if args.grid:
        if args.only:
            raise HDLMError("--only selects ladder entries; with --grid the file says what runs")
        spec = read_grid(args.grid)
        base = spec["base"] or preset
        base_overrides = list(spec["overrides"]) if spec["base"] else scale_overrides + list(spec["overrides"])
        kind = load_config(base, base_overrides + list(args.overrides)).schedule.kind
        return grid_cells(spec["grid"], base_kind=kind), base, base_overrides
    try:
        rhos = [float(r) for r in args.rhos.split(",")]
    except ValueError:
        raise HDLMError(f"--rhos = {args.rhos!r}: expected comma-separated numbers") from None
    if any(r <= 0 for r in rhos):
        raise HDLMError(f"--rhos = {args.rhos!r}: every ρ must be > 0")
    names = list(LADDER) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    return ladder_cells(names, rhos), preset, scale_overrides


def write_report(out: Path, results: dict, command: str, base: str, base_overrides: list[str]) -> Path:
    """OUT/report.md (the one table) and OUT/pareto.png (gen. PPL vs entropy)."""
    from ..plots.pareto import plot_pareto
    from ..sweep import pareto_front, sweep_rows, sweep_table

    rows = sweep_rows(results)
    picture = plot_pareto(rows, pareto_front(rows), out / "pareto.png", title="gen. PPL vs entropy (Fig. 4 left)")
    first = next(iter(results.values()), {})
    data = first.get("eval_data", {}).get("spec", "the test split")
    lines = ["# Small-scale reproduction", "", f"Command: `{command}`", "",
             f"Base: `{base}` with `{' '.join(base_overrides)}`; every cell sees the same training tokens "
             f"({first.get('train', {}).get('tokens', 0):,} each).", "",
             f"Bounds: perplexity upper bounds on {data} (lower is better; `exact` for AR). Samples: generative "
             f"perplexity under the judge (token-weighted) and token entropy; ★ = on the Pareto front.", "",
             sweep_table(rows), ""]
    lines += ["![gen. PPL vs entropy](pareto.png)", ""] if picture else ["_No judge: no gen. PPL, no picture._", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def run(args: argparse.Namespace) -> int:
    from ..errors import HDLMError
    from ..experiment import ExperimentPlan
    from ..sweep import run_cells

    for name in ("num_samples", "mc_samples", "eval_sequences"):
        if getattr(args, name) < 1:
            raise HDLMError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    cells, base, base_overrides = _cells(args)
    judge = None
    if args.judge.lower() != "none":
        from ..evaluation.judge import load_judge

        judge = load_judge(args.judge)
    plan = ExperimentPlan(num_samples=args.num_samples, mc_samples=args.mc_samples,
                          eval_sequences=args.eval_sequences, eval_data=args.eval_data, judge=None, trace=False,
                          pictures=False)
    out = Path(args.out)
    results = run_cells(cells, out, base, base_overrides, list(args.overrides), plan, judge=judge)
    command = " ".join(shlex.quote(a) for a in getattr(args, "_argv", ["hdlm", "repro"]))
    path = write_report(out, results, command, base, base_overrides)
    print(f"hdlm repro: report written to {path}")
    return 0
