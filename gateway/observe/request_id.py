"""Request ids: taken from the client's X-Request-ID when sane, else generated;
echoed on the response and put in the logging context.

`open_exchange` is called first thing for every request, by the observe
middleware (one middleware for both stages: a layer fewer on every request).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from aiohttp import web

from gateway.exchange import EXCHANGE, Exchange
from gateway.policy import validation

_SAFE = re.compile(r"[A-Za-z0-9._:\-]{1,128}").fullmatch

_KNOWN = validation.ROUTES | {"/v1/models", "/v1/audio/transcriptions", "/health", "/ping",
                              "/metrics"}


def route_label(path: str) -> str:
    """Bounded-cardinality route name for metrics."""
    if path in _KNOWN:
        return path
    return "/v1/other" if path.startswith("/v1/") else "other"


def request_id_of(headers: Mapping[str, str]) -> str:
    """The client's id when it is 1-128 of ``[A-Za-z0-9._:-]``, else a new one."""
    rid = headers.get("x-request-id")
    if rid is not None and _SAFE(rid):
        return rid
    return os.urandom(16).hex()  # what uuid4().hex gives, without building a UUID


def open_exchange(request: web.Request) -> Exchange:
    """Start the request's record, which every later stage fills in."""
    ex = Exchange(request_id=request_id_of(request.headers), route=route_label(request.path))
    request[EXCHANGE] = ex
    return ex


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streamed or not, carries the id (and says
    when a fallback model answered, and names the server without its software versions:
    one hook for all, as each hook costs every request)."""
    response.headers["Server"] = "llamagate"  # as on the edge server's own answers
    ex = request.get(EXCHANGE)
    if ex is not None:
        response.headers["X-Request-ID"] = ex.request_id
        if ex.fallback is not None:
            response.headers["X-Model-Fallback"] = ex.fallback
