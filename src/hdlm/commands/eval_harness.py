"""``hdlm eval harness``: lm-evaluation-harness tasks on a checkpoint (the ``hdlm`` model of :mod:`hdlm.harness`).

Examples::

    hdlm eval harness --checkpoint runs/ptb --tasks lambada_openai,piqa --limit 200 --json harness.json
    hdlm eval harness --checkpoint runs/ptb --tasks my_task --include-path tasks/ --mc-samples 16
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..config import SAMPLER_NAMES, VARIATIONAL_CHAINS
from ..errors import HDLMError
from . import add_schedule_options


def add_parser(sub) -> None:
    h = sub.add_parser("harness", help="lm-evaluation-harness tasks (loglikelihood: exact for AR, else a bound)",
                       description="Run lm-evaluation-harness tasks on a checkpoint. loglikelihood is exact for "
                                   "Quench + SHIFTED (AR) and otherwise minus an estimate of the discrete upper "
                                   "bound on the NLL (the context is a settled prompt); generation uses the samplers.")
    h.add_argument("--checkpoint", required=True, metavar="DIR|ORG/NAME",
                   help="checkpoint, run or pretrained folder, official checkpoint or Hugging Face Hub id")
    h.add_argument("--tasks", required=True, metavar="T1,T2",
                   help="comma-separated lm-eval task (or group) names, e.g. lambada_openai,piqa")
    h.add_argument("--include-path", default=None, metavar="DIR",
                   help="also read task YAML files from this folder (local tasks)")
    h.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples (default: the task's)")
    h.add_argument("--limit", type=float, default=None, metavar="N",
                   help="at most N documents per task (N < 1: that fraction)")
    h.add_argument("--mc-samples", type=int, default=8, metavar="M",
                   help="trajectories per loglikelihood request for the bound (default 8; AR is exact)")
    h.add_argument("--variational", default="auto", choices=VARIATIONAL_CHAINS,
                   help="the bound's noising chain: auto (default), forward or absorb")
    h.add_argument("--sampler", default=None, choices=SAMPLER_NAMES,
                   help="sampler for generate_until and the greedy check (default: the checkpoint's)")
    h.add_argument("--no-greedy-check", action="store_true",
                   help="skip the top-k = 1 decode that decides is_greedy for non-AR models (is_greedy = False)")
    add_schedule_options(h, "to evaluate under: ")
    h.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the draws and of lm-eval (default 0)")
    h.add_argument("--device", default="auto", metavar="DEV", help="auto | cpu | cuda | cuda:K (default auto)")
    h.add_argument("--log-samples", action="store_true", help="keep every request's response in the JSON")
    h.add_argument("--json", metavar="OUT", default=None,
                   help="write lm-eval's results with hdlm's provenance (what the likelihoods are) to this file")
    h.set_defaults(_eval=run_harness)


def _checked(args: argparse.Namespace) -> list[str]:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise HDLMError("--tasks: give at least one task name")
    if args.mc_samples < 1:
        raise HDLMError(f"--mc-samples {args.mc_samples}: must be >= 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise HDLMError(f"--num-fewshot {args.num_fewshot}: must be >= 0")
    if args.limit is not None and args.limit <= 0:
        raise HDLMError(f"--limit {args.limit:g}: must be > 0")
    if args.include_path and not Path(args.include_path).is_dir():
        raise HDLMError(f"--include-path {args.include_path}: not a folder")
    return tasks


def run_harness(args: argparse.Namespace) -> int:
    tasks = _checked(args)
    from ..harness import HDLMHarnessLM, evaluate

    lm = HDLMHarnessLM(args.checkpoint, schedule=args.schedule, width=args.width, rho=args.rho, steps=args.steps,
                       mc_samples=args.mc_samples, variational=args.variational, sampler=args.sampler,
                       seed=args.seed, greedy_check=not args.no_greedy_check, device=args.device)
    try:
        results = evaluate(lm, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                           limit=args.limit, seed=args.seed, log_samples=args.log_samples)
    except KeyError as e:  # lm-eval's unknown task
        raise HDLMError(f"--tasks: unknown task {e} (see lm-eval --tasks list, or --include-path)") from None
    from lm_eval.utils import make_table

    print(make_table(results))
    print(lm.likelihood_kind)
    if args.json:
        results["hdlm"]["command"] = shlex.join(getattr(args, "_argv", None) or sys.argv)
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0
