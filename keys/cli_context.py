"""What every CLI command gets: resolved paths, the fleet's Redis when REDIS_URL is set, the
clock reading, output, and helpers.

With REDIS_URL the commands read and write the fleet's Redis (keys, usage, audit) through
``CliContext.fleet`` (keys/cli_fleet.py, which imports redis: only then); without it, the keys
file and the usage database, as on one machine.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO, TypeVar

from core.values import redis_url
from keys.audit import CLI_ACTOR, AuditEntry, AuditLog
from keys.db import open_db
from keys.errors import KeysError
from keys.model import ApiKey
from keys.store import KeyStore
from keys.usage import UsageRow, UsageStore

if TYPE_CHECKING:
    from keys.cli_fleet import FleetCli

DEFAULT_DATA_DIR = "./data"
# low, high and default of REDIS_AUDIT_MAX_ENTRIES and REDIS_USAGE_RETENTION_DAYS, as the service has them
AUDIT_MAX_ENTRIES = (100, 10**9, 100_000)
USAGE_RETENTION_DAYS = (1, 100_000, 400)
T = TypeVar("T")
KeySet = tuple[ApiKey, ...]


class SettingError(KeysError):
    """An environment variable the CLI reads is invalid (named; its value never shown)."""


class Store(Protocol):
    """The key set a command changes: the keys file, or the fleet's Redis."""

    def load(self) -> KeySet: ...
    def update(self, change: Callable[[KeySet], tuple[KeySet, T]]) -> T: ...


class AuditWriter(Protocol):
    def record_audit(self, *, ts: float, actor: str, action: str, target: str | None,
                     detail: Mapping[str, object] | None = None) -> None: ...


@dataclass(frozen=True)
class RedisSettings:
    """The fleet's Redis as the CLI reaches it."""

    url: str = field(repr=False)  # may hold a password
    prefix: str
    audit_max_entries: int
    usage_retention_days: int


def redis_settings(environ: Mapping[str, str]) -> RedisSettings | None:
    """REDIS_URL, REDIS_KEY_PREFIX, REDIS_AUDIT_MAX_ENTRIES and REDIS_USAGE_RETENTION_DAYS;
    None without REDIS_URL."""
    url = (environ.get("REDIS_URL") or "").strip()
    if not url:
        return None
    try:
        redis_url(url)
    except ValueError:
        raise SettingError("REDIS_URL must be a redis://, rediss:// (TLS) or unix:// URL") from None
    prefix = (environ.get("REDIS_KEY_PREFIX") or "").strip() or "llamagate:"
    return RedisSettings(url, prefix, _bounded(environ, "REDIS_AUDIT_MAX_ENTRIES", AUDIT_MAX_ENTRIES),
                         _bounded(environ, "REDIS_USAGE_RETENTION_DAYS", USAGE_RETENTION_DAYS))


def _bounded(environ: Mapping[str, str], name: str, bounds: tuple[int, int, int]) -> int:
    low, high, default = bounds
    raw = (environ.get(name) or "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise SettingError(f"{name} must be an integer from {low} to {high}")
    return value


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
    fleet: FleetCli | None = None  # REDIS_URL is set: everything is in that Redis

    @property
    def store(self) -> Store:
        return KeyStore(self.keys_path) if self.fleet is None else self.fleet.store

    def load_keys(self) -> KeySet:
        """The stored keys; records in Redis that do not parse are named on stderr."""
        if self.fleet is None:
            return KeyStore(self.keys_path).load()
        store = self.fleet.store
        keys = store.load()
        for key_id, why in sorted(store.unreadable.items()):
            print(f"warning: skipped key {key_id}: {why}", file=sys.stderr)
        return keys

    def emit(self, text: str) -> None:
        print(text, file=self.out)

    def emit_json(self, value: object) -> None:
        print(json.dumps(value, indent=2, sort_keys=True), file=self.out)

    @contextlib.contextmanager
    def audit_log(self) -> Iterator[CliAudit]:
        """Open the audit log before a change, so an unwritable database stops the command
        before the keys file is touched rather than leaving an unaudited change behind."""
        if self.fleet is not None:
            yield CliAudit(self.fleet.audit, self.now)
            return
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
        if self.fleet is not None:
            return self.fleet.last_used_all()
        with self.existing_db() as conn:
            return {} if conn is None else UsageStore(conn).last_used_all()

    def usage(self, key_id: str | None, since: float | None, until: float | None) -> list[UsageRow]:
        """Usage rows: the fleet's totals with REDIS_URL, else this machine's database."""
        if self.fleet is not None:
            return self.fleet.usage(key_id, since, until)
        with self.existing_db() as conn:
            return [] if conn is None else UsageStore(conn).usage(key_id, since, until)

    def audit_entries(self, target: str | None, since: float | None, limit: int) -> list[AuditEntry]:
        if self.fleet is not None:
            return self.fleet.audit.list_audit(target=target, since=since, limit=limit)
        with self.existing_db() as conn:
            return [] if conn is None else AuditLog(conn).list_audit(target=target, since=since,
                                                                      limit=limit)


@dataclass
class CliAudit:
    """Audit entries written by the CLI, all with actor ``cli`` and the command's instant."""

    log: AuditWriter
    now: float

    def __call__(self, action: str, target: str | None, detail: Mapping[str, object] | None = None) -> None:
        self.log.record_audit(ts=self.now, actor=CLI_ACTOR, action=action, target=target, detail=detail)
