"""What every CLI command gets: resolved paths, the clock reading, output, and helpers."""

import contextlib
import json
import sqlite3
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from keys.audit import CLI_ACTOR, AuditLog
from keys.db import open_db
from keys.store import KeyStore
from keys.usage import UsageStore

DEFAULT_DATA_DIR = "./data"


def default_paths(environ: Mapping[str, str]) -> tuple[Path, Path]:
    """Keys file and usage database paths from ``AUTH_KEYS_FILE`` and ``DATA_DIR``."""
    data_dir = Path(environ.get("DATA_DIR") or DEFAULT_DATA_DIR)
    keys_file = environ.get("AUTH_KEYS_FILE") or str(data_dir / "keys.json")
    return Path(keys_file), data_dir / "usage.db"


@dataclass
class CliContext:
    """State shared by one CLI invocation; ``now`` is read once so a command sees one instant."""

    keys_path: Path
    usage_db: Path
    now: float
    out: TextIO = field(default_factory=lambda: sys.stdout)

    @property
    def store(self) -> KeyStore:
        return KeyStore(self.keys_path)

    def emit(self, text: str) -> None:
        print(text, file=self.out)

    def emit_json(self, value: object) -> None:
        print(json.dumps(value, indent=2, sort_keys=True), file=self.out)

    @contextlib.contextmanager
    def audit_log(self) -> Iterator["CliAudit"]:
        """Open the audit log before a change, so an unwritable database stops the command
        before the keys file is touched rather than leaving an unaudited change behind."""
        with contextlib.closing(open_db(self.usage_db)) as conn:
            yield CliAudit(AuditLog(conn), self.now)

    @contextlib.contextmanager
    def existing_db(self) -> Iterator[sqlite3.Connection | None]:
        """The usage database if it exists; read-only commands must not create it."""
        if not self.usage_db.exists():
            yield None
            return
        with contextlib.closing(open_db(self.usage_db)) as conn:
            yield conn

    def last_used_all(self) -> dict[str, float]:
        with self.existing_db() as conn:
            return {} if conn is None else UsageStore(conn).last_used_all()


@dataclass
class CliAudit:
    """Audit entries written by the CLI, all with actor ``cli`` and the command's instant."""

    log: AuditLog
    now: float

    def __call__(self, action: str, target: str | None, detail: Mapping[str, object] | None = None) -> None:
        self.log.record_audit(ts=self.now, actor=CLI_ACTOR, action=action, target=target, detail=detail)
