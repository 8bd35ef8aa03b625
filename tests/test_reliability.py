"""Nothing lost, nothing silent (issue #12): the non-finite guard, resume with overrides, kills at
random points, and every float field bounded."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hdlm.train as train_mod
from hdlm.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from hdlm.cli import main
from hdlm.config import SECTIONS, Config, load_config
from hdlm.errors import HDLMError
from hdlm.faults import CRASH_ENV
from test_train import assets, read_rows, small_config  # noqa: F401  (the module-scoped fixture)


def _nan_from(monkeypatch, first_bad: int, last_bad: int = 10**9) -> None:
    """The objective's training loss becomes nan on training calls first_bad..last_bad (1-based)."""
    real = train_mod.build_objective
    calls = {"n": 0}

    def build(cfg, n):
        objective = real(cfg, n)

        def poisoned(net, y, seeds, bseed):
            loss, stats = objective(net, y, seeds, bseed)
            if torch.is_grad_enabled():  # training, not validation
                calls["n"] += 1
                if first_bad <= calls["n"] <= last_bad:
                    loss = loss * float("nan")
            return loss, stats

        return poisoned

    monkeypatch.setattr(train_mod, "build_objective", build)


def _write(cfg: Config, path: Path) -> str:
    path.write_text(cfg.to_yaml())
    return str(path)


# --------------------------------------------------------------------------------------------
# item 1: a non-finite loss stops the run, the last finite checkpoint stays


def test_nonfinite_loss_stops_with_one_line_and_keeps_last_finite_checkpoint(assets, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    cfg = small_config(assets, run, **{"train.steps": 8, "train.save_every": 2, "train.eval_every": 2})
    _nan_from(monkeypatch, 5)
    assert main(["train", "--config", _write(cfg, tmp_path / "c.yaml"), "--no-progress"]) == 2  # stderr: the error only
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 5: non-finite loss nan" in err[0] and "step-00000004" in err[0], err
    assert "train.max_nonfinite_skips = 0" in err[0]
    ck = load_checkpoint(run)  # latest: the last finite one, loadable, all weights finite
    assert ck.step == 4 and [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    assert all(bool(torch.isfinite(t).all()) for t in ck.model_state.values())
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows) and max(r["step"] for r in rows) == 4


def test_nonfinite_steps_are_skipped_up_to_the_limit(assets, tmp_path, monkeypatch):
    over = {"train.steps": 6, "train.save_every": 6, "train.eval_every": 6, "train.max_nonfinite_skips": 2}
    _nan_from(monkeypatch, 3, 4)  # two bad steps: skipped, not applied
    out = train_mod.train(small_config(assets, tmp_path / "skip", **over))
    assert out["step"] == 6 and math.isfinite(out["loss"])
    assert [r["step"] for r in read_rows(tmp_path / "skip")] == [1, 2, 5, 6]  # no row of a skipped step
    assert all(bool(torch.isfinite(t).all()) for t in load_checkpoint(tmp_path / "skip").model_state.values())
    _nan_from(monkeypatch, 3)  # a third bad step is one too many
    with pytest.raises(HDLMError, match=r"step 5: non-finite loss nan .*stopped after 2 skipped step\(s\)"):
        train_mod.train(small_config(assets, tmp_path / "stop", **over))


def test_no_checkpoint_with_nonfinite_weights(tmp_path):
    state = type("S", (), {"step": 7, "checkpoint": tmp_path / "step-00000006"})()
    train_mod._check_finite({"a": torch.ones(2), "ids": torch.arange(3)}, state)
    with pytest.raises(HDLMError, match=r"step 7: weight b is not finite.*step-00000006"):
        train_mod._check_finite({"a": torch.ones(2), "b": torch.tensor([1.0, math.inf])}, state)


# --------------------------------------------------------------------------------------------
# item 2: every float field of the config is bounded and finite


def _float_fields():
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.type in (float, "float"):
                yield name, f.name


@pytest.mark.parametrize("section,name", list(_float_fields()))
def test_every_float_field_has_a_range_and_rejects_nonfinite(section, name):
    info = SECTIONS[section].__pydantic_fields__[name]
    bounds = {type(m).__name__ for m in info.metadata}
    assert bounds & {"Ge", "Gt"} and bounds & {"Le", "Lt"}, f"{section}.{name} has no range: {info.metadata}"
    for bad in ("nan", "inf", "-inf", "1e400"):
        with pytest.raises(HDLMError, match=rf"{section}\.{name}"):
            load_config("tiny-ptb", {f"{section}.{name}": bad})


# --------------------------------------------------------------------------------------------
# items 3, 4: resume applies the changeable overrides, refuses the rest, logs the same rows

TIMINGS = ("tokens_per_s", "elapsed")


def _rows(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(r).items() if k not in TIMINGS} for r in lines]


