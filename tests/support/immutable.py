"""A file no process may write, root included: `chattr +i` (the immutable attribute).

CI runs as root, which chmod does not stop; the immutable attribute does. It needs
CAP_LINUX_IMMUTABLE (root has it) and a filesystem that keeps the attribute (ext4, xfs,
btrfs, and overlayfs over them; not tmpfs). Where it cannot be set the test fails saying so:
a fault test skipped by default would count as passing without having run.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def set_immutable(path: Path, on: bool) -> None:
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.fail("chattr (e2fsprogs) is not installed: the unwritable-file tests need it")
    proc = subprocess.run([chattr, "+i" if on else "-i", str(path)], capture_output=True,
                          text=True, timeout=10, check=False)
    if proc.returncode != 0:
        pytest.fail(f"chattr {'+' if on else '-'}i {path} failed ({proc.stderr.strip()}): these "
                    "tests need root (CAP_LINUX_IMMUTABLE) and a filesystem with the attribute")


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """``path`` unwritable by anyone until the block ends (or ``set_immutable(path, False)``
    inside it); always cleared after, so the temporary directory can be removed."""
    set_immutable(path, True)
    try:
        yield
    finally:
        set_immutable(path, False)
