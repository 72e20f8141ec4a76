"""keys/usage_redis.py (with its batches, buffer files, scripts and readers: the
keys/usage_redis_*.py modules) against a real redis-server: totals, exactly once across lost
answers, outages and killed processes, the migration's import and the retention."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fleet.link import FleetDown, FleetLink, Script
from keys.usage import HOUR, Tally, UsageRow, hour_bucket
from keys.usage_redis import RedisUsage
from keys.usage_redis_buffer import PREFIX
from keys.usage_redis_import import import_rows
from keys.usage_redis_read import last_used_all, read_usage
from keys.usage_redis_scripts import APPLY, DAY
from tests.support.redis import RedisServer
from tests.support.wait import wait_until

NOW = time.time()  # the script keeps days by Redis's clock: the tests record around the real now
H_NOW = hour_bucket(NOW)


@contextlib.asynccontextmanager
async def linked(url: str) -> AsyncIterator[FleetLink]:
    link = FleetLink(url, "test:", 0.3)  # short: a paused Redis is found out quickly
    await link.start()
    try:
        yield link
    finally:
        await link.close()


@pytest.fixture
async def link(server: RedisServer) -> AsyncIterator[FleetLink]:
    async with linked(server.url) as link:
        yield link


@pytest.fixture
def buffer_dir(tmp_path: Path) -> Path:
    return tmp_path / "buffer"


def expected(*events: tuple[str, str, int, int, float]) -> list[UsageRow]:
    tally = Tally()
    for e in events:
        tally.add(*e)
    return sorted(tally.batch().rows, key=lambda r: (r.hour, r.key_id, r.model))


def total_requests(rows: list[UsageRow]) -> int:
    return sum(r.requests for r in rows)


def buffer_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{PREFIX}*.json"))


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def test_totals_after_flush_equal_what_was_recorded(link: FleetLink, buffer_dir: Path) -> None:
    usage = RedisUsage(link, buffer_dir=buffer_dir)
    await usage.open()
    try:
        events = [("k1", "qwen", 10, 1, NOW), ("k1", "qwen", 5, 2, NOW + 1),
                  ("k1", "llama|3", 7, 7, NOW), ("k2", "qwen", 1, 1, NOW - 2 * DAY),
                  ("k2", "qwen", 3, 4, NOW)]
        for e in events:
            usage.record(*e)
        usage.seen("k3", NOW + 5)  # a key with a request that used no tokens
        assert usage.pending == 5
        assert await usage.usage() == []  # nothing sent on the request path

        assert await usage.flush() == 5
        assert usage.pending == 0 and usage.buffer_path is None
        assert await usage.usage() == expected(*events)
        assert await read_usage(link, "k2", since=NOW - DAY) == expected(events[4])
        assert await read_usage(link, None, until=H_NOW) == expected(events[3])
        assert await usage.last_used("k1") == NOW + 1
        assert await last_used_all(link) == {"k1": NOW + 1, "k2": NOW, "k3": NOW + 5}

        # the layout other replicas and the CLI read
        day = link.of_key("k1", f"usage:{time.strftime('%Y%m%d', time.gmtime(NOW))}")
        assert int(await link.command("HGET", day, f"{H_NOW}|llama|3|p")) == 7
        assert 0 < int(await link.command("TTL", day)) <= 402 * DAY
        assert await link.command("SMEMBERS", link.name("usage", "keys")) == {b"k1", b"k2", b"k3"}
        applied = await link.command("HGETALL", link.of_key("k1", "usage:applied"))
        assert [(r.decode().partition(".")[0], seq) for r, seq in applied.items()] == [
            (link.replica, b"1")]
        assert await usage.flush() == 0
    finally:
        await usage.close()


async def test_a_batch_whose_answer_was_lost_is_counted_once(
        link: FleetLink, buffer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = RedisUsage(link, buffer_dir=buffer_dir)
    await usage.open()
    lost: list[Any] = []

    class LosingLink:
        """The link, but the first APPLY's answer never comes back, though Redis applied the
        batch (a timeout after the fact). A stand-in around it: the link may be compiled."""

        def __getattr__(self, name: str) -> Any:
            return getattr(link, name)

        def run_soon(self, script: Script, keys: Any, args: Any) -> asyncio.Future[Any]:
            done = link.run_soon(script, keys, args)
            if script.source != APPLY or lost:
                return done
            lost.append(args)
            answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

            def relay(applied: asyncio.Future[Any]) -> None:
                answer.set_exception(applied.exception() or FleetDown("the answer was lost"))

            done.add_done_callback(relay)
            return answer

    monkeypatch.setattr(usage._sender, "_link", LosingLink())
    try:
        for _ in range(3):
            usage.record("k1", "m", 2, 1, NOW)
        assert await usage.flush() == 0
        assert lost and usage.pending == 3 and usage.buffered == 3
        assert usage.report()["ok"] is False
        assert total_requests(await usage.usage("k1")) == 3  # Redis did apply it

        usage.record("k1", "m", 2, 1, NOW)  # newer, but waits behind the batch in doubt
        assert await usage.flush() == 4  # the same (replica, seq) again, then the newer one
        assert await usage.usage("k1") == [UsageRow("k1", "m", H_NOW, 4, 8, 4)]
        assert usage.pending == 0 and usage.buffer_path is None and usage.report()["ok"] is True
    finally:
        await usage.close()


async def test_an_outage_is_buffered_and_replayed_exactly_once(
        server: RedisServer, link: FleetLink, buffer_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "llamagate.keys")
    seen: list[tuple[int, bool]] = []
    # an hour between flushes: only the link's "Redis is back" can start the replay in time
    usage = RedisUsage(link, buffer_dir=buffer_dir, flush_interval=3600)
    usage.observer = lambda events, failed: seen.append((events, failed))
    await usage.open()
    try:
        usage.record("k1", "m", 1, 1, NOW)
        assert await usage.flush() == 1

        server.pause()
        for _ in range(7):
            usage.record("k1", "m", 1, 1, NOW)
        assert await usage.flush() == 0  # times out: sent, and maybe applied once Redis runs
        assert not link.up and usage.write_failures == 1 and seen[-1] == (7, True)
        for _ in range(4):
            usage.record("k1", "m", 1, 1, NOW)
            usage.record("k2", "m", 1, 1, NOW)
        assert await usage.flush() == 0  # Redis known down: not tried again
        assert usage.write_failures == 1 and usage.buffered == 15
        path = usage.buffer_path
        assert path is not None and path.stat().st_mode & 0o777 == 0o600
        body = json.loads(path.read_bytes())
        assert body["replica"].startswith(f"{link.replica}.")
        assert [(b["key"], b["seq"]) for b in body["batches"]] == [("k1", 2)]

        usage.start()
        server.resume()
        await wait_until(lambda: usage.pending == 0 and usage.buffer_path is None,
                         "the buffer replayed")
        assert await usage.usage() == [UsageRow("k1", "m", H_NOW, 12, 12, 12),
                                       UsageRow("k2", "m", H_NOW, 4, 4, 4)]
        assert not path.exists()
        assert len(messages(caplog, "cannot be written to Redis")) == 1
        assert messages(caplog, "usage reaches Redis") == [
            f"usage reaches Redis at {link.where} again after 0.2s; 15 buffered events replayed"]
    finally:
        await usage.close()


async def test_a_restart_of_redis_with_its_aof_replays_once(tmp_path: Path, buffer_dir: Path) -> None:
    server = RedisServer(tmp_path / "aof").start()  # every write fsynced to its append-only file
    try:
        async with linked(server.url) as link:
            usage = RedisUsage(link, buffer_dir=buffer_dir, flush_interval=3600)
            await usage.open()
            usage.start()
            try:
                usage.record("k1", "m", 1, 1, NOW)
                assert await usage.flush() == 1
                server.kill()
                for _ in range(3):
                    usage.record("k1", "m", 1, 1, NOW)
                assert await usage.flush() == 0
                assert usage.buffered == 3
                server.start()  # the same port and directory: the first event is in the AOF
                await wait_until(lambda: usage.pending == 0, "the buffer replayed")
                assert await usage.usage() == [UsageRow("k1", "m", H_NOW, 4, 4, 4)]
            finally:
                await usage.close()
    finally:
        server.stop()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


async def test_the_buffer_of_a_killed_process_is_replayed_once(
        server: RedisServer, buffer_dir: Path) -> None:
    async with linked(server.url) as dying_link:
        dying = RedisUsage(dying_link, buffer_dir=buffer_dir)
        await dying.open()
        usage = [("k1", "m", 3, 1, NOW), ("k1", "n", 1, 1, NOW - DAY), ("k2", "m", 2, 2, NOW)]
        dying.record(*usage[0])
        dying.record(*usage[1])
        server.pause()
        assert await dying.flush() == 0  # sent: Redis applies it when it runs again
        dying.record(*usage[2])
        dying.seen("k3", NOW)
        assert await dying.flush() == 0
        path = dying.buffer_path
        assert path is not None and dying.buffered == 3

        async with linked(server.url) as other_link:
            server.resume()
            await wait_until(lambda: other_link.up, "Redis to answer")
            other = RedisUsage(other_link, buffer_dir=buffer_dir)
            await other.open()  # the writer still runs: its buffer is not taken
            assert other.pending == 0 and path.exists()
            await other.close()
    # the process is killed: its file stays, naming a pid that no longer runs
    body = json.loads(path.read_bytes())
    body["pid"], body["identity"] = dead_pid(), "gone"
    path.write_text(json.dumps(body))
    copy = path.read_bytes()

    async with linked(server.url) as link:
        heir = RedisUsage(link, buffer_dir=buffer_dir)
        await heir.open()
        await heir.close()
        assert not path.exists()
        rows = await read_usage(link)
        assert rows == expected(*usage)
        assert await last_used_all(link) == {"k1": NOW, "k2": NOW, "k3": NOW}
        # a second replica that read the file before the first removed it: counted once still
        path.write_bytes(copy)
        late = RedisUsage(link, buffer_dir=buffer_dir)
        await late.open()
        await late.close()
        assert await read_usage(link) == rows and not path.exists()


async def test_close_with_redis_down_leaves_the_buffer_for_the_next_start(
        server: RedisServer, buffer_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with linked(server.url) as link:
        usage = RedisUsage(link, buffer_dir=buffer_dir)
        await usage.open()
        server.kill()
        usage.record("k1", "m", 5, 6, NOW)
        await usage.close()
        assert messages(caplog, "1 usage events kept in")
        files = buffer_files(buffer_dir)
        assert len(files) == 1 and json.loads(files[0].read_bytes())["final"] is True
    server.start()
    async with linked(server.url) as link:
        usage = RedisUsage(link, buffer_dir=buffer_dir)
        await usage.open()  # a closed recorder's file is taken though its process runs
        await usage.close()
        assert await read_usage(link) == [UsageRow("k1", "m", H_NOW, 1, 5, 6)]
        assert buffer_files(buffer_dir) == []


def write_orphan(path: Path, body: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700)
    path.write_text(json.dumps(body))


async def test_a_batch_sent_too_long_ago_is_set_aside_not_replayed(
        link: FleetLink, buffer_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    def batch(seq: int, requests: int, sent: float) -> dict[str, Any]:
        return {"replica": "gone", "seq": seq, "key": "k1", "rows": [["m", H_NOW, requests, 1, 1]],
                "last": NOW, "sent": sent}

    orphan = buffer_dir / f"{PREFIX}1-gone.json"
    write_orphan(orphan, {
        "version": 1, "pid": dead_pid(), "identity": "gone", "fleet": f"{link.where} {link.prefix}",
        "replica": "gone", "next_seq": 5, "final": False, "written": NOW,
        # Redis has forgotten the replica's applies from eight days ago: seq 3 might count twice
        "batches": [batch(3, 2, NOW - 8 * DAY), batch(4, 1, NOW - 60)],
        "unsent": {"rows": [["k2", "m", H_NOW, 1, 1, 1]], "last_used": {"k2": NOW}}})
    usage = RedisUsage(link, buffer_dir=buffer_dir)
    await usage.open()
    await usage.close()
    assert await read_usage(link) == [UsageRow("k1", "m", H_NOW, 1, 1, 1),
                                      UsageRow("k2", "m", H_NOW, 1, 1, 1)]
    kept = buffer_dir / f"stale-{orphan.name}"
    assert [b["seq"] for b in json.loads(kept.read_bytes())["batches"]] == [3]
    assert buffer_files(buffer_dir) == []
    assert messages(caplog, "2 usage events first sent more than 6 days ago are not replayed")


def write_junk(path: Path) -> None:
    path.parent.mkdir(mode=0o700)
    path.write_text("{not json")


async def test_buffer_files_that_cannot_be_read_are_left_alone(
        link: FleetLink, buffer_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    junk = buffer_dir / f"{PREFIX}1-junk.json"
    write_junk(junk)
    usage = RedisUsage(link, buffer_dir=buffer_dir)
    await usage.open()
    await usage.close()
    assert junk.exists() and messages(caplog, "cannot be read")


async def test_past_max_rows_new_rows_are_dropped(
        link: FleetLink, buffer_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    usage = RedisUsage(link, buffer_dir=buffer_dir, max_rows=2)
    await usage.open()
    try:
        for _ in range(2):
            usage.record("k1", "a", 1, 1, NOW)
            usage.record("k1", "b", 1, 1, NOW)
            usage.record("k1", "c", 1, 1, NOW)  # a third row: dropped
            usage.record("k1", "a", 1, 1, NOW)  # an existing row still counts
            assert usage.pending == 3
            assert await usage.flush() == 3
        assert usage.dropped == 2
        assert len(messages(caplog, "usage buffer full")) == 1
    finally:
        await usage.close()
    usage.record("k1", "a", 1, 1, NOW)  # after close: dropped, not an error
    assert usage.dropped == 3


async def test_import_rows_adds_only_what_was_not_imported(link: FleetLink, buffer_dir: Path) -> None:
    h1, h2 = H_NOW - 3 * DAY, H_NOW
    rows = [UsageRow("k1", "m", h1, 2, 20, 10), UsageRow("k1", "m", h2, 1, 5, 5),
            UsageRow("k2", "x", h2, 4, 4, 4)]
    ancient = UsageRow("k1", "m", H_NOW - 500 * DAY, 1, 1, 1)  # past the retention: skipped
    last = {"k1": NOW - 10.5, "k2": NOW - 20.0}
    usage = RedisUsage(link, buffer_dir=buffer_dir)
    await usage.open()
    usage.record("k1", "m", 1, 1, NOW)  # live usage of the fleet before the migration
    await usage.close()

    assert await import_rows(link, [*rows, ancient], last) == (3, 0)
    assert await import_rows(link, rows, last) == (0, 3)  # a rerun changes nothing
    live = UsageRow("k1", "m", h2, 1 + 1, 5 + 1, 5 + 1)
    assert await read_usage(link) == [rows[0], live, rows[2]]
    assert await last_used_all(link) == {"k1": NOW, "k2": NOW - 20.0}

    grown = [UsageRow("k1", "m", h1, 3, 30, 12), rows[1], rows[2], UsageRow("k3", "m", h2, 1, 1, 1)]
    assert await import_rows(link, grown, {**last, "k3": NOW - 1}) == (2, 2)
    assert await read_usage(link) == [grown[0], live, rows[2], grown[3]]
    assert await import_rows(link, grown, last) == (0, 4)


async def test_days_past_the_retention_are_trimmed(link: FleetLink, buffer_dir: Path) -> None:
    old = NOW - 10 * DAY
    days = link.of_key("k1", "usage:days")
    today, then = (time.strftime("%Y%m%d", time.gmtime(t)).encode() for t in (NOW, old))
    month = RedisUsage(link, buffer_dir=buffer_dir, retention_days=30)
    await month.open()
    month.record("k1", "m", 1, 1, old)
    month.record("k1", "m", 1, 1, NOW)
    await month.close()
    assert await link.command("ZRANGE", days, 0, -1) == [then, today]

    short = RedisUsage(link, buffer_dir=buffer_dir, retention_days=3)
    await short.open()
    short.record("k1", "m", 1, 1, old)  # already past three days: not added
    short.record("k1", "m", 1, 1, NOW)
    await short.close()
    assert await link.command("ZRANGE", days, 0, -1) == [today]
    assert await read_usage(link, "k1") == [UsageRow("k1", "m", H_NOW, 2, 2, 2)]
    ttl = int(await link.command("TTL", link.of_key("k1", f"usage:{today.decode()}")))
    assert 0 < ttl <= 4 * DAY + HOUR
    assert buffer_files(buffer_dir) == []  # healthy throughout: nothing buffered on disk


def shared_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    path.chmod(0o777)  # anyone may write here, and no sticky bit: anyone may swap our folder
    return path / "buffer"


async def test_a_buffer_directory_others_can_swap_is_refused(
        server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    buffer_dir = shared_dir(tmp_path / "shared")
    async with linked(server.url) as link:
        usage = RedisUsage(link, buffer_dir=buffer_dir)
        await usage.open()
        server.kill()
        usage.record("k1", "m", 1, 1, NOW)
        assert await usage.flush() == 0
        assert (usage.pending, usage.buffered) == (1, 0)
        assert messages(caplog, "held in memory only")
        await usage.close()
        assert usage.dropped == 1 and buffer_files(buffer_dir) == []
