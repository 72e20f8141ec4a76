"""The one pipeline: every request on the gateway port passes these stages, in this order.

    observe    request id, then (when the answer is done) metrics and the access log
    errors     every failure below becomes OpenAI-shaped error JSON; no trace leaves
    refusal    what the HTTP parser refused (400/408/413/414/431), answered as an error
    preflight  a CORS preflight is answered 204 here, before auth (browsers send no key)
    route      the table in gateway/router.py: handler and scope, or 404/405 (after auth)
    auth       the API key and the scope the route needs (gateway/policy/auth.py)
    ratelimit  the key's requests per minute and concurrency (gateway/policy/ratelimit.py)
    handler    /v1/*: the proxy (validation → admission → forward → SSE relay);
               probes, /metrics, /openapi.json, /admin/*: their own handlers

STAGES names them in that order; tests/gateway/test_pipeline.py pins it, for a token-path
route and for an admin route alike. Each stage is a plain call, not a layer: a layer cost
every request a few µs. Headers every answer carries (request id, fallback model, rate
limits, CORS) are added by ``decorator`` when the answer's head is written, so errors and
streams get them too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from core.logs import request_id_var
from gateway.edge.call import Call, refusal_error
from gateway.errors import (
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    error_parts,
    internal_error_body,
)
from gateway.exchange import Exchange
from gateway.observe.record import QUIET, record
from gateway.observe.request_id import request_id_of, route_label
from gateway.policy import ratelimit
from gateway.policy.auth import authenticate, is_canonical, is_canonical_target
from gateway.policy.cors import Cors, is_preflight
from gateway.router import PUBLIC, Match, Route
from gateway.state import AppState
from gateway.upstream import proxy
from keys.keyring import has_scope
from keys.model import SCOPE_METRICS

log = logging.getLogger("llamagate.gateway")

STAGES = ("observe", "errors", "refusal", "preflight", "route", "auth", "ratelimit", "handler")


async def handle(call: Call) -> None:
    """observe: the request's record, opened first and written when the answer is done."""
    state: AppState = call.state
    ex = Exchange(request_id=request_id_of(call.headers), route=route_label(call.path))
    call.ex = ex
    request_id_var.set(ex.request_id)  # this task's own context: no reset needed
    if state.telemetry is not None:
        ex.traceparent = call.headers.get("traceparent")
    status = 499  # client closed the request, unless we learn otherwise
    try:
        await _errors(call, state, ex)
        status = call.status or 499
    except (asyncio.CancelledError, ConnectionResetError):
        ex.error = ex.error or "client_disconnected"
        ex.end = ex.end or "client_closed"
        raise
    except BaseException:
        status = call.status or 500  # a stream cut short by a bug: what its head said
        raise
    finally:
        if call.path not in QUIET:  # probes and scrapes must not flood the log or metrics
            record(state.metrics, ex, status, call.method, state.telemetry)


async def _errors(call: Call, state: AppState, ex: Exchange) -> None:
    try:
        await _gate(call, state, ex)
    except GatewayError as exc:
        if ex.error is None:
            ex.error = exc.code  # the access line says why the gateway answered with an error
        if call.started:
            raise  # a stream already under way: nothing left to answer with
        status, headers, body = error_parts(exc)
        call.respond(status, body, headers=headers)
    except (ConnectionResetError, OSError) as exc:
        log.info("client connection lost: %s", type(exc).__name__)
        raise
    except Exception:
        if call.started:
            raise
        log.exception("unhandled error")
        call.respond(500, internal_error_body())


async def _gate(call: Call, state: AppState, ex: Exchange) -> None:
    if call.refusal is not None:  # any route: unparsable, its body never read (413), or its
        if call.denied is None:  # head refused by HeadGate
            raise refusal_error(call.refusal)
        if call.key is not None:
            ex.key_id = call.key.id
        raise call.denied
    if is_preflight(call.method, call.headers):
        status, headers = state.cors.preflight(call.headers.get("origin"),
                                               call.headers.get("access-control-request-headers"))
        call.respond(status, b"", content_type=None, headers=headers)
        return
    route: Route | None = call.route  # admitted at its head (HeadGate): matched, checked once
    if route is None:
        route = admit(call, state, ex)
    elif call.key is not None:
        ex.key_id = call.key.id
    ticket = call.ticket
    if ticket is None:
        await route.handler(call)
        return
    try:
        if ticket.pending and route.handler is not proxy.handle:  # the proxy admits its own
            await ratelimit.admit_fleet(state, ticket, None)
        await route.handler(call)
    finally:
        ratelimit.settle(state, ticket, call.key, ex)


