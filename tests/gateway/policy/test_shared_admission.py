"""GATEWAY_WORKERS > 1: one admission queue for every worker, held by the serve process
(gateway/policy/admission_hub.py) and asked over a Unix socket (gateway/policy/shared_admission.py).

First the hub and its clients in this process, on a real socket; then the real service
with two workers in front of the fake upstream, where per-worker queues would admit
requests that the single one refuses."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.policy.admission import Admission, AdmissionClosed, QueueFull, QueueTimeout
from gateway.policy.admission_hub import ACQUIRE, CANCEL, GRANTED, MESSAGE, RELEASE, AdmissionHub, messages
from gateway.policy.shared_admission import SharedAdmission
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import assert_openai_error
from tests.support.rawhttp import Client, json_request
from tests.support.service import Service
from tests.support.wait import wait_until


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
        await wait_until(lambda: hub.admission.queued == 1, "b queued at the hub")
        assert not waiting.done() and b.queued == 1
        a.release()
        await asyncio.wait_for(waiting, 5)  # handed over, first in first out
        assert (a.in_flight, b.in_flight, hub.admission.in_flight) == (0, 1, 1)
        b.release()
        await wait_until(lambda: hub.admission.in_flight == 0, "the place given back")


async def test_the_queue_bound_and_timeout_are_for_all_workers(tmp_path: Path) -> None:
    async with hub_and_workers(tmp_path, max_queue=1, queue_timeout=0.2) as (hub, (a, b)):
        await a.acquire()
        queued = asyncio.create_task(a.acquire())
        await wait_until(lambda: hub.admission.queued == 1, "a queued request")
        with pytest.raises(QueueFull):  # the other worker's own queue is empty
            await b.acquire()
        with pytest.raises(QueueTimeout):
            await queued
        assert hub.admission.queued == 0 and a.queued == 0


async def test_a_cancelled_waiter_leaves_the_hubs_queue(tmp_path: Path) -> None:
    async with hub_and_workers(tmp_path) as (hub, (a, b)):
        await a.acquire()
        waiting = asyncio.create_task(b.acquire())
        await wait_until(lambda: hub.admission.queued == 1, "b queued at the hub")
        waiting.cancel()  # its client went away
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await wait_until(lambda: hub.admission.queued == 0, "b out of the queue")
        a.release()
        await wait_until(lambda: hub.admission.in_flight == 0, "nothing held")
        assert b.in_flight == 0


async def test_a_draining_worker_refuses_its_queued_requests(tmp_path: Path) -> None:
    async with hub_and_workers(tmp_path) as (hub, (a, b)):
        await a.acquire()
        waiting = asyncio.create_task(b.acquire())
        await wait_until(lambda: hub.admission.queued == 1, "b queued at the hub")
        b.refuse_waiting()
        with pytest.raises(AdmissionClosed):
            await waiting
        await wait_until(lambda: hub.admission.queued == 0, "b out of the hub's queue")
        a.release()
        await wait_until(lambda: hub.admission.in_flight == 0, "nothing held")


async def test_a_worker_that_dies_gives_back_its_places(tmp_path: Path) -> None:
    async with hub_and_workers(tmp_path, limit=2) as (hub, (a, b)):
        await a.acquire()
        await a.acquire()
        waiting = asyncio.create_task(b.acquire())
        await wait_until(lambda: hub.admission.queued == 1, "b queued at the hub")
        a.close()  # as a crashed worker's socket is closed by the kernel
        await asyncio.wait_for(waiting, 5)
        await wait_until(lambda: hub.admission.in_flight == 1, "a's places given back")


async def test_without_the_hub_a_request_is_refused_not_hung(tmp_path: Path) -> None:
    async with hub_and_workers(tmp_path, workers=1) as (hub, (a,)):
        await a.acquire()
        waiting = asyncio.create_task(a.acquire())
        await wait_until(lambda: hub.admission.queued == 1, "a queued request")
        await hub.close()  # the serve process ending: its end of each connection closes
    with pytest.raises(AdmissionClosed):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(AdmissionClosed):
        await a.acquire()


@pytest.mark.llama_server
async def test_two_workers_refuse_past_one_shared_queue(fake: FakeLlama, tmp_path: Path,
                                                        http: aiohttp.ClientSession) -> None:
    svc = Service(tmp_path, {"BACKEND_URL": fake.url, "AUTH_ENABLED": "false",
                             "GATEWAY_WORKERS": "2", "MAX_CONCURRENT_REQUESTS": "1",
                             "MAX_QUEUE_SIZE": "1", "QUEUE_TIMEOUT": "60", "LOG_LEVEL": "info"})
    body = {"prompt": "a", "max_tokens": 2}
    await asyncio.to_thread(svc.start)
    try:
        await asyncio.to_thread(svc.wait_ready)
        fake.switches.hang_before_headers = True
        holder = await Client.sending(svc.url, json_request("/v1/completions", body))
        await fake.wait_for_requests(1, "/v1/completions")
        queued = await Client.sending(svc.url, json_request("/v1/completions", body))
        await wait_until(lambda: _queue_depth(http, svc), "a request queued")
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


# -- messages that cross: a cancel and a grant in flight at the same time ----------------

async def test_a_cancel_read_with_its_acquire_leaves_nothing_behind(tmp_path: Path) -> None:
    async with hub_and_workers(tmp_path, workers=1) as (hub, (holder,)):
        await holder.acquire()
        reader, writer = await asyncio.open_unix_connection(str(hub.path))
        writer.write(MESSAGE.pack(ACQUIRE, 7) + MESSAGE.pack(CANCEL, 7))  # one read at the hub
        await writer.drain()
        writer.write(MESSAGE.pack(ACQUIRE, 8))  # read after them, on the same connection
        await writer.drain()
        await wait_until(lambda: hub.admission.queued == 1, "8 queued")
        raw = _hub_worker(hub, lambda w: w.waiting)
        assert list(raw.waiting) == [8]  # 7 neither queued nor remembered
        holder.release()
        assert MESSAGE.unpack(await asyncio.wait_for(reader.readexactly(MESSAGE.size), 5)) \
            == (GRANTED, 8)  # the place went to 8, not to the cancelled 7
        writer.close()
        await wait_until(lambda: hub.admission.in_flight == 0, "8's place given back")


async def test_a_grant_overtaken_by_a_cancel_is_passed_on_once(tmp_path: Path) -> None:
    async with hub_and_workers(tmp_path) as (hub, (a, b)):
        await a.acquire()
        waiting = asyncio.create_task(b.acquire())
        await wait_until(lambda: hub.admission.queued == 1, "b queued at the hub")
        hub_a, hub_b = _hub_worker(hub, lambda w: w.held), _hub_worker(hub, lambda w: w.waiting)
        number = next(iter(hub_b.waiting))
        # a's release hands b the place; b's cancel is read before the grant is answered
        hub_a.data_received(MESSAGE.pack(RELEASE, 0))
        hub_b.data_received(MESSAGE.pack(CANCEL, number))
        assert hub.admission.in_flight == 0 and hub_b.held == 0
        ran = asyncio.Event()  # queued after the grant's callback, so that runs first
        asyncio.get_running_loop().call_soon(ran.set)
        await ran.wait()  # the grant's callback has run, and must not have answered
        assert hub_b.held == 0 and not hub_b.waiting
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert hub.admission.in_flight == 0 and b.in_flight == 0


@pytest.mark.parametrize("grant_first", [False, True])
async def test_a_worker_cancelled_as_its_grant_arrives_gives_it_back(
        tmp_path: Path, grant_first: bool) -> None:
    heard: list[tuple[bytes, int]] = []
    got = asyncio.Event()

    class Hub(asyncio.Protocol):  # records, never answers: the test plays its answers
        def data_received(self, data: bytes) -> None:
            heard.extend(MESSAGE.iter_unpack(data))
            got.set()

    server = await asyncio.get_running_loop().create_unix_server(Hub, str(tmp_path / "hub.sock"))
    worker = SharedAdmission(tmp_path / "hub.sock")
    await worker.connect()
    try:
        task = asyncio.create_task(worker.acquire())
        await wait_until(lambda: heard, "the acquire at the hub")
        (op, number), = heard
        assert op == ACQUIRE
        if grant_first:  # the grant is read, then the client leaves before the task resumes
            worker.data_received(MESSAGE.pack(GRANTED, number))
            task.cancel()
        else:  # the client leaves, then the grant that crossed the cancel is read
            task.cancel()
            worker.data_received(MESSAGE.pack(GRANTED, number))
        with pytest.raises(asyncio.CancelledError):
            await task
        expected = [(RELEASE, 0)] if grant_first else [(RELEASE, 0), (CANCEL, number)]
        await wait_until(lambda: heard[1:] == expected, f"{expected} at the hub")
        assert worker.in_flight == 0 and worker.queued == 0
    finally:
        worker.close()
        server.close()


def _hub_worker(hub: AdmissionHub, which: Callable[[Any], Any]) -> Any:
    """The hub's end of the worker connection that ``which`` picks out by its state."""
    return next(w for w in hub._workers if which(w))



def test_messages_split_over_reads_are_put_back_together() -> None:
    data = MESSAGE.pack(ACQUIRE, 1) + MESSAGE.pack(CANCEL, 1) + MESSAGE.pack(RELEASE, 0)
    received, rest = messages(b"", data[:13])  # one whole message and 4 bytes of the next
    assert received == [(ACQUIRE, 1)] and rest == data[9:13]
    received, rest = messages(rest, data[13:])
    assert received == [(CANCEL, 1), (RELEASE, 0)] and rest == b""
