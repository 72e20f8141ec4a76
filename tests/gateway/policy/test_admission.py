"""Admission control: MAX_CONCURRENT_REQUESTS in flight, MAX_QUEUE_SIZE waiting,
QUEUE_TIMEOUT per waiter; a waiter whose client leaves gives its place up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from gateway.drain import drain
from gateway.policy.admission import UNMEASURED_DRAIN, Admission, QueueFull, QueueTimeout
from gateway.policy.admission_hub import AdmissionHub
from gateway.policy.shared_admission import SharedAdmission
from gateway.upstream import slots
from tests.gateway.conftest import StartGateway
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, assert_openai_error
from tests.support.rawhttp import Client, json_request
from tests.support.wait import wait_until

COMPLETIONS = "/v1/completions"
BODY = {"prompt": "a", "max_tokens": 2}


async def _post(http: aiohttp.ClientSession, gateway: Gateway) -> tuple[int, dict[str, str], bytes]:
    async with http.post(gateway.url + COMPLETIONS, json=BODY) as r:
        return r.status, dict(r.headers), await r.read()


async def _hold_the_slot(gateway: Gateway, fake: FakeLlama) -> Client:
    """One request that holds the only backend slot (the fake hangs before answering)."""
    fake.switches.hang_before_headers = True
    holder = await Client.sending(gateway.url, json_request(COMPLETIONS, BODY))
    await fake.wait_for_requests(1, COMPLETIONS)
    return holder


async def _metric(http: aiohttp.ClientSession, gateway: Gateway, name: str) -> float:
    async with http.get(gateway.url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_queue_full_is_429_with_retry_after(start_gateway: StartGateway, fake: FakeLlama,
                                                  http: aiohttp.ClientSession) -> None:
    gateway = await start_gateway(MAX_CONCURRENT_REQUESTS="1", MAX_QUEUE_SIZE="1",
                                  QUEUE_TIMEOUT="60")
    holder = await _hold_the_slot(gateway, fake)
    waiter = asyncio.create_task(_post(http, gateway))
    await wait_until(lambda: gateway.state.admission.queued == 1, "a queued request")
    assert await _metric(http, gateway, "llamagate_in_flight_requests") == 1
    assert await _metric(http, gateway, "llamagate_queue_depth") == 1

    status, headers, body = await _post(http, gateway)
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    assert headers["Content-Type"].startswith("application/json") and headers["X-Request-ID"]
    assert_openai_error(json.loads(body), "rate_limit_error", "queue_full")
    async with gateway.sdk() as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.completions.create(model="tiny", prompt="a", max_tokens=2)
    assert info.value.code == "queue_full"
    assert await _metric(http, gateway, 'llamagate_rejections_total{reason="queue_full"}') == 2

    fake.switches.hang_before_headers = False
    fake.release.set()  # the holder finishes; the queued request gets the slot
    assert (await waiter)[0] == 200
    await holder.drop()
    assert len(fake.requests(COMPLETIONS)) == 2  # the refused ones never reached the backend
    # the refused ones never queued: only the holder's and the waiter's waits are observed
    await wait_until(lambda: not gateway.state.active, "the holder to finish")
    assert await _metric(http, gateway, "llamagate_queue_wait_seconds_count") == 2


async def test_queue_wait_expired_is_503_with_retry_after(start_gateway: StartGateway,
                                                          fake: FakeLlama,
                                                          http: aiohttp.ClientSession) -> None:
    gateway = await start_gateway(MAX_CONCURRENT_REQUESTS="1", QUEUE_TIMEOUT="0.2")
    holder = await _hold_the_slot(gateway, fake)
    async with gateway.sdk() as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.completions.create(model="tiny", prompt="a", max_tokens=2)
    assert info.value.status_code == 503
    assert int(info.value.response.headers["Retry-After"]) >= 1
    assert info.value.response.headers["X-Request-ID"]
    # the SDK keeps the envelope's inner object as `body`
    assert_openai_error({"error": info.value.body}, "service_unavailable", "queue_timeout")
    assert gateway.state.admission.queued == 0
    assert await _metric(http, gateway, 'llamagate_rejections_total{reason="queue_timeout"}') == 1
    # its wait is observed (the holder's, which never queued, is not over yet)
    assert await _metric(http, gateway, "llamagate_queue_wait_seconds_count") == 1
    assert await _metric(http, gateway, "llamagate_queue_wait_seconds_sum") >= 0.2
    assert len(fake.requests(COMPLETIONS)) == 1
    await holder.drop()


async def test_client_that_disconnects_while_queued_leaves_the_queue(
        start_gateway: StartGateway, fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    gateway = await start_gateway(MAX_CONCURRENT_REQUESTS="1", MAX_QUEUE_SIZE="1",
                                  QUEUE_TIMEOUT="60")
    holder = await _hold_the_slot(gateway, fake)
    queued = await Client.sending(gateway.url, json_request(COMPLETIONS, BODY))
    await wait_until(lambda: gateway.state.admission.queued == 1, "a queued request")
    await queued.drop()
    await wait_until(lambda: gateway.state.admission.queued == 0, "the waiter to leave", within=2)
    assert await _metric(http, gateway, "llamagate_queue_depth") == 0

    # its place is free again: a newcomer queues rather than getting 429
    newcomer = asyncio.create_task(_post(http, gateway))
    await wait_until(lambda: gateway.state.admission.queued == 1, "the newcomer queued")
    fake.switches.hang_before_headers = False
    fake.release.set()
    assert (await newcomer)[0] == 200
    await holder.drop()
    # the departed waiter never took a slot nor reached the backend
    assert len(fake.requests(COMPLETIONS)) == 2
    assert gateway.state.admission.in_flight == 0


async def test_draining_refuses_the_queued_requests_at_once(
        start_gateway: StartGateway, fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    gateway = await start_gateway(MAX_CONCURRENT_REQUESTS="1", QUEUE_TIMEOUT="60",
                                  SHUTDOWN_GRACE_SECONDS="60")
    holder = await _hold_the_slot(gateway, fake)
    waiter = asyncio.create_task(_post(http, gateway))
    await wait_until(lambda: gateway.state.admission.queued == 1, "a queued request")
    draining = asyncio.create_task(drain(gateway.state))  # waits for the holder, up to 60 s
    status, headers, body = await asyncio.wait_for(waiter, 5)  # not served late: refused now
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert_openai_error(json.loads(body), "service_unavailable", "shutting_down")
    assert not draining.done()  # the request in flight may still finish
    fake.release.set()
    await asyncio.wait_for(draining, 10)
    await holder.drop()
    assert len(fake.requests(COMPLETIONS)) == 1


async def test_probes_and_metrics_never_queue(start_gateway: StartGateway, fake: FakeLlama,
                                              http: aiohttp.ClientSession) -> None:
    gateway = await start_gateway(MAX_CONCURRENT_REQUESTS="1", MAX_QUEUE_SIZE="0")
    holder = await _hold_the_slot(gateway, fake)
    for path in ("/ping", "/health", "/metrics"):
        async with http.get(gateway.url + path) as r:
            assert r.status == 200, path
    status, _, _ = await _post(http, gateway)
    assert status == 429  # MAX_QUEUE_SIZE=0: no waiting at all
    await holder.drop()


async def test_reads_take_no_backend_slot(start_gateway: StartGateway, fake: FakeLlama,
                                          http: aiohttp.ClientSession) -> None:
    gateway = await start_gateway(MAX_CONCURRENT_REQUESTS="1", MAX_QUEUE_SIZE="0")
    holder = await _hold_the_slot(gateway, fake)
    async with http.get(gateway.url + "/v1/models") as r:  # the SDK's start-up check
        assert r.status == 200
        assert [m["id"] for m in (await r.json())["data"]] == ["tiny"]
    assert (await _post(http, gateway))[0] == 429  # while generations still queue
    assert gateway.state.admission.in_flight == 1
    await holder.drop()


async def test_the_request_timeout_counts_time_in_the_queue(
        start_gateway: StartGateway, fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    gateway = await start_gateway(MAX_CONCURRENT_REQUESTS="1", QUEUE_TIMEOUT="60")
    holder = await _hold_the_slot(gateway, fake)
    started = time.monotonic()
    async with gateway.sdk(default_headers={"X-Request-Timeout": "1"}) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.completions.create(model="tiny", prompt="a", max_tokens=2)
    waited = time.monotonic() - started
    assert info.value.status_code == 504, info.value  # its own deadline, not QUEUE_TIMEOUT
    assert_openai_error({"error": info.value.body}, "timeout", "upstream_timeout")
    assert waited < 30, waited
    assert gateway.state.admission.queued == 0 and len(gateway.state.active) == 1  # the holder
    assert await _metric(http, gateway, "llamagate_queue_depth") == 0
    assert len(fake.requests(COMPLETIONS)) == 1  # it never reached the backend
    fake.switches.hang_before_headers = False
    fake.release.set()
    await holder.drop()
    assert (await _post(http, gateway))[0] == 200  # and its place is not held


# -- the pure core ---------------------------------------------------------------------

async def test_admission_is_fifo_and_hands_slots_over() -> None:
    adm = Admission(limit=1, max_queue=2, timeout=5)
    await adm.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        await adm.acquire()
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(2)]
    await wait_until(lambda: adm.queued == 2, "two waiters")
    with pytest.raises(QueueFull):
        await adm.acquire()
    adm.release()
    await wait_until(lambda: order == [0], "the first waiter admitted")
    assert adm.in_flight == 1  # handed over, never dipped
    adm.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1]
    adm.release()
    assert adm.in_flight == 0


async def test_admission_timeout_and_cancellation_leave_the_queue() -> None:
    adm = Admission(limit=1, max_queue=2, timeout=0.05)
    await adm.acquire()
    with pytest.raises(QueueTimeout):
        await adm.acquire()
    assert adm.queued == 0
    adm.timeout = 60
    task = asyncio.create_task(adm.acquire())
    await wait_until(lambda: adm.queued == 1, "a waiter")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert adm.queued == 0
    adm.release()
    assert adm.in_flight == 0


# -- a full queue's Retry-After (issue 22: 44 clients told "1" all failed their retries) ------

class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_full_queue_reports_its_drain_time_at_the_measured_pace() -> None:
    clock = _Clock()
    adm = Admission(limit=1, max_queue=2, timeout=60, clock=clock)
    await adm.acquire()
    waiters = [asyncio.create_task(adm.acquire()) for _ in range(2)]
    await wait_until(lambda: adm.queued == 2, "two waiters")
    with pytest.raises(QueueFull) as unmeasured:
        await adm.acquire()
    assert unmeasured.value.drain == UNMEASURED_DRAIN  # nothing has finished under load yet
    # the backend finishes one request every 3 s while every place is taken
    for _ in range(2):
        clock.now += 3.0
        adm.release()
        waiters.append(asyncio.create_task(adm.acquire()))
        await wait_until(lambda: adm.queued == 2, "the queue full again")
    with pytest.raises(QueueFull) as measured:
        await adm.acquire()
    # one gap measured (the first release opens the run): 3 s for each of 2 ahead and itself
    assert measured.value.drain == pytest.approx(9.0)
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_an_idle_spell_is_not_taken_for_the_backends_pace() -> None:
    clock = _Clock()
    adm = Admission(limit=1, max_queue=1, timeout=60, clock=clock)
    for gap in (2.0, 2.0):  # saturated: released with a waiter behind, every 2 s
        await adm.acquire()
        waiter = asyncio.create_task(adm.acquire())
        await wait_until(lambda: adm.queued == 1, "a waiter")
        clock.now += gap
        adm.release()
        await waiter
        clock.now += gap
        adm.release()  # the last one out: nobody waits, the run ends
        clock.now += 3600.0  # an hour idle
    assert adm.drain_seconds() == pytest.approx(2.0)


def test_retry_after_spreads_refused_clients_over_the_drain_time() -> None:
    values = [slots.retry_after(4.0) for _ in range(400)]
    assert min(values) >= 4 and max(values) <= 8
    assert len(set(values)) >= 4  # spread, not one instant for everyone
    # a jitter of a second: 2 s for about 1 draw in 100 (200 draws missed it 13% of the
    # time; 3,000 miss it about once in 10^13)
    assert {slots.retry_after(0.01) for _ in range(3000)} == {1, 2}
    assert slots.retry_after(10_000.0) == slots.MAX_RETRY_AFTER


async def test_the_hubs_full_answer_carries_its_drain_time(tmp_path: Path) -> None:
    clock = _Clock()
    hub = AdmissionHub(Admission(limit=1, max_queue=1, timeout=60, clock=clock),
                       tmp_path / "admission.sock")
    await hub.start()
    worker = SharedAdmission(tmp_path / "admission.sock")
    await worker.connect()
    queued: list[asyncio.Task[None]] = []
    try:
        await worker.acquire()  # the one place
        queued.append(asyncio.create_task(worker.acquire()))
        await wait_until(lambda: hub.admission.queued == 1, "a request queued at the hub")
        with pytest.raises(QueueFull) as refused:
            await worker.acquire()
        assert refused.value.drain == UNMEASURED_DRAIN
        for _ in range(2):  # the place handed on every 1.5 s
            clock.now += 1.5
            worker.release()
            await queued[-1]
            queued.append(asyncio.create_task(worker.acquire()))
            await wait_until(lambda: hub.admission.queued == 1, "the queue full again")
        with pytest.raises(QueueFull) as refused:
            await worker.acquire()
        assert refused.value.drain == pytest.approx(3.0)  # 1.5 s for the one ahead and itself
    finally:
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        worker.close()
        await hub.close()
