"""What the pool retries: only a request that provably never reached the backend. And
pooled connections are not kept idle as long as llama-server keeps them (cpp-httplib
closes them after 5 s), so a request rarely meets one the backend is closing."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator

import aiohttp
import pytest
import uvloop

from gateway.upstream.backend import Upstream
from gateway.upstream.client import LOOK_AFTER, BackendBroken, BackendPool
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, assert_openai_error

COMPLETIONS = "/v1/completions"
JSON = "Content-Type: application/json\r\n"
BODY = json.dumps({"prompt": "a", "max_tokens": 2}).encode()
# cpp-httplib's CPPHTTPLIB_KEEPALIVE_TIMEOUT_SECOND, llama-server's idle keep-alive limit
BACKEND_KEEPALIVE = 5.0
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
Scenario = Callable[[FakeLlama, BackendPool], Awaitable[None]]


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Scenario], None]]:
    """`run(scenario)`: on a fresh loop of the parameter's kind, with a fake backend and a
    pool of two connections to it."""
    def run(scenario: Scenario) -> None:
        async def main() -> None:
            fake = FakeLlama()
            await fake.start()
            pool = BackendPool(fake.url, 2)
            try:
                await scenario(fake, pool)
            finally:
                pool.close()
                await fake.close()
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            runner.run(main())
    yield run


async def completion(pool: BackendPool) -> int:
    resp = await pool.request("POST", COMPLETIONS, BODY, JSON)
    await resp.read()
    return resp.status


def test_a_request_sent_on_a_reused_connection_is_not_retried(
        run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama, pool: BackendPool) -> None:
        assert await completion(pool) == 200
        fake.switches.drop_requests = 1  # it reads the request, then closes unanswered
        with pytest.raises(BackendBroken):
            await completion(pool)
        first, dropped = fake.requests(COMPLETIONS)  # the backend had it: not sent again
        assert dropped.dropped and dropped.peer == first.peer
        assert await completion(pool) == 200  # and the pool goes on, on a new connection
        assert fake.requests(COMPLETIONS)[-1].peer != first.peer
    run(scenario)


def test_a_request_whose_write_fails_at_once_is_sent_on_a_new_connection(
        run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama, pool: BackendPool) -> None:
        assert await completion(pool) == 200
        [idle] = pool._idle
        assert idle.transport is not None
        # the send direction is shut (through a duplicate of its descriptor: uvloop's
        # transport sockets refuse shutdown): the request's write fails before one byte leaves
        fd = idle.transport.get_extra_info("socket").fileno()
        with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as dup:
            dup.shutdown(socket.SHUT_WR)
        assert await completion(pool) == 200
        first, second = fake.requests(COMPLETIONS)
        assert second.peer != first.peer and not second.dropped
    run(scenario)


def test_a_connection_idle_past_the_pool_s_idle_time_is_not_reused(
        run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama, pool: BackendPool) -> None:
        short = BackendPool(fake.url, 2, idle_timeout=0.0)
        try:
            assert await completion(short) == 200
            assert await completion(short) == 200
        finally:
            short.close()
        first, second = fake.requests(COMPLETIONS)
        assert second.peer != first.peer
    run(scenario)


async def test_the_proxy_pool_idles_connections_less_than_llama_server_keeps_them(
        fake: FakeLlama) -> None:
    upstream = Upstream(fake.url, None, 4)
    await upstream.open()
    try:
        assert 0 < upstream.pool.idle_timeout < BACKEND_KEEPALIVE
    finally:
        await upstream.close()


async def test_the_gateway_answers_503_when_a_sent_request_goes_unanswered(
        gateway: Gateway, fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    for drop in (0, 1):
        fake.switches.drop_requests = drop
        async with http.post(gateway.url + COMPLETIONS, data=BODY,
                             headers={"Content-Type": "application/json"}) as r:
            if drop:
                assert r.status == 503
                assert_openai_error(await r.json(), "service_unavailable", "backend_unavailable")
            else:
                assert r.status == 200
    assert [s.dropped for s in fake.requests(COMPLETIONS)] == [False, True]


class ClosingBackend:
    """A raw backend in a thread: answers each request with keep-alive, and closes the
    connection it answered on when told, saying when it has. Its own thread, so the
    test's loop does not see the close until it runs again."""

    ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
              b"\r\n{}")

    def __init__(self, answer: bytes = ANSWER) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.close_now = threading.Event()
        self.closed = threading.Event()
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # the listener was closed: the test is over
            self.accepted += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)  # one small request per read, as the test sends them
            conn.sendall(self.answer)
            if self.accepted == 1:
                self.close_now.wait(10)
                conn.shutdown(socket.SHUT_RDWR)
                self.closed.set()
                return
            while conn.recv(65536):
                conn.sendall(self.ANSWER)

    def stop(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_an_idle_connection_the_backend_closed_unseen_is_not_reused(loop: str) -> None:
    """The backend's FIN has arrived but the loop has not run since: the pool must look at
    the socket, not only at what the loop has told it, or it sends into a closed
    connection and the request fails (the benchmark's 503s under llama-server)."""
    backend = ClosingBackend()

    async def main() -> None:
        pool = BackendPool(f"http://127.0.0.1:{backend.port}", 2)
        try:
            resp = await pool.request("GET", "/v1/models", b"", "")
            assert (resp.status, await resp.read()) == (200, b"{}")
            backend.close_now.set()
            assert backend.closed.wait(5)  # blocks the loop: it cannot see the close
            for conn in pool._idle:  # idle long enough to be looked at before its reuse
                conn.idle_since -= LOOK_AFTER
            resp = await pool.request("GET", "/v1/models", b"", "")
            assert (resp.status, await resp.read()) == (200, b"{}")
            assert backend.accepted == 2  # a new connection, not the closed one
        finally:
            pool.close()

    try:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(main())
    finally:
        backend.stop()


# llama-server's streamed answer: chunked, keep-alive announced, and the connection closed
# right after it
STREAMED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            b"Keep-Alive: timeout=5, max=100\r\n\r\n"
            b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_streamed_answer_s_connection_is_not_reused(loop: str) -> None:
    """The next request goes on a new connection at once, not on the one llama-server is
    closing (its close can still be on the way when the next request is sent)."""
    backend = ClosingBackend(STREAMED)

    async def main() -> None:
        pool = BackendPool(f"http://127.0.0.1:{backend.port}", 2)
        try:
            resp = await pool.request("POST", COMPLETIONS, BODY, JSON)
            assert resp.status == 200
            while await resp.read_chunk():
                pass
            # no wait in between; on the streamed answer's connection it would go unanswered
            resp = await asyncio.wait_for(pool.request("GET", "/v1/models", b"", ""), 5)
            assert resp.status == 200
            assert backend.accepted == 2
        finally:
            backend.close_now.set()
            pool.close()

    try:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(main())
    finally:
        backend.stop()
