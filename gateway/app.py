"""The gateway app factory: wires config, upstream, admission, metrics and routes.

Every background task and resource is owned by a cleanup context, so tests can
build the app, serve it on 127.0.0.1 and tear it down without leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from backend.upstreams import UpstreamSpec
from core import runtime
from core.config import Config
from gateway import keys_wiring, pipeline
from gateway.admin import openapi
from gateway.admin.catalog import ModelCatalog
from gateway.edge.client_address import ClientAddress
from gateway.edge.server import HttpServer
from gateway.edge.write_batch import WriteBatch
from gateway.observe import health_link, probes
from gateway.observe.metrics import GatewayMetrics, make_registries
from gateway.observe.model_metrics import ModelStateCollector
from gateway.observe.process_metrics import BackendCollector, ProcessCollector, service_processes
from gateway.observe.upstream_metrics import UpstreamCollector
from gateway.policy.admission import Admission
from gateway.policy.cors import Cors
from gateway.policy.shared_admission import SharedAdmission
from gateway.policy.shared_limits import SharedTable
from gateway.router import PUBLIC, Router
from gateway.state import APP_STATE, AppState
from gateway.upstream import llama_routes, proxy, slots
from gateway.upstream.backend import Upstream
from gateway.upstream.members import Member
from gateway.upstream.pool import Pool
from keys.model import SCOPE_INFERENCE, SCOPE_METRICS


@dataclass(frozen=True)
class Wiring:
    """Where the backend is, as decided by the serve process (or BACKEND_URL)."""

    backend_url: str
    backend_key: str | None
    runtime_dir: Path | None  # None: no serve process; follow the backend's /health
    models: tuple[str, ...] = ()
    models_known: bool = True  # False: BACKEND_URL's list is read once the backend is up
    control_socket: Path | None = None  # the serve process's model-management API
    admission_socket: Path | None = None  # several workers: the serve process's single queue
    limits_file: Path | None = None  # several workers: per-key rate limits they share
    worker_index: int = 0  # which of GATEWAY_WORKERS this is
    # PORT == PORT_HEALTH: the health process's socket, which answers the probes on PORT
    health_socket: Path | None = None
    # an upstream pool (BACKEND_URLS, BACKENDS_FILE): its llama-servers, in serve's order
    upstreams: tuple[UpstreamSpec, ...] = ()


def create_app(config: Config, wiring: Wiring) -> web.Application:
    app = web.Application(client_max_size=config.max_body_bytes)
    made, exposed = make_registries()
    pool = _pool(config, wiring.upstreams) if wiring.upstreams else None
    upstream = pool.members[0].upstream if pool is not None else \
        Upstream(wiring.backend_url, wiring.backend_key,
                 pool_size=max(16, config.concurrency_limit * 2))
    state = AppState(
        config=config,
        upstream=upstream,
        admission=SharedAdmission(wiring.admission_socket) if wiring.admission_socket else
        Admission(config.concurrency_limit, config.max_queue_size, config.queue_timeout),
        metrics=GatewayMetrics(made),
        models=ModelCatalog(wiring.models, wiring.models[0] if wiring.models else None,
                            known=wiring.models_known, aliases=dict(config.model_aliases)),
        exposed_registry=exposed,
    )
    state.models.reread = upstream.refresh
    state.pool = pool
    exposed.register(UpstreamCollector(pool))
    exposed.register(BackendCollector(lambda: upstream.status.ready, lambda: upstream.serve_state))
    exposed.register(ProcessCollector(service_processes(wiring.runtime_dir,
                                                        lambda: upstream.serve_state)))
    exposed.register(ModelStateCollector(state.models))
    state.metrics.follow(pool if pool is not None else state.admission)
    app[APP_STATE] = state
    state.cors = Cors(config.cors_origins)
    state.clients = ClientAddress(config.trusted_proxies)
    link = None
    if wiring.health_socket is not None:  # one listener for both tiers
        link = health_link.HealthLink(wiring.health_socket)
        app.cleanup_ctx.append(link.ctx)
    _routes(state.router, config, wiring, link)
    # keyring, limits, usage, audit, /admin routes (models, pulls and profiles via the socket)
    # several workers on this machine (a fleet's count in Redis, every worker's too)
    shared = wiring.limits_file if config.auth_enabled and config.redis_url is None else None
    keys_wiring.install(
        app, state, wiring.control_socket,
        SharedTable(shared, config.gateway_workers, wiring.worker_index) if shared else None,
        shared.parent / "auth_failures.bin" if shared else None)  # each worker creates it
    app.cleanup_ctx.append(_upstream_ctx(state, wiring))
    if isinstance(state.admission, SharedAdmission):
        app.cleanup_ctx.append(_hub_ctx(state.admission))
    app.cleanup_ctx.append(_background(lambda: slots.expire(state), "request-timeouts"))
    if wiring.runtime_dir is not None:
        app.cleanup_ctx.append(_heartbeat_ctx(state, wiring.runtime_dir))
    if config.otel_exporter_otlp_endpoint is not None:
        app.cleanup_ctx.append(_telemetry_ctx(state))
    return app


def _pool(config: Config, specs: tuple[UpstreamSpec, ...]) -> Pool:
    """The upstream pool's members, in serve's order (its published states follow it), all
    sending through one write batch (gateway/edge/write_batch.py)."""
    batch = WriteBatch()
    members = [Member(i, spec.name, Upstream(spec.url, spec.key,
                                             pool_size=max(16, config.concurrency_limit * 2),
                                             batch=batch),
                      spec.weight, config.concurrency_limit)
               for i, spec in enumerate(specs)]
    return Pool(members, config.max_queue_size, config.queue_timeout,
                affinity=config.pool_affinity, margin=config.pool_affinity_margin,
                limit=config.max_concurrent_requests, fallback_slots=config.parallel)


def _telemetry_ctx(state: AppState
                   ) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    """OTLP export (gateway/observe/otel.py), flushed at shutdown. Imported here only: the
    SDK costs a worker its import time and memory, and most deployments scrape instead."""
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from gateway.observe.otel import Telemetry
        state.telemetry = Telemetry()
        try:
            yield
        finally:
            telemetry, state.telemetry = state.telemetry, None
            await asyncio.to_thread(telemetry.shutdown)  # its exporters post synchronously
    return ctx


def _routes(router: Router, config: Config, wiring: Wiring,
            link: health_link.HealthLink | None) -> None:
    """The gateway's own routes; keys_wiring adds /admin/* when auth is on."""
    if link is None:
        router.add(["GET"], "/ping", probes.ping, PUBLIC)
        router.add(["GET"], "/health", probes.health, PUBLIC)
    else:  # PORT == PORT_HEALTH: the health process answers them (gateway/observe/health_link.py)
        for path in health_link.PROBES:
            router.add(["GET"], path, health_link.handler(link), PUBLIC)
    router.add(["GET"], "/metrics", probes.metrics, SCOPE_METRICS)
    router.add(["GET"], "/openapi.json", openapi.handler(
        admin=config.auth_enabled, models_admin=wiring.control_socket is not None), PUBLIC)
    # only the methods llama-server routes: the table answers any other 405 (issue 21)
    router.add(proxy.METHODS, "/v1/*", proxy.handle, SCOPE_INFERENCE,
               only=dict.fromkeys(proxy.INFERENCE_ROUTES, ("POST",)))
    # llama-server's native routes the gateway serves (exact paths: one dict lookup each);
    # every other path, the ones that change its state included, is no route
    for methods, path, scope in llama_routes.table():
        router.add(methods, path, proxy.handle, scope)


