"""Everything a gateway worker's handlers share, typed, in one app key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from core.config import Config
from gateway.admin.catalog import ModelCatalog
from gateway.edge.client_address import ClientAddress
from gateway.exchange import Exchange
from gateway.observe.metrics import GatewayMetrics
from gateway.policy.admission import Slots
from gateway.policy.buckets import RateLimiter
from gateway.policy.cors import Cors
from gateway.policy.fleet_limits import FleetLimiter
from gateway.policy.throttle import AddressThrottle
from gateway.router import Router
from gateway.upstream.backend import Upstream
from gateway.upstream.pool import Pool

if TYPE_CHECKING:  # the OpenTelemetry SDK is loaded only where export is on
    from gateway.observe.otel import Telemetry
from keys.reloader import KeyReloader
from keys.usage_recorder import UsageRecorder

if TYPE_CHECKING:  # a fleet's (REDIS_URL), imported where there is one
    from keys.usage_redis import RedisUsage
    from keys.watch_redis import RedisKeyWatcher


@dataclass
class Activity:
    """Last inference request, for idle shutdown; health probes never touch it."""

    last: float = field(default_factory=time.time)

    def touch(self) -> None:
        self.last = time.time()


@dataclass
class AppState:
    config: Config
    upstream: Upstream
    admission: Slots
    metrics: GatewayMetrics
    models: ModelCatalog
    exposed_registry: CollectorRegistry
    activity: Activity = field(default_factory=Activity)
    draining: bool = False
    # requests holding a backend slot, so a drain can end them at its deadline
    active: dict[Exchange, asyncio.Task[object]] = field(default_factory=dict)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    listening: asyncio.Event = field(default_factory=asyncio.Event)  # set once the port accepts
    drain_now: asyncio.Event = field(default_factory=asyncio.Event)
    # API keys, set up by gateway/keys_wiring.py; all None while AUTH_ENABLED=false
    keys: KeyReloader | RedisKeyWatcher | None = None
    usage: UsageRecorder | RedisUsage | None = None
    limiter: RateLimiter | None = None
    auth_failures: AddressThrottle | None = None
    # a fleet (REDIS_URL): limits counted in Redis instead of ``limiter``
    fleet_limits: FleetLimiter | None = None
    clock: Callable[[], float] = time.time  # wall clock for key expiry and rotation grace
    cors: Cors = field(default_factory=lambda: Cors(()))
    # who the client is behind TRUSTED_PROXIES (gateway/edge/client_address.py)
    clients: ClientAddress = field(default_factory=lambda: ClientAddress(()))
    router: Router = field(default_factory=Router)  # every route on the port (gateway/app.py)
    telemetry: Telemetry | None = None  # OTLP export, when OTEL_EXPORTER_OTLP_ENDPOINT is set
    # several llama-servers (BACKEND_URLS, BACKENDS_FILE): the pool admits and routes, and
    # ``upstream`` is the first of them, whose status is the pool's as serve publishes it
    pool: Pool | None = None

    def drain_deadline_now(self) -> None:
        self.drain_now.set()


APP_STATE = web.AppKey("llamagate_state", AppState)
