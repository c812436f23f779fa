"""Imports inside megaclone go one way: no cycle between modules, function-local imports included, nor between
packages (tools -> train/convert -> clone/checkpoint -> spec -> config).

The graph is read from the source with `ast`, so an import hidden inside a function counts as much as one at the
top of a file (it runs as soon as the function does). A node is a module file; `from megaclone.pkg import name`
is an edge to `pkg/__init__.py`, or to the module `pkg/name.py` when that exists, and importing `pkg.mod` from
outside `pkg` is an edge to `pkg/__init__.py` too (Python runs it first). Imports under `if TYPE_CHECKING:` never
run and are left out. Imports may stay inside functions for start-up cost (deepspeed, transformers, matplotlib:
the last test keeps them there), but they count here like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import megaclone

ROOT = Path(megaclone.__file__).parent


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except the bodies of `if TYPE_CHECKING:`."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _resolve(target: str, modules: set[str]) -> str | None:
    """The longest known module `target` names (`a.b.c` -> `a.b` when `c` is a name defined in `a.b`)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _packages_of(module: str) -> list[str]:
    """`a.b.c` -> [`a.b.c`, `a.b`, `a`]: the module and every package whose `__init__` importing it runs."""
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(len(parts), 0, -1)]


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the megaclone modules it imports (the package itself, `megaclone`, is left out: it is empty)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target.split(".")[0] != "megaclone":
                    continue
                resolved = _resolve(target, modules)
                if resolved is None:
                    continue
                # Importing a.b.c from outside package a.b first runs a/b/__init__.py: an edge to it too.
                edges.update(pkg for pkg in _packages_of(resolved) if not _inside(name, pkg))
        edges.discard("megaclone")
        edges.discard(name)
        graph[name] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(a shortest cycle a -> ... -> a, every module of its strongly connected component) for each component of
    more than one module (Tarjan's algorithm; the cycle starts at the component's first module by name)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(_cycle_in(c, graph), sorted(c)) for c in sorted(components, key=min)]


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component (breadth-first)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between megaclone's top-level packages and modules (`megaclone.train`, `megaclone.spec`)."""
    def top(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(top(module), set()).update(top(t) for t in targets if top(t) != top(module))
    return packages


def test_no_import_cycles() -> None:
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles in megaclone:\n" + "\n".join(
        f"{' -> '.join(cycle)}   (strongly connected: {', '.join(members)})" for cycle, members in cycles)


def test_no_cycles_between_packages() -> None:
    """One-way at the coarse grain too: tools -> train/convert -> clone/checkpoint -> spec -> config."""
    cycles = import_cycles(package_graph(import_graph()))
    assert not cycles, "import cycles between megaclone's packages:\n" + "\n".join(
        f"{' -> '.join(cycle)}   (strongly connected: {', '.join(members)})" for cycle, members in cycles)


def test_graph_sees_function_local_relative_and_package_imports(tmp_path: Path) -> None:
    """The checker itself: a cycle closed only inside a function is found and named, a package's __init__ counts
    for an importer outside the package, and an import under TYPE_CHECKING does not count."""
    pkg = tmp_path / "megaclone"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from megaclone.sub.a import f\n")
    (pkg / "sub" / "a.py").write_text("from megaclone import b\n\ndef f():\n    return b\n")
    (pkg / "sub" / "c.py").write_text("from megaclone.sub import a\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from megaclone.sub import c\n"
                              "\ndef g():\n    from .sub.a import f\n    return f\n")
    graph = import_graph(pkg)
    assert graph == {"megaclone": set(), "megaclone.sub": {"megaclone.sub.a"}, "megaclone.sub.a": {"megaclone.b"},
                     "megaclone.sub.c": {"megaclone.sub.a"}, "megaclone.b": {"megaclone.sub", "megaclone.sub.a"}}
    assert import_cycles(graph) == [(["megaclone.b", "megaclone.sub.a", "megaclone.b"],
                                     ["megaclone.b", "megaclone.sub", "megaclone.sub.a"])]
    assert import_cycles(package_graph(graph)) == [(["megaclone.b", "megaclone.sub", "megaclone.b"],
                                                    ["megaclone.b", "megaclone.sub"])]
    (pkg / "b.py").write_text("def g():\n    pass\n")
    assert import_cycles(import_graph(pkg)) == []


@pytest.mark.parametrize("lazy", ["deepspeed", "transformers", "matplotlib"])
def test_heavy_dependencies_stay_lazy(lazy: str) -> None:
    """Importing megaclone's library modules does not import deepspeed, transformers or matplotlib: they are
    imported inside the functions that need them, for start-up cost (tools and tests that never train)."""
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == lazy for n in names):
                offenders.append(module_name(path))
    assert not offenders, f"{lazy} imported at module level by {offenders}"
