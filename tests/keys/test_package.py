"""Package rules: keys is a leaf, and importing it does nothing."""

import ast
import subprocess
import sys
from pathlib import Path

from tests.keys.helpers import REPO_ROOT

FORBIDDEN = {"gateway", "health", "backend", "llamagate"}
PACKAGE = REPO_ROOT / "keys"


def imported_top_levels(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_keys_imports_no_other_llamagate_package() -> None:
    offenders = {path.name: imported_top_levels(path) & FORBIDDEN for path in PACKAGE.glob("*.py")}
    assert {name: bad for name, bad in offenders.items() if bad} == {}


def test_init_is_empty() -> None:
    assert (PACKAGE / "__init__.py").read_text() == ""


def test_importing_every_module_touches_nothing(tmp_path: Path) -> None:
    modules = sorted(f"keys.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    code = f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); " + "; ".join(f"import {m}" for m in modules)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == []
