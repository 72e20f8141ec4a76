"""Graceful shutdown of a worker: stop admitting, let requests finish, then end
what is left with a final error event.

Under one deadline (SHUTDOWN_GRACE_SECONDS; serve's SIGUSR1, sent on its second
signal, cuts it short): new requests, and those still queued for a backend slot, get 503 +
Retry-After from the moment draining starts;
requests in flight may complete; streams still open at the deadline receive a
final SSE error event and are closed.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.state import AppState

log = logging.getLogger("llamagate.gateway.drain")


async def drain(state: AppState) -> None:
    state.draining = True
    state.admission.refuse_waiting()  # queued, not started: better retried elsewhere now
    if state.pool is not None:
        state.pool.refuse_waiting()
    grace = state.config.shutdown_grace_seconds
    log.info("draining", extra={"in_flight": len(state.active), "grace_s": grace})
    if state.active:
        idle = asyncio.ensure_future(state.idle.wait())
        now = asyncio.ensure_future(state.drain_now.wait())
        await asyncio.wait({idle, now}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        for fut in (idle, now):
            fut.cancel()
    leftover = list(state.active.items())
    for ex, task in leftover:
        ex.shutdown = True
        task.cancel()
    if leftover:
        log.warning("ending requests still running at the drain deadline",
                    extra={"count": len(leftover)})
        await asyncio.wait([t for _, t in leftover], timeout=5.0)
