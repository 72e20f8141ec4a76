"""The fleet's key set in a real Redis: the CLI writing it (keys/store_redis.py, the CLI with
REDIS_URL) and a replica following it (keys/watch_redis.py), through outages."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from fleet.link import FleetLink
from keys import ops
from keys.cli import main
from keys.codec import key_to_dict
from keys.keyring import AuthFailure, Keyring
from keys.link_sync import SyncLink
from keys.store_redis import KeyNames, RedisKeyStore, encode
from keys.watch_redis import RedisKeyWatcher
from tests.keys.helpers import REPO_ROOT, T0, Cli, FakeClock, Paths
from tests.support.redis import RedisServer
from tests.support.wait import wait_until

PREFIX = "t1:"
HASH, VERSION, CHANNEL = f"{PREFIX}{{keys}}", f"{PREFIX}{{keys}}:version", f"{PREFIX}keys"
WITHIN = 1.0  # seconds: how soon a change must reach a replica



def generate(cli: Cli, name: str) -> tuple[str, str]:
    done = cli("generate", "--name", name, "--json")
    assert done.rc == 0, done.err
    created = json.loads(done.out)
    return created["id"], created["secret"]


def stored(server: RedisServer) -> RedisKeyStore:
    return RedisKeyStore(SyncLink(server.url, PREFIX))


def version(client: redis.Redis) -> int:
    return int(client.get(VERSION) or 0)


@contextlib.asynccontextmanager
async def watching(server: RedisServer, last_good: Path,
                   poll_interval: float = 0.5) -> AsyncIterator[RedisKeyWatcher]:
    link = FleetLink(server.url, PREFIX, timeout=0.2)
    await link.start()
    watcher = RedisKeyWatcher(link, last_good, poll_interval=poll_interval)
    try:
        await watcher.start()
        yield watcher
    finally:
        await watcher.close()
        await link.close()


def auth(watcher: RedisKeyWatcher, secret: str) -> AuthFailure | str:
    result = watcher.keyring.authenticate(secret, T0)
    return result.key.id if result.key is not None else result.reason or AuthFailure.INVALID


# the store and the CLI -------------------------------------------------------------------
async def test_names_are_the_fleet_links() -> None:
    link = FleetLink("redis://:pw@127.0.0.1:1/0", PREFIX)
    sync = SyncLink("redis://:pw@127.0.0.1:1/0", PREFIX)
    try:
        assert KeyNames.of(sync) == KeyNames.of(link) == KeyNames(HASH, VERSION, CHANNEL)
        assert sync.name("audit", "migrated") == link.name("audit", "migrated")
        assert sync.of_key("k1", "usage") == link.of_key("k1", "usage")
        assert "pw" not in sync.where
    finally:
        sync.close()
        await link.client.aclose()


def test_cli_generate_disable_rotate_remove_in_redis(rcli: Cli, server: RedisServer,
                                                     client: redis.Redis, paths: Paths) -> None:
    key_id, secret = generate(rcli, "alpha")
    assert Keyring(stored(server).load()).authenticate(secret, T0).key is not None
    record = json.loads(client.hget(HASH, key_id) or b"")
    assert record == key_to_dict(stored(server).load()[0])
    assert secret not in json.dumps(record)
    assert version(client) == 1

    assert rcli("disable", key_id).rc == 0
    ring = Keyring(stored(server).load())
    assert ring.authenticate(secret, T0).reason is AuthFailure.DISABLED
    assert rcli("enable", key_id).rc == 0

    rotated = rcli("rotate", key_id, "--grace", "1h", "--json")
    assert rotated.rc == 0, rotated.err
    new_secret = json.loads(rotated.out)["secret"]
    ring = Keyring(stored(server).load())
    assert ring.authenticate(new_secret, T0).key is not None
    assert ring.authenticate(secret, T0).via_previous_secret
    assert ring.authenticate(secret, T0 + 3601).reason is AuthFailure.INVALID

    assert rcli("remove", key_id).rc == 0
    assert client.hexists(HASH, key_id) == 0
    assert version(client) == 5

    audit = rcli("audit", "--json")
    assert [e["action"] for e in json.loads(audit.out)] == [
        "generate", "disable", "enable", "rotate", "remove"]
    assert not paths.keys.exists() and not paths.db.exists()  # nothing on this machine


def test_cli_list_and_show_read_redis(rcli: Cli, clock: FakeClock) -> None:
    a, _ = generate(rcli, "alpha")
    clock.advance(1)  # listed oldest first
    b, _ = generate(rcli, "beta")
    listed = rcli("list", "--json")
    assert listed.rc == 0, listed.err
    assert [k["id"] for k in json.loads(listed.out)] == [a, b]
    shown = rcli("show", b, "--json")
    assert json.loads(shown.out)["name"] == "beta"
    assert rcli("show", "nope").rc == 2


def test_a_change_writes_only_its_ids_and_announces_the_version(
        rcli: Cli, server: RedisServer, client: redis.Redis) -> None:
    a, _ = generate(rcli, "alpha")
    b, _ = generate(rcli, "beta")
    # b's record in another (valid) layout: a write that rewrote every record would change it
    pretty = json.dumps(json.loads(client.hget(HASH, b) or b""), indent=1).encode()
    client.hset(HASH, b, pretty)
    with contextlib.closing(client.pubsub()) as sub:
        sub.subscribe(CHANNEL)
        assert sub.get_message(timeout=2)["type"] == "subscribe"
        assert rcli("disable", a).rc == 0
        message = sub.get_message(timeout=2)
    assert message is not None and message["data"] == f"3 {a}".encode()
    assert client.hget(HASH, b) == pretty


def test_a_concurrent_writer_makes_the_change_run_again(rcli: Cli, server: RedisServer) -> None:
    a, _ = generate(rcli, "alpha")
    b, _ = generate(rcli, "beta")
    other = stored(server)
    calls = 0

    def change(keys: ops.KeySet) -> tuple[ops.KeySet, object]:
        nonlocal calls
        calls += 1
        if calls == 1:  # another writer between this one's read and its write
            other.update(lambda ks: ops.set_disabled(ks, b, True))
        return ops.set_disabled(keys, a, True)

    stored(server).update(change)
    assert calls == 2
    assert all(k.disabled for k in stored(server).load())


def test_concurrent_cli_processes_lose_no_key(server: RedisServer, paths: Paths) -> None:
    writer = ("import sys; sys.path.insert(0, sys.argv[1]); from keys.cli import main; "
              "sys.exit(max(main(['generate', '--name', f'{sys.argv[2]}-{n}'], "
              "environ={'REDIS_URL': sys.argv[3], 'REDIS_KEY_PREFIX': sys.argv[4]}) "
              "for n in range(8)))")
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(REPO_ROOT), f"w{i}", server.url,
                               PREFIX], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert len(stored(server).load()) == 24


def test_unreachable_redis_is_one_line_and_exit_1(paths: Paths, capsys: pytest.CaptureFixture[str]
                                                  ) -> None:
    from tests.support.service import free_port
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    for argv in (["generate", "--name", "x"], ["list"], ["usage"], ["audit"]):
        capsys.readouterr()
        assert main([*paths.args(), *argv], environ={"REDIS_URL": url}) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert "unreachable" in err and "127.0.0.1" in err
        assert "s3cret-pw" not in err


def test_a_bad_redis_url_is_named_not_shown(paths: Paths, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*paths.args(), "list"], environ={"REDIS_URL": "http://user:pw@host"}) == 2
    err = capsys.readouterr().err
    assert "REDIS_URL" in err and "pw" not in err


def test_the_cli_names_an_unreadable_record_and_keeps_it(rcli: Cli, client: redis.Redis) -> None:
    a, _ = generate(rcli, "alpha")
    client.hset(HASH, "broken", b"{not json")
    listed = rcli("list", "--json")
    assert [k["id"] for k in json.loads(listed.out)] == [a]
    assert "broken" in listed.err
    assert rcli("disable", a).rc == 0
    assert client.hget(HASH, "broken") == b"{not json"


# the watcher -----------------------------------------------------------------------------
async def test_a_change_reaches_the_watcher_by_its_message(rcli: Cli, server: RedisServer,
                                                           tmp_path: Path) -> None:
    a, secret = generate(rcli, "alpha")
    # no poll to speak of: only the message can bring the change in time
    async with watching(server, tmp_path / "last-good", poll_interval=3600) as w:
        assert auth(w, secret) == a
        assert rcli("disable", a).rc == 0
        await wait_until(lambda: auth(w, secret) is AuthFailure.DISABLED, "the disable",
                         within=WITHIN)
        b, other = generate(rcli, "beta")
        await wait_until(lambda: auth(w, other) == b, "the new key", within=WITHIN)
        assert rcli("remove", a).rc == 0
        await wait_until(lambda: w.keyring.get(a) is None, "the removal", within=WITHIN)
        assert w.report()["version"] == 4


async def test_a_skipped_version_makes_a_full_reload(rcli: Cli, server: RedisServer,
                                                     client: redis.Redis, tmp_path: Path) -> None:
    a, secret = generate(rcli, "alpha")
    async with watching(server, tmp_path / "last-good", poll_interval=3600) as w:
        assert auth(w, secret) == a
        key = stored(server).load()[0]
        client.hset(HASH, a, encode(ops.set_disabled((key,), a, True)[1]))  # unannounced: v2
        client.incr(VERSION)
        b, other = generate(rcli, "beta")  # announced as "3 <b>": the watcher is at 1
        await wait_until(lambda: auth(w, other) == b, "the new key", within=WITHIN)
        assert auth(w, secret) is AuthFailure.DISABLED


async def test_a_lost_message_is_caught_by_the_version_poll(rcli: Cli, server: RedisServer,
                                                            client: redis.Redis,
                                                            tmp_path: Path) -> None:
    a, secret = generate(rcli, "alpha")
    async with watching(server, tmp_path / "last-good") as w:
        assert auth(w, secret) == a
        key = stored(server).load()[0]
        client.hset(HASH, a, encode(ops.set_disabled((key,), a, True)[1]))
        client.incr(VERSION)  # and no PUBLISH: as a message lost during a reconnection
        await wait_until(lambda: auth(w, secret) is AuthFailure.DISABLED, "the change",
                         within=WITHIN)


async def test_a_paused_redis_keeps_the_keyring(rcli: Cli, server: RedisServer,
                                                tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                ) -> None:
    a, secret = generate(rcli, "alpha")
    async with watching(server, tmp_path / "last-good") as w:
        server.pause()
        try:
            await wait_until(lambda: w.report()["redis"] == "unreachable", "the outage noticed")
            assert auth(w, secret) == a
            report = w.report()
            assert report["ok"] is False and report["keys"] == 1
            assert "unreachable" in str(report["error"])
        finally:
            server.resume()
        await wait_until(lambda: w.report()["ok"], "Redis back")
        assert rcli("disable", a).rc == 0
        await wait_until(lambda: auth(w, secret) is AuthFailure.DISABLED, "the change after",
                         within=WITHIN)
    said = [r.getMessage() for r in caplog.records if "keeping the 1 keys" in r.getMessage()]
    assert len(said) == 1  # the outage is logged once, not at every look


async def test_changes_made_while_it_was_away_arrive_after_a_restart(
        rcli: Cli, server: RedisServer, tmp_path: Path) -> None:
    a, secret = generate(rcli, "alpha")
    async with watching(server, tmp_path / "last-good") as w:
        server.save()
        server.kill()
        await wait_until(lambda: w.report()["redis"] == "unreachable", "the outage noticed")
        assert auth(w, secret) == a
        server.start()  # the same port, the saved data
        assert rcli("disable", a).rc == 0  # before the watcher is back, most likely
        b, other = generate(rcli, "beta")
        await wait_until(lambda: auth(w, other) == b, "the changes after the restart")
        assert auth(w, secret) is AuthFailure.DISABLED
        await wait_until(lambda: w.report()["ok"], "the report clear")


async def test_a_redis_back_empty_does_not_log_everyone_out(rcli: Cli, server: RedisServer,
                                                            tmp_path: Path) -> None:
    a, secret = generate(rcli, "alpha")
    async with watching(server, tmp_path / "last-good") as w:
        server.kill()
        server.start()  # nothing saved: an empty Redis
        await wait_until(lambda: "gone" in str(w.report()["error"]), "the loss reported")
        assert auth(w, secret) == a
        b, other = generate(rcli, "beta")  # a write makes a new key set: it is the truth
        await wait_until(lambda: auth(w, other) == b, "the new set")
        assert auth(w, secret) is AuthFailure.INVALID
        assert w.report()["ok"] is True


async def test_a_start_with_redis_down_serves_the_last_good_copy(
        rcli: Cli, server: RedisServer, tmp_path: Path) -> None:
    a, secret = generate(rcli, "alpha")
    copy = tmp_path / "fleet" / "keys.last-good"
    async with watching(server, copy):
        pass
    assert stat.S_IMODE(os.stat(copy).st_mode) == 0o600
    assert secret not in copy.read_text() and a in copy.read_text()
    server.save()
    server.kill()
    async with watching(server, copy) as w:
        assert auth(w, secret) == a
        report = w.report()
        assert str(report["using"]).startswith("last good copy from")
        assert report["ok"] is False and "unreachable" in str(report["error"])
        server.start()
        await wait_until(lambda: w.report()["ok"], "Redis's keys in force")
        assert w.report()["using"] is None and auth(w, secret) == a


async def test_a_start_with_redis_down_and_no_copy_has_no_keys(server: RedisServer,
                                                              tmp_path: Path) -> None:
    server.kill()
    async with watching(server, tmp_path / "none") as w:
        assert len(w.keyring) == 0
        assert w.report()["ok"] is False and w.report()["using"] is None


async def test_the_copy_follows_each_change(rcli: Cli, server: RedisServer, tmp_path: Path) -> None:
    a, secret = generate(rcli, "alpha")
    copy = tmp_path / "last-good"
    async with watching(server, copy) as w:
        assert rcli("disable", a).rc == 0
        await wait_until(lambda: auth(w, secret) is AuthFailure.DISABLED, "the disable")
        await wait_until(lambda: '"disabled": true' in copy.read_text(), "the copy rewritten")


async def test_an_unreadable_record_is_skipped_and_named(
        rcli: Cli, server: RedisServer, client: redis.Redis, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    a, secret = generate(rcli, "alpha")
    client.hset(HASH, "broken", b'{"id": "broken", "disabeld": true}')
    client.incr(VERSION)
    async with watching(server, tmp_path / "last-good") as w:
        assert auth(w, secret) == a
        report = w.report()
        assert report["skipped"] == ["broken"] and report["ok"] is False
        assert report["keys"] == 1
        assert any("broken" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        result = await w.reload()
        assert (result.ok, result.key_count) == (False, 1)
        client.hdel(HASH, "broken")
        assert (await w.reload()).ok is True
        assert w.report()["skipped"] == []


async def test_a_key_set_redis_refuses_to_read_keeps_the_keyring(
        rcli: Cli, server: RedisServer, client: redis.Redis, tmp_path: Path) -> None:
    a, secret = generate(rcli, "alpha")
    async with watching(server, tmp_path / "last-good") as w:
        client.delete(HASH)
        client.set(HASH, "not a hash")  # WRONGTYPE for every read of the key set
        client.incr(VERSION)
        await wait_until(lambda: "refused" in str(w.report()["error"]), "the failure reported")
        assert auth(w, secret) == a and w.report()["redis"] == "up"
