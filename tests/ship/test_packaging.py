"""pyproject.toml declares every library the code imports, and the two locks pin them with
hashes: requirements.lock the runtime (the images), requirements-dev.lock the same pins plus
the dev extra (`make setup`). The floors themselves are tested by scripts/min_versions.sh,
which runs the suite on them."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OURS = frozenset({"core", "fleet", "backend", "keys", "health", "gateway", "llamagate", "scripts",
                  "tests"})


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements: list[str]) -> set[str]:
    return {canonical(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in requirements}


RUNTIME = declared(PROJECT["dependencies"])
DEV = declared(PROJECT["optional-dependencies"]["dev"])


def imported(folders: list[str]) -> dict[str, set[str]]:
    """Third-party top-level modules imported anywhere under ``folders`` → the files."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for source in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text(), str(source))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OURS and top != "__future__":
                        found.setdefault(top, set()).add(str(source.relative_to(ROOT)))
    return found


@cache
def installed() -> dict[str, list[str]]:
    return dict(packages_distributions())  # a scan of every installed distribution


def distributions(module: str) -> set[str]:
    return {canonical(d) for d in installed().get(module, [module])}


@pytest.mark.parametrize(("folders", "allowed", "extra"), [
    (["core", "fleet", "backend", "keys", "health", "gateway", "llamagate"], RUNTIME, "dependencies"),
    (["scripts", "tests"], RUNTIME | DEV, "the dev extra"),
])
def test_every_import_is_declared(folders: list[str], allowed: set[str], extra: str) -> None:
    missing = {module: sorted(files) for module, files in imported(folders).items()
               if not distributions(module) & allowed}
    assert not missing, f"imported but not in pyproject.toml's {extra}: {missing}"


@cache
def pins(lock: str) -> dict[str, str]:
    """package → version; each pin must carry at least one hash."""
    text = (ROOT / lock).read_text()
    entries = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)(.*?)(?=^\S|\Z)", text,
                         flags=re.MULTILINE | re.DOTALL)
    for name, version, rest in entries:
        assert "--hash=sha256:" in rest, f"{lock}: {name}=={version} has no hash"
    return {canonical(name): version for name, version, _ in entries}


def test_the_runtime_lock_pins_the_runtime_alone() -> None:
    runtime = pins("requirements.lock")
    assert set(runtime) >= RUNTIME, f"not locked: {RUNTIME - set(runtime)} (make lock)"
    dev_only = {"pytest", "mypy", "ruff", "openai", "schemathesis"}
    assert not dev_only & set(runtime), "dev tools in the runtime lock"


def test_the_dev_lock_pins_the_runtime_as_the_images_do() -> None:
    runtime, dev = pins("requirements.lock"), pins("requirements-dev.lock")
    assert set(dev) >= DEV, f"not locked: {DEV - set(dev)} (make lock)"
    differ = {name: (version, dev.get(name)) for name, version in runtime.items()
              if dev.get(name) != version}
    assert not differ, f"runtime pins that requirements-dev.lock changes: {differ} (make lock)"
