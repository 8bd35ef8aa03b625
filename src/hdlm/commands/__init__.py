"""CLI subcommands; each module has ``add_arguments(parser)`` and ``run(args) -> int``."""

import argparse


def add_config_help(parser: argparse.ArgumentParser, before: str = "") -> None:
    """List every config field (default, description, allowed values) under the command's ``--help``."""
    from ..config import field_help

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (before + "\n\n" if before else "") + \
        "config fields (KEY=VALUE; default: description [allowed]):\n" + field_help()