@dataclass
class Served:
    """A listening gateway: the HTTP server, and the app that owns its resources' lifecycle."""

    runner: web.AppRunner
    edge: HttpServer
    port: int

    async def close(self) -> None:
        await self.edge.close()
        await self.runner.cleanup()


async def serve(app: web.Application, host: str, port: int, *,
                reuse_port: bool = False) -> Served:
    """Start the app (its startup and cleanup contexts) and listen on host:port.

    aiohttp serves no request here: the app owns every resource and background task
    (cleanup_ctx), and the one pipeline (gateway/pipeline.py) answers every request."""
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    state = app[APP_STATE]
    config = state.config
    server = HttpServer(state, pipeline.handle, pipeline.decorator(state.cors),
                        max_body=config.max_body_bytes, gate=pipeline.HeadGate(),
                        head_timeout=config.head_timeout,
                        write_stall_timeout=config.write_stall_timeout,
                        max_per_client=config.max_connections_per_client)
    try:
        listening = await server.listen(host, port, reuse_port=reuse_port)
    except BaseException:
        await runner.cleanup()
        raise
    state.listening.set()
    return Served(runner, server, listening.sockets[0].getsockname()[1])


def _background(coro_fn: Callable[[], Coroutine[Any, Any, None]], name: str
                ) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(coro_fn(), name=name)
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return ctx


def _upstream_ctx(state: AppState, wiring: Wiring
                  ) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        pool = state.pool
        members = [state.upstream] if pool is None else [m.upstream for m in pool.members]
        for upstream in members:
            await upstream.open()
        if wiring.runtime_dir is not None:
            watcher = state.upstream.follow_serve_file(
                wiring.runtime_dir, state.models.update if pool is None
                else _both(state.models.update, pool.apply))
        else:
            watcher = state.upstream.poll_health()
        task = asyncio.create_task(watcher, name="backend-status")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for upstream in members:
            await upstream.close()
    return ctx


def _both(first: Callable[[dict[str, Any]], None], then: Callable[[dict[str, Any]], None]
          ) -> Callable[[dict[str, Any]], None]:
    def both(serve_state: dict[str, Any]) -> None:
        first(serve_state)
        then(serve_state)
    return both


def _hub_ctx(admission: SharedAdmission
             ) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await admission.connect()
        yield
        admission.close()
    return ctx


def _heartbeat_ctx(state: AppState, runtime_dir: Path
                   ) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    path = runtime_dir / f"{runtime.WORKER_PREFIX}{os.getpid()}.json"

    async def beat() -> None:
        # the first heartbeat says the worker is up: only once it accepts connections (the
        # health tier said 200 while a restarted worker's port still refused them)
        await state.listening.wait()
        while True:
            counts = state.pool if state.pool is not None else state.admission
            beat_state: dict[str, object] = {
                "in_flight": counts.in_flight, "queued": counts.queued,
                "last_activity": state.activity.last, "draining": state.draining,
                "models_used": state.models.used}
            # the data files' state, for /health (issue 22): whether usage is written and
            # which keys are in force
            if state.usage is not None:
                beat_state["usage"] = state.usage.report()
            if state.keys is not None:
                beat_state["keys"] = state.keys.report()
            if state.fleet_limits is not None:  # a fleet's Redis (REDIS_URL)
                beat_state["fleet"] = state.fleet_limits.link.report()
            if state.pool is not None:  # each upstream, for the health process's /health
                beat_state["upstreams"] = state.pool.report()
            runtime.write_state(path, beat_state)
            await asyncio.sleep(runtime.HEARTBEAT)  # heartbeat period

    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with _background(beat, "heartbeat")(app):
            yield
        # a worker that exits cleanly must not look like a hung one
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return ctx
