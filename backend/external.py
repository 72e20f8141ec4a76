"""An already running llama-server (BACKEND_URL) that we watch but do not own.

Its model list is read each time it becomes ready (at boot it may not be up yet; it
may come back from a restart serving another model) and every `MODELS_REFRESH`
seconds while it stays ready, for a restart quicker than the /health poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

log = logging.getLogger("llamagate.serve")

MODELS_REFRESH = 30.0
# polls in a row that may go unanswered (timed out, connection dropped) before a ready
# backend counts as unreachable: under load, one slow /health made every request a 503
MISSES = 2

# (state, ready, models): models is the last list read, None until one has been
Report = Callable[[str, bool, tuple[str, ...] | None], None]


def health_state(status: int | None) -> tuple[str, bool]:
    """(state, ready) from an HTTP status of a backend's /health; None: no answer.
    503 is llama-server loading; a server without /health (404) is up."""
    if status is None:
        return "unreachable", False
    if status in (200, 404):
        return "ready", True
    return ("starting" if status == 503 else "error"), False


async def probe_health(session: aiohttp.ClientSession, url: str, within: aiohttp.ClientTimeout,
                       headers: dict[str, str] | None = None) -> tuple[int | None, bool]:
    """The status of `url`/health, or None and whether nothing listens at all (refused)."""
    try:
        async with session.get(f"{url}/health", headers=headers, timeout=within) as resp:
            return resp.status, False
    except aiohttp.ClientConnectorError:
        return None, True
    except (TimeoutError, aiohttp.ClientError):
        return None, False


class MissTolerance:
    """Whether an unanswered poll is forgiven: up to MISSES in a row while ready. A busy
    server's slow or dropped answer is not yet a reason to refuse every request; a backend
    that is really gone refuses connections, and counts at once."""

    def __init__(self) -> None:
        self.misses = 0

    def forgives(self, code: int | None, refused: bool, ready: bool) -> bool:
        if code is None and not refused and ready and self.misses < MISSES:
            self.misses += 1
            return True
        self.misses = 0
        return False


class ExternalBackend:
    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def warn_if_keyless(self) -> None:
        """Once, at start: a llama-server without its own key is open to anyone who reaches
        its port, past the gateway's keys, limits and metering (and the gateway must be all
        that reaches it: a request it lets through is all that should)."""
        if not self.headers:
            log.warning("BACKEND_URL is set without BACKEND_API_KEY: the external llama-server "
                        "should have its own key (--api-key-file), given here as "
                        "BACKEND_API_KEY", extra={"backend_url": self.url})

    async def model_names(self) -> tuple[str, ...] | None:
        """Names the backend serves; None when it cannot be asked (not up yet)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            return await self._list(session)

    async def _list(self, session: aiohttp.ClientSession) -> tuple[str, ...] | None:
        try:
            async with session.get(f"{self.url}/v1/models", headers=self.headers) as resp:
                if resp.status != 200:
                    return None
                data = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            return None
        return tuple(str(m["id"]) for m in items if isinstance(m, dict) and "id" in m)

    async def follow(self, report: Report, interval: float = 1.0,
                     refresh: float = MODELS_REFRESH) -> None:
        """Report every `interval`. Ready means /health says so and the model list has been
        read since it did: the gateway must not route by a list from before a restart."""
        timeout = aiohttp.ClientTimeout(total=max(2.0, interval))
        models: tuple[str, ...] | None = None
        listed: float | None = None  # when the list was read in the current ready period
        last, warned = "", False
        tolerance = MissTolerance()
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                code, refused = await probe_health(session, self.url, timeout, self.headers)
                if tolerance.forgives(code, refused, last == "ready"):
                    report("ready", True, models)
                    await asyncio.sleep(interval)  # poll period
                    continue
                state, ready = health_state(code)
                if not ready:
                    listed, warned = None, False
                elif listed is None or time.monotonic() - listed >= refresh:
                    fresh = await self._list(session)
                    if fresh is not None:
                        models, listed = fresh, time.monotonic()
                    elif listed is None:  # answers /health, not /v1/models (yet)
                        state, ready = "starting", False
                        if not warned:
                            warned = True
                            log.warning("backend answers /health but not /v1/models: not ready "
                                        "until it lists its models (BACKEND_API_KEY?)",
                                        extra={"backend_url": self.url})
                if state != last:
                    log.info("backend %s", state, extra={"backend_url": self.url})
                    last = state
                report(state, ready, models)
                await asyncio.sleep(interval)  # poll period