def test_resume_applies_lr_override_and_refuses_fixed_fields(assets, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = small_config(assets, run, **{"train.steps": 6, "train.lr_schedule": "constant", "train.warmup": 0})
    train_mod.train(cfg, stop_after=2, progress=False)
    for bad, field in (("model.hidden=64", "model.hidden"), ("train.seed=3", "train.seed"),
                       ("train.batch_size=8", "train.batch_size"), ("process.kind=absorb", "process.kind")):
        assert main(["train", "--resume", str(run), bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"config {field} = " in err[0] and "cannot change on --resume" in err[0], err
    assert main(["train", "--resume", str(run), "train.lr=0.02", "--steps", "4"]) == 0
    assert "train.lr = 0.02 (was 0.01)" in capsys.readouterr().out
    assert [(r["step"], r["lr"]) for r in read_rows(run)] == [(1, 1e-2), (2, 1e-2), (3, 0.02), (4, 0.02)]
    ck = load_checkpoint(run)
    assert ck.step == 4 and ck.config.train.lr == 0.02
    assert [g["lr"] for g in ck.train_state["optimizer"]["param_groups"]] == [0.02]


def test_resumed_metrics_equal_uninterrupted_when_log_every_does_not_divide_the_checkpoint_step(assets, tmp_path):
    over = {"train.steps": 8, "train.log_every": 3, "train.save_every": 2, "train.eval_every": 4}
    train_mod.train(small_config(assets, tmp_path / "full", **over))
    cut = small_config(assets, tmp_path / "cut", **over)
    train_mod.train(cut, stop_after=4)  # checkpoint at step 4, mid-window (rows at 3, 6, 8)
    train_mod.train(cut, resume=str(tmp_path / "cut"))
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "full")
    assert [r["step"] for r in _rows(tmp_path / "full") if r["split"] == "train"] == [3, 6, 8]


# --------------------------------------------------------------------------------------------
# kill -9 at random points (some mid-checkpoint-write, some mid-prune), then resume: bitwise equal


def _kill_points(rng, steps: int, save_every: int, keep: int = 2) -> list[str]:
    """Five crash points in run order: after a step, half-way through a checkpoint write, mid-prune."""
    saves = list(range(save_every, steps + 1, save_every))
    steps_pts = [(k, 0, f"step-{k}") for k in range(1, steps)]
    writes = [(k, 1, f"write-{k}") for k in saves]
    prunes = [(k, 2, f"prune-{k}") for k in saves[keep:]]
    chosen = rng.sample(writes, 2) + rng.sample(prunes, 1) + rng.sample(steps_pts, 2)
    return [name for *_, name in sorted(chosen)]


def _hdlm(args: list[str], crash_at: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=os.pathsep.join(sys.path))
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([sys.executable, "-m", "hdlm", "train", *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # seven short processes
@pytest.mark.parametrize("seed", [0])
def test_sigkill_at_random_points_then_resume_is_bitwise_exact(assets, tmp_path, seed):
    over = {"train.steps": 12, "train.save_every": 2, "train.log_every": 3, "train.eval_every": 4,
            "model.dropout": 0.1, "train.ema": 0.9}
    train_mod.train(small_config(assets, tmp_path / "full", **over))
    run = tmp_path / "killed"
    points = _kill_points(random.Random(seed), 12, 2)
    assert any(p.startswith("write-") for p in points) and any(p.startswith("prune-") for p in points)
    args = ["--config", _write(small_config(assets, run, **over), tmp_path / "c.yaml")]
    for point in points:
        proc = _hdlm(args, point)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stdout, proc.stderr)
        args = ["--resume", str(run)] if list_checkpoints(run) else args
    proc = _hdlm(args, None)
    assert proc.returncode == 0, proc.stderr
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(run)
    assert a.step == b.step == 12
    for name, t in a.model_state.items():
        assert torch.equal(t, b.model_state[name]), name
        assert torch.equal(a.ema_state[name], b.ema_state[name]), name
    assert _rows(run) == _rows(tmp_path / "full")
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["step-00000010", "step-00000012"]  # nothing orphaned


def test_a_kill_during_pruning_leaves_no_orphan_after_the_next_save(tmp_path):
    """A step folder without meta.json (what a kill half-way through deleting it left, before removals
    became renames) is removed by the next save."""
    from test_checkpoint import identity, make_model, tiny_config

    cfg = tiny_config()
    model = make_model(cfg, seed=1)
    save_checkpoint(tmp_path, 2, model, cfg, identity(), {})
    orphan = tmp_path / "step-00000001"
    (orphan / "sub").mkdir(parents=True)
    (orphan / "model.safetensors").write_bytes(b"half")
    save_checkpoint(tmp_path, 4, model, cfg, identity(), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002", "step-00000004"]


def test_user_guide_lists_exactly_the_resumable_fields():
    from hdlm.resume import RESUMABLE

    guide = (Path(__file__).parents[1] / "docs" / "user-guide.md").read_text()
    para = guide[guide.index("On `--resume`"):guide.index("is refused with one line")]
    named = set(re.findall(r"`([a-z_.*]+)`", para.replace("/", "` `")))
    want = {r[len("train."):] for r in RESUMABLE if r.startswith("train.")} - {"out_dir"}
    assert {n.split(".")[-1] for n in named if n != "sample.*"} == want and "sample.*" in named


# --------------------------------------------------------------------------------------------
# item 11: a missing validation file is reported before any work


def test_missing_valid_file_is_one_line_before_training_starts(assets, tmp_path, monkeypatch, capsys):
    """`data.dataset = DIR/{split}.txt` with no valid.txt: exit 2 naming valid.txt, before the tokenizer
    is even loaded (on main it surfaced only after the train split was tokenized), no run folder."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text(Path(assets["text"]).read_text())
    run = tmp_path / "run"
    cfg = small_config(assets, run, **{"data.dataset": str(folder / "{split}.txt"),
                                       "data.cache_dir": str(tmp_path / "cache")})

    def no_work(*a, **k):
        raise AssertionError("the tokenizer was loaded before the data files were checked")

    monkeypatch.setattr(train_mod, "load_tokenizer", no_work)
    assert main(["train", "--config", _write(cfg, tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder / "valid.txt") in err[0] and "not found" in err[0], err
    assert not run.exists() and not (tmp_path / "cache").exists()
