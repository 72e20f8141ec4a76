"""Everything a gateway worker's handlers share, typed, in one app key."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.admission import Admission
from gateway.exchange import Exchange
from gateway.metrics import GatewayMetrics
from gateway.upstream import Upstream
from llamagate.config import Config


@dataclass
class Activity:
    """Last inference request, for idle shutdown; health probes never touch it."""

    last: float = field(default_factory=time.time)

    def touch(self) -> None:
        self.last = time.time()


@dataclass
class ModelCatalog:
    names: tuple[str, ...]
    default: str | None = None

    def resolve(self, requested: str | None) -> str | None:
        """Name to route to; None when the model is unknown. An empty catalog accepts all."""
        if requested is None or requested == "":
            return self.default or (self.names[0] if self.names else "-")
        if not self.names or requested in self.names:
            return requested
        return None


@dataclass
class AppState:
    config: Config
    upstream: Upstream
    admission: Admission
    metrics: GatewayMetrics
    models: ModelCatalog
    exposed_registry: CollectorRegistry
    activity: Activity = field(default_factory=Activity)
    draining: bool = False
    # requests holding a backend slot, so a drain can end them at its deadline
    active: dict[Exchange, asyncio.Task[object]] = field(default_factory=dict)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    drain_now: asyncio.Event = field(default_factory=asyncio.Event)

    def drain_deadline_now(self) -> None:
        self.drain_now.set()


APP_STATE = web.AppKey("llamagate_state", AppState)
