"""The project's packages import in one direction and without cycles, read from the source.

    core                       the base: configuration, logs, runtime files, entry helpers
     ├── fleet                 the link to the fleet's Redis (REDIS_URL)
     ├── backend, keys         llama-server and models; the key store (neither uses the other;
     │                         keys may use fleet: keys, usage and audit in Redis)
     │    ├── health           the health process
     │    └── gateway          the HTTP edge
     └── llamagate             the process wiring (serve, fleet, control, CLI): may use all

An import inside `if TYPE_CHECKING:` counts for the direction, not for cycles: it is not an
import at run time, and two classes that call each other on every request (an HTTP
connection and the request it answers) name each other's concrete type so that mypyc calls
their methods natively: typed through a Protocol instead, each such call was a method
lookup by name (callgrind: about 3,000 instructions per proxied request).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "fleet", "backend", "keys", "health", "gateway", "llamagate")
MAY_IMPORT: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "fleet": frozenset({"core"}),
    "backend": frozenset({"core"}),
    "keys": frozenset({"core", "fleet"}),
    "health": frozenset({"core", "backend"}),
    "gateway": frozenset({"core", "fleet", "backend", "keys"}),
    "llamagate": frozenset({"core", "fleet", "backend", "keys", "health", "gateway"}),
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


def _typing_only(tree: ast.Module) -> set[int]:
    """The ids of the import nodes under `if TYPE_CHECKING:`."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found |= {id(n) for stmt in node.body for n in ast.walk(stmt)
                      if isinstance(n, (ast.Import, ast.ImportFrom))}
    return found


def imports_of(name: str, source: Path, known: dict[str, Path],
               runtime_only: bool = False) -> set[str]:
    """The project modules `name` imports (a package's own module when `from pkg import mod`);
    ``runtime_only``: leave out those imported for the type checker alone."""
    is_package = source.name == "__init__.py"
    out: set[str] = set()
    tree = ast.parse(source.read_text(), str(source))
    skip = _typing_only(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
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


def graph(runtime_only: bool = False) -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, source, known, runtime_only) for name, source in known.items()}


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
    g = graph(runtime_only=True)
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


def test_typing_only_imports_are_told_apart(tmp_path: Path) -> None:
    """The reader sees an import under TYPE_CHECKING, and leaves it out only for cycles."""
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from core.config import Config\n")
    known = {"core.config": ROOT / "core" / "config.py", "probe": source}
    assert imports_of("probe", source, known) == {"core.config"}
    assert imports_of("probe", source, known, runtime_only=True) == set()
