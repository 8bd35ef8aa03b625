"""The ``hdlm`` command line: one subcommand per module under :mod:`hdlm.commands`.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``. Any
:class:`~hdlm.errors.HDLMError` (bad input) is printed as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ._version import __version__
from .allocator import keep_freed_memory
from .errors import HDLMError

# name -> (module, one-line help)
COMMANDS = {
    "schedule": ("hdlm.commands.schedule", "print or draw a hyperschedule (paper Fig. 2)"),
    "train": ("hdlm.commands.train", "train a model (any process x hyperschedule x ALIGNED/SHIFTED)"),
    "convert": ("hdlm.commands.convert", "convert a pretrained causal LM (HF, GGUF) into a hybrid diffusion LM"),
    "sample": ("hdlm.commands.sample", "generate text from a checkpoint (KV-cached samplers)"),
    "eval": ("hdlm.commands.eval", "evaluate: perplexity bound, generative perplexity, entropy, MAUVE"),
    "run": ("hdlm.commands.run", "the main job: train, sample and evaluate, then write a report"),
    "repro": ("hdlm.commands.repro", "small-scale reproduction of the paper's tables"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the subcommands' parsers are of this class too)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; KEY=VALUE overrides are accepted anywhere on the line, also between options."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hdlm",
        description="Hybrid diffusion language models: hyperschedules, gamma/epsilon-hybrid processes, "
        "KV-cached samplers and the paper's evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"hdlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    args._argv = ["hdlm", *(sys.argv[1:] if argv is None else argv)]  # recorded in reports for reproduction
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    keep_freed_memory()  # no page faults per step from malloc's mmap / trimming (hdlm.allocator)
    try:
        return int(args._run(args) or 0)
    except HDLMError as e:
        print(f"hdlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"hdlm {args.command}: error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hdlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
