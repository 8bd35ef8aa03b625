"""≥ 100 bad inputs across every subcommand and the Python API (issue #12): each exits 2 (or raises
HDLMError) with one line on stderr naming the offending field, file or value, no traceback, before any
expensive work, and leaves every file that existed before byte-identical.

CLI cases run in-process (``hdlm.cli.main``) so the table stays fast; a few run as real processes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hdlm.cli import main
from hdlm.config import load_config
from hdlm.errors import HDLMError
from test_train import assets, small_config  # noqa: F401  (the module-scoped fixture)

BINARY = b"\x00\x01\x02\xff\xfe\x80 not text"


@pytest.fixture(scope="module")
def root(assets, tmp_path_factory):  # noqa: F811
    """A tiny Block-schedule checkpoint, its config file, and files that are wrong in every way."""
    from hdlm.train import train

    r = tmp_path_factory.mktemp("bad_inputs")
    cfg = small_config(assets, r / "run", **{"train.steps": 2, "schedule.kind": "block", "schedule.width": 4})
    train(cfg)
    (r / "c.yaml").write_text(cfg.to_yaml())
    (r / "list.yaml").write_text("- a\n- b\n")
    (r / "scalar.yaml").write_text("42\n")
    (r / "bad.yaml").write_text("model: [\n")
    (r / "unknown.yaml").write_text("modle:\n  hidden: 8\n")
    for name in ("bin.bin", "bin.yaml", "bin.txt", "bin.parquet", "bin.jsonl"):
        (r / name).write_bytes(BINARY)
    (r / "notjson.jsonl").write_text('{"text": "a"}\nnot json\n')
    (r / "notext.jsonl").write_text('{"txt": "a"}\n')
    (r / "badids.jsonl").write_text('{"text": "a", "token_ids": ["x"]}\n')
    (r / "array.jsonl").write_text('[1, 2]\n')
    (r / "empty.txt").write_text("\n\n")
    (r / "judge.gguf").write_text("garbage\n")
    (r / "samples.txt").write_text("the cat sat\n\nthe dog ran\n")
    (r / "file").write_text("I am a file\n")
    (r / "folder").mkdir()
    (r / "hfdir").mkdir()
    return r


# (argv with {R} = the fixture folder, text the one stderr line must contain)
CLI_CASES = [
    # usage errors of every command
    ("", None),
    ("nosuch", "invalid choice"),
    ("train --nosuch", "--nosuch"),
    ("train --steps x", "--steps"),
    ("schedule", "--length"),
    ("schedule --length x", "--length"),
    ("schedule --length 8 --kind nosuch", "--kind"),
    ("sample", "--checkpoint"),
    ("sample --checkpoint {R}/run --sampler nosuch", "--sampler"),
    ("sample --checkpoint {R}/run --num-samples two", "--num-samples"),
    ("sample --checkpoint {R}/run --draw nosuch", "--draw"),
    ("sample --checkpoint {R}/run --schedule nosuch", "--schedule"),
    ("eval", "eval"),
    ("eval nosuch", "invalid choice"),
    ("eval ppl", "--checkpoint"),
    ("eval ppl --checkpoint {R}/run --estimator nosuch", "--estimator"),
    ("eval ppl --checkpoint {R}/run --variational nosuch", "--variational"),
    ("eval ppl --checkpoint {R}/run --detokenize nosuch", "--detokenize"),
    ("eval gen", "--samples"),
    ("eval gen --samples {R}/samples.txt --checkpoint {R}/run", "--checkpoint"),
    ("eval gen --samples {R}/samples.txt --featurizer nosuch", "--featurizer"),
    ("eval harness --checkpoint {R}/run", "--tasks"),
    ("run --steps x", "--steps"),
    ("run --nosuch", "--nosuch"),
    ("repro --scale nosuch", "--scale"),
    ("convert --nosuch", "--nosuch"),
    # malformed overrides and config values (item 5, item 2)
    ("train --config {R}/c.yaml train.lr=[ --out {R}/o", "train.lr=["),
    ("train --config {R}/c.yaml train.lr --out {R}/o", "train.lr"),
    ("train --config {R}/c.yaml train.lr=inf --out {R}/o", "train.lr"),
    ("train --config {R}/c.yaml train.lr=nan --out {R}/o", "train.lr"),
    ("train --config {R}/c.yaml train.lr=1e400 --out {R}/o", "train.lr"),
    ("train --config {R}/c.yaml train.lr=-1 --out {R}/o", "train.lr"),
    ("train --config {R}/c.yaml train.lr=fast --out {R}/o", "train.lr"),
    ("train --config {R}/c.yaml objective.beta2=inf --out {R}/o", "objective.beta2"),
    ("train --config {R}/c.yaml process.lam=inf --out {R}/o", "process.lam"),
    ("train --config {R}/c.yaml process.gamma=2 --out {R}/o", "process.gamma"),
    ("train --config {R}/c.yaml process.kind=nosuch --out {R}/o", "process.kind"),
    ("train --config {R}/c.yaml schedule.kind=nosuch --out {R}/o", "schedule.kind"),
    ("train --config {R}/c.yaml schedule.width=0 --out {R}/o", "schedule.width"),
    ("train --config {R}/c.yaml model.hidden=4 --out {R}/o", "model.hidden"),
    ("train --config {R}/c.yaml model.dropout=1.5 --out {R}/o", "model.dropout"),
    ("train --config {R}/c.yaml model.n_layers=true --out {R}/o", "model.n_layers"),
    ("train --config {R}/c.yaml model.hiden=64 --out {R}/o", "model.hiden"),
    ("train --config {R}/c.yaml modle.hidden=64 --out {R}/o", "modle"),
    ("train --config {R}/c.yaml train.betas=[0.9] --out {R}/o", "train.betas"),
    ("train --config {R}/c.yaml train.betas=[0.9,1.5] --out {R}/o", "train.betas"),
    ("train --config {R}/c.yaml train.batch_size=0 --out {R}/o", "train.batch_size"),
    ("train --config {R}/c.yaml train.batch_size=3 train.grad_accum=2 --out {R}/o", "train.batch_size"),
    ("train --config {R}/c.yaml train.grad_clip=-1 --out {R}/o", "train.grad_clip"),
    ("train --config {R}/c.yaml train.ema=2 --out {R}/o", "train.ema"),
    ("train --config {R}/c.yaml train.max_nonfinite_skips=-1 --out {R}/o", "train.max_nonfinite_skips"),
    ("train --config {R}/c.yaml train.dtype=fp8 --out {R}/o", "train.dtype"),
    ("train --config {R}/c.yaml train.device=tpu --out {R}/o", "tpu"),
    ("train --config {R}/c.yaml train.logger=nosuch --out {R}/o", "train.logger"),
    ("train --config {R}/c.yaml sample.temperature=0 --out {R}/o", "sample.temperature"),
    ("train --config {R}/c.yaml sample.top_p=inf --out {R}/o", "sample.top_p"),
    ("train --config {R}/c.yaml --set train.lr=inf --out {R}/o", "train.lr"),
    ("train --config {R}/c.yaml --steps 0 --out {R}/o", "train.steps"),
    ("train --config {R}/c.yaml --device tpu --out {R}/o", "tpu"),
    # bad config files (item 5)
    ("train --config {R}/list.yaml --out {R}/o", "list.yaml"),
    ("train --config {R}/scalar.yaml --out {R}/o", "scalar.yaml"),
    ("train --config {R}/bin.bin --out {R}/o", "bin.bin"),
    ("train --config {R}/bin.yaml --out {R}/o", "bin.yaml"),
    ("train --config {R}/bad.yaml --out {R}/o", "bad.yaml"),
    ("train --config {R}/unknown.yaml --out {R}/o", "modle"),
    ("train --config {R}/folder --out {R}/o", "folder"),
    ("train --config {R}/nosuch.yaml --out {R}/o", "nosuch.yaml"),
    ("train --config nosuch-preset --out {R}/o", "nosuch-preset"),
    ("run --config {R}/bin.yaml --out {R}/o", "bin.yaml"),
    ("run --config {R}/list.yaml --out {R}/o", "list.yaml"),
    # bad data (item 5, item 11)
    ("train --config {R}/c.yaml data.dataset={R}/bin.txt --out {R}/o", "bin.txt"),
    ("train --config {R}/c.yaml data.dataset={R}/bin.parquet --out {R}/o", "bin.parquet"),
    ("train --config {R}/c.yaml data.dataset={R}/bin.jsonl --out {R}/o", "bin.jsonl"),
    ("train --config {R}/c.yaml data.dataset={R}/notjson.jsonl --out {R}/o", "notjson.jsonl:2"),
    ("train --config {R}/c.yaml data.dataset={R}/notext.jsonl --out {R}/o", "notext.jsonl:1"),
    ("train --config {R}/c.yaml data.dataset={R}/nosuch.txt --out {R}/o", "nosuch.txt"),
    ("train --config {R}/c.yaml data.tokenizer={R}/folder --out {R}/o", "folder"),
    # run folders (item 5, item 3)
    ("train --config {R}/c.yaml --out {R}/file", "file"),
    ("train --config {R}/c.yaml --out {R}/run", "already holds checkpoints"),
    ("train --resume {R}/run", "nothing to do"),
    ("train --resume {R}/folder --steps 9", "folder"),
    ("train --resume {R}/nosuch --steps 9", "nosuch"),
    ("train --resume {R}/run --steps 9 model.hidden=64", "model.hidden"),
    ("train --resume {R}/run --steps 9 train.seed=5", "train.seed"),
    ("train --resume {R}/run --steps 9 schedule.width=8", "schedule.width"),
    ("train --init-from {R}/nosuch --out {R}/o", "nosuch"),
    # sample (items 5-7)
    ("sample --checkpoint {R}/nosuch", "nosuch"),
    ("sample --checkpoint {R}/folder", "folder"),
    ("sample --checkpoint {R}/run --num-samples 0", "--num-samples 0"),
    ("sample --checkpoint {R}/run --batch-size 0", "--batch-size 0"),
    ("sample --checkpoint {R}/run --seed -1", "--seed -1"),
    ("sample --checkpoint {R}/run --top-k -1", "--top-k -1"),
    ("sample --checkpoint {R}/run --out {R}/folder", "--out"),
    ("sample --checkpoint {R}/run --out {R}/file/x.txt", "--out"),
    ("sample --checkpoint {R}/run --trace {R}/file/x.png", "--trace"),
    ("sample --checkpoint {R}/run --sampler ar --num-samples 1 --no-progress", "sampler 'ar'"),
    ("sample --checkpoint {R}/run --sampler acs --num-samples 1 --no-progress", "acs"),
    ("sample --checkpoint {R}/run --device tpu", "tpu"),
    # eval ppl (items 5-7)
    ("eval ppl --checkpoint {R}/nosuch", "nosuch"),
    ("eval ppl --checkpoint {R}/run --data {R}/bin.txt", "bin.txt"),
    ("eval ppl --checkpoint {R}/run --data {R}/bin.parquet", "bin.parquet"),
    ("eval ppl --checkpoint {R}/run --data {R}/nosuch.txt", "nosuch.txt"),
    ("eval ppl --checkpoint {R}/run --device tpu", "tpu"),
    ("eval ppl --checkpoint {R}/run --seed -3", "--seed -3"),
    ("eval ppl --checkpoint {R}/run --max-sequences 0", "--max-sequences 0"),
    ("eval ppl --checkpoint {R}/run --batch-size 0", "--batch-size 0"),
    ("eval ppl --checkpoint {R}/run --mc-samples 0", "--mc-samples 0"),
    ("eval ppl --checkpoint {R}/run --json {R}/folder", "--json"),
    ("eval ppl --checkpoint {R}/run --json {R}/file/x.json", "--json"),
    # eval gen (items 5-7, 9)
    ("eval gen --samples {R}/nosuch.jsonl --no-mauve", "nosuch.jsonl"),
    ("eval gen --samples {R}/bin.jsonl --no-mauve", "bin.jsonl"),
    ("eval gen --samples {R}/bin.txt --no-mauve", "bin.txt"),
    ("eval gen --samples {R}/notjson.jsonl --no-mauve", "notjson.jsonl:2"),
    ("eval gen --samples {R}/notext.jsonl --no-mauve", "notext.jsonl:1"),
    ("eval gen --samples {R}/badids.jsonl --no-mauve", "token_ids"),
    ("eval gen --samples {R}/array.jsonl --no-mauve", "array.jsonl:1"),
    ("eval gen --samples {R}/empty.txt --no-mauve", "empty.txt"),
    ("eval gen --samples {R}/samples.txt --judge {R}/judge.gguf --no-mauve", "judge.gguf"),
    ("eval gen --samples {R}/samples.txt --judge {R}/nosuch.gguf --no-mauve", "nosuch.gguf"),
    ("eval gen --samples {R}/samples.txt --judge {R}/hfdir --no-mauve", "hfdir"),
    ("eval gen --samples {R}/samples.txt --judge {R}/file --no-mauve", "file"),
    ("eval gen --samples {R}/samples.txt --judge no-such-org/no-such-judge --no-mauve", "no-such-judge"),
    ("eval gen --samples {R}/samples.txt --batch-size 0 --no-mauve", "--batch-size 0"),
    ("eval gen --samples {R}/samples.txt --seed -1 --no-mauve", "--seed -1"),
    ("eval gen --samples {R}/samples.txt --num-buckets 1", "--num-buckets 1"),
    ("eval gen --samples {R}/samples.txt --max-length 0 --no-mauve", "--max-length 0"),
    ("eval gen --samples {R}/samples.txt --json {R}/folder --no-mauve", "--json"),
    ("eval gen --samples {R}/samples.txt --markdown {R}/file/x.md --no-mauve", "--markdown"),
    ("eval gen --checkpoint {R}/run --num-samples 0 --no-mauve", "--num-samples 0"),
    ("eval gen --checkpoint {R}/run --save-samples {R}/file/s.jsonl --no-mauve", "--save-samples"),
    ("eval gen --samples {R}/samples.txt --device tpu --no-mauve", "tpu"),
    # run: every argument checked before training (item 6)
    ("run --config {R}/c.yaml --out {R}/file", "--out"),
    ("run --config {R}/c.yaml --out {R}/o --eval-sequences 0", "--eval-sequences 0"),
    ("run --config {R}/c.yaml --out {R}/o --num-samples 0", "--num-samples 0"),
    ("run --config {R}/c.yaml --out {R}/o --mc-samples 0", "--mc-samples 0"),
    ("run --config {R}/c.yaml --out {R}/o --judge no-such-org/no-such-judge", "no-such-judge"),
    ("run --config {R}/c.yaml --out {R}/o --judge {R}/judge.gguf", "judge.gguf"),
    ("run --config {R}/c.yaml --out {R}/o --seed -1", "--seed -1"),
    ("run --config {R}/c.yaml --out {R}/o --rho 0", "--rho 0"),
    ("run --config {R}/c.yaml --out {R}/o --steps 0", "--steps 0"),
    ("run --config {R}/c.yaml --out {R}/o train.lr=inf", "train.lr"),
    # schedule
    ("schedule --length 0", "0"),
    ("schedule --length 8 --kind block --width 0", "width"),
    ("schedule --length 8 --kind flat --steps 0", "steps"),
    ("schedule --length 8 --kind slide --width 4 --rho 0", "rho"),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("line,expected", CLI_CASES, ids=[c[0][:60] for c in CLI_CASES])
def test_bad_cli_input_is_one_line_and_exit_2(root, capsys, line, expected):
    before = _snapshot(root)
    argv = line.replace("{R}", str(root)).split()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.strip() and not ln.startswith("\r")]
    if expected is None:  # bare `hdlm`: the help, exit 0
        assert rc == 0 and "usage" in captured.out
        return
    assert rc == 2, (rc, captured.err[-2000:])
    assert len(err) == 1, err
    assert "Traceback" not in captured.err and "error" in err[0]
    assert expected in err[0], err[0]
    after = _snapshot(root)
    assert {k: after.get(k) for k in before} == before  # files that existed are byte-identical
    assert not (root / "o").exists()  # nothing started


def test_the_table_is_large_enough():
    commands = {line.split()[0] for line, _ in CLI_CASES if line}
    assert len(CLI_CASES) + len(API_CASES) >= 100
    assert commands >= {"train", "sample", "eval", "run", "schedule", "repro", "convert"}


# --------------------------------------------------------------------------------------------
# the Python API


def _pipeline(root, **kw):
    from hdlm import HDLMPipeline

    return HDLMPipeline.from_pretrained(str(root / "run"), **kw)


API_CASES = [
    (lambda r: load_config("tiny-ptb", {"train.lr": float("inf")}), "train.lr"),
    (lambda r: load_config("tiny-ptb", {"process.lam": float("nan")}), "process.lam"),
    (lambda r: load_config("tiny-ptb", ["train.lr"]), "train.lr"),
    (lambda r: load_config(str(r / "bin.yaml")), "bin.yaml"),
    (lambda r: load_config(str(r / "list.yaml")), "list.yaml"),
    (lambda r: load_config("tiny-ptb").replace({"model.nosuch": 1}), "model.nosuch"),
    (lambda r: __import__("hdlm.checkpoint").checkpoint.load_checkpoint(r / "folder"), "folder"),
    (lambda r: __import__("hdlm.train").train.train(load_config(str(r / "c.yaml"),
                                                                {"train.out_dir": str(r / "file")})), "file"),
    (lambda r: _pipeline(r, device="tpu"), "tpu"),
    (lambda r: _pipeline(r).generate_ids(1, sampler="ar"), "sampler 'ar'"),
    (lambda r: _pipeline(r).generate_ids(1, sampler="nosuch"), "nosuch"),
]


@pytest.mark.parametrize("k", range(len(API_CASES)))
def test_bad_api_input_raises_one_line_hdlm_error(root, k):
    call, expected = API_CASES[k]
    before = _snapshot(root)
    with pytest.raises(HDLMError) as info:
        call(root)
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert _snapshot(root) == before


# --------------------------------------------------------------------------------------------
# a few as real processes: the message, not a traceback, reaches a shell


@pytest.mark.parametrize("line,expected", [
    ("train --config {R}/bin.yaml --out {R}/o", "bin.yaml"),
    ("eval ppl --checkpoint {R}/run --data {R}/bin.parquet", "bin.parquet"),
    ("sample --checkpoint {R}/run --num-samples 0", "--num-samples 0"),
])
def test_bad_input_in_a_real_process(root, line, expected):
    argv = [sys.executable, "-m", "hdlm", *line.replace("{R}", str(root)).split()]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**__import__("os").environ,
                                                                                   "PYTHONPATH": ":".join(sys.path)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0], proc.stderr


# --------------------------------------------------------------------------------------------
# item 10: overrides anywhere on the line; item 8: one schedule-merge rule for eval ppl and sample


def test_overrides_are_accepted_anywhere_on_the_command_line():
    from hdlm.cli import _parse, build_parser

    args = _parse(build_parser(), ["train", "train.lr=1e-3", "--out", "x", "train.steps=3", "--steps", "4",
                                   "model.hidden=64"])
    assert args.overrides == ["train.lr=1e-3", "train.steps=3", "model.hidden=64"] and args.out == "x"
    assert args.steps == 4


def test_schedule_slide_on_a_block_checkpoint_keeps_omega_in_eval_and_sample(root):
    from hdlm.hyperschedule import from_config

    pipe = _pipeline(root)
    assert pipe.config.schedule.kind == "block" and pipe.config.schedule.width == 4
    bound_schedule = from_config(pipe.config.schedule, pipe.config.model.length, kind="slide")  # what eval ppl uses
    sampled = pipe.generate_ids(1, schedule="slide", seed=0, progress=False).hyperschedule
    assert bound_schedule.kind == sampled.kind == "slide" and bound_schedule.width == sampled.width == 4
