"""Connects the `keys` package to a gateway app: the live keyring and its reloads, the
rate limiter, usage recording, the audit log and the admin routes. With REDIS_URL all of
these are the fleet's, in Redis (gateway/fleet_wiring.py).

Each resource is owned by a cleanup context. The keyring is loaded before the first
request is served, then reloaded on a change of the keys file (polled every
KEYS_RELOAD_INTERVAL seconds; 0 turns polling off), on SIGHUP and on
`POST /admin/keys/reload`. With AUTH_ENABLED=false nothing here is set up and no /admin
route exists, so a gateway without auth exposes no key management.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from gateway.admin import control_client
from gateway.admin import routes as admin
from gateway.observe.metrics import GatewayMetrics
from gateway.policy.buckets import RateLimiter
from gateway.policy.shared_limits import SharedTable, limiters
from gateway.policy.shared_throttle import SharedAddressThrottle
from gateway.policy.throttle import AddressThrottle
from gateway.state import AppState
from keys import usage_spool
from keys.model import Limits
from keys.reloader import KeyReloader
from keys.usage_recorder import UsageRecorder

log = logging.getLogger("llamagate.keys")
CleanupCtx = Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]


def install(app: web.Application, state: AppState, control_socket: Path | None = None,
            shared: SharedTable | None = None, failures_file: Path | None = None) -> None:
    """Set up API keys on ``app`` when auth is on, with the admin routes (none without auth:
    nothing could tell an admin from anyone else). ``shared``: several workers' common
    rate-limit table; ``failures_file``: their common failed-authentication counts."""
    config = state.config
    if not config.auth_enabled:
        return
    # 0 in the settings means unlimited, which a key's Limits spells None
    defaults = Limits(config.max_requests_per_minute or None, config.max_tokens_per_minute or None,
                      config.max_concurrent_per_key or None)
    if config.redis_url is not None:  # a fleet: all of it in Redis (redis-py loaded only then)
        from gateway import fleet_wiring
        fleet_wiring.install(app, state, defaults, control_socket)
        return
    state.keys = KeyReloader(config.auth_keys_file)
    state.usage = UsageRecorder(config.usage_db, flush_interval=config.usage_flush_interval,
                                spool_dir=usage_spool.spool_dir(config.usage_db))
    _count_usage(state.usage, state.metrics)
    if shared is None:
        state.limiter = RateLimiter(defaults)
    else:
        state.limiter = RateLimiter(defaults, make=limiters(shared))
        app.on_cleanup.append(lambda app: _close(shared))
    if failures_file is None:
        state.auth_failures = AddressThrottle(config.auth_failures_per_minute)
    else:
        throttle = SharedAddressThrottle(failures_file, config.auth_failures_per_minute)
        state.auth_failures = throttle
        app.on_cleanup.append(lambda app: _close(throttle))
    auditor = admin.Auditor(config.usage_db)
    admin.install(state.router, state.keys, state.usage, auditor)
    if control_socket is not None:
        app.cleanup_ctx.append(control_client.install(state.router, control_socket, auditor))
    app.cleanup_ctx.append(_keys_ctx(state.keys, config.keys_reload_interval))
    app.cleanup_ctx.append(_usage_ctx(state.usage, auditor))


async def _close(shared: SharedTable | SharedAddressThrottle) -> None:
    shared.close()


def _keys_ctx(reloader: KeyReloader, interval: float) -> CleanupCtx:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        reloader.reload()  # fail closed: a missing file means no key works, and it says so
        loop = asyncio.get_running_loop()
        before = signal.getsignal(signal.SIGHUP)  # a worker's: ignored (gateway/worker.py)
        hup = _add_sighup(loop, reloader)
        task = asyncio.create_task(reloader.watch(interval), name="keys-watch") if interval > 0 else None
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)  # which leaves SIGHUP's default: death
                if before is not None:
                    signal.signal(signal.SIGHUP, before)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    return ctx


def _add_sighup(loop: asyncio.AbstractEventLoop, reloader: KeyReloader) -> bool:
    def on_hup() -> None:
        log.info("SIGHUP: reloading API keys")
        reloader.reload()

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    except (NotImplementedError, AttributeError):  # no SIGHUP (Windows): reload by the other two means
        return False
    return True


def _count_usage(recorder: UsageRecorder, metrics: GatewayMetrics) -> None:
    """The recorder's state as metrics, moved at each flush (every USAGE_FLUSH_INTERVAL)."""
    pending, failures = metrics.usage_pending, metrics.usage_write_failures

    def observe(events: int, failed: bool) -> None:
        pending.set(events)
        if failed:
            failures.inc()
    recorder.observer = observe


def _usage_ctx(recorder: UsageRecorder, auditor: admin.Auditor) -> CleanupCtx:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        # Neither fails on a database that cannot be opened (read-only, full disk): the
        # gateway serves, usage waits (and is spooled), /health says so (issue 22).
        await recorder.open()
        try:
            await auditor.open()
            recorder.start()
            yield
        finally:
            # close() flushes what is buffered, so a clean shutdown loses no usage
            await recorder.close()
            await auditor.close()
    return ctx
