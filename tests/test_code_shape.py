"""The shape of the code a newcomer reads: no import circle among the project's modules, and no
function longer than a screen in the engine, the stages and the manifests. Checked with ``ast`` on the
source, so nothing is imported or run."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("manifests", "facekit", "stages", "training", "pipeline")
SHORT_PACKAGES = ("pipeline", "stages", "manifests")
MAX_FUNCTION_LINES = 80
# Functions in files other work rewrites at the same time; this list only shrinks.
LONG_FUNCTIONS_ALLOWED: frozenset[str] = frozenset()


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (a function-level import closes a circle
    as surely as a top-level one, it only hides it)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_cycles() -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    modules = _modules()
    graph = {m: _imports(p, m, set(modules)) for m, p in modules.items()}
    # A package's __init__ re-exporting its submodules is no circle: drop package -> own child edges.
    for m, deps in graph.items():
        graph[m] = {d for d in deps if not d.startswith(m + ".")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group: list[str] = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _long_in(tree: ast.AST, module: str) -> list[str]:
    out: list[str] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                qual = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = (child.end_lineno or child.lineno) - child.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        out.append(f"{module}:{qual} ({lines})")
                walk(child, qual + ".")

    walk(tree, "")
    return out


def long_functions() -> list[str]:
    """``module:qualname (lines)`` of each function over MAX_FUNCTION_LINES in SHORT_PACKAGES."""
    return [f for name, path in _modules().items() if name.startswith(SHORT_PACKAGES)
            for f in _long_in(ast.parse(path.read_text(), str(path)), name)]


def test_no_module_imports_itself_through_a_circle() -> None:
    assert import_cycles() == []


def test_no_function_in_the_engine_stages_or_manifests_is_longer_than_80_lines() -> None:
    over = [f for f in long_functions() if f.rsplit(" ", 1)[0] not in LONG_FUNCTIONS_ALLOWED]
    assert over == []


def test_the_allow_list_of_long_functions_names_only_functions_still_long() -> None:
    still = {f.rsplit(" ", 1)[0] for f in long_functions()}
    assert sorted(LONG_FUNCTIONS_ALLOWED - still) == []
