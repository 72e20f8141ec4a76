"""Request ids: taken from the client's X-Request-ID when sane, else generated;
echoed on the response and put in the logging context."""

from __future__ import annotations

import re
import uuid

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.exchange import EXCHANGE, Exchange
from llamagate.logs import request_id_var

_SAFE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def route_label(path: str) -> str:
    """Bounded-cardinality route name for metrics."""
    if path.startswith("/v1/"):
        return path if path in _KNOWN else "/v1/other"
    return path if path in _KNOWN else "other"


_KNOWN = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
                    "/health", "/ping", "/metrics"})


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request.headers.get("X-Request-ID", "")
    if not _SAFE.match(rid):
        rid = uuid.uuid4().hex
    request[EXCHANGE] = Exchange(request_id=rid, route=route_label(request.path))
    token = request_id_var.set(rid)
    try:
        return await handler(request)
    finally:
        request_id_var.reset(token)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streamed or not, carries the id."""
    ex = request.get(EXCHANGE)
    if ex is not None:
        response.headers["X-Request-ID"] = ex.request_id
