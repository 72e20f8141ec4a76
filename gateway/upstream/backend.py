"""The gateway's HTTP clients to llama-server, and its view of the backend's state.

Proxied requests go through one pool of keep-alive connections
(`gateway/upstream/client.py`, built for the hot path); the health poll and the
metrics scrape use an aiohttp session. The backend key is added here and
nowhere else. Readiness comes from the serve process's state file (supervised
backend) or from polling `/health` (BACKEND_URL).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from backend.external import MissTolerance, health_state, probe_health
from core import runtime
from gateway.edge.write_batch import WriteBatch
from gateway.upstream.client import BackendPool, Response

log = logging.getLogger("llamagate.gateway.upstream")


@dataclass
class BackendStatus:
    state: str = "starting"
    ready: bool = False
    draining: bool = False
    restarts: int = 0
    retry_at: float | None = None  # wall time of the supervisor's next start attempt


class Upstream:
    def __init__(self, base_url: str, api_key: str | None, pool_size: int,
                 batch: WriteBatch | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._batch = batch  # the socket write batch, shared by a pool's upstreams
        self.auth_header = f"Bearer {api_key}" if api_key else None
        self._api_key = api_key
        self.status = BackendStatus()
        self.serve_state: dict[str, Any] | None = None  # serve's last published state
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._pool: BackendPool | None = None
        self._serve_file: Path | None = None
        self._also: Callable[[dict[str, Any]], None] = lambda s: None
        self._serve_file_seen: tuple[int, int] = (0, 0)  # inode and mtime last read

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.open() not called"
        return self._session

    @property
    def pool(self) -> BackendPool:
        assert self._pool is not None, "Upstream.open() not called"
        return self._pool

    async def open(self) -> None:
        auth = {"Authorization": self.auth_header} if self.auth_header else {}
        self._pool = BackendPool(self.base_url, self._pool_size, headers=auth, secret=self._api_key,
                                 batch=self._batch)
        # the health poll and metrics scrapes only: a few connections are plenty
        connector = aiohttp.TCPConnector(limit=4, keepalive_timeout=60, enable_cleanup_closed=True)
        # Timeouts are set per request by the caller; no automatic decompression
        # means bodies pass through byte for byte.
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=None),
                                              skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._session is not None:
            await self._session.close()

    def send(self, method: str, target: str, body: bytes, content_type: str | None,
             request_id: str) -> Coroutine[Any, Any, Response]:
        """Forward one request (``target``: path and query) through the pool; the awaitable
        gives the response once its headers are in, or raises ``backend_http.BackendError``.
        (Not a coroutine itself: the proxy awaits the pool's directly, a frame fewer.)"""
        extra = f"X-Request-ID: {request_id}\r\n"
        if content_type and "\r" not in content_type and "\n" not in content_type:
            extra += f"Content-Type: {content_type}\r\n"
        return self.pool.request(method, target, body, extra)

    def headers(self, content_type: str | None, request_id: str) -> dict[str, str]:
        headers = {"X-Request-ID": request_id}
        if content_type:
            headers["Content-Type"] = content_type
        if self.auth_header:
            headers["Authorization"] = self.auth_header
        return headers

    def refresh(self) -> BackendStatus:
        """Re-read the serve file now (only on the not-ready paths), so a request
        never sees an older state than the health port has just reported."""
        if self._serve_file is not None:
            self._read_serve_file(self._serve_file)
        return self.status

    def _read_serve_file(self, path: Path) -> None:
        # a stat first: requests for unknown models re-read on every one, and serve rewrites
        # the file (atomically: a new inode) only every half second or on a change
        try:
            st = os.stat(path)
        except OSError:
            return
        if (st.st_ino, st.st_mtime_ns) == self._serve_file_seen:
            return
        state = runtime.read_state(path)
        if state is not None:
            self._serve_file_seen = (st.st_ino, st.st_mtime_ns)
            self.apply(state)
            self._also(state)

    def apply(self, state: dict[str, Any]) -> None:
        """Take the backend's state from the serve process's published state."""
        self.serve_state = state  # read whole at scrape time (gateway/observe/process_metrics.py)
        backend = state.get("backend", {})
        self.status = BackendStatus(
            state=str(backend.get("state", "unknown")),
            ready=backend.get("state") == "ready",
            draining=state.get("phase") == "draining",
            restarts=int(backend.get("restarts", 0)),
            retry_at=backend.get("retry_at") if isinstance(backend.get("retry_at"), float) else None)

    async def follow_serve_file(self, runtime_dir: Path,
                                also: Callable[[dict[str, Any]], None] = lambda s: None) -> None:
        """Track the supervised backend's state as published by the serve process (and hand
        each new state to `also`: one reader of the file per worker)."""
        path = self._serve_file = runtime_dir / runtime.SERVE_FILE
        self._also = also

        def on_state(state: dict[str, Any]) -> None:
            self.apply(state)
            also(state)

        await runtime.follow(path, on_state)

    async def poll_health(self, interval: float = 1.0) -> None:
        """Track an external backend (BACKEND_URL) through its own /health."""
        timeout = aiohttp.ClientTimeout(total=min(interval * 2, 5.0))
        tolerance = MissTolerance()
        while True:
            code, refused = await probe_health(self.session, self.base_url, timeout)
            if not tolerance.forgives(code, refused, self.status.ready):
                state, ok = health_state(code)
                if ok != self.status.ready:
                    log.info("backend %s", state, extra={"backend_url": self.base_url})
                self.status = BackendStatus(state=state, ready=ok)
            await asyncio.sleep(interval)  # poll period
