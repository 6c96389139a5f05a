"""The layering rules of the code base, checked on its source with ``ast`` (nothing is imported):

- no import cycle among the modules of ``dist_ckpt`` and ``storage_backends`` (imports at module
  level, inside functions and under ``if TYPE_CHECKING:`` all count, relative ones resolved: a
  module that needs its caller's type for an annotation is a seam to name with a Protocol);
- ``storage_backends`` imports neither ``dist_ckpt`` nor torch;
- nothing outside ``storage_backends`` (library, tests, benchmarks, examples) probes a backend
  with ``hasattr``/``getattr`` (a backend's abilities are its Protocols, not attributes found at
  run time; a heuristic: the probed object's name contains "backend" or is ``.local``/``.root``);
- no ``Protocol`` in ``storage_backends`` declares more than 8 methods;
- no Python file of the project is over 400 lines (measured after ``ruff format``).

Each failure message lists every offender, so one run shows all there is to fix.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dist_ckpt", "storage_backends")
LINE_LIMIT = 400
PROTOCOL_METHOD_LIMIT = 8
LINE_CHECKED_DIRS = ("dist_ckpt", "storage_backends", "tests", "benchmarks", "examples")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imported_names(module: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) of every import statement in ``path``, relative
    imports resolved against ``module``'s package."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [alias.name for alias in node.names]))
    return found


def _internal_target(name: str, modules: dict[str, Path]) -> str | None:
    """The project module that importing ``name`` runs (its longest prefix that is one)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names in _imported_names(module, path):
            # `from pkg import submodule` imports pkg.submodule; `from pkg import name` only pkg
            for dotted in [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]:
                internal = _internal_target(dotted, modules)
                if internal is not None and internal != module:
                    graph[module].add(internal)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each strongly connected component of more than one
    module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return [_cycle_in(graph, set(c)) for c in sorted(components)]


def _component_of(graph: dict[str, set[str]], start: str) -> list[str]:
    """The modules that ``start`` reaches and that reach ``start``."""

    def reach(edges: dict[str, set[str]]) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reverse: dict[str, set[str]] = {m: set() for m in graph}
    for a, targets in graph.items():
        for b in targets:
            reverse[b].add(a)
    return sorted(reach(graph) & reach(reverse))


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first within it)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_the_graph_sees_module_level_function_level_and_relative_imports() -> None:
    graph = _import_graph()
    assert "dist_ckpt.manager" in graph and "storage_backends.base" in graph
    assert "storage_backends" in graph["dist_ckpt.manager"] or any(
        t.startswith("storage_backends") for t in graph["dist_ckpt.manager"]
    )
    # a cycle found in a made-up graph is printed as a closed path
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    graph = _import_graph()
    cycles = _cycles(graph)
    # each cycle, then every direct back-edge in its component (the edges to cut)
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join(cycle))
        members = set(_component_of(graph, cycle[0]))
        lines += [
            f"    {a} <-> {b}" for a in sorted(members) for b in sorted(graph[a] & members) if a < b and a in graph[b]
        ]
    assert not cycles, "import cycles (one per group of modules that import each other):\n" + "\n".join(lines)


def test_storage_backends_imports_neither_dist_ckpt_nor_torch() -> None:
    modules = _modules()
    bad = [
        f"{module} imports {target}"
        for module, path in modules.items()
        if module.split(".")[0] == "storage_backends"
        for target, _ in _imported_names(module, path)
        if target.split(".")[0] in ("dist_ckpt", "torch")
    ]
    assert not bad, "storage_backends must not import dist_ckpt or torch:\n" + "\n".join(bad)


def _probes_a_backend(call: ast.Call) -> bool:
    if not (isinstance(call.func, ast.Name) and call.func.id in ("hasattr", "getattr") and call.args):
        return False
    subject = ast.unparse(call.args[0])
    return "backend" in subject.lower() or subject.endswith((".local", ".root")) or subject in ("local", "root")


def test_no_hasattr_or_getattr_probing_of_backends_outside_storage_backends() -> None:
    probes = [
        f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"
        for top in LINE_CHECKED_DIRS
        if top != "storage_backends"
        for path in sorted((ROOT / top).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Call) and _probes_a_backend(node)
    ]
    assert not probes, "backends probed with hasattr/getattr (declare the ability in a Protocol):\n" + "\n".join(probes)


def _is_protocol(cls: ast.ClassDef) -> bool:
    return any(
        (isinstance(b, ast.Name) and b.id == "Protocol") or (isinstance(b, ast.Attribute) and b.attr == "Protocol")
        for b in cls.bases
    )


def test_no_protocol_in_storage_backends_declares_more_than_8_methods() -> None:
    wide = []
    for path in sorted((ROOT / "storage_backends").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and _is_protocol(node):
                methods = [f.name for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
                if len(methods) > PROTOCOL_METHOD_LIMIT:
                    wide.append(
                        f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} declares {len(methods)}: {methods}"
                    )
    assert not wide, f"Protocols over {PROTOCOL_METHOD_LIMIT} methods (split the seam):\n" + "\n".join(wide)


def test_no_python_file_over_400_lines() -> None:
    long = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for top in LINE_CHECKED_DIRS
        for path in sorted((ROOT / top).rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > LINE_LIMIT
    ]
    assert not long, f"files over {LINE_LIMIT} lines (split them by concern):\n" + "\n".join(long)
