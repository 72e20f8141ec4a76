"""The proxy's forwarding step (gateway/upstream/proxy.py): one request sent to the backend,
and, in multi-model mode, the request whose model failed to load sent again to its fallback.
"""

from __future__ import annotations

import json
import math
import time

from gateway.edge.call import Call
from gateway.errors import BackendUnavailable
from gateway.exchange import Exchange
from gateway.policy import auth
from gateway.policy.validation import RequestInfo
from gateway.state import AppState
from gateway.upstream import fold as unstream
from gateway.upstream.client import BackendBroken, BackendError, Response
from gateway.upstream.connection import BackendConnectError


async def send(call: Call, state: AppState, ex: Exchange, raw: bytes) -> Response:
    """The request to the backend; its answer's head. A HEAD is asked as the GET it stands
    for (as nginx's proxy_cache_convert_head does):"""
    # a HEAD is asked as the GET it stands for (as nginx's proxy_cache_convert_head does):
    # its answer is the GET's head, whose length only the GET's body gives (a key's filtered
    # model list among them); the edge writes no body for a HEAD
    method = "GET" if call.method == "HEAD" else call.method
    ex.forwarded = True  # from here its prompt is charged, however it ends (upstream/cut.py)
    ex.forwarded_at = time.monotonic()
    pool = state.pool
    upstream = state.upstream if pool is None else \
        pool.members[ex.member].upstream if ex.member >= 0 else pool.upstream_of(ex)
    try:
        resp = await upstream.send(method, call.path_qs, raw, call.headers.get("content-type"),
                                   ex.request_id)
    except BackendError as exc:  # its message says which: no connection, or one that broke
        # a connection that broke may have carried the request: charged only if it did
        connect = isinstance(exc, BackendConnectError)
        ex.forwarded = not connect
        ex.end = "backend_failed"
        ex.upstream_failure = "broken" if not connect else \
            "refused" if isinstance(exc.__cause__, ConnectionRefusedError) else "connect"
        raise BackendUnavailable(str(exc), retry_after=2) from None
    ex.answered_at = time.monotonic()
    ex.upstream_status = resp.status
    return resp


def retargeted(call: Call, ex: Exchange, info: RequestInfo, model: str) -> bytes:
    """The request's body for another model (a fallback after a failed load)."""
    changed = {**(info.body or {}), "model": model}
    return (unstream.stream_body(changed, call.path) if ex.unstream
            else json.dumps(changed).encode())


async def after_failed_load(call: Call, state: AppState, ex: Exchange, resp: Response,
                             info: RequestInfo) -> Response:
    """llama-server's router answers the request that finds its model unloadable with a 500
    ("failed to load"); the requests after it meet the cooldown (gateway/admin/catalog.py). Serve
    this one as those will be: by the model's fallback, or a 503 with Retry-After."""
    key = call.key

    def allowed(model: str) -> bool:
        return auth.may_use(key, model)

    requested, fallback_before = ex.model, ex.fallback
    tried = {ex.model}
    try:
        while True:
            body = await resp.read()  # a short JSON error; read() returns it again later
            if f"name={ex.model} failed to load".encode() not in body:
                return resp
            fallback = state.models.fallback_of(ex.model, allowed)
            if fallback is None or fallback in tried:
                # nothing answered: the error, the access line and the metrics name the
                # model asked for, and no X-Model-Fallback claims otherwise
                ex.model, ex.fallback = requested, fallback_before
                raise BackendUnavailable(
                    f"model '{requested}' failed to load; it is refused for a while, "
                    "see /admin/models", code="model_unavailable",
                    retry_after=max(1, math.ceil(state.config.model_cooldown_seconds)))
            tried.add(fallback)
            state.models.touch(fallback)  # the fleet counts a failure only after a use
            ex.model = ex.fallback = fallback
            resp = await send(call, state, ex, retargeted(call, ex, info, fallback))
            if resp.status != 500:
                return resp
    except BackendBroken as exc:
        resp.close()
        raise BackendUnavailable(str(exc), retry_after=2) from None
    except BaseException:
        resp.close()  # cancelled while reading: the connection cannot go back to the pool
        raise
