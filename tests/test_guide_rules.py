"""The rules the user guide states about data files and tokenizers are the code's (issue #12 item 11).

Each rule is read from the guide's sentence (the regular expression must find it) and checked
against the config defaults and against what the loader does with tokenizers built here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tokenizers as hf

from hdlm.config import DataConfig, TrainConfig
from hdlm.errors import HDLMError
from hdlm.tokenizers import BUILTIN, load_tokenizer

GUIDE = (Path(__file__).resolve().parents[1] / "docs" / "user-guide.md").read_text(encoding="utf-8")


def _paragraph(start: str) -> str:
    para = next((p for p in GUIDE.split("\n\n") if start in p), None)
    assert para, f"the user guide has no paragraph with {start!r}"
    return " ".join(para.split())


def tokenizer_rule() -> dict:
    text = _paragraph("Tokenizers (`data.tokenizer`")
    default = re.search(r"Tokenizers \(`data\.tokenizer`, default `([^`]+)`\): (.*?), or a local", text)
    candidates = re.search(r"else the first of (.*?) that is in the vocabulary", text)
    error = re.search(r'one line \("([^"]+)"\)', text)
    assert default and candidates and error, text
    return {"default": default.group(1), "builtin": re.findall(r"`([^`]+)`", default.group(2)),
            "candidates": re.findall(r"`([^`]+)`", candidates.group(1)), "error": error.group(1),
            "configured": re.findall(r"`(\w+\.json)`", text.split("named by", 1)[1].split("beside", 1)[0])}


def _local(folder: Path, tokens: list[str], config: dict | None = None, name: str = "tokenizer_config.json") -> str:
    """A word-level tokenizer of ``tokens`` saved as folder/tokenizer.json (+ a config file naming an EOS)."""
    folder.mkdir(parents=True, exist_ok=True)
    tk = hf.Tokenizer(hf.models.WordLevel({t: i for i, t in enumerate(tokens + ["[UNK]"])}, unk_token="[UNK]"))
    tk.pre_tokenizer = hf.pre_tokenizers.WhitespaceSplit()
    tk.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / name).write_text(json.dumps(config))
    return str(folder)


def test_documented_tokenizer_names_and_default_are_the_code():
    rule = tokenizer_rule()
    assert rule["default"] == DataConfig().tokenizer
    assert tuple(rule["builtin"]) == BUILTIN


def test_a_local_tokenizer_without_an_end_of_text_token_fails_as_documented(tmp_path):
    rule = tokenizer_rule()
    with pytest.raises(HDLMError) as info:
        load_tokenizer(_local(tmp_path / "none", ["a", "b"]))
    assert rule["error"] in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(HDLMError, match=re.escape(rule["error"])):  # the .json file itself, too
        load_tokenizer(str(tmp_path / "none" / "tokenizer.json"))


def test_end_of_text_search_order_is_the_documented_one(tmp_path):
    rule = tokenizer_rule()
    cands = rule["candidates"]
    assert len(cands) >= 3
    for k, token in enumerate(cands):  # each candidate is found, and wins over every later one
        later = cands[k + 1:]
        tokens = ["a", *reversed(later), token, "b"]
        assert load_tokenizer(_local(tmp_path / f"c{k}", tokens)).eos_id == tokens.index(token)
    assert rule["configured"] == ["tokenizer_config.json", "special_tokens_map.json"]
    for name in rule["configured"]:  # a configured eos_token beats every candidate
        tokens = ["a", *cands, "b"]
        folder = _local(tmp_path / name, tokens, {"eos_token": "b"}, name)
        assert load_tokenizer(folder).eos_id == tokens.index("b")


def test_documented_split_defaults_are_the_config_defaults():
    text = _paragraph("data.train_split")
    found = dict(re.findall(r"`data\.(train_split|valid_split)` \(default `([^`]+)`\)", text))
    assert found == {"train_split": DataConfig().train_split, "valid_split": DataConfig().valid_split}
    m = re.search(r"`data\.dataset=([^`]+)\{split\}\.txt` reads `\1(\w+)\.txt` .*? and `\1(\w+)\.txt`", text)
    assert m and (m.group(2), m.group(3)) == (DataConfig().train_split, DataConfig().valid_split), text


def _harness_default(name: str):
    import inspect

    pytest.importorskip("lm_eval")
    from hdlm.harness import HDLMHarnessLM

    return inspect.signature(HDLMHarnessLM.__init__).parameters[name].default


def _parser_default(argv: list[str], dest: str):
    from hdlm.cli import build_parser

    return getattr(build_parser().parse_args(argv), dest)


def _gamma_default_sampler() -> str:
    from hdlm.config import load_config
    from hdlm.processes import make_process
    from hdlm.sampling.samplers import make_sampler

    cfg = load_config("tiny-ptb")  # a γ-hybrid with 0 < γ < 1
    return make_sampler("auto", make_process(cfg.process, 8)).name


# (doc, the sentence stating a default, with the value as group 1; the code's value)
STATED_DEFAULTS = [
    ("docs/user-guide.md", r"`train\.logger` is `(\w+)` \(the default\)", lambda: TrainConfig().logger),
    ("docs/user-guide.md", r"`--detokenize (\w+)` \(the default\)",
     lambda: _parser_default(["eval", "ppl", "--checkpoint", "x"], "detokenize")),
    ("docs/user-guide.md", r"`mc_samples` trajectories per request, default (\d+)", lambda: _harness_default("mc_samples")),
    ("README.md", r"the full-support (posterior)-mean kernel \(the γ default\)", _gamma_default_sampler),
]


@pytest.mark.parametrize("doc,pattern,code", STATED_DEFAULTS, ids=[p for _, p, _ in STATED_DEFAULTS])
def test_defaults_the_docs_state_are_the_codes(doc, pattern, code):
    text = " ".join((Path(__file__).resolve().parents[1] / doc).read_text(encoding="utf-8").split())
    m = re.search(pattern, text)
    assert m, f"{doc} no longer states this default: {pattern}"
    assert str(code()) == m.group(1), (m.group(1), code())
