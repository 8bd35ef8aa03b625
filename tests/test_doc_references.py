"""Every doc names only code that exists (issue #12 item 11): the README, the user guide and the
docs/ pages, not just docs/architecture.md (whose every name tests/test_architecture_doc.py checks).

In backticks: a ``*.py`` path must be a file; ``hdlm.x.y``, ``f(...)``, ``Class.member`` and
``module.name`` (a module or class of the package before the dot) must resolve by import and
getattr; ``test_*`` must be a test in tests/. Other spans (config values, file names, JSON keys)
are prose. A few names of the official reference code are listed with where they live.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import hdlm
from test_architecture_doc import resolves_outside, universe

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/user-guide.md", "docs/checkpoints.md", "docs/likelihood.md", "docs/conversion.md",
        "docs/repro-results.md", "docs/architecture.md"]
ALIASES = {"pipe": "HDLMPipeline"}  # the examples' variable for an HDLMPipeline
OFFICIAL = {"LogLinearNoise"}  # ServiceNow/hdlm's noise class (docs/checkpoints.md maps it to process.noise)
# dotted spans with these heads are config keys (ours or the official YAML's: `noise.type`) or attributes
# of a Hugging Face model (`model.lm_head`), not modules; config keys are checked in test_cli_docs / config
NOT_MODULES = {"noise", "sampling", "graph", "annealing", "training", "tokenizer"}
FILE_NAME = re.compile(r".*\.(json|jsonl|safetensors|png|yaml|txt|md|bin|pt|gguf|parquet)")
NAME = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"


def _heads() -> set[str]:
    """Module short names and class names of the package: a dotted span starting with one is code."""
    heads = set()
    for info in pkgutil.walk_packages(hdlm.__path__, "hdlm."):
        if info.name == "hdlm.__main__":
            continue
        heads.add(info.name.rsplit(".", 1)[-1])
        mod = importlib.import_module(info.name)
        heads.update(k for k, v in vars(mod).items() if inspect.isclass(v) and v.__module__.startswith("hdlm"))
    from hdlm.config import SECTIONS

    return heads - set(SECTIONS) - NOT_MODULES


def _test_names() -> set[str]:
    return {m for f in (ROOT / "tests").glob("test_*.py") for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}


def references(text: str, heads: set[str]) -> list[tuple[str, str]]:
    """(kind, reference) for every code reference in backticks of ``text``."""
    out = []
    for span in (s.strip() for s in re.findall(r"`([^`\n]+)`", text)):
        out += [("file", f) for f in re.findall(r"[\w/.-]+\.py\b", span)]
        out += [("name", n) for n in re.findall(r"\bhdlm(?:\.[A-Za-z_]\w*)+", span)]
        call = re.fullmatch(rf"({NAME})\(.*\)", span)
        if call:
            out.append(("name", call.group(1)))
        dotted = re.fullmatch(NAME, span)
        if dotted and "." in span and span.split(".")[0] in heads | set(ALIASES) and not FILE_NAME.fullmatch(span) \
                and not span.endswith(".py"):
            out.append(("name", span))
        if re.fullmatch(r"test_\w+", span):
            out.append(("test", span))
    return out


@pytest.fixture(scope="module")
def code() -> dict:
    return {"names": universe(), "heads": _heads(), "tests": _test_names()}


def missing(refs: list[tuple[str, str]], code: dict) -> list[str]:
    bad = []
    for kind, ref in refs:
        if kind == "file":
            ok = any((base / ref).is_file() for base in (ROOT, ROOT / "src", ROOT / "src" / "hdlm"))
        elif kind == "test":
            ok = ref in code["tests"]
        else:
            head, _, rest = ref.partition(".")
            name = ALIASES.get(head, head) + ("." + rest if rest else "")
            ok = name in code["names"] or name in OFFICIAL or resolves_outside(name)
        if not ok:
            bad.append(f"{kind} {ref}")
    return sorted(set(bad))


@pytest.mark.parametrize("doc", DOCS)
def test_every_code_reference_in_the_docs_exists(doc, code):
    refs = references((ROOT / doc).read_text(encoding="utf-8"), code["heads"])
    assert not missing(refs, code), f"{doc} names code that does not exist: {missing(refs, code)}"


def test_the_docs_name_enough_code_for_the_check_to_have_teeth(code):
    refs = [r for doc in DOCS for r in references((ROOT / doc).read_text(encoding="utf-8"), code["heads"])]
    kinds = {k: sum(1 for kind, _ in refs if kind == k) for k in ("file", "name", "test")}
    assert kinds["file"] >= 10 and kinds["name"] >= 50 and kinds["test"] >= 3, kinds


def test_the_check_catches_made_up_references(code):
    text = ("`hdlm.sampling.no_such` `perplexity_bound(model)` `no_such_function(x)` `HDLMPipeline.nope` "
            "`pipe.generate_ids` `pipe.nope` `src/hdlm/nope.py` `tests/test_progress.py` `test_no_such_test`")
    assert missing(references(text, code["heads"]), code) == [
        "file src/hdlm/nope.py", "name HDLMPipeline.nope", "name hdlm.sampling.no_such", "name no_such_function",
        "name pipe.nope", "test test_no_such_test"]


def test_checkpoint_folder_names_in_the_docs_are_the_codes():
    """``step-00001000`` as :func:`hdlm.run_folder.step_dir_name` writes it (not ``step_``, not unpadded);
    a placeholder has as many characters as the number; the pointer file is ``run_folder.LATEST``."""
    from hdlm.run_folder import LATEST, step_dir_name

    width = len(step_dir_name(0)) - len("step-")
    prefix = step_dir_name(0)[:-width]
    seen = 0
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        assert not re.search(r"\bstep_[0-9XN]{2,}", text), f"{doc}: checkpoint folders are named {prefix}…"
        for name in re.findall(r"\bstep-([0-9]+|[XN]{2,})\b", text):
            seen += 1
            assert len(name) == width and (not name.isdigit() or step_dir_name(int(name)) == prefix + name), (doc, name)
        for pointer in re.findall(r"`(\w+)` pointer", text):
            assert pointer == LATEST, (doc, pointer)
    assert seen >= 3
