"""Convert a pretrained causal LM into a hybrid diffusion LM (the paper's §5 plan; docs/conversion.md).

Examples::

    hdlm convert                                    # SmolLM2-135M -> SHIFTED eps-hybrid, Block omega = 4 (PTB)
    hdlm convert --config smollm2-ptb-block --train # ... then fine-tune it (hdlm train --init-from)
    hdlm convert --config smollm2-ptb-slide         # the Slide preset
    hdlm convert --from ./my-hf-folder --out runs/mine/converted schedule.width=8
    hdlm convert --from gemma3-270m --out runs/gemma/converted
    hdlm train --config runs/smollm2-ptb-block/converted/config.yaml --init-from runs/smollm2-ptb-block/converted
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

DEFAULT_PRESET = "smollm2-ptb-block"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "examples:" + __doc__.split("Examples::", 1)[1].rstrip()
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.lr=1e-4")
    p.add_argument("--config", "-c", metavar="PRESET|FILE", default=DEFAULT_PRESET,
                   help=f"the hybrid to convert into (default: {DEFAULT_PRESET})")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a dotted config override (repeatable)")
    p.add_argument("--from", dest="source", metavar="SOURCE",
                   help="smollm2 | gemma3-270m | a .gguf file | an HF model folder | a Hub id in the local "
                        "cache (default: model.hf_source)")
    p.add_argument("--out", metavar="DIR", help="the converted model's folder (default: <train.out_dir>/converted)")
    p.add_argument("--cache-dir", metavar="DIR", help="where GGUF conversions are cached (default: data.cache_dir)")
    p.add_argument("--train", action="store_true", help="then fine-tune it: hdlm train --init-from the folder")


def run(args: argparse.Namespace) -> int:
    from ..config import _parse_overrides, load_config
    from ..conversion import convert_to_folder

    cfg = load_config(args.config, _parse_overrides(list(args.overrides) + list(args.sets)))
    out = Path(args.out) if args.out else Path(cfg.train.out_dir) / "converted"
    print(f"hdlm convert: {args.source or cfg.model.hf_source} -> {out}", flush=True)
    folder = convert_to_folder(args.source, cfg, out, cache_dir=args.cache_dir)
    from ..checkpoint import read_config

    done = read_config(folder)
    m = done.model
    print(f"hdlm convert: {m.hf_source} ({m.hf_config.get('model_type')}, N = {m.vocab_size}) as a "
          f"{m.configuration.upper()} {done.process.kind}-hybrid, {done.schedule.kind} omega = {done.schedule.width} "
          f"-> {folder}", flush=True)
    cfg_file = shlex.quote(str(folder / "config.yaml"))
    print(f"hdlm convert: fine-tune with: hdlm train --config {cfg_file} --init-from {shlex.quote(str(folder))}",
          flush=True)
    if args.train:
        from ..train import train

        train(done.replace({"train.init_from": str(folder)}))
    return 0
