"""A proxied request's hold on the backend: its wait for a slot (gateway/policy/admission.py
decides who goes next; this is the proxy's side, with its metrics and errors), its place
among the active requests a drain can end, and its end-to-end timeout.

The timeout is enforced by one sweep over the active requests (``expire``), not a timer
per request: a per-request timer costs every request ~10 µs (uvloop timer handles).
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from typing import Any, Final

from gateway.errors import BackendUnavailable, BadRequest, RateLimited, UpstreamTimeout
from gateway.exchange import Exchange
from gateway.policy.admission import AdmissionClosed, QueueFull, QueueTimeout
from gateway.state import AppState

# how often the sweeper looks for requests past their timeout; bounds how late one fires
SWEEP_INTERVAL = 0.05
MAX_RETRY_AFTER: Final = 60  # seconds: a longer wait is better learnt by trying again
_SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?").fullmatch  # X-Request-Timeout


def request_timeout(raw: str | None, default: float) -> float:
    """The X-Request-Timeout header's seconds (1-600), or the default."""
    if raw is None:
        return default
    # a plain decimal: float() would also take "1_0", "inf" and " 5 "
    value = float(raw) if _SECONDS(raw) else -1.0
    if not 1 <= value <= 600:
        raise BadRequest("X-Request-Timeout must be a number of seconds from 1 to 600",
                         code="invalid_timeout")
    return value


async def wait_for_slot(state: AppState, ex: Exchange, counted: bool,
                        body: dict[str, Any] | None = None, exclude: int = -1) -> None:
    """Wait for a backend slot (with a pool, on an upstream serving the request's model but
    not ``exclude``; ``body`` names its conversation); the caller takes the request out of
    state.active when none is given."""
    metrics = state.metrics
    pool = state.pool
    queued_at = time.monotonic()
    if counted:
        metrics.queue_depth.inc()
    # a refusal for a full queue never waited; every other outcome did, and the waits that
    # ended in a timeout or a departed client are the ones most worth observing
    waited = True
    try:
        if pool is None:
            await state.admission.acquire()
        else:
            key = pool.take(ex, body, exclude)
            if key is not None:  # none free: the pool's queue
                await pool.wait(ex, key, exclude)
    except QueueFull as full:
        waited = False
        metrics.rejections.labels("queue_full").inc()
        raise RateLimited("too many requests are queued; retry shortly", code="queue_full",
                          retry_after=retry_after(full.drain)) from None
    except QueueTimeout:
        metrics.rejections.labels("queue_timeout").inc()
        raise BackendUnavailable("timed out waiting for a free backend slot", code="queue_timeout",
                                 retry_after=2) from None
    except AdmissionClosed:
        raise BackendUnavailable("the server is shutting down", code="shutting_down",
                                 retry_after=5) from None
    except asyncio.CancelledError:
        if not (ex.timed_out or ex.shutdown):
            raise  # the client went away while queued
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
        if ex.shutdown:
            raise BackendUnavailable("the server is shutting down", code="shutting_down",
                                     retry_after=5) from None
        metrics.rejections.labels("queue_timeout").inc()
        raise UpstreamTimeout("the request's timeout ran out while it waited for a backend "
                              "slot") from None
    finally:
        if counted:
            metrics.queue_depth.dec()
        if waited:
            ex.queue_wait = time.monotonic() - queued_at
    if counted:
        metrics.in_flight.inc()


def retry_after(drain: float) -> int:
    """Retry-After for a full queue: its drain time plus a jitter as long again (at least a
    second), in whole seconds, at most MAX_RETRY_AFTER. Clients refused together come back
    spread over that span rather than all at once into a queue that is still full."""
    spread = random.uniform(0.0, max(1.0, drain))
    return max(1, min(MAX_RETRY_AFTER, math.ceil(drain + spread)))


def leave(state: AppState, ex: Exchange) -> None:
    if state.active.pop(ex, None) is not None and not state.active:
        state.idle.set()


async def expire(state: AppState) -> None:
    """Cancel requests past their timeout (the handler turns that into a 504 or a final event)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(SWEEP_INTERVAL)  # the sweep period, see SWEEP_INTERVAL
        now = loop.time()
        for ex, task in list(state.active.items()):
            if now >= ex.deadline and not ex.timed_out and not ex.shutdown:
                ex.timed_out = True
                task.cancel()
