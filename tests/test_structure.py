"""The shape of the code (issue #13): no import circle, small functions and modules, light entry points.

The import graph is read from the source (AST), function-level imports included, so that a circle
hidden behind a late import is still a circle. Two kinds of import are not edges: those under
``if TYPE_CHECKING:`` (never run) and those under ``if __name__ == "__main__":`` (they run in the
module ``__main__``, not in the module itself, e.g. ``python -m hdlm.train``).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "hdlm"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500
ARGPARSE_TABLES = {"add_arguments", "build_parser"}  # long by nature: one line per option


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _skipped_block(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` and ``if __name__ == "__main__":`` blocks."""
    if not isinstance(node, ast.If):
        return False
    test = ast.unparse(node.test)
    return test in ("TYPE_CHECKING", "typing.TYPE_CHECKING") or test.replace("'", '"') == '__name__ == "__main__"'


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``module`` imports anywhere in its body (function level included)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _skipped_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & known  # `from . import masks`
            found.update(subs)
            if len(subs) < len(node.names):  # names defined in the module (or package) itself
                found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    edges = set()
    for name in found:
        if name not in known:
            continue
        edges.add(name)
        parts = name.split(".")
        # importing a.b.c runs the package a.b first, unless the importer is inside it already
        # (the root `hdlm` stays light: tested below)
        parents = {".".join(parts[:k]) for k in range(2, len(parts))}
        edges.update(p for p in parents if p in known and not (module + ".").startswith(p + "."))
    edges.discard(module)
    return edges


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imported(m, p, set(mods)) for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_a_circle_through_a_function_level_import(tmp_path):
    """The checker itself: a late (function-level) import that closes a circle is found."""
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import g\n")
    known = {"p.a", "p.b"}
    graph = {"p.a": imported("p.a", tmp_path / "a.py", known), "p.b": imported("p.b", tmp_path / "b.py", known)}
    assert find_cycle(graph) == ["p.a", "p.b", "p.a"]
    (tmp_path / "b.py").write_text("if __name__ == '__main__':\n    from .a import g\n")
    graph["p.b"] = imported("p.b", tmp_path / "b.py", known)
    assert find_cycle(graph) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_library_does_not_import_the_cli():
    graph = import_graph()
    cli = {m for m in graph if m == "hdlm.cli" or m.startswith("hdlm.commands")}
    offenders = {m: sorted(graph[m] & cli) for m in graph if m not in cli and m != "hdlm.__main__" and graph[m] & cli}
    assert not offenders, offenders


def test_functions_and_modules_are_small():
    long_functions, long_modules = [], []
    for module, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{module}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in ARGPARSE_TABLES:
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{module}.{node.name}: {n} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions


# --------------------------------------------------------------------------------------------
# light entry points


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_help_and_import_hdlm_do_not_import_torch():
    code = ("import sys\nfrom hdlm.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['sample', '--help'], ['eval', 'ppl', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "import hdlm\nprint('TORCH' if 'torch' in sys.modules else 'LIGHT')")
    out = _run(code)
    assert out.strip().splitlines()[-1] == "LIGHT"
    assert "train.lr = 0.0003: peak learning rate of AdamW" in out  # field descriptions in --help


def test_python_dash_m_hdlm_and_lazy_pipeline():
    env = dict(os.environ, PYTHONPATH=str(SRC))
    out = subprocess.run([sys.executable, "-m", "hdlm", "--version"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("hdlm ")
    for entry in (["-m", "hdlm", "train", "--help"], ["-m", "hdlm.train", "--help"]):  # torchrun -m hdlm train
        out = subprocess.run([sys.executable, *entry], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0 and out.stdout.startswith("usage: hdlm train"), (entry, out.stderr)
    out = subprocess.run([sys.executable, "-m", "hdlm", "train", "train.lrr=1"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 2 and "did you mean 'lr'" in out.stderr and "Traceback" not in out.stderr
    assert _run("from hdlm import HDLMPipeline\nprint(HDLMPipeline.__module__)").strip() == "hdlm.sampling.pipeline"
    with pytest.raises(AttributeError):
        import hdlm

        hdlm.no_such_thing  # noqa: B018
