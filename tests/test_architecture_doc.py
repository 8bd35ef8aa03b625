"""docs/architecture.md cites only names that exist (issue #12 item 11, #13 item 9).

Every `code` span that looks like a Python name (``hdlm.x.y``, ``Class.method``, ``func(...)``,
``name``) must resolve: a module of the package, an attribute of one, an attribute of a class in
one, or one of the few words below that are arguments or values the contracts describe.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import hdlm

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
# argument names, tensor names and values the contracts talk about (not definitions)
WORDS = {"tokens", "sigma", "positions", "mask", "keep", "out_index", "cache", "commit", "raw", "aux", "rate",
         "family", "kernel", "kernels", "name", "substituted", "table", "levels", "kind", "rho", "steps", "width",
         "split", "settled_end", "active_end", "start", "end", "u", "d", "T", "add_arguments", "run", "main",
         "schedule", "train", "sample", "eval", "repro", "log_every", "eval_every", "save_every"}


def universe() -> set[str]:
    names: set[str] = set()
    for info in pkgutil.walk_packages(hdlm.__path__, "hdlm."):
        if info.name == "hdlm.__main__":
            names.add(info.name)
            continue
        mod = importlib.import_module(info.name)
        short = info.name.rsplit(".", 1)[-1]
        names.add(info.name)
        for attr, value in vars(mod).items():
            names.update({attr, f"{info.name}.{attr}", f"{short}.{attr}"})
            if inspect.isclass(value) and value.__module__.startswith("hdlm"):
                for member in dir(value):
                    names.update({member, f"{attr}.{member}", f"{short}.{attr}.{member}"})
                names.update(getattr(value, "__dataclass_fields__", {}))
    return names


ROOT = DOC.parents[1]


def config_keys() -> set[str]:
    from hdlm.config import LEGACY_KEYS, SECTIONS

    keys = {f"{sec}.{name}" for sec, cls in SECTIONS.items() for name in cls.__dataclass_fields__}
    return keys | {f"{sec}.{name}" for sec, name in LEGACY_KEYS}


def resolves_outside(name: str) -> bool:
    """A standard-library name (``dataclasses.replace``) or a config key (``sample.draw``)."""
    if name in config_keys():
        return True
    head, _, rest = name.partition(".")
    try:
        obj = importlib.import_module(head)
    except ImportError:
        return False
    for part in rest.split(".") if rest else []:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return not head.startswith("hdlm")


def cited_files() -> list[str]:
    return [span for span in re.findall(r"`([^`\n]+)`", DOC.read_text()) if re.fullmatch(r"[\w/.-]+\.(py|md)", span)]


def cited() -> list[str]:
    out = []
    for span in re.findall(r"`([^`\n]+)`", DOC.read_text()):
        if re.fullmatch(r"[\w/.-]+\.(py|md)", span):
            continue  # a file: checked below
        head = re.sub(r"\(.*$", "", span.strip())  # f(x, y) -> f
        for part in re.split(r"\s*[/,]\s*", head):  # a / b, a, b
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", part):
                out.append(part)
    return out


def test_every_name_architecture_md_cites_exists():
    known = universe() | WORDS
    names = cited()
    assert len(names) > 80  # the map names the code: the check has teeth
    missing = sorted({n for n in names if n not in known and not resolves_outside(n)})
    assert not missing, f"docs/architecture.md cites names that do not exist: {missing}"
    files = cited_files()
    assert files and all((ROOT / f).is_file() for f in files), [f for f in files if not (ROOT / f).is_file()]


def test_names_in_the_diagrams_exist():
    """Dotted names inside the fenced diagrams (``Process.reverse_kernel``, ``layout.training_cells``)."""
    fences = re.findall(r"```(?:mermaid)?\n(.*?)```", DOC.read_text(), flags=re.S)
    dotted = {m for f in fences for m in re.findall(r"\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+\b", f)}
    assert len(dotted) > 10
    missing = sorted(dotted - universe())
    assert not missing, f"the diagrams in docs/architecture.md cite names that do not exist: {missing}"


def test_the_checker_catches_a_made_up_name():
    assert "Process.posterior" in universe() and "Process.no_such_method" not in universe()
    assert "hdlm.layout.training_layout" not in universe()  # what the old map cited
