"""Train a model: any process x hyperschedule x ALIGNED/SHIFTED (paper App. B.1).

Examples::

    hdlm train                                   # the tiny-ptb preset, CPU-sized
    hdlm train --config owt-gamma-110m train.batch_size=64 --out runs/owt
    hdlm train --resume runs/owt                 # continue exactly where the last checkpoint left off
    hdlm train --config owt-gamma-block-stage2 --init-from runs/owt   # Stage 2 from a Stage-1 run
    hdlm train --init-from hdlm-group/hdlm-base-gamma-0.01 --out runs/ft schedule.width=16   # a published model
    torchrun --nproc_per_node=8 -m hdlm train --config owt-gamma-110m
"""

from __future__ import annotations

import argparse

from . import add_config_help, add_progress_option

DEFAULT_PRESET = "tiny-ptb"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_help(p, "examples:" + __doc__.split("Examples::", 1)[1].rstrip())
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.lr=1e-3")
    p.add_argument("--config", "-c", metavar="PRESET|FILE",
                   help=f"a preset name or a YAML file (default: {DEFAULT_PRESET}; with --resume or --init-from: "
                        f"the checkpoint's)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a dotted config override (repeatable)")
    p.add_argument("--resume", metavar="DIR", help="run folder (or checkpoint folder) to continue exactly")
    p.add_argument("--out", metavar="DIR", help="run folder (sets train.out_dir)")
    p.add_argument("--init-from", metavar="CKPT", help="Stage 2: start from this checkpoint's weights (train.init_from): "
                   "a folder, an official checkpoint or a Hub id; without --config its config is the base")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:K (sets train.device)")
    p.add_argument("--steps", type=int, help="number of optimizer steps (sets train.steps)")
    add_progress_option(p)


def build_config(args: argparse.Namespace):
    """The run's config: preset/file (or the resumed checkpoint's), then overrides, then the flags."""
    from ..checkpoint import read_config
    from ..config import load_config, parse_overrides

    overrides = parse_overrides(list(args.overrides) + list(args.sets))
    for flag, key in (("out", "train.out_dir"), ("init_from", "train.init_from"), ("device", "train.device"),
                      ("steps", "train.steps")):
        value = getattr(args, flag)
        if value is not None:  # taken verbatim: a path is not YAML
            overrides[key] = value
    if args.resume and not args.config:
        return read_config(args.resume).replace(overrides)
    if args.init_from and not args.config:  # Stage 2 of any checkpoint: its config is the base
        from ..hub import read_pretrained_config

        return read_pretrained_config(args.init_from).replace(overrides)
    return load_config(args.config or DEFAULT_PRESET, overrides)


def run(args: argparse.Namespace) -> int:
    from ..train import train

    cfg = build_config(args)
    train(cfg, resume=args.resume, progress=not args.no_progress)
    return 0
