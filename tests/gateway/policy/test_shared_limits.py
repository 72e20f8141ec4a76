"""GATEWAY_WORKERS > 1: a key's rate limits are counted across workers (gateway/policy/shared_limits.py).

First two workers' views of one table in this process, on a stopped clock; then the real
service with two workers, where per-worker buckets would let a key through twice over."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.policy import shared_limits
from gateway.policy.buckets import KeyLimiter, LimitExceeded, RateLimiter
from gateway.policy.shared_limits import SharedKeyLimiter, SharedTable, limiters
from keys.model import Limits
from tests.support.fake_llama import FakeLlama
from tests.support.keytool import KeyTool
from tests.support.service import two_worker_service, worker_pids

NOW = 1000.0


Views = Callable[..., tuple[RateLimiter, RateLimiter]]


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[Views]:
    """Two workers' limiters on one table (closed after the test)."""
    tables: list[SharedTable] = []

    def make(slots: int = 64) -> tuple[RateLimiter, RateLimiter]:
        path = tmp_path / "limits.bin"
        shared_limits.create(path, workers=2, slots=slots)
        return limiter(path, 0, slots), limiter(path, 1, slots)

    def limiter(path: Path, index: int, slots: int) -> RateLimiter:
        tables.append(SharedTable(path, 2, index, slots))
        return RateLimiter(Limits(), clock=lambda: NOW, make=limiters(tables[-1]))

    make.limiter = limiter  # type: ignore[attr-defined]
    yield make
    for table in tables:
        table.close()


def test_requests_per_minute_are_one_budget(two_workers: Views) -> None:
    a, b = two_workers()
    limits = Limits(requests_per_minute=3)
    ka, kb = a.for_key("k1", limits), b.for_key("k1", limits)
    ka.admit(NOW)
    kb.admit(NOW)
    ka.admit(NOW)
    with pytest.raises(LimitExceeded) as info:
        kb.admit(NOW)
    assert info.value.retry_after == pytest.approx(20.0)  # one request back every 20 s
    assert ka.headers(NOW)["x-ratelimit-remaining-requests"] == "0"
    # another key has its own budget
    b.for_key("k2", limits).admit(NOW)
    assert b.for_key("k2", limits).headers(NOW)["x-ratelimit-remaining-requests"] == "2"


def test_concurrency_and_tokens_are_counted_over_workers(two_workers: Views) -> None:
    a, b = two_workers()
    limits = Limits(tokens_per_minute=100, max_concurrent=2)
    ka, kb = a.for_key("k", limits), b.for_key("k", limits)
    ka.admit(NOW)
    kb.admit(NOW)
    with pytest.raises(LimitExceeded, match="2 concurrent"):
        kb.admit(NOW)
    assert ka.reserve(60, NOW) == 60
    with pytest.raises(LimitExceeded, match="100 tokens per minute"):
        kb.reserve(60, NOW)
    ka.release(60, 10, NOW)  # used 10 of the 60 reserved: 50 come back
    assert kb.reserve(60, NOW) == 60
    kb.admit(NOW)  # a's release freed a place
    assert kb.in_flight() == 2 and ka.in_flight() == 2


def test_a_restarted_worker_gives_back_what_it_held(two_workers: Views, tmp_path: Path) -> None:
    a, b = two_workers()
    limits = Limits(max_concurrent=2)
    a.for_key("k", limits).admit(NOW)
    b.for_key("k", limits).admit(NOW)
    with pytest.raises(LimitExceeded):
        a.for_key("k", limits).admit(NOW)
    # worker 1 crashed: serve voids its counts at once, and starts it again with its index
    shared_limits.release_worker(tmp_path / "limits.bin", 2, 1, 64)
    assert a.for_key("k", limits).in_flight() == 1
    restarted = two_workers.limiter(tmp_path / "limits.bin", 1, 64)  # type: ignore[attr-defined]
    assert a.for_key("k", limits).in_flight() == 1
    restarted.for_key("k", limits).admit(NOW)
    assert a.for_key("k", limits).in_flight() == 2


