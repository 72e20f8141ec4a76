"""BACKEND_URL's model list follows the backend: read when it becomes ready, again when it
comes back, and it is not called ready while its list cannot be read."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from llamagate.external import ExternalBackend
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
