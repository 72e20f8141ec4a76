"""The fleet's limits (gateway/policy/fleet_limits.py) and auth-failure throttle
(gateway/policy/fleet_throttle.py) against a real redis-server, with several links to it
standing for several replicas: the counts are the fleet's, leases free a dead replica's
slots, and an outage falls back as REDIS_FAILURE_MODE says."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from fleet.link import FleetLink
from gateway.errors import BackendUnavailable, BadRequest, RateLimited
from gateway.policy.fleet_limits import FleetLimiter, Hold
from gateway.policy.fleet_throttle import FleetAddressThrottle
from keys.model import Limits
from tests.support.redis import RedisServer


@pytest.fixture
async def links(redis_server: RedisServer) -> AsyncIterator[list[FleetLink]]:
    made: list[FleetLink] = []
    yield made
    for link in made:
        await link.close()


async def replicas(redis_server: RedisServer, made: list[FleetLink], n: int, *,
                   lease: float = 30.0, fail_open: bool = True) -> list[FleetLimiter]:
    out = []
    for _ in range(n):
        link = FleetLink(redis_server.url, "test:", timeout=0.3)
        made.append(link)
        await link.start()
        assert link.up
        out.append(FleetLimiter(link, Limits(), lease, fail_open))
    return out


async def admitted(limiter: FleetLimiter, limits: Limits, key: str = "k1", tokens: int = 0,
                   asked: bool = False, inference: bool = True) -> Hold | None:
    hold = Hold(key, limits)
    try:
        await limiter.admit(hold, tokens, asked, inference)
    except RateLimited:
        return None
    return hold


async def test_requests_per_minute_are_the_fleets(redis_server: RedisServer,
                                                  links: list[FleetLink]) -> None:
    fleet = await replicas(redis_server, links, 3)
    limits = Limits(requests_per_minute=5)
    answers = [await admitted(fleet[i % 3], limits) for i in range(12)]
    assert sum(a is not None for a in answers) == 5
    assert answers[:5] == [a for a in answers if a is not None]  # the first five, then none
    remaining = [a.headers["x-ratelimit-remaining-requests"] for a in answers[:5] if a]
    assert remaining == ["4", "3", "2", "1", "0"]  # counted down across the three
    hold = Hold("k1", limits)
    with pytest.raises(RateLimited) as refused:
        await fleet[1].admit(hold, 0, False, True)
    assert refused.value.retry_after is not None and 0 < refused.value.retry_after <= 12.1
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.value.headers["x-ratelimit-limit-requests"] == "5"
    # another key has its own count
    assert await admitted(fleet[0], limits, key="k2") is not None


async def test_concurrency_is_the_fleets_and_released(redis_server: RedisServer,
                                                      links: list[FleetLink]) -> None:
    fleet = await replicas(redis_server, links, 3)
    limits = Limits(max_concurrent=2)
    first, second = await admitted(fleet[0], limits), await admitted(fleet[1], limits)
    assert first is not None and second is not None
    assert await admitted(fleet[2], limits) is None
    fleet[0].release(first, 0)
    await _until(lambda: redis_server.client().zcard("test:{k1}:slots") == 1)
    assert await admitted(fleet[2], limits) is not None


async def test_a_dead_replicas_slots_free_within_the_lease(redis_server: RedisServer,
                                                           links: list[FleetLink]) -> None:
    lease = 1.0
    fleet = await replicas(redis_server, links, 2, lease=lease)
    limits = Limits(max_concurrent=1)
    alive = fleet[1]
    alive.start()  # renews its own requests' leases
    try:
        held = await admitted(alive, limits, key="renewed")
        assert held is not None
        # the dead one takes a slot and never renews nor releases it
        assert await admitted(fleet[0], limits, key="orphaned") is not None
        taken = time.monotonic()
        while await admitted(alive, limits, key="orphaned") is None:
            assert time.monotonic() - taken < lease + 1.0, "the slot outlived its lease"
            await asyncio.sleep(0.05)
        assert time.monotonic() - taken >= lease * 0.9
        # meanwhile the live replica's running request kept its slot past the lease
        assert await admitted(fleet[0], limits, key="renewed") is None
    finally:
        await alive.close()


async def test_tokens_reserved_then_settled(redis_server: RedisServer,
                                            links: list[FleetLink]) -> None:
    a, b = await replicas(redis_server, links, 2)
    limits = Limits(tokens_per_minute=100)
    hold = await admitted(a, limits, tokens=60, asked=True)
    assert hold is not None and hold.reserved == 60
    assert hold.headers["x-ratelimit-remaining-tokens"] == "40"
    assert await admitted(b, limits, tokens=60, asked=True) is None  # 40 left
    a.release(hold, 10)  # used 10 of the 60: 50 back
    await _until(lambda: float(redis_server.client().hget("test:{k1}:limits", "tl") or 0) >= 89)
    again = await admitted(b, limits, tokens=80, asked=True)
    assert again is not None
    with pytest.raises(BadRequest) as too_large:
        await b.admit(Hold("k1", limits), 101, True, True)
    assert too_large.value.code == "tokens_exceed_limit"


async def test_a_refusal_for_tokens_takes_no_request(redis_server: RedisServer,
                                                     links: list[FleetLink]) -> None:
    [a] = await replicas(redis_server, links, 1)
    limits = Limits(requests_per_minute=2, tokens_per_minute=10)
    assert await admitted(a, limits, tokens=8, asked=True) is not None
    for _ in range(3):
        assert await admitted(a, limits, tokens=8, asked=True) is None
    assert await admitted(a, limits, tokens=2, asked=True) is not None  # the second request


async def test_outage_open_limits_each_replica_to_its_share(redis_server: RedisServer,
                                                           links: list[FleetLink]) -> None:
    a, b = await replicas(redis_server, links, 2, fail_open=True)
    await a.link._announce()
    assert a.link.fleet_size == 2
    limits = Limits(requests_per_minute=4)
    redis_server.pause()
    try:
        # the first call waits out the timeout, then this replica counts alone: 4 / 2
        got = [await admitted(a, limits) for _ in range(4)]
        assert sum(g is not None for g in got) == 2
        assert not a.link.up
    finally:
        redis_server.resume()


async def test_outage_closed_refuses_inference_only(redis_server: RedisServer,
                                                   links: list[FleetLink]) -> None:
    [a] = await replicas(redis_server, links, 1, fail_open=False)
    limits = Limits(requests_per_minute=100)
    redis_server.pause()
    try:
        with pytest.raises(BackendUnavailable) as refused:
            await a.admit(Hold("k1", limits), 16, True, True)
        assert refused.value.status == 503 and refused.value.retry_after
        assert await admitted(a, limits, inference=False) is not None  # a listing goes on
    finally:
        redis_server.resume()
    # back: the probe hears Redis again, and the fleet counts once more
    await _until(lambda: a.link.up, within=5)
    assert await admitted(a, limits) is not None
    assert redis_server.client().hget("test:{k1}:limits", "rl") is not None


async def test_auth_failures_are_counted_fleet_wide(redis_server: RedisServer,
                                                    links: list[FleetLink]) -> None:
    fleet = await replicas(redis_server, links, 2)
    throttles = [FleetAddressThrottle(r.link, per_minute=4) for r in fleet]
    for i in range(4):  # two failures on each replica: under the limit on each alone
        throttles[i % 2].failure("203.0.113.9")
    await _until(lambda: redis_server.client().get("test:auth:203.0.113.9") is not None)
    throttles[0].failure("203.0.113.9")  # the fifth, fleet-wide
    await _until(lambda: throttles[0].retry_after("203.0.113.9") > 0)
    assert throttles[0].retry_after("198.51.100.1") == 0


async def _until(check: Callable[[], object], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_outage_closed_refuses_a_key_without_limits_too(redis_server: RedisServer,
                                                             links: list[FleetLink]) -> None:
    [a] = await replicas(redis_server, links, 1, fail_open=False)
    unlimited = Limits()
    assert not a.closed_now()
    assert await admitted(a, unlimited) is not None  # nothing to count: admitted as is
    redis_server.pause()
    try:
        # the first call to a paused Redis waits out its timeout and marks it down
        with pytest.raises(BackendUnavailable):
            await a.admit(Hold("k1", Limits(requests_per_minute=10)), 16, True, True)
        assert a.closed_now()
        with pytest.raises(BackendUnavailable):
            await a.admit(Hold("k1", unlimited), 16, True, True)
        assert await admitted(a, unlimited, inference=False) is not None
    finally:
        redis_server.resume()


async def test_a_redis_that_refuses_writes_counts_as_down(redis_server: RedisServer,
                                                          links: list[FleetLink]) -> None:
    """A demoted primary answers READONLY: the replica falls back instead of answering 500,
    and is back only once Redis takes writes again (its probe writes, not just PINGs)."""
    [a] = await replicas(redis_server, links, 1, fail_open=True)
    limits = Limits(requests_per_minute=100)
    redis_server.client().replicaof("127.0.0.1", "1")  # nothing there: read-only for good
    try:
        assert await admitted(a, limits) is not None  # admitted here alone
        assert not a.link.up
        for _ in range(3):  # a few probes: PING answers, the heartbeat's write does not
            await asyncio.sleep(0.55)
            assert not a.link.up
    finally:
        redis_server.client().replicaof("no", "one")
    await _until(lambda: a.link.up, within=5)
    assert await admitted(a, limits) is not None
    assert redis_server.client().hget("test:{k1}:limits", "rl") is not None


async def test_a_slot_whose_admission_was_given_up_on_is_freed(redis_server: RedisServer,
                                                               links: list[FleetLink]) -> None:
    """A client that leaves while its admission is out: Redis takes the slot when it gets
    to the call, and the key's next call gives it back, well before the lease."""
    [a] = await replicas(redis_server, links, 1, lease=30.0)
    limits = Limits(max_concurrent=1)
    assert await admitted(a, limits, key="warm") is not None  # Redis knows the script now
    wire = a.link._wire
    assert wire is not None
    redis_server.pause()  # the call goes out and waits in Redis's socket
    try:
        admission = asyncio.ensure_future(a.admit(Hold("k1", limits), 0, False, True))
        await _until(lambda: wire._out, within=1)
        admission.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admission
    finally:
        redis_server.resume()
    await _until(lambda: a.link.up, within=5)
    await _until(lambda: redis_server.client().zcard("test:{k1}:slots") == 0, within=2)
    assert await admitted(a, limits) is not None


async def test_a_slot_taken_while_redis_was_paused_is_freed_when_it_answers(
        redis_server: RedisServer, links: list[FleetLink]) -> None:
    """An admission sent to a paused Redis times out (the request is admitted here alone),
    and Redis runs it when it resumes: the slot it took goes back once Redis answers, not
    a lease later."""
    [a] = await replicas(redis_server, links, 1, lease=30.0)
    limits = Limits(max_concurrent=1)
    assert await admitted(a, limits, key="warm") is not None  # Redis knows the script now
    redis_server.pause()
    try:
        hold = await admitted(a, limits)
        assert hold is not None and hold.local is not None
        a.release(hold, 0)
    finally:
        redis_server.resume()
    await _until(lambda: a.link.up, within=5)
    await _until(lambda: redis_server.client().zcard("test:{k1}:slots") == 0, within=2)
    assert await admitted(a, limits) is not None
