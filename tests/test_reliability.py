"""Nothing lost, nothing silent (issue #12): the non-finite guard, resume with overrides, kills at
random points, and every float field bounded."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import hdlm.train as train_mod
from hdlm.checkpoint import list_checkpoints, load_checkpoint
from hdlm.cli import main
from hdlm.config import SECTIONS, Config, load_config
from hdlm.errors import HDLMError
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
    assert main(["train", "--config", _write(cfg, tmp_path / "c.yaml")]) == 2
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
