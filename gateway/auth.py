"""Authentication (placeholder until the key store lands): allows everything
when AUTH_ENABLED=false, otherwise only probes."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import Unauthorized
from gateway.state import APP_STATE

PUBLIC = frozenset({"/ping", "/health", "/health/live", "/health/ready"})


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[APP_STATE]
    if not state.config.auth_enabled or request.path in PUBLIC:
        return await handler(request)
    raise Unauthorized("missing or invalid API key")
