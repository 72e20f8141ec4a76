"""``migrate --to-redis``: copy one machine's keys file, usage database and audit log into the
fleet's Redis (REDIS_URL).

Every part is idempotent, so a copy cut short is finished by running it again, and a second
run changes nothing:

* keys: a key Redis does not have is added; one it has with the same record is left alone;
  one whose record differs is left as Redis has it (the fleet may have rotated or disabled
  it since) and named on stderr.
* usage: keys/usage_redis_import.py's ``import_rows`` adds each (key, model, hour) row once;
  rows older than the fleet keeps usage are left out, and counted on their own.
* audit: each row is copied once, keeping its original time (keys/audit_redis.py).

One audit entry records the migration itself, when it copied anything.
"""

from __future__ import annotations

import argparse
import sys

from keys.audit import CLI_ACTOR, AuditEntry, AuditLog
from keys.cli_context import CliContext, SettingError
from keys.codec import check_unique
from keys.errors import DuplicateKeyError, KeyFormatError
from keys.model import ApiKey
from keys.store import KeyStore
from keys.usage import UsageRow, UsageStore

KeySet = tuple[ApiKey, ...]


def merge(current: KeySet, incoming: KeySet) -> tuple[KeySet, tuple[int, int, list[str]]]:
    """Add the incoming keys Redis lacks: (new set, (copied, unchanged, ids that differ))."""
    by_id = {k.id: k for k in current}
    added = [k for k in incoming if k.id not in by_id]
    same = sum(1 for k in incoming if by_id.get(k.id) == k)
    differ = [k.id for k in incoming if k.id in by_id and by_id[k.id] != k]
    new_keys = (*current, *added)
    try:
        check_unique(new_keys)
    except KeyFormatError as exc:  # a key of the file shares a secret with another in Redis
        raise DuplicateKeyError(f"cannot copy the keys file: {exc}") from None
    return new_keys, (len(added), same, differ)


def cmd_migrate(ctx: CliContext, args: argparse.Namespace) -> int:
    fleet = ctx.fleet
    if fleet is None:
        raise SettingError("migrate --to-redis copies into the Redis that REDIS_URL names, "
                           "and REDIS_URL is not set")
    incoming = KeyStore(ctx.keys_path).load()  # a missing file holds no keys
    rows: list[UsageRow] = []
    last_used: dict[str, float] = {}
    entries: list[AuditEntry] = []
    with ctx.existing_db() as conn:
        if conn is not None:
            usage = UsageStore(conn)
            rows, last_used = usage.usage(), usage.last_used_all()
            entries = list(AuditLog(conn).entries())
    copied, same, differ = fleet.store.update(lambda current: merge(current, incoming))
    rows_copied, rows_there = fleet.import_usage(rows, last_used)
    audit_copied, audit_there = fleet.audit.migrate(entries)
    counts = {"keys_copied": copied, "keys_unchanged": same, "keys_differ": differ,
              "usage_rows_copied": rows_copied, "audit_entries_copied": audit_copied}
    if copied or rows_copied or audit_copied:
        fleet.audit.record_audit(ts=ctx.now, actor=CLI_ACTOR, action="migrate", target=None,
                                 detail={**counts, "keys_file": str(ctx.keys_path),
                                         "usage_db": str(ctx.usage_db)})
    if differ:
        print(f"warning: key(s) {', '.join(differ)} differ between {ctx.keys_path} and Redis: "
              "kept as Redis has them", file=sys.stderr)
    too_old = len(rows) - rows_copied - rows_there  # import_rows skips them, counted in neither
    ctx.emit(f"keys: {copied} copied, {same} unchanged"
             + (f", {len(differ)} kept as in Redis" if differ else "")
             + f"; usage rows: {rows_copied} copied, {rows_there} unchanged"
             + (f", {too_old} past REDIS_USAGE_RETENTION_DAYS" if too_old else "")
             + f"; audit entries: {audit_copied} copied, {audit_there} unchanged")
    return 0
