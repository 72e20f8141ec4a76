"""The fleet's audit stream in a real Redis (keys/audit_redis.py): written and read by the
gateway's RedisAuditor and the CLI's RedisAuditSync, trimmed, and kept while Redis is away."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from fleet.link import FleetLink
from keys.audit import AuditEntry
from keys.audit_redis import RedisAuditor, RedisAuditSync, Scan, entry_of, fields_of
from keys.link_sync import SyncLink
from tests.keys.helpers import T0, FakeClock
from tests.support.redis import RedisServer
from tests.support.wait import wait_until

PREFIX = "t2:"
STREAM = f"{PREFIX}{{audit}}"


@pytest.fixture
def sync_log(server: RedisServer) -> Iterator[RedisAuditSync]:
    link = SyncLink(server.url, PREFIX)
    try:
        yield RedisAuditSync(link, max_entries=100)
    finally:
        link.close()


@contextlib.asynccontextmanager
async def auditor(server: RedisServer, clock: FakeClock, queue_size: int = 1000
                  ) -> AsyncIterator[RedisAuditor]:
    link = FleetLink(server.url, PREFIX, timeout=0.2)
    await link.start()
    audit = RedisAuditor(link, 100, clock, queue_size=queue_size)
    await audit.open()
    try:
        yield audit
    finally:
        await audit.close()
        await link.close()


def test_fields_round_trip_and_omit_a_missing_target() -> None:
    flat = fields_of(T0, "key_1", "rotate", None, {"grace_seconds": 60.0})
    assert "target" not in flat[::2]
    entry = entry_of("1700000000000-0", dict(zip(flat[::2], flat[1::2], strict=True)))
    assert entry == AuditEntry("1700000000000-0", T0, "key_1", "rotate", None,
                               {"grace_seconds": 60.0})


async def test_the_gateway_records_and_lists_with_filters(server: RedisServer,
                                                          clock: FakeClock) -> None:
    async with auditor(server, clock) as audit:
        await audit.record("admin1", "reload", None, {"ok": True})
        clock.advance(10)
        await audit.record("admin1", "load_model", "qwen", {"status": 200})
        clock.advance(10)
        await audit.record("admin2", "pull", "org/repo")
        everything = await audit.list()
        assert [e.action for e in everything] == ["reload", "load_model", "pull"]
        assert all(isinstance(e.id, str) for e in everything)
        assert everything[1].detail == {"status": 200} and everything[1].ts == T0 + 10
        assert [e.action for e in await audit.list(target="qwen")] == ["load_model"]
        assert [e.action for e in await audit.list(actor="admin2")] == ["pull"]
        assert [e.action for e in await audit.list(since=T0 + 5)] == ["load_model", "pull"]
        assert [e.action for e in await audit.list(limit=2)] == ["load_model", "pull"]


def test_the_stream_is_trimmed_to_about_max_entries(sync_log: RedisAuditSync,
                                                    client: redis.Redis) -> None:
    for n in range(1000):
        sync_log.record_audit(ts=T0 + n, actor="cli", action="generate", target=f"k{n}")
    length = client.xlen(STREAM)
    # MAXLEN ~ drops whole nodes (100 entries each by default): at least 100, fewer than 200
    assert 100 <= length < 200
    listed = sync_log.list_audit(limit=1000)
    assert len(listed) == length and listed[-1].target == "k999"


def test_paging_reaches_past_one_page(server: RedisServer, client: redis.Redis) -> None:
    link = SyncLink(server.url, PREFIX)
    try:
        log = RedisAuditSync(link, max_entries=10_000)
        for n in range(1200):
            log.record_audit(ts=T0 + n, actor="cli", action="disable", target="a" if n == 3 else "b")
        assert [e.ts for e in log.list_audit(target="a")] == [T0 + 3]
        assert len(log.list_audit(limit=1100)) == 1100
    finally:
        link.close()


def test_a_since_listing_stops_at_old_stream_ids() -> None:
    scan = Scan(since=T0)
    old = int((T0 - 3600) * 1000)
    scan.feed([(f"{old}-0", {"ts": repr(T0 - 3600), "actor": "cli", "action": "x"})])
    assert scan.done and scan.result() == []


async def test_entries_recorded_while_redis_is_down_are_written_when_it_is_back(
        server: RedisServer, clock: FakeClock) -> None:
    async with auditor(server, clock) as audit:
        server.pause()
        try:
            await audit.record("admin1", "load_model", "qwen")
            clock.advance(1)
            await audit.record("admin1", "unload_model", "qwen")
            assert audit.pending == 2
        finally:
            server.resume()
        await wait_until(lambda: audit.pending == 0, "the queue written")
        entries = await audit.list()
        assert [(e.action, e.ts) for e in entries] == [("load_model", T0), ("unload_model", T0 + 1)]


async def test_a_full_queue_drops_the_oldest_and_says_so(server: RedisServer, clock: FakeClock,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "llamagate.audit")
    async with auditor(server, clock, queue_size=2) as audit:
        server.kill()
        for action in ("one", "two", "three"):
            await audit.record("admin1", action)
        assert audit.pending == 2
        assert any("queue full" in r.getMessage() for r in caplog.records)
    assert any("2 audit entries were never written" in r.getMessage() for r in caplog.records)
