"""Auth and rate limiting sit where gateway/middlewares.py says: inside the error renderer, auth
before the rate limiter (a refused key must not spend anyone's budget)."""

from __future__ import annotations

from aiohttp import web

from gateway import middlewares as pipeline
from gateway.error_middleware import error_middleware
from gateway.policy.auth import auth_middleware
from gateway.policy.cors import Cors
from gateway.policy.ratelimit import on_prepare, ratelimit_middleware


def test_order() -> None:
    app = web.Application()
    pipeline.install(app, Cors(()))
    order = [m.__wrapped__ for m in app.middlewares]  # type: ignore[attr-defined]
    assert order.index(error_middleware) < order.index(auth_middleware)
    assert order.index(auth_middleware) + 1 == order.index(ratelimit_middleware)
    assert order[-1] is ratelimit_middleware  # the last stage before the handlers
    assert on_prepare in app.on_response_prepare
