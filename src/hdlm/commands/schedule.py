"""Print or draw a hyperschedule τ[t, i] (paper §3.1, Fig. 2) with its width ω, rate ρ and Eq. (1) splits.

Examples::

    hdlm schedule --kind slide --length 16 --width 4
    hdlm schedule --kind block --length 1024 --width 16 --rho 2 --json
    hdlm schedule --kind flat --length 64 --steps 32 --png flat.png
"""

from __future__ import annotations

import argparse
import json

from typing import TYPE_CHECKING

from ..config import SCHEDULE_KINDS as KINDS
from ..errors import HDLMError

if TYPE_CHECKING:  # pragma: no cover
    from ..hyperschedule import Hyperschedule

# Print the whole table only while it stays readable in a terminal.
MAX_PRINT_D = 80
MAX_PRINT_T = 200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=KINDS, default="block",
                        help="hyperschedule of Fig. 2: quench (AR), flat (diffusion), block, slide (default: block)")
    parser.add_argument("--length", type=int, required=True, metavar="D", help="sequence length d")
    parser.add_argument("--width", type=int, default=None, metavar="W",
                        help="window width omega for block/slide (default: max(1, d // 4))")
    parser.add_argument("--rho", type=float, default=None, metavar="R",
                        help="generation rate rho in tokens per step (default 1; block/slide need width/rho "
                             "to be an integer, flat needs d/rho to be one; quench only allows 1)")
    parser.add_argument("--steps", type=int, default=None, metavar="T",
                        help="flat only: number of generation steps T (default d/rho)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="print JSON (kind, d, T, levels, width, rho, rate, table) instead of the text table")
    out.add_argument("--png", metavar="FILE", default=None,
                     help="write a Fig. 2-style heat map to FILE and print its path")


def format_table(hs: "Hyperschedule") -> str:
    """τ[t, i] one row per step, each row followed by its Eq. (1) split for t → t+1, then a summary."""
    lines = []
    if hs.d <= MAX_PRINT_D and hs.T <= MAX_PRINT_T:
        cell = len(str(hs.levels))
        sep = "" if cell == 1 else " "
        t_w = len(str(hs.T))
        lines.append(f"{'t':>{t_w}} | tau[t, i] for i = 0..{hs.d - 1}  (settled | active | worthless for t -> t+1)")
        for t, row in enumerate(hs.table.tolist()):
            cells = sep.join(f"{v:>{cell}}" for v in row)
            split = ""
            if t < hs.T:
                s, a = hs.split(t)
                split = f"  [0,{s}) [{s},{a}) [{a},{hs.d})"
            lines.append(f"{t:>{t_w}} | {cells}{split}")
    else:
        lines.append(f"(table of {hs.T + 1} x {hs.d} not printed: use --json or --png)")
    lines.append(f"{hs.kind}: d = {hs.d}, T = {hs.T}, levels = {hs.levels}, width = {hs.width}, "
                 f"rho = {hs.rho:g}, rate d/T = {hs.rate:.4g}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..hyperschedule import make_hyperschedule

    hs = make_hyperschedule(args.kind, args.length, width=args.width, rho=args.rho, steps=args.steps)
    if args.json:
        print(json.dumps(hs.to_dict()))
    elif args.png:
        from ..plots.schedule import plot_hyperschedule

        try:
            print(plot_hyperschedule(hs, args.png))
        except OSError as e:
            raise HDLMError(f"cannot write '{args.png}': {e.strerror or e}") from None
    else:
        print(format_table(hs))
    return 0
