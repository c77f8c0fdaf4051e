"""The shape of `app/`, as `docs/architecture.md` draws it, checked on the source.

Imports are read with `ast` (those under `if TYPE_CHECKING:` included: a reader
and a type checker see them too) and resolved to modules of `app`. Importing
`a.b.c` from outside the package `a.b` also runs `a.b`'s `__init__` first, so
it counts as importing `a.b` too; from inside `a.b` it does not (the package is
already being imported, and Python resolves a submodule of it at once).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "app"

# Which top-level parts of `app` each part may import. Imports point down:
# routers/http -> services -> providers -> db -> core -> platform -> errors.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "models": set(),
    "platform": {"platform"},
    "core": {"core", "platform", "errors"},
    "db": {"db", "core", "platform", "errors", "models"},
    "providers": {"providers", "core", "platform", "errors"},
    "services": {"services", "providers", "db", "core", "platform", "errors", "models"},
}
LONGEST_MODULE = 450
LONGEST_ROUTER = 160


def module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in APP.rglob("*.py")}


def imported(name: str, path: Path) -> Iterator[str]:
    """The `app` modules (and packages) that module `name` imports."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a.b import c` imports the module a.b.c when there is one, else a.b.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        for target in targets:
            parts = target.split(".")
            for end in range(2, len(parts) + 1):
                candidate = ".".join(parts[:end])
                inside = name == candidate or name.startswith(candidate + ".")
                if candidate in known and candidate != name and (candidate == target or not inside):
                    yield candidate


@cache
def graph() -> dict[str, frozenset[str]]:
    return {name: frozenset(imported(name, path)) for name, path in modules().items()}


def part(name: str) -> str:
    return name.split(".")[1] if name.count(".") else name


def find_cycle(edges: dict[str, frozenset[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> list[str] | None:
        if node in trail:
            return [*trail[trail.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(edges.get(node, ())):
            found = visit(nxt, [*trail, node])
            if found:
                return found
        done.add(node)
        return None

    for start in sorted(edges):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_no_module_imports_itself_round_a_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    edges = {**graph(), "app.errors": frozenset({"app.models"})}
    edges["app.models"] = edges["app.models"] | {"app.errors"}
    assert find_cycle(edges) == ["app.errors", "app.models", "app.errors"]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_point_down(layer: str) -> None:
    upward = sorted(
        f"{name} imports {target}"
        for name, targets in graph().items()
        if part(name) == layer
        for target in targets
        if part(target) not in ALLOWED[layer]
    )
    assert upward == []


def test_no_module_is_longer_than_a_reader_can_hold() -> None:
    long = {
        name: lines
        for name, path in modules().items()
        if (lines := len(path.read_text(encoding="utf-8").splitlines()))
        > (LONGEST_ROUTER if part(name) == "routers" else LONGEST_MODULE)
    }
    assert long == {}
