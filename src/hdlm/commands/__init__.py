"""CLI subcommands; each module has ``add_arguments(parser)`` and ``run(args) -> int``."""

import argparse


def add_config_help(parser: argparse.ArgumentParser, before: str = "") -> None:
    """List every config field (default, description, allowed values) under the command's ``--help``."""
    from ..config import field_help

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (before + "\n\n" if before else "") + \
        "config fields (KEY=VALUE; default: description [allowed]):\n" + field_help()


def add_schedule_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """--schedule/--width/--rho/--steps over the checkpoint's hyperschedule (merged by the one rule of
    :func:`hdlm.hyperschedule.from_config`: switching between block and slide keeps the checkpoint's ω)."""
    from ..config import SCHEDULE_KINDS

    parser.add_argument("--schedule", default=None, choices=SCHEDULE_KINDS,
                        help=f"{prefix}hyperschedule kind (default: the checkpoint's schedule.kind)")
    parser.add_argument("--width", type=int, default=None, metavar="W",
                        help=f"{prefix}window width omega, block/slide (default: the checkpoint's)")
    parser.add_argument("--rho", type=float, default=None, metavar="R",
                        help=f"{prefix}generation rate rho, tokens per step (default: the checkpoint's)")
    parser.add_argument("--steps", type=int, default=None, metavar="T", help=f"{prefix}number of steps T (flat only)")
