"""`hdlm schedule`: text table, --json, --png and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hdlm.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["schedule", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv,width,T,levels", [
    (["--kind", "quench", "--length", "7"], 1, 7, 1),
    (["--kind", "flat", "--length", "6"], 6, 6, 6),
    (["--kind", "flat", "--length", "8", "--steps", "4"], 8, 4, 4),
    (["--kind", "flat", "--length", "8", "--rho", "0.5"], 8, 16, 16),
    (["--kind", "block", "--length", "10", "--width", "4"], 4, 12, 4),
    (["--kind", "slide", "--length", "10", "--width", "4"], 4, 13, 4),      # d + ω - 1
    (["--kind", "slide", "--length", "16", "--width", "4", "--rho", "2"], 4, 9, 2),  # ⌊15/2⌋ + 2
    (["--kind", "block", "--length", "16"], 4, 16, 4),                      # default ω = d // 4
])
def test_json(capsys, argv, width, T, levels):
    rc, out, err = run_cli(capsys, *argv, "--json")
    assert rc == 0 and err == ""
    d = json.loads(out)
    assert (d["width"], d["T"], d["levels"]) == (width, T, levels)
    assert set(d) >= {"table", "width", "rho", "rate", "T", "levels", "d", "kind"}
    assert len(d["table"]) == T + 1 and all(len(row) == d["d"] for row in d["table"])
    assert d["table"][0] == [levels] * d["d"] and d["table"][-1] == [0] * d["d"]
    assert d["rate"] == pytest.approx(d["d"] / T)


def test_text_table(capsys):
    rc, out, _ = run_cli(capsys, "--kind", "slide", "--length", "5", "--width", "2")
    assert rc == 0
    lines = out.strip().splitlines()
    # slide at ρ = 1: τ = clip(2 - (t - i), 0, 2), T = 6
    rows = [line.split("|")[1].split()[0] for line in lines[1:8]]
    assert rows == ["22222", "12222", "01222", "00122", "00012", "00001", "00000"]
    assert "width = 2" in lines[-1] and "T = 6" in lines[-1] and "levels = 2" in lines[-1] and "rho = 1" in lines[-1]


def test_png(capsys, tmp_path):
    path = tmp_path / "sub" / "slide.png"
    rc, out, _ = run_cli(capsys, "--kind", "slide", "--length", "16", "--width", "4", "--png", str(path))
    assert rc == 0 and out.strip() == str(path)
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_path_printed_is_the_file_written(capsys, tmp_path):
    """`--png fx` writes fx.png (matplotlib appends the suffix) and says fx.png, not fx (issue #12 item 10)."""
    rc, out, _ = run_cli(capsys, "--kind", "block", "--length", "8", "--width", "4", "--png", str(tmp_path / "fx"))
    assert rc == 0 and out.strip() == str(tmp_path / "fx.png")
    assert [p.name for p in tmp_path.iterdir()] == ["fx.png"]
    assert (tmp_path / "fx.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, out, err = run_cli(capsys, "--kind", "block", "--length", "8", "--width", "4", "--png", str(tmp_path / "fx.txt"))
    assert rc == 2 and "fx.txt" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "fx.txt").exists()


@pytest.mark.parametrize("argv,word", [
    (["--kind", "block", "--length", "8", "--width", "0"], "width"),
    (["--kind", "slide", "--length", "8", "--width", "9"], "width"),
    (["--kind", "block", "--length", "8", "--width", "4", "--rho", "3"], "rho"),
    (["--kind", "flat", "--length", "8", "--rho", "3"], "rho"),
    (["--kind", "quench", "--length", "8", "--rho", "2"], "rho"),
    (["--kind", "slide", "--length", "0"], "length"),
    (["--kind", "block", "--length", "8", "--steps", "3"], "steps"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, word):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("hdlm schedule: error:") and word in err


def test_every_option_has_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["schedule", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--kind", "--length", "--width", "--rho", "--steps", "--json", "--png"):
        assert opt in out
    from hdlm.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["schedule"]
    for action in sub._actions:
        assert action.help, action.dest


def test_subprocess_error_is_one_line_without_traceback():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "hdlm.cli", "schedule", "--kind", "block", "--length", "8",
                           "--width", "4", "--rho", "3"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "rho" in lines[0]
