"""Load the mypyc-compiled request path when a build matches these sources.

`scripts/build_native.py` compiles COMPILED into BUILD_DIR. The package's
`__init__` calls `use_native(__path__)`: when the build's digest equals the
digest of the sources now on disk, the build's folder goes first on the
package path, so `import gateway.proxy` finds the extension; otherwise, or
with LLAMAGATE_NATIVE=0, every module is the plain `.py`. The digest covers
every module the compiled code can see (gateway, backend, keys, llamagate), since
mypyc checks types at run time against what it saw at build time.

The switch is read from the environment here, not from Config: it is decided
at import, before any configuration exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

BUILD_DIR = ".build/native"

# the modules every proxied request runs through, in the order it meets them
COMPILED: tuple[str, ...] = (
    "http_server", "http_call", "write_batch", "request_id", "edge", "observe",
    "auth", "ratelimit", "admission", "validation", "proxy", "backend_http", "backend_conn",
    "sse", "unstream", "usage", "cors",
    # subclasses of compiled classes (an interpreted class cannot inherit from a compiled one)
    "shared_limits", "shared_throttle",
)

_ROOT = Path(__file__).resolve().parent.parent
_WATCHED = ("gateway", "backend", "keys", "llamagate")


def manifest_for(root: Path) -> str:
    """What build_native writes beside a build: the digest of the sources under `root` and
    the interpreter it is for."""
    return json.dumps({"digest": _digest(root), "abi": _abi()})


def use_native(package_path: list[str], root: Path = _ROOT) -> bool:
    """Put the compiled modules first on `package_path` if they are current."""
    if os.environ.get("LLAMAGATE_NATIVE", "1") == "0":
        return False
    build = root / BUILD_DIR
    try:
        manifest = (build / "manifest.json").read_text()
    except OSError:
        return False  # never built (no compiler, or installed without make setup)
    try:
        current = manifest == manifest_for(root)
    except OSError:  # a source that cannot be read: nothing to compare the build with
        current = False
    if not current:
        print("llamagate: .build/native was built from other sources or for another Python; "
              "running the gateway as plain Python (make setup rebuilds it)", file=sys.stderr)
        return False
    # mypyc's runtime library is a top-level module of the build: found here before anywhere
    sys.path.insert(0, str(build))
    package_path.insert(0, str(build / "gateway"))
    return True


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for package in _WATCHED:
        for source in sorted((root / package).rglob("*.py")):
            if not source.name.startswith("."):  # an editor's lock or backup file
                h.update(str(source.relative_to(root)).encode() + b"\0" + source.read_bytes())
    return h.hexdigest()


def _abi() -> str:
    return str(sysconfig.get_config_var("EXT_SUFFIX"))
