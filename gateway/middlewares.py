"""The order every request off the token path passes through (a test pins it).
gateway/stages.py runs the same stages, in the same order, for `/v1/*`.

observe (request id, then metrics and the access log) → CORS preflight → errors →
auth → rate limit → handler (validation → admission → proxy → SSE relay).

Errors sit inside the observer so that metrics, the access log and response
headers (request id, CORS, added in on_response_prepare) see every error as an
ordinary response. Every layer costs every request something, so stages that
always run together share one (the request id opens the observed record).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.error_middleware import error_middleware
from gateway.observe.record import observe_middleware
from gateway.observe.request_id import echo_request_id
from gateway.policy.auth import auth_middleware
from gateway.policy.cors import Cors
from gateway.policy.ratelimit import on_prepare as ratelimit_headers
from gateway.policy.ratelimit import ratelimit_middleware


def install(app: web.Application, cors: Cors) -> None:
    app.middlewares.extend(_layer(stage) for stage in (
        observe_middleware,
        cors.middleware,
        error_middleware,
        auth_middleware,
        ratelimit_middleware,
    ))
    app.on_response_prepare.append(echo_request_id)
    if cors.allowed:  # with CORS off its hook adds nothing: no call for nothing
        app.on_response_prepare.append(cors.on_prepare)
    app.on_response_prepare.append(ratelimit_headers)


def _layer(stage: Middleware) -> Middleware:
    """The stage as aiohttp wants it: `web.middleware` marks the function with an
    attribute, which a mypyc-compiled function (gateway/native.py) cannot take."""
    @web.middleware
    async def layer(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await stage(request, handler)
    layer.__wrapped__ = stage  # type: ignore[attr-defined]
    return layer
