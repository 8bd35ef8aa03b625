"""What the README and the user guide say about the default preset is the preset (issue #12 item 11).

They said GPT-2 tokens, ω = 16, 4 × 256 while src/hdlm/presets/tiny-ptb.yaml is bert-base-uncased,
ω = 4, 4 layers × 128. Each fact is read from the docs' sentence and compared with the loaded preset;
a statement that drops a fact fails too (the regular expression must find it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hdlm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PRESET = "tiny-ptb"


def statements() -> dict[str, str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    guide = (ROOT / "docs" / "user-guide.md").read_text(encoding="utf-8")
    main_job = next(p for p in readme.split("\n\n") if f"`{PRESET}` preset" in p)
    row = next(line for line in guide.splitlines() if line.startswith(f"| `{PRESET}` (default)"))
    return {"README.md": " ".join(main_job.split()), "docs/user-guide.md": row}


def facts(text: str) -> dict[str, object]:
    found = {}
    for key, pattern, cast in (("gamma", r"γ = ([0-9.]+)", float), ("width", r"ω = (\d+)", int),
                               ("length", r"\bd = (\d+)", int), ("layers", r"(\d+) layers × (\d+)", None)):
        m = re.search(pattern, text)
        assert m, f"the statement does not give {key}: {text!r}"
        found[key] = (int(m.group(1)), int(m.group(2))) if cast is None else cast(m.group(1))
    found["kind"] = re.search(r"\b(Block|Slide|Flat|Quench)\b", text).group(1).lower()
    found["configuration"] = re.search(r"\b(ALIGNED|SHIFTED)\b", text).group(1).lower()
    return found


@pytest.mark.parametrize("doc", ["README.md", "docs/user-guide.md"])
def test_default_preset_statements_match_the_preset(doc):
    cfg = load_config(PRESET)
    text = statements()[doc]
    assert facts(text) == {"gamma": cfg.process.gamma, "width": cfg.schedule.width, "length": cfg.model.length,
                           "layers": (cfg.model.n_layers, cfg.model.hidden), "kind": cfg.schedule.kind,
                           "configuration": cfg.model.configuration}
    assert cfg.data.tokenizer in text, f"{doc} does not name the preset's tokenizer {cfg.data.tokenizer}"
    assert re.search(r"\b(PTB|Penn Treebank)\b", text) and cfg.data.dataset == "ptb", f"{doc}: the data is not PTB"
    for other in ("GPT-2", "gpt2", "BERT tokens") if cfg.data.tokenizer != "gpt2" else ("bert",):
        assert other not in text, f"{doc} names another tokenizer ({other}) for {PRESET}"


def test_the_time_the_docs_state_is_the_one_the_preset_records():
    recorded = re.search(r"in about (\d+) minutes", (ROOT / "src/hdlm/presets" / f"{PRESET}.yaml").read_text())
    assert recorded
    for doc, text in statements().items():
        m = re.search(r"about (\d+) minutes", text)
        assert m and m.group(1) == recorded.group(1), doc


# --------------------------------------------------------------------------------------------
# the user guide's preset table: every preset has a row, every fact a row states is the preset's

DATASETS = {"PTB": "ptb", "OWT": "openwebtext", "LM1B": "lm1b"}


def preset_rows() -> dict[str, str]:
    guide = (ROOT / "docs" / "user-guide.md").read_text(encoding="utf-8")
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w-]+)`(?: \(default\))? \| (.*) \|$", guide, re.M)
            if (ROOT / "src/hdlm/presets" / f"{m.group(1)}.yaml").is_file()}


def stated(row: str) -> dict[str, object]:
    """The facts a row states, each read with its own pattern (a fact the row does not give is absent)."""
    out: dict[str, object] = {}
    for key, pattern, cast in (("process.gamma", r"γ = ([0-9.]+)", float), ("process.epsilon", r"ε = ([0-9.]+)", float),
                               ("schedule.width", r"ω = (\d+)", int), ("model.length", r"\bd = (\d+)", int),
                               ("train.batch_size", r"\bbatch (\d+)", int),
                               ("model.n_layers", r"\b(\d+) (?:layers )?× \d+", int),
                               ("model.hidden", r"\b\d+ (?:layers )?× (\d+)", int),
                               ("model.n_heads", r"× (\d+) heads", int)):
        m = re.search(pattern, row)
        if m:
            out[key] = cast(m.group(1))
    kinds = re.findall(r"\b(Block|Slide|Flat|Quench)\b", row)
    if kinds:
        out["schedule.kind"] = kinds[0].lower()
    for word, kind in (("γ-hybrid", "gamma"), ("ε-hybrid", "epsilon")):
        if word in row:
            out["process.kind"] = kind
    if re.search(r"\b(ALIGNED|SHIFTED)\b", row):
        out["model.configuration"] = re.search(r"\b(ALIGNED|SHIFTED)\b", row).group(1).lower()
    if "no time conditioning" in row:
        out["model.time_conditioning"] = False
    names = [d for d in DATASETS if re.search(rf"\b{d}\b", row)]
    if names:
        out["dataset"] = DATASETS[names[0]]
    tok = re.search(r"\b(bert-base-uncased|gpt2|GPT-2)\b", row)
    if tok:
        out["data.tokenizer"] = tok.group(1).lower().replace("-2", "2")
    return out


def _actual(cfg, key: str):
    if key == "dataset":
        return next((v for v in DATASETS.values() if v in cfg.data.dataset.lower()), cfg.data.dataset)
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def test_every_preset_has_a_row_in_the_user_guide():
    files = {p.stem for p in (ROOT / "src/hdlm/presets").glob("*.yaml")}
    assert set(preset_rows()) == files


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "src/hdlm/presets").glob("*.yaml")))
def test_each_preset_row_states_only_what_the_preset_is(name):
    cfg, row = load_config(name), preset_rows()[name]
    facts = stated(row)
    if name.startswith("smollm2"):  # the same with Slide: the other facts are the block row's
        facts = {**stated(preset_rows()["smollm2-ptb-block"]), **facts}
    assert len(facts) >= 2, f"the {name} row states too little to check: {row!r}"
    wrong = {k: (v, _actual(cfg, k)) for k, v in facts.items() if _actual(cfg, k) != v}
    assert not wrong, f"user guide row for {name}: stated vs preset {wrong}"


def test_the_preset_the_docs_call_default_is_the_commands_default():
    from hdlm.cli import build_parser
    from hdlm.commands.train import DEFAULT_PRESET

    guide = (ROOT / "docs" / "user-guide.md").read_text(encoding="utf-8")
    marked = re.findall(r"^\| `([\w-]+)` \(default\) \|", guide, re.M)
    run = build_parser().parse_args(["run"])
    assert marked == [PRESET] == [DEFAULT_PRESET] == [run.config]
