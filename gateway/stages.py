"""The token path: every `/v1/*` request (and its aliases without `/v1`), and every
request the HTTP parser refused, served by gateway/edge/server.py.

The same stages as gateway/middlewares.py, in the same order, as plain calls instead of
aiohttp middlewares (each middleware layer cost every request a few µs):

observe (request id, then metrics and the access log) → errors → auth → rate limit →
proxy (validation → admission → forward → SSE relay).

``HeadGate`` makes the same checks of a head alone (route, key, scope, rate limit) for the
edge server, before it tells a client waiting with `Expect: 100-continue` to send its body.

Headers every answer carries (request id, fallback model, rate limits, CORS) are
added by ``decorate`` when the answer's head is written, so errors and streams get
them too.
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
    NotFound,
    error_parts,
    internal_error_body,
)
from gateway.exchange import Exchange
from gateway.observe.record import record
from gateway.observe.request_id import request_id_of, route_label
from gateway.policy import ratelimit
from gateway.policy.auth import authenticate, is_canonical_target
from gateway.policy.cors import Cors
from gateway.state import AppState
from gateway.upstream import proxy
from keys.keyring import has_scope
from keys.model import SCOPE_INFERENCE

log = logging.getLogger("llamagate.gateway")


async def handle(call: Call) -> None:
    state: AppState = call.state
    ex = Exchange(request_id=request_id_of(call.headers), route=route_label(call.path))
    call.ex = ex
    request_id_var.set(ex.request_id)  # this task's own context: no reset needed
    status = 499  # client closed the request, unless we learn otherwise
    try:
        await _answer(call, state, ex)
        status = call.status or 499
    except (asyncio.CancelledError, ConnectionResetError):
        ex.error = ex.error or "client_disconnected"
        raise
    except BaseException:
        status = call.status or 500  # a stream cut short by a bug: what its head said
        raise
    finally:
        record(state.metrics, ex, status, call.method)


async def _answer(call: Call, state: AppState, ex: Exchange) -> None:
    try:
        await _authorized(call, state, ex)
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


async def _authorized(call: Call, state: AppState, ex: Exchange) -> None:
    if call.refusal is not None:  # any route: unparsable, or its body never read (413)
        raise refusal_error(call.refusal) if call.denied is None else call.denied
    if call.key is None:
        _admit(call, state, ex)
    else:  # its head passed HeadGate: checked and admitted once, not again
        ex.key_id = call.key.id
    ticket = call.ticket
    if ticket is None:
        await proxy.handle(call)
        return
    try:
        await proxy.handle(call)
    finally:
        ratelimit.settle(state, ticket, call.key, ex)


def _admit(call: Call, state: AppState, ex: Exchange | None) -> None:
    """What the head decides: the route, the key (``call.key``; ``ex`` names it), its scope,
    its rate limit (``call.ticket``); raises the error the request is refused with."""
    # the path checks are for what goes to llama-server: a model's name may hold a `/` (the
    # SDK sends it as %2F), and GET /v1/models/{model} is answered here, never forwarded
    if not proxy.retrieves_model(call) and not is_canonical_target(call.path, call.target):
        raise NotFound("no such route", code="not_found")
    if not state.config.auth_enabled:
        return
    clients = state.clients
    remote = call.remote if not clients.enabled else clients.of(
        call.remote, [v.decode("latin-1") for k, v in call.raw_headers
                      if k.lower() == b"x-forwarded-for"])
    key = authenticate(call.headers, remote, state)
    if ex is not None:
        ex.key_id = key.id
    if not has_scope(key, SCOPE_INFERENCE):
        raise Forbidden(f"this API key lacks the '{SCOPE_INFERENCE}' scope", code="missing_scope")
    call.ticket = ratelimit.admit(state, key)
    call.key = key


class HeadGate:
    """The edge server's ``Gate`` (gateway/edge/server.py): ``_admit`` for a head."""

    def check(self, call: Call) -> GatewayError | None:
        try:
            _admit(call, call.state, None)
        except GatewayError as exc:
            return exc
        return None  # call.key and call.ticket go with the request once its body is in

    def release(self, call: Call) -> None:
        if call.ticket is not None and call.key is not None:  # nothing was sent: nothing used
            ratelimit.settle(call.state, call.ticket, call.key, Exchange(request_id="-", route="-"))


def decorator(cors: Cors) -> Callable[[Call], str]:
    """The headers every answer on the token path carries, as header lines."""

    def decorate(call: Call) -> str:
        ex = call.ex
        if ex is None:
            return ""
        lines = f"X-Request-ID: {ex.request_id}\r\n"
        if ex.fallback is not None:
            lines += f"X-Model-Fallback: {ex.fallback}\r\n"
        if call.ticket is not None:
            lines += ratelimit.header_lines(call.ticket)
        if cors.allowed:
            lines += cors.lines(call.headers.get("origin"))
        return lines

    return decorate
