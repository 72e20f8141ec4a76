"""BACKEND_URL's model list follows the backend: read when it becomes ready, again when it
comes back, and it is not called ready while its list cannot be read."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from backend.external import MISSES, ExternalBackend
from tests.support.service import free_port

Report = tuple[str, bool, tuple[str, ...] | None]


class Fake:
    """A backend whose /health status and /v1/models answer the test sets."""

    def __init__(self) -> None:
        self.health = 503
        self.models: list[str] | None = None  # None: /v1/models answers 500
        self.keys: set[str | None] = set()
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        self.runner = web.AppRunner(app)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health)

    async def _models(self, request: web.Request) -> web.Response:
        self.keys.add(request.headers.get("Authorization"))
        if self.models is None:
            return web.Response(status=500)
        return web.json_response({"data": [{"id": m} for m in self.models]})


@contextlib.asynccontextmanager
async def following(fake: Fake, refresh: float = 60.0
                    ) -> AsyncIterator[asyncio.Queue[Report]]:
    await fake.runner.setup()
    port = free_port()
    await web.TCPSite(fake.runner, "127.0.0.1", port).start()
    reports: asyncio.Queue[Report] = asyncio.Queue()
    backend = ExternalBackend(f"http://127.0.0.1:{port}", "sekret")
    task = asyncio.create_task(backend.follow(lambda *r: reports.put_nowait(r), interval=0.01,
                                              refresh=refresh))
    try:
        yield reports
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await fake.runner.cleanup()


async def next_where(reports: asyncio.Queue[Report], ready: bool) -> Report:
    while True:
        report = await asyncio.wait_for(reports.get(), 10)
        if report[1] is ready:
            return report


async def test_ready_only_once_the_list_is_read_and_read_again_after_an_outage() -> None:
    fake = Fake()
    async with following(fake) as reports:
        assert (await reports.get())[:2] == ("starting", False)
        fake.health = 200  # up, but its list cannot be read yet: still starting
        while not fake.keys:
            assert await asyncio.wait_for(reports.get(), 10) == ("starting", False, None)
        assert await asyncio.wait_for(reports.get(), 10) == ("starting", False, None)
        fake.models = ["a"]
        assert await next_where(reports, True) == ("ready", True, ("a",))
        fake.health, fake.models = 503, ["b"]
        assert (await next_where(reports, False))[:2] == ("starting", False)
        fake.health = 200
        assert await next_where(reports, True) == ("ready", True, ("b",))
    assert fake.keys == {"Bearer sekret"}


async def test_the_list_is_read_again_while_ready() -> None:
    fake = Fake()
    fake.health, fake.models = 200, ["a"]
    async with following(fake, refresh=0.05) as reports:
        assert await next_where(reports, True) == ("ready", True, ("a",))
        fake.models = ["b"]  # a restart quicker than the /health poll
        async with asyncio.timeout(10):
            while (report := await next_where(reports, True))[2] != ("b",):
                assert report == ("ready", True, ("a",))
        fake.models = None  # a failed re-read keeps the list it had
        for _ in range(20):
            assert await next_where(reports, True) == ("ready", True, ("b",))


async def test_an_unanswered_health_poll_is_not_yet_an_outage() -> None:
    """Under load llama-server may drop or be slow to answer a /health poll; one such poll
    must not make every request a 503. One that keeps failing, or says so, still does."""
    answered, drops, state = 0, 0, {"health": b"200 OK"}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered, drops
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /health") and answered >= 3 and drops < 2 * MISSES:
            drops += 1  # no answer (aiohttp tries a dropped request twice: one poll, two drops)
            writer.close()
            return
        if head.startswith(b"GET /health"):
            answered += 1
            answer = b"HTTP/1.1 " + state["health"] + b"\r\nContent-Length: 0\r\n\r\n"
        else:
            body = b'{"data": [{"id": "a"}]}'
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reports: asyncio.Queue[Report] = asyncio.Queue()
    backend = ExternalBackend(f"http://127.0.0.1:{port}", None)
    task = asyncio.create_task(backend.follow(lambda *r: reports.put_nowait(r), interval=0.01))
    try:
        assert await next_where(reports, True) == ("ready", True, ("a",))
        while drops < 2 * MISSES or answered < 6:  # the misses, then answers again
            report = await asyncio.wait_for(reports.get(), 10)
            assert report == ("ready", True, ("a",)), report
        state["health"] = b"503 Service Unavailable"  # an answer that says so counts at once
        assert (await next_where(reports, False))[:2] == ("starting", False)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.close()
        await server.wait_closed()
