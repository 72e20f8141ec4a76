"""Load the mypyc-compiled request path when a build matches these sources.

`scripts/build_native.py` compiles COMPILED into BUILD_DIR. The package's
`__init__` calls `use_native()`: when the build's digest equals the digest of the
sources now on disk, a finder for exactly the COMPILED modules goes first on
`sys.meta_path`, so `import gateway.upstream.proxy` loads the extension; every other
module, and every module with LLAMAGATE_NATIVE=0, is the plain `.py`. The digest
covers every module the compiled code can see (gateway, backend, keys, core,
llamagate), since mypyc checks types at run time against what it saw at build time.

Hashing the sources (about 600 KB) is done once per process tree: a process that
found the build current says so in LLAMAGATE_NATIVE_CHECKED (the manifest itself),
and its children, which inherit the environment from `llamagate serve`, compare
only the manifest. A build swapped in the meantime has another manifest and is
checked in full.

The switch is read from the environment here, not from Config: it is decided
at import, before any configuration exists.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

BUILD_DIR = ".build/native"
CHECKED = "LLAMAGATE_NATIVE_CHECKED"

# the modules every proxied request runs through, in the order it meets them
COMPILED: tuple[str, ...] = (
    "gateway.edge.server", "gateway.edge.connection", "gateway.edge.head", "gateway.edge.call",
    "gateway.edge.write_batch",
    "gateway.observe.request_id", "gateway.pipeline", "gateway.router", "gateway.observe.record",
    "gateway.policy.auth", "gateway.policy.ratelimit", "gateway.policy.buckets",
    "gateway.policy.throttle", "gateway.policy.admission",
    "gateway.policy.validation", "gateway.upstream.proxy", "gateway.upstream.slots",
    "gateway.upstream.forward", "gateway.upstream.client",
    "gateway.upstream.connection", "gateway.upstream.events", "gateway.upstream.sse",
    "gateway.upstream.fold", "gateway.upstream.cut",
    "gateway.observe.metering", "gateway.observe.histograms", "gateway.policy.cors",
    "gateway.upstream.pool", "gateway.upstream.members", "gateway.upstream.affinity",
    "gateway.upstream.outlier",
    # subclasses of compiled classes (an interpreted class cannot inherit from a compiled one)
    "gateway.policy.shared_limits", "gateway.policy.shared_throttle",
    "gateway.policy.fleet_throttle",
    # a fleet's admission (REDIS_URL) and its link to Redis, on every request's path there
    "gateway.policy.fleet_limits", "fleet.link", "fleet.wire",
)

_ROOT = Path(__file__).resolve().parent.parent
_WATCHED = ("gateway", "backend", "keys", "core", "fleet", "llamagate")


def manifest_for(root: Path) -> str:
    """What build_native writes beside a build: the digest of the sources under `root` and
    the interpreter it is for."""
    return json.dumps({"digest": _digest(root), "abi": _abi()})


class CompiledFinder:
    """Finds the extension of each compiled module in the build; nothing else."""

    def __init__(self, build: Path, modules: Sequence[str]) -> None:
        suffix = _abi()
        self.files = {name: build / (name.replace(".", "/") + suffix) for name in modules}

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None or not file.exists():
            return None
        return importlib.util.spec_from_file_location(fullname, file)


def use_native(root: Path = _ROOT) -> bool:
    """Load COMPILED from the build under `root` if it is current; True if it will be."""
    if os.environ.get("LLAMAGATE_NATIVE", "1") == "0":
        return False
    build = root / BUILD_DIR
    try:
        manifest = (build / "manifest.json").read_text()
    except OSError:
        return False  # never built (no compiler, or installed without make setup)
    if os.environ.get(CHECKED) != manifest:
        try:
            current = manifest == manifest_for(root)
        except OSError:  # a source that cannot be read: nothing to compare the build with
            current = False
        if not current:
            print("llamagate: .build/native was built from other sources or for another Python; "
                  "running the gateway as plain Python (make setup rebuilds it)", file=sys.stderr)
            return False
        os.environ[CHECKED] = manifest  # for the children: checked once per process tree
    # mypyc's runtime library is a top-level module of the build: found here before anywhere
    sys.path.insert(0, str(build))
    sys.meta_path.insert(0, CompiledFinder(build, COMPILED))
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
