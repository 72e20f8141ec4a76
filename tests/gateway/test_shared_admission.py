"""GATEWAY_WORKERS > 1: one admission queue for every worker, held by the serve process
(gateway/admission_hub.py) and asked over a Unix socket (gateway/shared_admission.py).

First the hub and its clients in this process, on a real socket; then the real service
with two workers in front of the fake upstream, where per-worker queues would admit
requests that the single one refuses."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.admission import Admission, AdmissionClosed, QueueFull, QueueTimeout
from gateway.admission_hub import AdmissionHub
from gateway.shared_admission import SharedAdmission
from tests.gateway.fake_upstream import FakeUpstream
from tests.gateway.support import RawRequest, assert_openai_error, wait_until
from tests.support.service import Service


@contextlib.asynccontextmanager
async def hub_and_workers(tmp_path: Path, limit: int = 1, max_queue: int = 8,
                          queue_timeout: float = 60.0, workers: int = 2
                          ) -> AsyncIterator[tuple[AdmissionHub, list[SharedAdmission]]]:
    hub = AdmissionHub(Admission(limit, max_queue, queue_timeout), tmp_path / "admission.sock")
    await hub.start()
    clients = [SharedAdmission(hub.path) for _ in range(workers)]
    for c in clients:
        await c.connect()
    try:
        yield hub, clients
    finally:
        for c in clients:
            c.close()
        await hub.close()


async def test_a_place_held_by_one_worker_is_not_given_to_another(tmp_path: Path) -> None:
    async with hub_and_workers(tmp_path) as (hub, (a, b)):
        await a.acquire()
        waiting = asyncio.create_task(b.acquire())
        await wait_until(lambda: hub.admission.queued == 1, what="b queued at the hub")
        assert not waiting.done() and b.queued == 1
        a.release()
        await asyncio.wait_for(waiting, 5)  # handed over, first in first out
        assert (a.in_flight, b.in_flight, hub.admission.in_flight) == (0, 1, 1)
        b.release()
        await wait_until(lambda: hub.admission.in_flight == 0, what="the place given back")


async def test_the_queue_bound_and_timeout_are_for_all_workers(tmp_path: Path) -> None:
    async with hub_and_workers(tmp_path, max_queue=1, queue_timeout=0.2) as (hub, (a, b)):
        await a.acquire()
        queued = asyncio.create_task(a.acquire())
        await wait_until(lambda: hub.admission.queued == 1, what="a queued request")
        with pytest.raises(QueueFull):  # the other worker's own queue is empty
            await b.acquire()
        with pytest.raises(QueueTimeout):
            await queued
        assert hub.admission.queued == 0 and a.queued == 0


async def test_a_cancelled_waiter_leaves_the_hubs_queue(tmp_path: Path) -> None:
    async with hub_and_workers(tmp_path) as (hub, (a, b)):
        await a.acquire()
        waiting = asyncio.create_task(b.acquire())
        await wait_until(lambda: hub.admission.queued == 1, what="b queued at the hub")
        waiting.cancel()  # its client went away
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await wait_until(lambda: hub.admission.queued == 0, what="b out of the queue")
        a.release()
        await wait_until(lambda: hub.admission.in_flight == 0, what="nothing held")
        assert b.in_flight == 0


async def test_a_worker_that_dies_gives_back_its_places(tmp_path: Path) -> None:
    async with hub_and_workers(tmp_path, limit=2) as (hub, (a, b)):
        await a.acquire()
        await a.acquire()
        waiting = asyncio.create_task(b.acquire())
        await wait_until(lambda: hub.admission.queued == 1, what="b queued at the hub")
        a.close()  # as a crashed worker's socket is closed by the kernel
        await asyncio.wait_for(waiting, 5)
        await wait_until(lambda: hub.admission.in_flight == 1, what="a's places given back")


async def test_without_the_hub_a_request_is_refused_not_hung(tmp_path: Path) -> None:
    async with hub_and_workers(tmp_path, workers=1) as (hub, (a,)):
        await a.acquire()
        waiting = asyncio.create_task(a.acquire())
        await wait_until(lambda: hub.admission.queued == 1, what="a queued request")
        await hub.close()  # the serve process ending: its end of each connection closes
    with pytest.raises(AdmissionClosed):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(AdmissionClosed):
        await a.acquire()


async def test_two_workers_refuse_past_one_shared_queue(fake: FakeUpstream, tmp_path: Path,
                                                        http: aiohttp.ClientSession) -> None:
    svc = Service(tmp_path, {"BACKEND_URL": fake.url, "AUTH_ENABLED": "false",
                             "GATEWAY_WORKERS": "2", "MAX_CONCURRENT_REQUESTS": "1",
                             "MAX_QUEUE_SIZE": "1", "QUEUE_TIMEOUT": "60", "LOG_LEVEL": "info"})
    body = {"prompt": "a", "max_tokens": 2}
    await asyncio.to_thread(svc.start)
    try:
        await asyncio.to_thread(svc.wait_ready)
        fake.switches.hang_before_headers = True
        holder = await RawRequest.send(svc.url, "/v1/completions", body)
        await fake.wait_for_requests(1, "/v1/completions")
        queued = await RawRequest.send(svc.url, "/v1/completions", body)
        await wait_until(lambda: _queue_depth(http, svc), what="a request queued")
        refused = 0
        for _ in range(40):  # a new connection each: the kernel spreads them over both workers
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as fresh, \
                    fresh.post(svc.url + "/v1/completions", json=body) as r:
                if r.status == 429:
                    assert_openai_error(await r.json(), "rate_limit_error", "queue_full")
                    refused += 1
                else:
                    pytest.fail(f"got {r.status}: {await r.text()}")
            if refused >= 8 and len(_pids_of_429(svc)) == 2:
                break
        # both workers refused, so the refusal came from one queue, not each worker's own
        assert len(_pids_of_429(svc)) == 2
        assert len(fake.requests("/v1/completions")) == 1
        fake.switches.hang_before_headers = False
        fake.release.set()
        assert (await holder.read_head()).startswith(b"HTTP/1.1 200 ")
        assert (await queued.read_head(within=10)).startswith(b"HTTP/1.1 200 ")
        await holder.drop()
        await queued.drop()
    finally:
        await asyncio.to_thread(svc.stop)


async def _queue_depth(http: aiohttp.ClientSession, svc: Service) -> bool:
    async with http.get(svc.url + "/metrics") as r:
        return "\nllamagate_queue_depth 1.0\n" in await r.text()


def _pids_of_429(svc: Service) -> set[int]:
    return {line["worker_pid"] for line in map(json.loads, _access_lines(svc))
            if line["status"] == 429}


def _access_lines(svc: Service) -> list[str]:
    return [line for line in svc.log().splitlines() if '"logger":"llamagate.access"' in line]
