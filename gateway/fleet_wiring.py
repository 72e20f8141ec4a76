"""Connects a gateway worker to its fleet's Redis (REDIS_URL): the key set, the limits,
the auth-failure throttle, usage and the audit log, each in Redis instead of this
machine's files (gateway/keys_wiring.py calls ``install`` in their stead).

One ``FleetLink`` per worker carries all of it. The cleanup context starts them in the
order a request needs them (the link, the key set, usage, the lease renewals) and stops
them the other way round, so a clean shutdown writes the usage it holds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web
from keys.audit_redis import RedisAuditor
from keys.usage_redis import RedisUsage
from keys.watch_redis import RedisKeyWatcher

from fleet.link import FleetLink
from gateway.admin import control_client
from gateway.admin import routes as admin
from gateway.observe.metrics import GatewayMetrics
from gateway.policy.fleet_limits import FleetLimiter
from gateway.policy.fleet_throttle import FleetAddressThrottle
from gateway.state import AppState
from keys import usage_spool
from keys.model import Limits

log = logging.getLogger("llamagate.fleet")
CleanupCtx = Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]


def install(app: web.Application, state: AppState, defaults: Limits,
            control_socket: Path | None) -> None:
    config = state.config
    assert config.redis_url is not None
    link = FleetLink(config.redis_url, config.redis_key_prefix, config.redis_timeout)
    _observe(link, state.metrics)
    state.fleet_limits = FleetLimiter(link, defaults, config.redis_lease_seconds,
                                      fail_open=config.redis_failure_mode == "open")
    state.auth_failures = FleetAddressThrottle(link, config.auth_failures_per_minute)
    buffers = config.usage_buffer_dir or usage_spool.spool_dir(config.usage_db).parent / "fleet"
    watcher = RedisKeyWatcher(link, buffers / "keys.last-good")
    usage = RedisUsage(link, flush_interval=config.usage_flush_interval, buffer_dir=buffers,
                       retention_days=config.redis_usage_retention_days)
    state.keys, state.usage = watcher, usage
    metrics = state.metrics

    def observe_usage(events: int, failed: bool) -> None:
        metrics.usage_pending.set(events)
        if metrics.usage_buffered is not None:
            metrics.usage_buffered.set(usage.buffered)
        if failed:
            metrics.usage_write_failures.inc()
    usage.observer = observe_usage
    auditor = RedisAuditor(link, config.redis_audit_max_entries)
    admin.install(state.router, watcher, usage, auditor)
    if control_socket is not None:
        app.cleanup_ctx.append(control_client.install(state.router, control_socket, auditor))
    app.cleanup_ctx.append(_fleet_ctx(link, watcher, usage, auditor, state.fleet_limits))


def _observe(link: FleetLink, metrics: GatewayMetrics) -> None:
    metrics.follow_fleet()
    up, latency = metrics.redis_up, metrics.redis_latency
    assert up is not None and latency is not None
    up.set(0)

    def on_state(answers: bool) -> None:
        up.set(1 if answers else 0)
    link.on_state = on_state
    link.observe = latency.observe


def _fleet_ctx(link: FleetLink, watcher: RedisKeyWatcher, usage: RedisUsage,
               auditor: RedisAuditor, limiter: FleetLimiter) -> CleanupCtx:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        # none of these fails on an unreachable Redis: the last good keys serve, usage
        # waits on local disk, limits follow REDIS_FAILURE_MODE, and the link keeps trying
        await link.start()
        try:
            await watcher.start()
            await usage.open()
            await auditor.open()
            usage.start()
            limiter.start()
            yield
        finally:
            await limiter.close()
            await usage.close()
            await auditor.close()
            await watcher.close()
            await link.close()
    return ctx
