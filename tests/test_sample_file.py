"""One sample format (issue #12 item 9): `hdlm sample` writes JSONL that `hdlm eval gen` reads.

Today's main wrote ``{"samples": [{"text", "ids"}], ...}`` from `sample --json`, which `eval gen`
read as nothing useful (a ``.json`` file was read as one text sample), and `eval gen --checkpoint`
had no sampler options.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from conftest import tiny_bert_checkpoint

from hdlm.cli import main
from hdlm.errors import HDLMError
from hdlm.sample_file import SAMPLE_KEYS, read_samples


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny γ-hybrid Block model over the bert-base-uncased vocabulary (random weights). (conftest.tiny_bert_checkpoint)"""
    return tiny_bert_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _weights_sha(folder) -> str:
    import hashlib

    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_sample_writes_one_jsonl_line_per_sample(checkpoint, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--checkpoint", str(checkpoint), "--num-samples", "3", "--prompt", "hello",
                 "--seed", "5", "--temperature", "0.9", "--out", str(out), "--no-progress"]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    rows = [json.loads(line) for line in lines]
    for row in rows:
        assert tuple(row) == SAMPLE_KEYS
        assert row["prompt_length"] == 1 and row["seed"] == 5 and len(row["token_ids"]) == 16
        assert row["checkpoint"] == _weights_sha(checkpoint)
        assert row["sampler"]["name"] == "posterior" and row["sampler"]["temperature"] == 0.9
        assert row["sampler"]["hyperschedule"]["kind"] == "block" and row["sampler"]["hyperschedule"]["width"] == 4
        assert row["text"].startswith("hello")
    assert read_samples(out) == rows  # eval gen's reader takes exactly what sample wrote


def test_eval_gen_reads_what_sample_wrote(checkpoint, tmp_path, capsys, monkeypatch):
    """Round trip through the CLI: eval gen judges the texts and takes entropy on the token ids."""
    import hdlm.evaluation.judge as judge_mod
    import hdlm.evaluation.quality as quality

    out = tmp_path / "s.jsonl"
    assert main(["sample", "--checkpoint", str(checkpoint), "--num-samples", "2", "--seed", "1",
                 "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    judged = []

    class StubJudge:
        name, source, conversion_seconds, device = "stub", "stub", None, "cpu"

    monkeypatch.setattr(judge_mod, "load_judge", lambda *a, **k: StubJudge())
    monkeypatch.setattr(quality, "generative_perplexity",
                        lambda texts, *a, **k: judged.extend(texts) or
                        {"n_samples": len(texts), "n_tokens": 1, "ppl_token_weighted": 1.0, "ppl_mean_per_sample": 1.0})
    result = tmp_path / "gen.json"
    capsys.readouterr()
    assert main(["eval", "gen", "--samples", str(out), "--no-mauve", "--json", str(result)]) == 0
    assert judged == [r["text"] for r in rows]
    entropy = json.loads(result.read_text())["entropy"]
    assert entropy["tokens"] == "generator"

    def plug_in(ids):  # independent: the plug-in entropy of each sample's token histogram
        n = len(ids)
        return -sum(c / n * math.log(c / n) for c in Counter(ids).values())

    assert entropy["per_sample"] == pytest.approx([plug_in(r["token_ids"]) for r in rows])


def test_eval_gen_checkpoint_takes_the_sampler_options(checkpoint, tmp_path, capsys, monkeypatch):
    """`eval gen --checkpoint` samples exactly what `hdlm sample` gives with the same options."""
    import hdlm.evaluation.judge as judge_mod

    opts = ["--num-samples", "2", "--seed", "3", "--sampler", "euler", "--temperature", "0.7", "--rho", "1",
            "--eta", "0.2"]
    ref = tmp_path / "ref.jsonl"
    assert main(["sample", "--checkpoint", str(checkpoint), *opts, "--out", str(ref), "--no-progress"]) == 0
    saved = tmp_path / "saved.jsonl"
    # stop right after the samples are saved: loading the judge fails
    monkeypatch.setattr(judge_mod, "load_judge", lambda *a, **k: (_ for _ in ()).throw(HDLMError("no judge")))
    assert main(["eval", "gen", "--checkpoint", str(checkpoint), *opts, "--save-samples", str(saved),
                 "--no-mauve"]) == 2
    assert "no judge" in capsys.readouterr().err
    got, want = read_samples(saved), read_samples(ref)
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in want]
    assert got[0]["sampler"] == want[0]["sampler"] and got[0]["sampler"]["name"] == "euler"
    assert got[0]["sampler"]["temperature"] == 0.7 and got[0]["sampler"]["hyperschedule"]["rho"] == 1.0
    # a different temperature changes the samples (the option reaches the sampler)
    assert main(["eval", "gen", "--checkpoint", str(checkpoint), *opts[:-4], "--temperature", "3",
                 "--save-samples", str(saved), "--no-mauve"]) == 2
    assert [r["token_ids"] for r in read_samples(saved)] != [r["token_ids"] for r in want]


@pytest.mark.parametrize("name, content, needle", [
    ("old.json", '{"samples": [{"text": "a", "ids": [1]}]}\n', "expected a .jsonl file"),
    ("old.jsonl", '{"samples": [{"text": "a", "ids": [1]}]}\n', "old.jsonl:1"),
    ("s.csv", "text\na\n", "s.csv"),
    ("bad_len.jsonl", '{"text": "a", "prompt_length": "1"}\n', "'prompt_length' must be a int"),
    ("bad_sampler.jsonl", '{"text": "a", "sampler": "acs"}\n', "'sampler' must be a dict"),
])
def test_eval_gen_refuses_other_shapes_with_one_line(tmp_path, capsys, name, content, needle):
    f = tmp_path / name
    f.write_text(content)
    before = f.read_bytes()
    assert main(["eval", "gen", "--samples", str(f), "--no-mauve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and name in err[0], err
    assert f.read_bytes() == before


def test_sample_and_eval_gen_refuse_a_json_output_name(checkpoint, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "s.json")]) == 2
    assert main(["eval", "gen", "--checkpoint", str(checkpoint), "--save-samples", str(tmp_path / "s.json"),
                 "--no-mauve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("name the file .jsonl" in line for line in err), err
    assert not list(tmp_path.iterdir())
