"""The probes on a port shared by both tiers (PORT == PORT_HEALTH, RunPod's default).

With one listener there is no health port: serve starts the health process on a Unix
socket in the runtime directory instead, and the gateway answers /ping, /health,
/health/live and /health/ready by asking it, so the answers follow the health tier's
rules exactly (serve's heartbeat, every gateway worker's, the data files, the backend's
state: 204 while initializing, 200 ready, 503 unhealthy or draining). Two cases are
answered here instead: this worker's own drain (503 at once, as the gateway's probes
always did), and a health process that does not answer (crashed and being restarted by
serve): then the gateway's own verdict (gateway/observe/probes.py), which follows the
same backend rules without the heartbeats.

Before the gateway worker listens (the first second or so of `llamagate serve`) the port
refuses connections, which RunPod's balancer reads as not ready, as it reads a 204.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Final

import aiohttp
from aiohttp import web

from gateway.edge.call import Call
from gateway.observe import probes
from gateway.state import AppState

PROBES: Final = ("/ping", "/health", "/health/live", "/health/ready")
TIMEOUT: Final = 2.0  # seconds: the health process only reads small state files


class HealthLink:
    """An HTTP client of the health process's Unix socket, owned by the app's cleanup."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._session: aiohttp.ClientSession | None = None

    @contextlib.asynccontextmanager
    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.socket_path)),
            timeout=aiohttp.ClientTimeout(total=TIMEOUT))
        try:
            yield
        finally:
            await self._session.close()

    async def ask(self, path: str) -> tuple[int, bytes, str | None] | None:
        """The health process's answer to GET ``path``; None when it gives none."""
        if self._session is None:
            return None
        try:
            async with self._session.get(f"http://health{path}") as resp:
                body = await resp.read()
                return resp.status, body, resp.headers.get("Content-Type")
        except (OSError, TimeoutError, aiohttp.ClientError):
            return None


def handler(link: HealthLink) -> Callable[[Call], Awaitable[None]]:
    async def answer(call: Call) -> None:
        state: AppState = call.state
        if not state.draining and not state.upstream.status.draining:
            got = await link.ask(call.path)
            if got is not None:
                status, body, content_type = got
                call.respond(status, body, content_type=content_type if body else None)
                return
        if call.path == "/health":
            await probes.health(call)
        elif call.path == "/health/live":
            call.respond(200, b'{"status": "alive"}')
        else:  # /ping; /health/ready answers as /ping does, with no body
            await probes.ping(call)
    return answer
