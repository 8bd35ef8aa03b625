"""The CLI as documented: every subcommand has --help, every option the README shows exists, and the
main job (`hdlm run`) goes end to end on a tiny setting and writes its report."""

import re
import shlex
from pathlib import Path

import pytest

from conftest import char_tokenizer_dir
from hdlm.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_every_subcommand_has_help_for_every_option(capsys):
    subs = _subparsers()
    assert set(subs) == set(COMMANDS)  # no command silently missing
    for name, p in subs.items():
        for a in p._actions:
            if a.option_strings and a.dest != "help":
                assert a.help, f"hdlm {name} {a.option_strings[0]} has no help"
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: hdlm " + name in capsys.readouterr().out


def _readme_commands():
    text = "".join((ROOT / f).read_text() for f in ("README.md", "docs/user-guide.md", "docs/conversion.md"))
    for line in re.findall(r"^(?:\.venv/bin/)?hdlm [^\n#`|]*|`hdlm [^`]*`", text, flags=re.M):
        yield line.strip("`").strip()


def test_every_option_in_the_readme_and_guide_exists():
    subs = _subparsers()
    seen = 0
    for cmd in _readme_commands():
        words = shlex.split(cmd.replace("...", ""))
        words = words[words.index("hdlm") + 1 if "hdlm" in words else 1:]
        if not words or words[0] not in subs:
            continue
        p = subs[words[0]]
        if words[0] == "eval" and len(words) > 1:  # eval has its own subcommands
            p = next(a for a in p._actions if a.dest and a.choices and words[1] in a.choices).choices[words[1]]
        known = {o for a in p._actions for o in a.option_strings}
        for w in words:
            if w.startswith("--"):
                assert w.split("=")[0] in known, f"README/guide option {w} does not exist in: {cmd}"
                seen += 1
    assert seen > 20


def test_main_job_end_to_end_writes_the_report(tmp_path, monkeypatch):
    tok = char_tokenizer_dir(tmp_path / "tok")
    text = tmp_path / "text.txt"
    text.write_text("".join(f"the company said {i} shares rose .\n" for i in range(200)))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "report"
    rc = main(["run", "--out", str(out), "--steps", "4", "--num-samples", "2", "--mc-samples", "1",
               "--eval-sequences", "4", "--judge", "none",
               f"data.dataset={text}", f"data.tokenizer={tok}", f"data.cache_dir={tmp_path / 'cache'}",
               "model.length=32", "model.n_layers=1", "model.hidden=32", "model.n_heads=2", "model.cond_dim=16",
               "model.pad_vocab_to=8", "schedule.width=8", "train.batch_size=4", "train.eval_batches=2",
               "train.log_every=2", "train.eval_every=2", "train.save_every=4"])
    assert rc == 0
    report = (out / "report.md").read_text()
    for needle in ("Perplexity on", "discrete", "continuous", "training tokens", "Sample texts",
                   "hdlm run --out", "*estimate*"):
        assert needle in report
    # the default γ = 0.01 model: the discrete bound certifies the default (posterior) sampler and is finite
    row = next(line for line in report.splitlines() if line.startswith("| discrete |"))
    assert "| bound | posterior, block T = " in row and "inf" not in row
    assert "| continuous | estimate | — (an estimate) |" in report
    for pic in ("curves.png", "hyperschedule.png", "trace.png"):
        assert (out / pic).stat().st_size > 1000
