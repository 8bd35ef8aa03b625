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


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    """--no-progress: the one switch for :mod:`hdlm.progress` (bar on a terminal, lines with total and ETA
    on stderr in logs and pipes)."""
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (terminal) or progress lines with total and ETA (logs, pipes)")


# --------------------------------------------------------------------------------------------
# checks every command runs before its first expensive step (issue #12: validation before work)


def check_at_least(value: int | None, flag: str, low: int = 1) -> None:
    """One line for a count or seed below ``low`` (None: the default, fine)."""
    from ..errors import HDLMError

    if value is not None and value < low:
        raise HDLMError(f"{flag} {value}: must be >= {low}")


def check_output_path(path: str | None, flag: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a folder, a path under a file,
    or a folder without write permission (missing folders are created by the writer)."""
    import os
    from pathlib import Path

    from ..errors import HDLMError

    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise HDLMError(f"{flag} '{path}' is a folder, expected a file name")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise HDLMError(f"{flag} '{path}': '{parent}' is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise HDLMError(f"{flag} '{path}': folder '{parent}' is not writable")


def check_output_folder(path: str | None, flag: str) -> None:
    """Refuse an output folder that is an existing file or cannot be created."""
    from pathlib import Path

    from ..errors import HDLMError

    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise HDLMError(f"{flag} '{path}' is an existing file, expected a folder")
    if path is not None and not Path(path).exists():
        check_output_path(path, flag)


def check_judge(spec: str | None) -> None:
    """The judge of ``--judge`` exists (a .gguf file with the GGUF magic, an HF folder, or a name in the
    local HF cache), checked without loading it."""
    from pathlib import Path

    from ..errors import HDLMError
    from ..evaluation.judge import DEFAULT_JUDGE

    if spec is None or spec == DEFAULT_JUDGE:
        return
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise HDLMError(f"judge file '{spec}' not found")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise HDLMError(f"judge file '{spec}' is not a GGUF file (no GGUF magic bytes)")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise HDLMError(f"judge folder '{spec}' has no config.json (expected a Hugging Face model folder)")
    elif path.exists():
        raise HDLMError(f"judge '{spec}': expected a .gguf file or a Hugging Face model folder")
    else:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
            raise HDLMError(f"judge '{spec}' is not in the local Hugging Face cache and hdlm never downloads: "
                            f"pass --judge PATH (a local HF folder or a .gguf file), or use the default 'smollm2'")
