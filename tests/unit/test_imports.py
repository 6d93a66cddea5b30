"""meshctl's modules import each other without a cycle, at any depth.

Walks every ``import`` statement (module level and inside functions, where a
cycle is easiest to hide) with ``ast`` and fails on any cycle between
meshctl's own modules. Imports under ``if TYPE_CHECKING:`` are left out: they
never run, and a type hint naming its owner (``lab._host.Host`` annotating
its ``Lab``) is not a layering of code.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "meshctl"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """The meshctl modules ``path`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            # importing a.b.c runs a, a.b and a.b.c
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in modules and candidate != this:
                    found.add(candidate)
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:``."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    files = sorted(package.rglob("*.py"))
    modules = {module_name(f, package) for f in files}
    return {module_name(f, package): imports_of(f, modules, package) for f in files}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as [a, b, …, a], or [] if there is none.

    A package's ``__init__`` importing its own submodules is not a cycle of
    interest (Python runs the package first by construction), so edges from a
    submodule up to a package that contains it are left out.
    """
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if node.startswith(dep + "."):
                continue
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_meshctl_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "meshctl.model" in graph and "meshctl.compile" in graph
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_model_is_below_chain_and_intentions() -> None:
    graph = import_graph()
    for module in ("meshctl.chain", "meshctl.intentions", "meshctl.model"):
        assert "meshctl.compile" not in graph[module], module
        assert "meshctl.snapshot_io" not in graph[module], module


@pytest.mark.parametrize("where", ["module", "function"])
def test_the_walk_finds_a_cycle_hidden_anywhere(tmp_path: Path, where: str) -> None:
    # The harness can tell a difference: a two-module cycle, one side at the
    # given level, is found.
    pkg = tmp_path / "meshctl"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from meshctl.b import x\n")
    body = ("from meshctl import a\n" if where == "module"
            else "def f():\n    from meshctl.a import y\n    return y\n")
    (pkg / "b.py").write_text(body)
    (pkg / "c.py").write_text("from . import a\n"
                              "from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from meshctl import b\n")
    graph = import_graph(pkg)
    assert graph["meshctl.c"] == {"meshctl", "meshctl.a"}
    assert find_cycle(graph) in (["meshctl.a", "meshctl.b", "meshctl.a"],
                                 ["meshctl.b", "meshctl.a", "meshctl.b"])
    (pkg / "b.py").write_text("x = 1\n")
    assert find_cycle(import_graph(pkg)) == []


# ---------------------------------------------------------------- drivers own their knowledge

DRIVERS = ("nginx", "haproxy")


def driver_name_switches(package: Path = PACKAGE) -> list[str]:
    """Every comparison with a driver's name outside that driver's own package.

    ``x == "nginx"``, ``x != "haproxy"``, ``x in ("nginx", …)``: a branch on
    which proxy runs belongs in the driver (its plan, its gaps), not in shared
    code. Defaults and argument strings (``proxy: str = "nginx"``) are not
    comparisons and are left alone.
    """
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).parts
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Compare):
                continue
            names = set()
            for side in (node.left, *node.comparators):
                items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                names |= {i.value for i in items
                          if isinstance(i, ast.Constant) and i.value in DRIVERS}
            for name in sorted(names):
                if rel[:2] != ("proxy", name):
                    found.append(f"{'/'.join(rel)}:{node.lineno} compares with {name!r}")
    return found


def test_no_driver_name_is_compared_outside_its_driver() -> None:
    assert driver_name_switches() == []


def test_the_switch_finder_sees_a_switch(tmp_path: Path) -> None:
    pkg = tmp_path / "meshctl"
    (pkg / "proxy" / "nginx").mkdir(parents=True)
    (pkg / "proxy" / "nginx" / "gaps.py").write_text("ok = name == 'nginx'\n")
    (pkg / "shared.py").write_text("def f(driver, c):\n    proxy: str = 'nginx'\n"
                                   "    return driver == 'nginx' or c in ('haproxy', 'x')\n")
    assert sorted(driver_name_switches(pkg)) == ["shared.py:3 compares with 'haproxy'",
                                         "shared.py:3 compares with 'nginx'"]
