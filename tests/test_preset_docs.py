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
    for other in ("GPT-2", "gpt2", "BERT tokens") if cfg.data.tokenizer != "gpt2" else ("bert",):
        assert other not in text, f"{doc} names another tokenizer ({other}) for {PRESET}"


def test_the_time_the_docs_state_is_the_one_the_preset_records():
    recorded = re.search(r"in about (\d+) minutes", (ROOT / "src/hdlm/presets" / f"{PRESET}.yaml").read_text())
    assert recorded
    for doc, text in statements().items():
        m = re.search(r"about (\d+) minutes", text)
        assert m and m.group(1) == recorded.group(1), doc
