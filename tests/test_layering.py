"""The project's packages import in one direction and without cycles, read from the source.

    core                       the base: configuration, logs, runtime files, entry helpers
     ├── backend, keys         llama-server and models; the key store (neither uses the other)
     │    ├── health           the health process
     │    └── gateway          the HTTP edge
     └── llamagate             the process wiring (serve, fleet, control, CLI): may use all

An import inside `if TYPE_CHECKING:` counts too: a cycle for the type checker is a cycle of
design.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "backend", "keys", "health", "gateway", "llamagate")
MAY_IMPORT: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "backend": frozenset({"core"}),
    "keys": frozenset({"core"}),
    "health": frozenset({"core", "backend"}),
    "gateway": frozenset({"core", "backend", "keys"}),
    "llamagate": frozenset({"core", "backend", "keys", "health", "gateway"}),
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for source in (ROOT / package).rglob("*.py"):
            parts = source.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = source
    return found


def imports_of(name: str, source: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (a package's own module when `from pkg import mod`)."""
    is_package = source.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".") if is_package else name.split(".")[:-1]
                parent = parent[:len(parent) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, source, known) for name, source in known.items()}


def test_the_graph_is_read() -> None:
    g = graph()
    assert "gateway.upstream.proxy" in g["gateway.pipeline"]  # the reader sees what is there
    assert "core.config" in g["llamagate.serve"]


def test_every_import_follows_the_direction() -> None:
    wrong = sorted(f"{name} -> {target}" for name, targets in graph().items() for target in targets
                   if (a := name.split(".")[0]) != (b := target.split(".")[0])
                   and b not in MAY_IMPORT[a])
    assert wrong == []


def test_no_import_cycle() -> None:
    g = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(g[name]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(g):
        if name not in state:
            visit(name)
    assert [" -> ".join(c) for c in cycles] == []