def admit(call: Call, state: AppState, ex: Exchange | None) -> Route:
    """route → auth → ratelimit, what the head alone decides: the route, the key
    (``call.key``; ``ex`` names it), its scope and rate limit (``call.ticket``). Raises the
    error the request is refused with."""
    match = _route(call, state)
    route = match.route
    gated = call.key is not None  # its head passed HeadGate: checked and admitted once, not again
    if gated:
        if ex is not None:
            ex.key_id = call.key.id
    elif state.config.auth_enabled and (route is None or not _public(route, state)):
        _authenticate(call, state, ex, route)
    if route is None:  # no route: any valid key may learn that
        if match.allow:
            raise MethodNotAllowed(f"method {call.method} is not allowed here",
                                   headers={"Allow": ", ".join(sorted(match.allow))})
        raise NotFound("no such route", code="not_found")
    if call.key is not None and not gated:
        call.ticket = ratelimit.admit(state, call.key)
    call.route = route
    return route


class HeadGate:
    """The HTTP server's ``Gate`` (gateway/edge/connection.py): ``admit`` for every head as it
    arrives, so no body is read (nor decoded, nor invited with `100 Continue`) before the
    key, scope and limits passed. This is the pipeline's own route → auth → ratelimit, done
    once: what it admitted (``call.route``, ``key``, ``ticket``) goes with the request."""

    def check(self, call: Call) -> GatewayError | None:
        if is_preflight(call.method, call.headers):
            return None
        try:
            admit(call, call.state, None)
        except GatewayError as exc:
            return exc
        return None  # call.key and call.ticket go with the request once its body is in

    def release(self, call: Call) -> None:
        if call.ticket is not None and call.key is not None:  # nothing was sent: nothing used
            ratelimit.settle(call.state, call.ticket, call.key, Exchange(request_id="-", route="-"))


def _route(call: Call, state: AppState) -> Match:
    # the path checks are for what goes to llama-server: a model's name may hold a `/` (the
    # SDK sends it as %2F), and GET /v1/models/{model} is answered here, never forwarded
    path = call.path
    if path.startswith("/v1/"):
        if not proxy.retrieves_model(call) and not is_canonical_target(path, call.target):
            raise NotFound("no such route", code="not_found")
    elif not is_canonical(path):
        raise NotFound("no such route", code="not_found")
    match = state.router.match(call.method, path, call.target)
    call.params = match.params
    return match


def _public(route: Route, state: AppState) -> bool:
    return route.scope == PUBLIC or (route.scope == SCOPE_METRICS and state.config.metrics_public)


def _authenticate(call: Call, state: AppState, ex: Exchange | None, route: Route | None) -> None:
    clients = state.clients
    remote = call.remote if not clients.enabled else clients.of(
        call.remote, [v.decode("latin-1") for k, v in call.raw_headers
                      if k.lower() == b"x-forwarded-for"])
    key = authenticate(call.headers, remote, state)
    if ex is not None:
        ex.key_id = key.id
    if route is not None and not has_scope(key, route.scope):
        raise Forbidden(f"this API key lacks the '{route.scope}' scope", code="missing_scope")
    call.key = key


def decorator(cors: Cors) -> Callable[[Call], str]:
    """The headers every answer carries, as header lines."""

    def decorate(call: Call) -> str:
        ex = call.ex
        if ex is None:
            return ""
        lines = f"X-Request-ID: {ex.request_id}\r\n"
        if ex.fallback is not None:
            lines += f"X-Model-Fallback: {ex.fallback}\r\n"
        if call.ticket is not None:
            lines += ratelimit.header_lines(call.ticket)
        if cors.allowed and not is_preflight(call.method, call.headers):
            lines += cors.lines(call.headers.get("origin"))
        return lines

    return decorate
