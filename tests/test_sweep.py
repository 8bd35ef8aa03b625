"""Sweeps (hdlm.sweep, ``hdlm repro --grid``): grid expansion, the Pareto front by hand, and a tiny grid
run end to end through the same code as the ladder — resumable (finished cells skipped, a cut
training continued), one table, one picture."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from conftest import char_tokenizer_dir
from hdlm.errors import HDLMError
from hdlm.experiment import ExperimentPlan
from hdlm.sweep import (CELL_FILE, LADDER, cell_config, grid_cells, ladder_cells, pareto_front, read_grid, run_cells,
                        sweep_rows)


def test_pareto_front_by_hand():
    rows = [{"gen_ppl": g, "entropy": h} for g, h in [(100, 3.0), (80, 2.5), (120, 3.5), (90, 2.4), (None, 5.0),
                                                      (80, 2.5)]]
    # (90, 2.4) is beaten by (80, 2.5) in both; a tie does not dominate; no gen. PPL is never on the front
    assert pareto_front(rows) == [True, True, True, False, False, True]


def test_grid_expands_training_and_sampling_axes():
    grid = {"gamma": [0.0, 0.01], "epsilon": [0.01], "schedule": ["block", "flat"], "width": [4, 8],
            "rho": [1, 2], "eta": [0.0, 0.01], "train.lr": [1e-3]}
    cells = grid_cells(grid)
    names = [c.name for c in cells]
    assert len(names) == len(set(names)) == 3 * 2 + 3  # flat cells are not multiplied by ω
    by = {c.name: c for c in cells}
    eps = by["epsilon0.01-block-w8-train.lr=0.001"]
    assert eps.overrides == ["process.kind=epsilon", "process.epsilon=0.01", "model.time_conditioning=false",
                             "schedule.kind=block", "schedule.width=8", "train.lr=0.001"]
    assert [(s.sampler, s.rho, s.eta) for s in eps.settings] == [("ancestral", 1, 0.0), ("ancestral", 2, 0.0),
                                                                   ("acs", 1, 0.01), ("acs", 2, 0.01)]
    flat = by["gamma0-flat-train.lr=0.001"]
    assert "schedule.width=4" not in flat.overrides and [(s.sampler, s.rho) for s in flat.settings] == \
        [("auto", 1), ("auto", 2)]
    q = grid_cells({"schedule": ["quench"], "configuration": ["shifted"], "rho": [1, 4]})
    assert [c.name for c in q] == ["quench-shifted"] and [s.rho for s in q[0].settings] == [1.0]  # AR: ρ = 1


def test_ladder_is_cells_too():
    cells = ladder_cells(list(LADDER), [1.0, 4.0])
    assert [c.name for c in cells] == list(LADDER)
    assert [(s.sampler, s.rho) for s in cells[-1].settings] == [("ar", 1.0)]
    assert [(s.sampler, s.eta, s.rho) for s in cells[7].settings] == [("ancestral", None, 1.0), ("ancestral", None, 4.0),
                                                                      ("acs", 0.01, 1.0), ("acs", 0.01, 4.0)]
    with pytest.raises(HDLMError, match="--only: unknown entry 'gpt'"):
        ladder_cells(["gpt"], [1.0])


@pytest.mark.parametrize("grid,match", [
    ({"gama": [0.1]}, "unknown axis 'gama'"), ({"gamma": []}, "grid gamma: empty list"),
    ({"gamma": ["high"]}, "grid gamma: .* must be a list of float"), ({"rho": [0]}, "rho must be > 0"),
    ({}, "expected a mapping of axes")])
def test_bad_grids_are_one_line(grid, match):
    with pytest.raises(HDLMError, match=match):
        grid_cells(grid)


class FakeJudge:
    """Per-token NLL 1 + (length of the text mod 7) / 10 for each word: deterministic, no model."""

    name = "fake"

    def nll(self, texts, batch_size=8, max_length=None, progress=True):
        return [np.full(max(1, len(t.split())), 1.0 + (len(t) % 7) / 10, dtype=np.float32) for t in texts]


@pytest.fixture
def setup(tmp_path):
    rng = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text("".join(" ".join(rng.choice("a cat sat on the mat and ran".split()) for _ in range(8)) + " .\n"
                            for _ in range(200)))
    tok = char_tokenizer_dir(tmp_path / "tok")
    base = tmp_path / "base.yaml"
    base.write_text(json.dumps({  # YAML is a superset of JSON
        "base": "tiny-ptb",
        "model": {"length": 16, "n_layers": 1, "hidden": 16, "n_heads": 2, "cond_dim": 8, "pad_vocab_to": 8,
                  "dropout": 0.0},
        "schedule": {"kind": "block", "width": 4},
        "data": {"dataset": str(text), "tokenizer": str(tok), "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 3, "batch_size": 2, "warmup": 1, "device": "cpu", "log_every": 1, "eval_every": 3,
                  "eval_batches": 1, "save_every": 1}}))
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"base: {base}\noverrides: [train.lr=0.003]\n"
                    "grid:\n  gamma: [0.01]\n  epsilon: [0.01]\n  rho: [1, 2]\n  eta: [0.0, 0.01]\n")
    plan = ExperimentPlan(num_samples=2, mc_samples=1, eval_data=f"{text}:test", eval_sequences=2, judge=None,
                          trace=False, pictures=False)
    return {"grid": grid, "base": str(base), "plan": plan, "text": text}


def test_tiny_grid_runs_resumes_and_reports(setup, tmp_path):
    from hdlm.commands.repro import write_report
    from hdlm.train import train

    spec = read_grid(setup["grid"])
    cells = grid_cells(spec["grid"])
    assert [c.name for c in cells] == ["gamma0.01", "epsilon0.01"]
    out = tmp_path / "out"
    # a training cut short (as if killed at step 1) before the sweep starts: the sweep continues it
    eps_cfg = cell_config(cells[1], spec["base"], spec["overrides"], []).replace(
        {"train.out_dir": str(out / "epsilon0.01" / "run")})
    assert train(eps_cfg, stop_after=1)["stopped"]
    said: list[str] = []
    results = run_cells(cells, out, spec["base"], spec["overrides"], [], setup["plan"], judge=FakeJudge(),
                        log=said.append)
    steps = [json.loads(line)["step"] for line in (out / "epsilon0.01" / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3]  # continued exactly, no step twice
    rows = sweep_rows(results)
    assert [(r["cell"], r["sampler"], r["rho"], r["eta"]) for r in rows] == [
        ("gamma0.01", "posterior", 1.0, None), ("gamma0.01", "posterior", 2.0, None),  # the γ default (auto)
        ("epsilon0.01", "ancestral", 1.0, 0.0), ("epsilon0.01", "ancestral", 2.0, 0.0),
        ("epsilon0.01", "acs", 1.0, 0.01), ("epsilon0.01", "acs", 2.0, 0.01)]
    assert all(r["gen_ppl"] is not None and r["discrete"] != "—" for r in rows)
    assert results["epsilon0.01"]["config"]["train"]["lr"] == 0.003  # the grid's overrides reached every cell
    report = write_report(out, results, "hdlm repro --grid grid.yaml", spec["base"], spec["overrides"])
    text = report.read_text()
    assert text.count("\n| gamma0.01 |") == 2 and text.count("\n| epsilon0.01 |") == 4 and "★" in text
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "pareto.png" in text

    # again: every cell is skipped, nothing retrained, the same results
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob(CELL_FILE)}
    said.clear()
    again = run_cells(cells, out, spec["base"], spec["overrides"], [], setup["plan"], judge=FakeJudge(), log=said.append)
    assert sum("done before, skipped" in s for s in said) == 2 and again == json.loads(json.dumps(results, default=str))
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob(CELL_FILE)}
    # a finished cell run with other settings is not silently mixed in
    with pytest.raises(HDLMError, match="holds a cell run with another config or settings"):
        run_cells(cells, out, spec["base"], spec["overrides"], ["train.lr=0.01"], setup["plan"], log=said.append)


def test_repro_cli_checks_the_grid_file(setup, tmp_path):
    from hdlm.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  omega: [4]\n")
    assert main(["repro", "--grid", str(bad), "--judge", "none", "--out", str(tmp_path / "o")]) == 2
    assert main(["repro", "--grid", str(tmp_path / "missing.yaml"), "--judge", "none"]) == 2
    assert main(["repro", "--grid", str(setup["grid"]), "--only", "ar", "--judge", "none"]) == 2
    assert main(["repro", "--rhos", "1,-2", "--judge", "none", "--out", str(tmp_path / "o")]) == 2
    assert main(["repro", "--grid", str(setup["grid"]), "--num-samples", "0", "--judge", "none"]) == 2
