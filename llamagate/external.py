"""An already running llama-server (BACKEND_URL) that we watch but do not own."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp


def health_state(status: int | None) -> tuple[str, bool]:
    """(state, ready) from an HTTP status of a backend's /health; None: no answer.
    503 is llama-server loading; a server without /health (404) is up."""
    if status is None:
        return "unreachable", False
    if status in (200, 404):
        return "ready", True
    return ("starting" if status == 503 else "error"), False


class ExternalBackend:
    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def model_names(self) -> tuple[str, ...]:
        """Names the backend serves; empty (accept any) when it cannot be asked yet."""
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s, \
                    s.get(f"{self.url}/v1/models", headers=self.headers) as resp:
                if resp.status != 200:
                    return ()
                data = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return ()
        items = data.get("data", []) if isinstance(data, dict) else []
        return tuple(str(m["id"]) for m in items if isinstance(m, dict) and "id" in m)

    async def follow(self, report: Callable[[str, bool], None], interval: float = 1.0) -> None:
        timeout = aiohttp.ClientTimeout(total=max(2.0, interval))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    async with session.get(f"{self.url}/health", headers=self.headers) as resp:
                        code: int | None = resp.status
                except (TimeoutError, aiohttp.ClientError):
                    code = None
                report(*health_state(code))
                await asyncio.sleep(interval)  # poll period
