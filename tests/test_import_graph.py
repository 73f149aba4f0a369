"""The package's import graph: no circle between modules (every import counts, those inside functions too), no
circle between sub-packages, and every module imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import expertyard

PACKAGE_DIR = Path(expertyard.__file__).resolve().parent
# third-party packages the project treats as optional extras: a module that needs one may import it inside a
# function, and where one is missing, a module that imports it at top level is skipped instead of failed
OPTIONAL = {"triton", "fastapi", "uvicorn", "matplotlib", "xgrammar", "huggingface_hub", "accelerate", "lm_eval"}
# circles between sub-packages that still exist (each one is an issue to fix, then to delete from here)
KNOWN_PACKAGE_CYCLES: set[frozenset[str]] = {
    frozenset({"experts", "trace"}),  # experts/predictors/trained.py imports trace.record
}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package by its __init__.py)."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = ("expertyard", *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, path: Path, node: ast.Import | ast.ImportFrom, known) -> list[str]:
    """The package modules one import statement loads: `from P import m` is module P.m when P.m exists, else P."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        if node.level:
            base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            stem = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
    out = []
    for t in targets:
        while t and t not in known:  # `import expertyard.x.y.Name` style: the nearest module
            t = t.rpartition(".")[0]
        if t and t != name and t != "expertyard":
            out.append(t)
    return out


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the first such import}, over all imports anywhere in the file."""
    known = modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in known}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in imported(name, path, node, known):
                    graph[name].setdefault(t, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One concrete circle [a, b, ..., a] per strongly connected component of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle(graph, comp) for comp in comps]


def _circle(graph, comp: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component (BFS)."""
    start = min(comp)
    parent = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w in comp and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(comp)} is not strongly connected")


def describe(graph, circle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(circle, circle[1:])) + f" -> {circle[-1]}"


def test_cycle_finder_reports_a_circle_and_ignores_a_chain():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"d": 5}}
    (circle,) = cycles(graph)
    assert circle == ["a", "b", "c", "a"]
    assert describe(graph, circle) == "a (line 1) -> b (line 2) -> c (line 3) -> a"
    assert cycles({"a": {"b": 1}, "b": {}, "c": {"a": 2, "b": 3}}) == []


def test_graph_sees_imports_inside_functions_and_relative_imports(tmp_path):
    known = {"expertyard.p": tmp_path / "p" / "__init__.py", "expertyard.p.x": tmp_path / "p" / "x.py",
             "expertyard.p.y": tmp_path / "p" / "y.py", "expertyard.q": tmp_path / "q.py"}
    code = "def f():\n    from expertyard.q import thing\n    from . import y\n    from .y import Name\n"
    nodes = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.ImportFrom)]
    found = [t for n in nodes for t in imported("expertyard.p.x", known["expertyard.p.x"], n, known)]
    assert found == ["expertyard.q", "expertyard.p.y", "expertyard.p.y"]


def test_no_import_circle_between_modules():
    graph = import_graph()
    found = [describe(graph, c) for c in cycles(graph)]
    assert not found, "import circles (imports inside functions count too):\n" + "\n".join(found)


def test_no_new_import_circle_between_subpackages():
    """expertyard.A imports expertyard.B and B imports A, through any of their modules."""
    graph = import_graph()
    packages: dict[str, dict[str, int]] = {}
    for a, targets in graph.items():
        if a == "expertyard":
            continue
        pa = a.split(".")[1]
        packages.setdefault(pa, {})
        for b, line in targets.items():
            pb = b.split(".")[1]
            if pb != pa:
                packages[pa].setdefault(pb, line)
    found = {frozenset(c[:-1]) for c in cycles(packages)}
    assert found - KNOWN_PACKAGE_CYCLES == set(), f"new circles between sub-packages: {found - KNOWN_PACKAGE_CYCLES}"
    assert KNOWN_PACKAGE_CYCLES - found == set(), f"fixed: delete {KNOWN_PACKAGE_CYCLES - found} from the list"


CHILD = """
import importlib, os, sys
import torch, numpy, transformers  # heavy third-party packages once, before forking; no expertyard module yet
optional = set(sys.argv[1].split(","))
for name in sys.argv[2:]:
    pid = os.fork()
    if pid == 0:  # a fresh process with no expertyard module loaded: only `name` and what it imports
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            root = (e.name or "").split(".")[0]
            print(("SKIP " if root in optional else "FAIL ") + name + ": " + repr(e), flush=True)
            os._exit(0 if root in optional else 1)
        except BaseException as e:
            print("FAIL " + name + ": " + repr(e), flush=True)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        print("STATUS " + name + ": " + str(status), flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="one forked process per module needs os.fork")
def test_every_module_imports_alone_in_a_fresh_interpreter():
    names = sorted(modules())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", CHILD, ",".join(sorted(OPTIONAL)), *names], env=env,
                         capture_output=True, text=True, timeout=600)
    failures = [line for line in run.stdout.splitlines() if line.startswith(("FAIL", "STATUS"))]
    assert run.returncode == 0 and not failures, "\n".join(failures) + run.stderr[-2000:]
