"""``migrate --to-redis`` (keys/cli_migrate.py) from one machine's files into a real Redis:
the keys authenticate the same, usage and audit arrive whole, and a second run changes
nothing."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from keys.audit import AuditLog
from keys.cli_migrate import merge
from keys.db import open_db
from keys.errors import DuplicateKeyError
from keys.keyring import Keyring
from keys.link_sync import SyncLink
from keys.model import ApiKey
from keys.store import KeyStore
from keys.store_redis import RedisKeyStore
from keys.usage import UsageEvent, UsageStore, aggregate, hour_bucket
from llamagate.cli import main as llamagate_main
from tests.keys.helpers import REPO_ROOT, T0, Cli, FakeClock, Paths
from tests.support.redis import RedisServer

PREFIX = "t3:"
STREAM = f"{PREFIX}{{audit}}"



@pytest.fixture
def machine(cli: Cli, paths: Paths, clock: FakeClock) -> list[str]:
    """One machine's keys file, usage and audit log, as the CLI and the gateway leave them;
    returns every secret that ever worked."""
    secrets = []
    ids = []
    for name in ("alpha", "beta", "gamma"):
        created = json.loads(cli("generate", "--name", name, "--json").out)
        secrets.append(created["secret"])
        ids.append(created["id"])
        clock.advance(1)
    secrets.append(json.loads(cli("rotate", ids[0], "--grace", "1h", "--json").out)["secret"])
    assert cli("disable", ids[2]).rc == 0
    # usage of the last few hours (the fleet keeps REDIS_USAGE_RETENTION_DAYS of it), and one
    # request from long before, which it does not take
    recent = time.time() - 12 * 1800
    events = [UsageEvent(ids[n % 2], "qwen" if n % 3 else "llama", 10 + n, 5 * n,
                         recent + n * 1800) for n in range(12)]
    events.append(UsageEvent(ids[1], "qwen", 1, 1, T0))
    with contextlib.closing(open_db(paths.db)) as conn:
        UsageStore(conn).write(aggregate(events))
    return secrets


def local_keys(paths: Paths) -> tuple[ApiKey, ...]:
    return KeyStore(paths.keys).load()


def redis_keys(server: RedisServer) -> tuple[ApiKey, ...]:
    link = SyncLink(server.url, PREFIX)
    try:
        return RedisKeyStore(link).load()
    finally:
        link.close()


def everything(client: redis.Redis) -> dict[bytes | str, object]:
    """Every key of the Redis and its value: equal means nothing changed. (A set's or hash's
    DUMP follows its table's layout, which a no-op SADD may rehash: compared by content.)"""
    def value(key: bytes | str) -> object:
        kind = client.type(key)
        if kind == b"set":
            return sorted(client.smembers(key))
        if kind == b"hash":
            return client.hgetall(key)
        return client.dump(key)
    return {k: value(k) for k in sorted(client.keys("*"))}


def test_migrate_copies_everything_once(machine: list[str], cli: Cli, rcli: Cli, paths: Paths,
                                        server: RedisServer, client: redis.Redis) -> None:
    with contextlib.closing(open_db(paths.db)) as conn:
        local_audit = list(AuditLog(conn).entries())
        kept = len(UsageStore(conn).usage()) - 1  # all but the row past the retention
    done = rcli("migrate", "--to-redis")
    assert done.rc == 0, done.err
    assert done.out.strip() == (f"keys: 3 copied, 0 unchanged; usage rows: {kept} copied, 0 "
                                "unchanged, 1 past REDIS_USAGE_RETENTION_DAYS; audit entries: "
                                f"{len(local_audit)} copied, 0 unchanged")

    # the keys authenticate the same, before and after the grace of the rotated secret
    before, after = Keyring(local_keys(paths)), Keyring(redis_keys(server))
    for now in (T0 + 10, T0 + 7200):
        for secret in machine:
            assert after.authenticate(secret, now) == before.authenticate(secret, now)
    assert set(redis_keys(server)) == set(local_keys(paths))

    # the same usage totals and last uses
    def usage(run: Cli) -> list[dict[str, object]]:
        return sorted(json.loads(run("usage", "--json").out),
                      key=lambda r: (r["hour"], r["key_id"], r["model"]))
    recent = [r for r in usage(cli) if r["hour"] != hour_bucket(T0)]
    assert usage(rcli) == recent and len(recent) == kept
    listed = {k["id"]: k["last_used"] for k in json.loads(rcli("list", "--json").out)}
    assert listed == {k["id"]: k["last_used"] for k in json.loads(cli("list", "--json").out)}
    assert any(v is not None for v in listed.values())

    # every audit entry, with its original time, and one for the migration itself
    fleet_audit = json.loads(rcli("audit", "--json", "--limit", "1000").out)
    assert client.xlen(STREAM) == len(local_audit) + 1
    assert [(e["ts"], e["actor"], e["action"], e["target"], e["detail"])
            for e in fleet_audit[:-1]] == [(e.ts, e.actor, e.action, e.target, e.detail)
                                           for e in local_audit]
    assert fleet_audit[-1]["action"] == "migrate"

    # again: nothing changes
    state = everything(client)
    again = rcli("migrate", "--to-redis")
    assert again.rc == 0, again.err
    assert again.out.strip() == (f"keys: 0 copied, 3 unchanged; usage rows: 0 copied, {kept} "
                                 "unchanged, 1 past REDIS_USAGE_RETENTION_DAYS; audit entries: "
                                 f"0 copied, {len(local_audit)} unchanged")
    assert everything(client) == state


def test_a_key_changed_in_redis_since_is_kept(machine: list[str], rcli: Cli, paths: Paths,
                                              server: RedisServer) -> None:
    assert rcli("migrate", "--to-redis").rc == 0
    first = local_keys(paths)[0].id
    assert rcli("disable", first).rc == 0
    again = rcli("migrate", "--to-redis")
    assert again.rc == 0
    assert "2 unchanged, 1 kept as in Redis" in again.out
    assert first in again.err
    assert next(k for k in redis_keys(server) if k.id == first).disabled


def test_migrate_needs_redis_url(machine: list[str], cli: Cli) -> None:
    done = cli("migrate", "--to-redis")
    assert done.rc == 2 and "REDIS_URL" in done.err
    assert cli("migrate").rc == 2  # the direction is spelled out


def test_a_file_key_sharing_a_secret_with_a_redis_key_is_refused(machine: list[str],
                                                                 paths: Paths) -> None:
    key = local_keys(paths)[0]
    twin = ApiKey(id="other", name="other", secret_hash=key.secret_hash, prefix=key.prefix,
                  scopes=key.scopes, created=key.created)
    with pytest.raises(DuplicateKeyError):
        merge((twin,), (key,))


def test_migrate_through_the_script_and_llamagate_keys(machine: list[str], paths: Paths,
                                                       server: RedisServer, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "key_mgmt.py"), *paths.args(), "migrate",
         "--to-redis"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", "REDIS_URL": server.url, "REDIS_KEY_PREFIX": PREFIX})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("keys: 3 copied")
    monkeypatch.setenv("DATA_DIR", str(paths.keys.parent))
    monkeypatch.setenv("REDIS_URL", server.url)
    monkeypatch.setenv("REDIS_KEY_PREFIX", PREFIX)
    for name in ("AUTH_KEYS_FILE", "USAGE_DB"):
        monkeypatch.delenv(name, raising=False)
    capsys.readouterr()
    assert llamagate_main(["keys", "migrate", "--to-redis"]) == 0
    assert capsys.readouterr().out.startswith("keys: 0 copied, 3 unchanged")

