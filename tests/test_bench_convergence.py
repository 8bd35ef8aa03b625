"""The glue of bench/convergence.py that its table's claims rest on: token accounting of Stage 2,
the configs each family gets, and the ratios the report prints (the bench itself is too slow for CI)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("convergence_bench", ROOT / "bench" / "convergence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_stage2_counts_its_ar_pretraining_in_the_budget(bench, tmp_path):
    # "equal token budgets": a Stage-2 run at B trains its AR model on B/2 and fine-tunes on B/2,
    # and each AR model is trained once, before the run that starts from it.
    runs = bench.run_plan(["ar", "stage2-block"], (1024, 2048), 0.5)
    names = [r.name for r in runs]
    assert names == ["ar-1024", "ar-512", "stage2-block-1024", "ar-2048", "stage2-block-2048"]
    scale = bench.SCALES["quick"]
    s2 = next(r for r in runs if r.name == "stage2-block-2048")
    assert s2.init_from.name == "ar-1024"
    cfg = bench.run_config(s2, scale, tmp_path / "corpus", tmp_path)
    assert cfg.train.steps * scale.batch * scale.length == 1024
    assert cfg.train.init_from == str(tmp_path / "runs" / "ar-1024")
    assert (cfg.schedule.kind, cfg.model.configuration, cfg.process.kind) == ("block", "shifted", "gamma")
    ar = bench.run_config(runs[0], scale, tmp_path / "corpus", tmp_path)
    assert (ar.schedule.kind, ar.model.configuration) == ("quench", "shifted")
    assert ar.train.steps * scale.batch * scale.length == 1024 and ar.train.init_from is None
    assert ar.data.dataset == f"{tmp_path / 'corpus'}/{{split}}.txt"


def test_every_family_builds_a_valid_config(bench, tmp_path):
    scale = bench.SCALES["full"]
    for model in bench.MODELS:
        cfg = bench.run_config(bench.Run(model, 262144), scale, tmp_path, tmp_path)
        assert cfg.train.steps == 256 and cfg.model.length == scale.length


def test_report_ratios_and_infinite_estimates(bench):
    limit, source = 1.5, 1.4
    ref = {"N": 10, "n_blocks": 2, "d": 4, "n_tokens": 8, "uniform_allowed_fraction": 0.1,
           "nll_per_token": {"source": source, "limit": limit, "limit_stationary_first": limit,
                             "entropy_rate": 1.45, "unigram": 2.0}}
    ref["ppl"] = {k: math.exp(v) for k, v in ref["nll_per_token"].items()}
    bound = {"nll_per_token": limit + math.log(2.0), "stderr": 0.01, "n_infinite": 0}
    runs = [{"model": "m", "tokens": 4096, "bounds": {"discrete": {**bound, "nll_per_token": math.inf, "n_infinite": 3},
                                                     "continuous": bound},
             "samples": {"1": {"sampler": "analytic", "fraction": 0.25}}}]
    md = bench.markdown({"reference": ref, "runs": runs, "settings": {"rhos": [0.5, 1.0], "num_samples": 4}})
    assert "| m | 4,096 | discrete | inf | 0.0100 | inf | inf | inf | 3 |" in md
    assert f"| m | 4,096 | continuous | {limit + math.log(2):.4f} | 0.0100 | {2 * math.exp(limit):.3f} | " \
           f"{2 * math.exp(limit - source):.3f} | 2.000 | 0 |" in md
    assert "| m | 4,096 | analytic | — | 0.2500 |" in md


def test_results_doc_describes_the_full_scale_the_bench_runs(bench):
    # bench/RESULTS.md states the full run's sizes: it must follow SCALES["full"]
    full = bench.SCALES["full"]
    text = " ".join((ROOT / "bench" / "RESULTS.md").read_text().split())
    assert " / ".join(f"{b:,}" for b in full.budgets) + " training tokens" in text
    assert f"{full.eval_blocks} test blocks ({full.eval_blocks * full.length:,} tokens)" in text
    assert f"M = {full.mc_samples} draws per estimator, {full.num_samples} samples per ρ" in text
    assert f"d = {full.length}, {full.layers} layers × {full.hidden}, batch {full.batch}" in text
    assert f"{full.words} word types" in text
