"""Progress in non-terminal runs (issue #12 item 10): lines with total, rate and ETA at a bounded rate,
driven here by a fake clock; and the real commands print them when stderr is a pipe."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from hdlm.progress import Progress, track
from test_train import assets, small_config  # noqa: F401  (the module-scoped fixture)

LINE = re.compile(r"^(?P<desc>[^:]+): (?P<unit>\S+) (?P<n>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\) (?P<rate>\S+) "
                  r"(?P=unit)/s, elapsed (?P<elapsed>[\d:]+), ETA (?P<eta>[\d:]+)")


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def seconds(text: str) -> int:
    """'1:02:03' or '2:03' -> seconds (the reference parser, independent of the code's formatter)."""
    total = 0
    for part in text.split(":"):
        total = 60 * total + int(part)
    return total


def run_loop(total: int, dt: float, initial: int = 0, stop: int | None = None, **kw) -> list[dict]:
    clock, out = FakeClock(), io.StringIO()
    bar = Progress(total, "train", "step", initial=initial, stream=out, clock=clock, **kw)
    for _ in range(initial, total if stop is None else stop):
        clock.t += dt
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    parsed = [LINE.match(ln) for ln in lines]
    assert all(parsed), lines
    return [dict(m.groupdict(), line=ln) for m, ln in zip(parsed, lines)]


def test_lines_carry_total_rate_and_an_eta_consistent_with_the_fake_rate():
    rows = run_loop(total=2000, dt=0.3)  # 3.33 step/s: 10 minutes in all
    assert rows[0]["n"] == "1" and rows[-1]["n"] == "2000" and rows[-1]["pct"] == "100"
    for r in rows:
        n = int(r["n"])
        assert r["desc"] == "train" and r["unit"] == "step" and r["total"] == "2000"
        assert float(r["rate"]) == pytest.approx(1 / 0.3, rel=1e-2)
        assert abs(seconds(r["elapsed"]) - 0.3 * n) <= 1
        assert abs(seconds(r["eta"]) - 0.3 * (2000 - n)) <= 1  # steps left / rate
        assert int(r["pct"]) == round(100 * n / 2000)
    assert rows[-1]["eta"] == "0:00" and rows[-1]["elapsed"] == "10:00"


def test_line_rate_is_bounded_by_percent_and_by_seconds():
    fast = run_loop(total=100_000, dt=1e-4)  # 10 s in all: only the 10% marks (+ first, last)
    assert 10 <= len(fast) <= 100 / 10 + 2
    slow = run_loop(total=1000, dt=7.0, every_s=30.0)  # 7 s a step: a line at least every 30 s
    steps = [int(r["n"]) for r in slow]
    assert max(b - a for a, b in zip(steps, steps[1:])) * 7.0 <= 30.0 + 7.0
    assert len(slow) <= 1000 * 7.0 / 30.0 + 100 / 10 + 2


def test_resume_counts_only_the_new_steps_and_an_early_stop_gets_a_last_line():
    rows = run_loop(total=100, dt=2.0, initial=40, stop=70)  # resumed at 40, killed at 70
    assert rows[0]["n"] == "41" and rows[-1]["n"] == "70"
    last = rows[-1]
    assert float(last["rate"]) == pytest.approx(0.5) and seconds(last["eta"]) == 60  # 30 left at 0.5 step/s
    assert seconds(last["elapsed"]) == 60


def test_disabled_prints_nothing_and_a_terminal_gets_a_bar_not_lines():
    out = io.StringIO()
    list(track(range(5), 5, "x", enabled=False, stream=out))
    assert out.getvalue() == ""
    bar = Progress(5, "x", tty=True, stream=out)
    assert bar.is_bar
    bar.update(5)
    bar.close()
    assert not LINE.search(out.getvalue())
    out = io.StringIO()
    assert list(track(range(3), 3, "judge", stream=out, clock=FakeClock())) == [0, 1, 2]
    assert out.getvalue().splitlines()[-1].startswith("judge: batch 3/3 (100%)")


def test_postfix_is_appended_to_the_line():
    out, clock = io.StringIO(), FakeClock()
    bar = Progress(2, "ppl (discrete)", "batch", stream=out, clock=clock)
    clock.t += 1
    bar.set_postfix(nll="3.1416")
    bar.update(1)
    assert out.getvalue().strip().endswith("; nll 3.1416")


# --------------------------------------------------------------------------------------------
# the commands, with stderr a pipe as in a log or a batch job


def _hdlm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "hdlm", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _progress_lines(stderr: str, desc: str) -> list[dict]:
    rows = [LINE.match(ln) for ln in stderr.splitlines()]
    return [m.groupdict() for m in rows if m and m["desc"] == desc]


@pytest.mark.slow  # four short processes
def test_train_sample_and_eval_print_progress_lines_to_a_pipe(assets, tmp_path):
    run = tmp_path / "run"
    cfg = small_config(assets, run, **{"train.steps": 6, "train.eval_every": 6, "train.save_every": 6,
                                       "sample.num_samples": 3, "sample.batch_size": 2})
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    proc = _hdlm("train", "--config", str(tmp_path / "c.yaml"))
    rows = _progress_lines(proc.stderr, "train")
    assert rows and rows[-1]["n"] == "6" and all(r["total"] == "6" and r["unit"] == "step" for r in rows), proc.stderr
    assert "hdlm train: train step 6" in proc.stdout  # the log lines stay, on stdout
    rows = _progress_lines(_hdlm("sample", "--checkpoint", str(run)).stderr, "sample")
    assert [(r["n"], r["total"]) for r in rows] == [("2", "3"), ("3", "3")]  # a line per batch of sequences
    proc = _hdlm("eval", "ppl", "--checkpoint", str(run), "--data", assets["text"], "--max-sequences", "5",
                 "--batch-size", "2", "--mc-samples", "1")
    rows = _progress_lines(proc.stderr, "ppl (discrete)")
    assert rows and rows[-1]["n"] == rows[-1]["total"] == "3" and rows[-1]["eta"] == "0:00", proc.stderr
    quiet = _hdlm("sample", "--checkpoint", str(run), "--no-progress").stderr
    assert not _progress_lines(quiet, "sample")


def test_the_user_guide_states_the_progress_rate_of_the_code():
    from pathlib import Path

    from hdlm.progress import EVERY_PCT, EVERY_S

    guide = " ".join((Path(__file__).resolve().parents[1] / "docs" / "user-guide.md").read_text().split())
    m = re.search(r"one per (\d+)% of the total or per (\d+) s, whichever comes first", guide)
    assert m and (float(m.group(1)), float(m.group(2))) == (EVERY_PCT, EVERY_S)
    example = re.search(r"`(train: step [^`]+)`", guide).group(1)
    assert LINE.match(example)  # the documented line has the shape the code prints
