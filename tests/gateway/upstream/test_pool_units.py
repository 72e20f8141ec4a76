"""The upstream pool's pure parts: outlier ejection with a clock, the power of two choices,
conversation keys, and the pool's admission (one FIFO queue across upstreams, per-upstream
slots, affinity with its margin, probation) on members that never open a connection."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.errors import BackendUnavailable
from gateway.exchange import Exchange
from gateway.policy.admission import QueueFull, QueueTimeout
from gateway.upstream.affinity import PREFIX_CHARS, AffinityTable, conversation_key
from gateway.upstream.backend import Upstream
from gateway.upstream.members import Member, better, choose
from gateway.upstream.outlier import BASE_EJECTION, CONSECUTIVE, EJECTED, HEALTHY, PROBATION, Outlier
from gateway.upstream.pool import Pool, failure_of


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_consecutive_failures_eject_then_probation_then_healthy() -> None:
    o = Outlier()
    for _ in range(CONSECUTIVE - 1):
        assert not o.failed(0.0, "status_5xx")
    o.answered(0.0)  # an answer in between: the count starts again
    for _ in range(CONSECUTIVE - 1):
        assert not o.failed(0.0, "status_5xx")
    assert o.failed(0.0, "status_5xx")
    assert o.state(0.0) == EJECTED and o.reason == "status_5xx"
    assert not o.failed(1.0, "broken")  # sent before the ejection: counted already
    assert o.state(BASE_EJECTION) == PROBATION
    assert o.failed(BASE_EJECTION, "timeout")  # one failure in probation: out again, longer
    assert o.state(BASE_EJECTION * 2.5) == EJECTED
    assert o.state(BASE_EJECTION * 3) == PROBATION
    o.answered(BASE_EJECTION * 3)
    assert o.state(BASE_EJECTION * 3) == HEALTHY and o.reason is None and o.ejections == 0


def test_a_refused_connection_ejects_at_once() -> None:
    o = Outlier()
    assert o.failed(5.0, "refused", at_once=True)
    assert o.state(5.0) == EJECTED


def test_a_probe_that_saw_it_down_and_up_again_ends_its_probation() -> None:
    o = Outlier()
    o.failed(0.0, "status_5xx", at_once=True)
    o.probed(True, BASE_EJECTION)  # never seen down: the failures still count
    assert o.state(BASE_EJECTION) == PROBATION
    o.failed(BASE_EJECTION, "refused", at_once=True)
    o.probed(False, BASE_EJECTION)  # down, then restarted within its ejection
    o.probed(True, BASE_EJECTION + 1.0)
    assert o.state(BASE_EJECTION + 1.0) == EJECTED  # the ejection runs its time
    o.probed(True, BASE_EJECTION * 3)
    assert o.state(BASE_EJECTION * 3) == HEALTHY and o.reason is None


def member(index: int, slots: int = 2, models: tuple[str, ...] = ("A",), weight: float = 1.0,
           ready: bool = True) -> Member:
    m = Member(index, f"u{index}", Upstream(f"http://127.0.0.1:{9000 + index}", None, 1),
               weight, slots)
    m.models, m.ready, m.state = frozenset(models), ready, "ready" if ready else "starting"
    return m


def test_two_choices_prefer_free_slots_then_weight_then_fewer_in_flight() -> None:
    a, b = member(0, slots=4), member(1, slots=4)
    a.in_flight = 3
    assert better(a, b) is b
    b.busy = 4  # another client's requests fill b's slots (its /slots)
    assert better(a, b) is a
    c, d = member(2), member(3, weight=2.0)
    assert better(c, d) is d
    # three candidates: two distinct draws, whatever the random number
    cands = [member(i) for i in range(3)]
    cands[1].in_flight = 2
    picks = {choose(cands, r / 100).index for r in range(100)}
    assert picks == {0, 2}  # the busy one loses every pair it is drawn in


def test_conversation_keys_follow_the_opening_or_the_named_key() -> None:
    system = {"role": "system", "content": "be brief"}
    turn1 = {"messages": [system, {"role": "user", "content": "hi there"}]}
    turn3 = {"messages": [system, {"role": "user", "content": "hi there"},
                          {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "and then?"}]}
    other = {"messages": [system, {"role": "user", "content": "something else"}]}
    assert conversation_key(turn1) == conversation_key(turn3) != conversation_key(other)
    assert conversation_key({**turn1, "user": "u-1"}) == conversation_key({**other, "user": "u-1"})
    assert conversation_key({**turn1, "prompt_cache_key": "k"}) != conversation_key(turn1)
    long = "x" * (PREFIX_CHARS * 2)
    assert conversation_key({"prompt": long}) == conversation_key({"prompt": long + "more"})
    assert conversation_key({"input": 5}) is None


def test_the_affinity_table_forgets_the_least_recently_routed() -> None:
    table = AffinityTable(limit=2)
    table.served(1, 0)
    table.served(2, 1)
    table.served(1, 2)  # routed again: now the most recent
    table.served(3, 0)
    assert (table.get(1), table.get(2), table.get(3)) == (2, -1, 0)


def exchange(model: str = "A") -> Exchange:
    ex = Exchange("req", "/v1/chat/completions")
    ex.model = model
    return ex


def chat(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def answered(ex: Exchange, status: int = 200) -> Exchange:
    ex.upstream_status = status
    return ex


async def test_slots_bound_each_upstream_and_one_queue_serves_first_come_first() -> None:
    a, b = member(0, slots=1, models=("A",)), member(1, slots=1, models=("A", "B"))
    pool = Pool([a, b], max_queue=10, timeout=5, affinity=False)
    first, second = exchange(), exchange()
    await pool.acquire(first, None)
    await pool.acquire(second, None)
    assert {first.member, second.member} == {0, 1} and pool.in_flight == 2
    # both full: a request for B and then one for A queue, in that order
    wait_b, wait_a = exchange("B"), exchange("A")
    tb = asyncio.create_task(pool.acquire(wait_b, None))
    await asyncio.sleep(0)
    ta = asyncio.create_task(pool.acquire(wait_a, None))
    await asyncio.sleep(0)
    assert pool.queued == 2
    # a's slot frees: B cannot use it, so the A request behind it takes it
    pool.release(answered(first if first.member == 0 else second))
    await ta
    assert wait_a.member == 0 and not tb.done()
    pool.release(answered(first if first.member == 1 else second))  # b frees: B's
    await tb
    assert wait_b.member == 1 and pool.queued == 0


async def test_a_full_queue_refuses_and_a_waiter_times_out() -> None:
    pool = Pool([member(0, slots=1)], max_queue=1, timeout=0.05, affinity=False)
    await pool.acquire(exchange(), None)
    waiting = asyncio.create_task(pool.acquire(exchange(), None))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await pool.acquire(exchange(), None)
    with pytest.raises(QueueTimeout):
        await waiting
    assert pool.queued == 0


async def test_no_upstream_serving_the_model_is_a_503_not_a_wait() -> None:
    clock = Clock()
    a = member(0, models=("A",))
    pool = Pool([a, member(1, models=("B",), ready=False)], max_queue=10, timeout=5,
                clock=clock)
    with pytest.raises(BackendUnavailable, match="model 'B'"):
        await pool.acquire(exchange("B"), None)
    ex = exchange()
    await pool.acquire(ex, None)
    ex.upstream_failure = "refused"
    pool.release(ex)  # ejected at once
    assert a.ejections == 1
    with pytest.raises(BackendUnavailable) as refused:
        await pool.acquire(exchange(), None)
    assert refused.value.retry_after == pytest.approx(BASE_EJECTION)
    clock.now += BASE_EJECTION  # probation: one request at a time, until one is answered
    on_probation = exchange()
    await pool.acquire(on_probation, None)
    assert a.shown_state(clock.now) == "probation"
    queued = asyncio.create_task(pool.acquire(exchange(), None))
    await asyncio.sleep(0)
    assert pool.queued == 1
    pool.release(answered(on_probation))
    await queued
    assert a.shown_state(clock.now) == "ready"


async def test_affinity_returns_a_conversation_unless_its_upstream_is_over_the_margin() -> None:
    members = [member(i, slots=8) for i in range(3)]
    pool = Pool(members, max_queue=10, timeout=5, affinity=True, margin=1)
    first = exchange()
    await pool.acquire(first, chat("conversation one"))
    home = first.member
    pool.release(answered(first))
    for _ in range(5):  # later turns go home
        ex = exchange()
        await pool.acquire(ex, chat("conversation one"))
        assert ex.member == home
        pool.release(answered(ex))
    assert members[home].affinity_hits == 5
    members[home].in_flight += 2  # home now has two more in flight than the others
    spilled = exchange()
    await pool.acquire(spilled, chat("conversation one"))
    assert spilled.member != home and members[spilled.member].affinity_misses == 1
    # and the conversation stays where it spilled to
    members[home].in_flight -= 2
    pool.release(answered(spilled))
    again = exchange()
    await pool.acquire(again, chat("conversation one"))
    assert again.member == spilled.member


async def test_a_conversation_waits_for_a_slot_at_home_within_the_margin() -> None:
    members = [member(i, slots=1) for i in range(2)]
    pool = Pool(members, max_queue=10, timeout=5, affinity=True, margin=1)
    first = exchange()
    await pool.acquire(first, chat("conversation two"))  # home is now full
    home = members[first.member]
    waiting = exchange()
    task = asyncio.create_task(pool.acquire(waiting, chat("conversation two")))
    await asyncio.sleep(0)
    assert pool.queued == 1  # the other upstream is free, but home is only 1 ahead
    pool.release(answered(first))
    await task
    assert members[waiting.member] is home and home.affinity_hits == 1


async def test_a_retry_goes_to_another_upstream_first_in_the_queue() -> None:
    a, b = member(0, slots=1), member(1, slots=1)
    pool = Pool([a, b], max_queue=10, timeout=5, affinity=False)
    held, failed = exchange(), exchange()
    await pool.acquire(held, None)
    await pool.acquire(failed, None)
    behind = asyncio.create_task(pool.acquire(exchange(), None))
    await asyncio.sleep(0)
    retry = exchange()
    retried = asyncio.create_task(pool.acquire(retry, None, exclude=failed.member))
    await asyncio.sleep(0)
    failed.upstream_failure = "broken"
    pool.release(failed)  # its upstream's slot frees, but the retry may not go there
    await behind
    pool.release(answered(held))
    await retried
    assert retry.member == held.member != failed.member


def test_what_counts_against_an_upstream() -> None:
    assert failure_of(answered(exchange(), 200)) is None
    assert failure_of(answered(exchange(), 404)) is None
    assert failure_of(answered(exchange(), 500)) == "status_5xx"
    assert failure_of(answered(exchange(), 503)) == "loading"
    timed_out = exchange()
    timed_out.timed_out = True
    assert failure_of(timed_out) == "timeout"
    assert failure_of(exchange()) is None  # the client left before an answer: not its fault
