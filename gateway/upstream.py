"""The gateway's one HTTP client to llama-server, and its view of the backend's state.

One pooled keep-alive connection set is shared by every request; the backend
key is added here and nowhere else. Readiness comes from the serve process's
state file (supervised backend) or from polling `/health` (BACKEND_URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from llamagate import runtime
from llamagate.external import health_state

log = logging.getLogger("llamagate.gateway.upstream")


@dataclass
class BackendStatus:
    state: str = "starting"
    ready: bool = False
    draining: bool = False
    restarts: int = 0


class Upstream:
    def __init__(self, base_url: str, api_key: str | None, pool_size: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth_header = f"Bearer {api_key}" if api_key else None
        self.status = BackendStatus()
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._serve_file: Path | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.open() not called"
        return self._session

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._pool_size, keepalive_timeout=60,
                                         enable_cleanup_closed=True)
        # Timeouts are set per request by the proxy; no automatic decompression
        # means bodies pass through byte for byte.
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=None),
                                              skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def headers(self, content_type: str | None, request_id: str) -> dict[str, str]:
        headers = {"X-Request-ID": request_id}
        if content_type:
            headers["Content-Type"] = content_type
        if self.auth_header:
            headers["Authorization"] = self.auth_header
        return headers

    def refresh(self) -> BackendStatus:
        """Re-read the serve file now (only on the not-ready path), so a request
        never sees an older state than the health port has just reported."""
        if self._serve_file is not None:
            self._read_serve_file(self._serve_file)
        return self.status

    def _read_serve_file(self, path: Path) -> None:
        state = runtime.read_state(path)
        if state is None:
            return
        backend = state.get("backend", {})
        self.status = BackendStatus(
            state=str(backend.get("state", "unknown")),
            ready=backend.get("state") == "ready",
            draining=state.get("phase") == "draining",
            restarts=int(backend.get("restarts", 0)))

    async def follow_serve_file(self, runtime_dir: Path, interval: float = 0.1) -> None:
        """Track the supervised backend's state as published by the serve process."""
        path = self._serve_file = runtime_dir / runtime.SERVE_FILE
        last_mtime = 0
        while True:
            with contextlib.suppress(OSError):
                mtime = path.stat().st_mtime_ns
                if mtime != last_mtime:
                    last_mtime = mtime
                    self._read_serve_file(path)
            await asyncio.sleep(interval)  # poll period of a shared file

    async def poll_health(self, interval: float = 1.0) -> None:
        """Track an external backend (BACKEND_URL) through its own /health."""
        timeout = aiohttp.ClientTimeout(total=min(interval * 2, 5.0))
        while True:
            try:
                async with self.session.get(f"{self.base_url}/health", timeout=timeout) as resp:
                    code: int | None = resp.status
            except (TimeoutError, aiohttp.ClientError):
                code = None
            state, ok = health_state(code)
            if ok != self.status.ready:
                log.info("backend %s", state, extra={"backend_url": self.base_url})
            self.status = BackendStatus(state=state, ready=ok)
            await asyncio.sleep(interval)
