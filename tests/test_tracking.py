"""Experiment tracking (hdlm.tracking): every backend receives exactly the rows of metrics.jsonl.

TensorBoard is read back from its event files after a real (resumed) training run; Trackio from
its local SQLite store (in a subprocess, since Trackio fixes its folder at import); W&B through a
stand-in module that records the calls (a real offline run writes a binary log with no public reader).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conftest import char_tokenizer_dir
from hdlm.config import load_config
from hdlm.errors import HDLMError
from hdlm.tracking import make_tracker, scalars
from hdlm.train import train

ROWS = [{"step": 2, "split": "train", "loss": 3.5, "lr": 1e-3, "tokens_per_s": 100.0, "elapsed": 0.5},
        {"step": 2, "split": "valid", "loss": 3.75, "elapsed": 0.6},
        {"step": 4, "split": "train", "loss": 3.25, "lr": 5e-4, "tokens_per_s": 120.0, "elapsed": 1.0}]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking_assets")
    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text("".join(" ".join(rng.choice("a cat sat on the mat and ran".split()) for _ in range(8)) + " .\n"
                            for _ in range(200)))
    return {"tok": str(char_tokenizer_dir(root / "tok")), "text": str(text), "cache": str(root / "cache")}


def tiny_config(assets, out_dir, **over):
    base = {"model.length": 16, "model.n_layers": 1, "model.hidden": 16, "model.n_heads": 2, "model.cond_dim": 8,
            "model.pad_vocab_to": 8, "model.dropout": 0.0, "schedule.width": 4, "data.dataset": assets["text"],
            "data.tokenizer": assets["tok"], "data.cache_dir": assets["cache"], "train.steps": 4,
            "train.batch_size": 2, "train.warmup": 1, "train.device": "cpu", "train.log_every": 1,
            "train.eval_every": 2, "train.eval_batches": 1, "train.save_every": 2, "train.out_dir": str(out_dir)}
    base.update(over)
    return load_config("tiny-ptb", base)


def expected_points(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from metrics.jsonl, as a tracker must have received them."""
    out: dict[str, list] = {}
    for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        for tag, value in scalars(row).items():
            out.setdefault(tag, []).append((row["step"], value))
    return out


def test_scalars_are_the_numeric_fields_of_a_row_by_split():
    assert scalars(ROWS[1]) == {"valid/loss": 3.75, "valid/elapsed": 0.6}
    assert scalars({"step": 1, "split": "train", "loss": 2, "flag": True, "note": "x"}) == {"train/loss": 2.0}


def test_tensorboard_holds_exactly_the_metrics_rows_of_a_resumed_run(assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = tiny_config(assets, run, **{"train.logger": "tensorboard"})
    assert train(cfg, stop_after=2)["stopped"]
    train(cfg, resume=str(run))  # the steps after the checkpoint are purged, none duplicated
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    logged = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    expected = expected_points(run)
    assert set(logged) == set(expected) and {"train/loss", "valid/loss", "train/lr"} <= set(logged)
    for tag, points in expected.items():
        assert [s for s, _ in logged[tag]] == [s for s, _ in points], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert [s for s, _ in logged["train/loss"]] == [1, 2, 3, 4]


def test_no_logger_writes_no_tracker_files(assets, tmp_path):
    train(tiny_config(assets, tmp_path / "run", **{"train.steps": 1}))
    assert not (tmp_path / "run" / "tensorboard").exists() and (tmp_path / "run" / "metrics.jsonl").exists()


def test_trackio_local_store_reads_back_the_rows(tmp_path):
    script = f"""
import json, sys
from hdlm.tracking import make_tracker
rows = json.loads(sys.argv[1])
t = make_tracker("trackio", {str(tmp_path / "run")!r}, project="hdlmtest", config={{"a": 1}})
for r in rows:
    t.log(r)
t.close()
from trackio.sqlite_storage import SQLiteStorage
print("LOGS=" + json.dumps(SQLiteStorage.get_logs("hdlmtest", "run")))
"""
    env = dict(os.environ, TRACKIO_DIR=str(tmp_path / "trackio"), PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", script, json.dumps(ROWS)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    logs = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("LOGS="))[5:])
    got = [(e["step"], {k: v for k, v in e.items() if k not in ("step", "timestamp")}) for e in logs]
    assert got == [(r["step"], scalars(r)) for r in ROWS]


def test_wandb_runs_offline_in_the_run_folder_and_logs_the_rows(tmp_path, monkeypatch):
    calls: dict = {"log": []}

    class Run:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    t = make_tracker("wandb", tmp_path / "run", project="proj", config={"train": {"lr": 1}})
    for r in ROWS:
        t.log(r)
    t.close()
    init_kw = calls["init"]
    assert init_kw["mode"] == "offline" and init_kw["dir"] == str(tmp_path / "run") and init_kw["project"] == "proj"
    assert init_kw["resume"] == "allow" and init_kw["config"] == {"train": {"lr": 1}}
    again = make_tracker("wandb", tmp_path / "run")  # a resumed run continues the same W&B run
    assert calls["init"]["id"] == init_kw["id"]
    again.close()
    assert calls["log"] == [(r["step"], scalars(r)) for r in ROWS] and calls["finished"]


def test_bad_logger_is_one_clear_line(monkeypatch):
    with pytest.raises(HDLMError, match=r"train.logger = 'mlflow'.*one of none, tensorboard, wandb, trackio"):
        load_config("tiny-ptb", ["train.logger=mlflow"])
    monkeypatch.setitem(sys.modules, "trackio", None)  # not installed
    with pytest.raises(HDLMError, match="'trackio' package is not installed"):
        make_tracker("trackio", "unused")


def test_user_guide_states_the_default_logger():
    from pathlib import Path

    from hdlm.config import LOGGERS, TrainConfig

    guide = (Path(__file__).resolve().parents[1] / "docs" / "user-guide.md").read_text()
    assert f"`train.logger` is `{TrainConfig().logger}` (the default)" in guide
    assert all(f"`{name}`" in guide for name in LOGGERS)
