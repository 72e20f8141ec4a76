"""Usage the database could not take, kept in a file until a process can write it (issue 22).

A recorder whose flush fails writes its whole pending tally to ``usage-<pid>-<instance>.json``
in a spool directory (atomic replace: a reader sees the previous spool or the new one), each
write under a fresh ``token``. The directory is outside DATA_DIR, under the temporary directory
(TMPDIR, where serve's runtime directory is too), so a full or read-only data disk does not
stop it, and keyed by the database's path, so two services never take each other's usage.

A spool is recovered only once its writer is gone: the file names the writer's pid, its start
time and the boot, so a pid reused by another process does not pass for the writer. Whoever
recovers it adds the rows and records the token in the same transaction (``UsageStore.write``),
then deletes the file: a crash between the two leaves a file whose token is already recorded,
which the next reader deletes without counting it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from core.private_files import DIR_MODE, FILE_MODE
from keys.usage import Tally, UsageBatch, UsageRow

PREFIX: Final = "usage-"
_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class Spool:
    """One spool file of a writer that is gone."""

    path: Path
    pid: int
    token: str
    batch: UsageBatch

    @property
    def events(self) -> int:
        return sum(r.requests for r in self.batch.rows)


def spool_dir(db_path: Path, base: Path | None = None) -> Path:
    """Where spools of the database at ``db_path`` go: ``<TMPDIR>/llamagate-usage-<uid>/<hash>``."""
    digest = hashlib.sha256(str(db_path.resolve()).encode()).hexdigest()[:16]
    root = base if base is not None else Path(tempfile.gettempdir())
    return root / f"llamagate-usage-{os.getuid()}" / digest


def process_identity(pid: int) -> str:
    """The boot and the process's start time: with the pid, names one process for good."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        # the command name in parentheses may hold spaces: the fields follow its ')'
        start = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""  # no /proc: the pid alone decides
    return f"{boot}:{start}"


def writer_alive(pid: int, identity: str) -> bool:
    """Whether the process that wrote a spool is still running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: not the writer, which was us
        return False
    return not identity or process_identity(pid) == identity


def _open_dir(directory: Path) -> None:
    """Create the directory 0700; refuse one another user owns or others may enter (it is
    under a shared /tmp, where anyone may have made the name first)."""
    for level in (directory.parent, directory):
        with contextlib.suppress(FileExistsError):
            level.mkdir(mode=DIR_MODE)
        st = os.lstat(level)
        if not os.path.isdir(level) or os.path.islink(level) or st.st_uid != os.getuid() \
                or st.st_mode & 0o077:
            raise PermissionError(f"spool directory {level} is not a private directory of ours")


def encode(tally: Tally, token: str, *, final: bool = False) -> bytes:
    """A spool's content. ``final``: written by a recorder that is closing, which will never
    touch the file again, so a reader need not wait for its process to end."""
    pid = os.getpid()
    return json.dumps({
        "version": _VERSION, "pid": pid, "identity": process_identity(pid), "token": token,
        "final": final, "rows": [[k, m, h, *t] for (k, m, h), t in tally.totals.items()],
        "last_used": tally.last_used,
    }).encode()


def write_spool(directory: Path, name: str, body: bytes) -> Path:
    """Replace this process's spool ``name`` with ``body``, atomically; the file is 0600.
    Not fsynced: it outlives a crash of the process, which is what it is for, not of the
    machine (the directory is usually a tmpfs anyway)."""
    _open_dir(directory)
    path = directory / name
    tmp = directory / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), FILE_MODE)  # a temporary file a killed writer left may be older
        f.write(body)
    os.replace(tmp, path)
    return path


def orphans(directory: Path, own: str) -> tuple[list[Spool], list[Path]]:
    """Spools whose writers are gone (not ``own``, this process's file name), and the paths
    of files that are not spools (to report; they are left alone)."""
    found: list[Spool] = []
    bad: list[Path] = []
    try:
        paths = sorted(directory.glob(f"{PREFIX}*.json"))
    except OSError:
        return found, bad
    for path in paths:
        if path.name == own:
            continue
        try:
            data = json.loads(path.read_bytes())
            pid, identity, token = int(data["pid"]), str(data["identity"]), str(data["token"])
            final = data["final"] is True
            rows = tuple(UsageRow(str(k), str(m), int(h), int(r), int(p), int(c))
                         for k, m, h, r, p, c in data["rows"])
            last_used = {str(k): float(ts) for k, ts in data["last_used"].items()}
        except FileNotFoundError:
            continue  # recovered by another worker meanwhile
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            bad.append(path)
            continue
        if final or not writer_alive(pid, identity):
            found.append(Spool(path, pid, token, UsageBatch(rows, last_used)))
    return found, bad


def remove(path: Path) -> None:
    """Delete a spool whose rows are in the database (its token recorded with them)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
