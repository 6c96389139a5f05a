"""The backend seams (issue 14): small Protocols, every backend satisfying each of them, no
probing of backends for optional methods, and storage_backends' modules joined by explicit
collaborators (no import circle, no reaching into another module's private names)."""

from __future__ import annotations

import ast
import inspect
import pkgutil
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest
from support.faulty_backend import FaultyBackend

import storage_backends
from storage_backends import Backend, ConditionalWrites, ReadableStore, Staging, WritableStore
from storage_backends.local import LocalBackend
from storage_backends.s3 import S3Backend

MAX_METHODS = 8
SEAMS = (ReadableStore, WritableStore, ConditionalWrites, Staging)
PACKAGE = Path(storage_backends.__file__).parent
DIST_CKPT = PACKAGE.parent / "dist_ckpt"


def _modules() -> list[Any]:
    return [import_module(f"storage_backends.{m.name}") for m in pkgutil.iter_modules([str(PACKAGE)])]


def _protocols() -> list[type]:
    found = {
        cls
        for module in [storage_backends, *_modules()]
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if cls.__module__.startswith("storage_backends") and getattr(cls, "_is_protocol", False)
    }
    return sorted(found, key=lambda c: c.__qualname__)


def _own_methods(cls: type) -> set[str]:
    return {
        name
        for name, value in vars(cls).items()
        if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))
    }


def _methods(cls: type) -> set[str]:
    """Own methods and those of the Protocols it extends."""
    return set().union(*(_own_methods(c) for c in cls.__mro__ if getattr(c, "_is_protocol", False)))


def test_every_protocol_in_storage_backends_has_at_most_eight_methods() -> None:
    protocols = _protocols()
    assert {p.__name__ for p in protocols} >= {"Backend", "ObjectWriter", *(s.__name__ for s in SEAMS)}
    for proto in protocols:
        own = _own_methods(proto)
        assert len(own) <= MAX_METHODS, f"{proto.__qualname__} declares {len(own)} methods: {sorted(own)}"
        # a Protocol either is a seam (<= 8 methods, inherited ones included) or only combines seams
        assert not own or len(_methods(proto)) <= MAX_METHODS, (proto.__qualname__, sorted(_methods(proto)))
    assert _own_methods(Backend) == set(), "Backend only combines the seams"
    assert set(Backend.__mro__) >= set(SEAMS)
    # the seams do not overlap: each method belongs to one of them
    names = [m for seam in SEAMS for m in _methods(seam)]
    assert len(names) == len(set(names)) == len(_methods(Backend))


def _signature_problems(proto: type, obj: Any) -> list[str]:
    """Where ``obj``'s methods do not accept the calls the Protocol describes."""
    problems = []
    for name in sorted(_methods(proto)):
        want = inspect.signature(getattr(proto, name))
        have = inspect.signature(getattr(obj, name))
        params = dict(have.parameters)
        for p in list(want.parameters.values())[1:]:  # past self
            got = params.pop(p.name, None)
            if got is None or got.kind != p.kind or (p.default is not p.empty) != (got.default is not got.empty):
                problems.append(f"{name}: parameter {p.name} is {got} where {proto.__name__} has {p}")
        required = [
            p for p in params.values() if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        problems += [f"{name}: extra parameter {p} has no default" for p in required]
    return problems


def _backends(tmp_path: Path) -> dict[str, Any]:
    local = LocalBackend(str(tmp_path / "local"))
    return {
        "LocalBackend": local,
        # no request is sent: the client only needs to exist
        "S3Backend": S3Backend("bucket", "run", endpoint_url="http://127.0.0.1:9"),
        "FaultyBackend": FaultyBackend(local),
    }


@pytest.mark.parametrize("seam", SEAMS, ids=lambda s: s.__name__)
def test_every_backend_satisfies_every_seam(tmp_path: Path, seam: type) -> None:
    for name, backend in _backends(tmp_path).items():
        assert isinstance(backend, seam), f"{name} is not a {seam.__name__}"
        assert isinstance(backend, Backend)
        assert _signature_problems(seam, backend) == [], name


def test_the_tier_router_is_a_readable_store(tmp_path: Path) -> None:
    from dist_ckpt.tiers.restore_choice import RoutedBackend

    local, root = LocalBackend(str(tmp_path / "local")), LocalBackend(str(tmp_path / "root"))
    routed = RoutedBackend(local, root, "step_000000001", {"a.bin"}, all_local=False)
    assert isinstance(routed, ReadableStore) and _signature_problems(ReadableStore, routed) == []
    local.write_bytes("step_000000001/a.bin", b"local")
    root.write_bytes("step_000000001/b.bin", b"root!")
    out = bytearray(5)
    assert routed.read_into("step_000000001/a.bin", 0, memoryview(out)) == 5 and out == b"local"
    assert routed.read_into("step_000000001/b.bin", 0, memoryview(out)) == 5 and out == b"root!"


def test_dist_ckpt_never_probes_a_backend_for_a_method() -> None:
    """hasattr/getattr with a backend method's name: the seams make every method explicit.
    Names that other objects have too (a tensor's ``size``) count only on something named a
    backend."""
    method_names = {m for seam in SEAMS for m in _methods(seam)}
    generic = {"size", "read", "list", "exists", "delete"}
    probes = []
    for path in sorted(DIST_CKPT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("hasattr", "getattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in method_names
                and (node.args[1].value not in generic or "backend" in ast.unparse(node.args[0]))
            ):
                probes.append(f"{path.relative_to(DIST_CKPT.parent)}:{node.lineno}")
    assert probes == []


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in ``tree``, those under ``if TYPE_CHECKING`` too."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_storage_backends_modules_import_no_circle_and_no_private_name() -> None:
    trees = {
        f"storage_backends.{p.stem}" if p.stem != "__init__" else "storage_backends": ast.parse(p.read_text())
        for p in PACKAGE.glob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        edges = set()
        for module, names in _imports(tree):
            assert not module.startswith("dist_ckpt") and module.split(".")[0] != "torch", (name, module)
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in trees] or [module]
            edges |= {t for t in targets if t in trees and t != "storage_backends"}
            private = [n for n in names if n.startswith("_") and n != "__future__"]
            assert not private or module not in trees, f"{name} imports private {private} from {module}"
        graph[name] = edges

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return [*path, nxt]
            if nxt not in path:
                found = cycle_from(start, [*path, nxt])
                if found:
                    return found
        return None

    for module in sorted(graph):
        assert cycle_from(module, [module]) is None, " -> ".join(cycle_from(module, [module]) or [])

    # no module reaches into another object's private attributes (``backend._error``): only
    # ``self._x`` and ``cls._x``
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                assert isinstance(base, ast.Name) and base.id in ("self", "cls"), (
                    f"{name}:{node.lineno} reaches into {ast.unparse(node)}"
                )