def test_a_reload_that_changes_a_limit_keeps_what_is_left(two_workers: Views) -> None:
    a, b = two_workers()
    ka = a.for_key("k", Limits(requests_per_minute=10))
    for _ in range(6):
        ka.admit(NOW)
    kb = b.for_key("k", Limits(requests_per_minute=5))  # b has reloaded the keys file already
    assert kb.headers(NOW)["x-ratelimit-remaining-requests"] == "4"  # 4 left, within 5
    for _ in range(4):
        kb.admit(NOW)
    with pytest.raises(LimitExceeded):
        kb.admit(NOW)
    with pytest.raises(LimitExceeded):
        ka.admit(NOW)  # the bucket is one, whichever limit a worker has read


def test_a_full_table_falls_back_to_per_worker_limits(two_workers: Views,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    a, _ = two_workers(slots=2)
    with caplog.at_level(logging.WARNING, "llamagate.gateway.limits"):
        kinds = [type(a.for_key(f"k{i}", Limits(requests_per_minute=1))) for i in range(3)]
    assert kinds == [SharedKeyLimiter, SharedKeyLimiter, KeyLimiter]
    assert "table is full" in caplog.text


def test_only_keys_with_a_limit_take_a_record(two_workers: Views) -> None:
    a, _ = two_workers()
    assert type(a.for_key("free", Limits())) is KeyLimiter
    # a reload gives it a limit: from then on it is counted with the other workers
    assert type(a.for_key("free", Limits(requests_per_minute=5))) is SharedKeyLimiter
    assert type(a.for_key("free", Limits())) is KeyLimiter


def _hammer(path: Path, index: int, tries: int, granted: Any) -> None:
    """One worker process admitting and releasing as fast as it can."""
    table = SharedTable(path, 2, index, 64)
    key = RateLimiter(Limits(), clock=lambda: NOW, make=limiters(table)).for_key(
        "k", Limits(requests_per_minute=20_000, max_concurrent=1_000_000))
    for _ in range(tries):
        try:
            key.admit(NOW)
        except LimitExceeded:
            continue
        granted.value += 1  # this process's own counter: no race here
        key.release(0, None, NOW)
    table.close()


def test_two_processes_never_overdraw_a_bucket(tmp_path: Path) -> None:
    """The lock is what makes read, change, write one step: without it the two processes'
    updates would overwrite each other and grant more than the bucket holds."""
    path = tmp_path / "limits.bin"
    shared_limits.create(path, workers=2, slots=64)
    ctx = multiprocessing.get_context("fork")
    counts = [ctx.Value("i", 0, lock=False) for _ in range(2)]
    procs = [ctx.Process(target=_hammer, args=(path, i, 15_000, counts[i])) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    # the clock stands still: the bucket's 20,000 requests, exactly, whoever got them
    assert counts[0].value + counts[1].value == 20_000
    table = SharedTable(path, 2, 0, 64)
    try:
        assert table.in_flight(table.record("k") or 0) == 0
    finally:
        table.close()


@pytest.mark.llama_server
async def test_two_workers_grant_a_key_its_limit_once(metered_fake: FakeLlama, tmp_path: Path) -> None:
    keys = KeyTool(tmp_path / "data" / "keys.json", tmp_path / "data" / "usage.db")
    _, secret = keys.generate("limited", "--rpm", "4")
    body = {"model": "tiny", "prompt": "a", "max_tokens": 2}
    async with two_worker_service(tmp_path, metered_fake, keys) as svc:
        statuses = []
        for _ in range(16):  # a new connection each: the kernel spreads them over both workers
            async with aiohttp.ClientSession() as fresh, fresh.post(
                    svc.url + "/v1/completions", json=body,
                    headers={"Authorization": f"Bearer {secret}"}) as r:
                statuses.append(r.status)
        assert statuses.count(200) == 4 and statuses.count(429) == 12
        # both workers answered, so each worker's own budget of 4 would have let more through
        assert len(worker_pids(svc)) == 2
