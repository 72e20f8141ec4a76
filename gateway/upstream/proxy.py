"""Forwards /v1/* requests, and llama-server's native routes (gateway/upstream/llama_routes.py),
to llama-server: validate, admit, forward, relay.

The body is forwarded byte for byte; only inference routes are parsed (for
validation, the model name and token limits); a multi-model backend is sent the name of
the model a request resolved to (an alias's, the default), as its router picks by name.
Backend work is cancelled as soon as the client goes away: the edge server cancels the
request's task, and an unfinished upstream response is closed, not returned to the pool,
which makes llama-server drop the request and free its slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Final

from gateway.edge.call import Call
from gateway.errors import (
    BackendUnavailable,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    UpstreamTimeout,
    sse_error_event,
)
from gateway.exchange import Exchange
from gateway.observe.metering import finish_reason, tokens_from_body, tokens_from_results
from gateway.policy import auth, ratelimit, validation
from gateway.policy.validation import RequestInfo, model_of, prompt_of, validate
from gateway.state import AppState
from gateway.upstream import backend_errors, cut, forward, llama_routes, slots, sse
from gateway.upstream import fold as unstream
from gateway.upstream.client import BackendBroken, Response
from gateway.upstream.pool import RETRYABLE

log = logging.getLogger("llamagate.gateway.proxy")

# validated, metered and limited: the OpenAI ones, and llama-server's Anthropic Messages,
# OpenAI Responses and rerank endpoints, which run the same models on the same slots
INFERENCE_ROUTES = validation.ROUTES
# those and llama-server's native POST routes: every body the proxy parses and checks
_VALIDATED: Final = validation.ROUTES | validation.NATIVE
# generation routes whose bodies are forms (an audio file): metered, not validated
METERED_FORMS = frozenset({"/v1/audio/transcriptions"})
# the methods llama-server routes (tools/server registers Get and Post handlers only; its
# HTTP library answers HEAD for a GET route, and the router adds HEAD to a GET route): any
# other is refused by the route table with 405, never forwarded. OPTIONS preflights are
# answered by the pipeline before routing.
METHODS = ("GET", "POST")
# catalog modes whose GET /v1/models the gateway answers from its catalog
LISTED_HERE: Final = frozenset({"router", "pool"})


async def handle(call: Call) -> None:
    """validate → resolve the model → admit → forward → relay (streamed or folded) → meter."""
    if _answered_here(call):
        return
    state: AppState = call.state
    ex: Exchange = call.ex
    info: RequestInfo | None = None
    if call.method == "POST" and call.path in _VALIDATED:
        config = state.config
        # CTX is the context of a llama-server we start; a BACKEND_URL one's is not known here
        info = validate(call.path, call.body, config.max_messages, config.max_prompt_bytes,
                        config.ctx if config.supervise_backend else 0)
        _resolve_model(call, state, ex, info)
        raw = _forwarded_body(call, state, ex, info)
    else:
        raw = _resolve_named_model(call, state, ex)
    timeout = _may_proceed(call, state, ex)
    ticket = call.ticket
    if ticket is not None and ticket.pending:  # a fleet's limits: one round trip to Redis
        await ratelimit.admit_fleet(state, ticket, ex)
    loop = asyncio.get_running_loop()
    # the timeout counts queueing too (expire() below enforces it): a client's deadline is
    # end to end, and a request whose client has given up should not take a slot
    ex.deadline = loop.time() + timeout
    task = asyncio.current_task()
    assert task is not None
    state.active[ex] = task
    state.idle.clear()
    metrics = state.metrics
    counted = not metrics.live_gauges
    # reads (model listings, props) and tokenizing or templating take no backend slot:
    # llama-server answers them at once, in its HTTP threads
    reads = call.method in ("GET", "HEAD") or call.path in validation.UTILITY
    pool = state.pool
    if not reads:
        try:
            await slots.wait_for_slot(state, ex, counted, None if info is None else info.body)
        except BaseException:  # refused, timed out or left while queued: no longer active
            slots.leave(state, ex)
            raise
    # how the exchange failed, raised again once the request is charged: an await in a
    # `finally` that an exception passes through lost the exception in compiled code
    failed: BaseException | None = None
    try:
        try:
            await _exchange(call, state, ex, raw, info)
        except GatewayError:
            if pool is None or not _retryable(call, ex):
                raise
            await _retry(call, state, ex, raw, info)
    except asyncio.CancelledError as cancelled:
        if not (ex.shutdown or ex.timed_out):
            ex.end = "client_closed"
            failed = cancelled  # the client went away
        else:
            task.uncancel()
            try:
                _cut_short(call, ex, timeout)
            except GatewayError as refused:
                failed = refused
    except BaseException as other:  # (distinct names: mypyc types one per exception name)
        failed = other
    if pool is not None:
        pool.release(ex)
    elif not reads:
        state.admission.release()
    if not reads and counted:
        metrics.in_flight.dec()
    try:
        if cut.needs_charge(ex):  # the backend slot is free: counting may take a moment
            await cut.charge(state, ex, call.path, None if info is None else info.body)
    finally:
        slots.leave(state, ex)  # still active until charged: a drain waits for the count
    if failed is not None:
        raise failed


def _retryable(call: Call, ex: Exchange) -> bool:
    """A pool's request that failed before the client saw a byte of the answer (no
    connection, one that broke, a 503 while loading: gateway/upstream/pool.py RETRYABLE),
    and was not sent again already. Never once a stream has begun."""
    return not (call.started or ex.retried or ex.member < 0 or ex.shutdown or ex.timed_out) \
        and ex.upstream_failure in RETRYABLE


async def _retry(call: Call, state: AppState, ex: Exchange, raw: bytes,
                 info: RequestInfo | None) -> None:
    """``_exchange`` once more, on another upstream of the pool than the one that failed."""
    pool = state.pool
    assert pool is not None
    failed = ex.member
    pool.release(ex)  # its failure counts against that upstream
    ex.member, ex.retried = -1, True
    ex.upstream_status, ex.upstream_failure, ex.end, ex.error = 0, None, None, None
    ex.forwarded = False  # the work it began died with it: the retry's answer is the charge
    await slots.wait_for_slot(state, ex, False, None if info is None else info.body, failed)
    await _exchange(call, state, ex, raw, info)


def _answered_here(call: Call) -> bool:
    """What the gateway answers itself, or refuses before anything else."""
    state: AppState = call.state
    if call.method == "GET" and call.path == "/v1/models" and state.models.mode in LISTED_HERE:
        # several models: our own listing (the router's would show paths and argv; a pool's
        # is the union of its upstreams')
        _respond(call, 200, json.dumps(state.models.listing()).encode(), "application/json")
        return True
    if retrieves_model(call):
        _retrieve_model(call, state, call.path.removeprefix("/v1/models/"))
        return True
    if call.path in INFERENCE_ROUTES and call.method != "POST":
        # llama-server would answer its own 404 (with a numeric code): the route exists
        raise MethodNotAllowed(f"{call.path} takes POST, not {call.method}",
                               headers={"Allow": "POST"})
    return False


def _resolve_model(call: Call, state: AppState, ex: Exchange, info: RequestInfo) -> None:
    """A validated request's model: one served (an alias's, the default), one the key may
    use, or, for inference, its fallback."""
    inference = call.path not in validation.UTILITY
    if inference:
        ex.inference, ex.stream, ex.max_tokens = True, info.stream, info.max_tokens
        ex.n, ex.tasks = info.n, info.tasks
    if state.config.log_prompts:
        ex.prompt = prompt_of(call.path, info.body)
    ex.model = model = state.models.require(info.model)
    key = call.key
    auth.check_model(key, ex, call.method, state)  # the model asked for, before any fallback
    state.activity.touch()
    if not inference:  # tokenizing with a fallback's vocabulary would answer wrongly
        state.models.touch(model)
        return
    # 503 while it cools down, or its fallback (only one the key may use too)
    routed = state.models.route(model, lambda m: auth.may_use(key, m))
    ex.model = routed
    if routed != model:
        ex.fallback = routed


def _resolve_named_model(call: Call, state: AppState, ex: Exchange) -> bytes:
    """Any other route whose body names a model (count_tokens, and whatever llama-server adds)
    runs that model: it must be one served, and one the key may use. The body to forward."""
    if call.method in ("GET", "HEAD") and call.path in llama_routes.READS:
        llama_routes.name_in_query(call, state, ex)
        return call.body
    if call.method != "POST" or not call.body:
        return call.body
    named = model_of(call.body, call.headers.get("content-type"))
    if named is not None or call.path in METERED_FORMS:
        ex.model = model = state.models.require(named)
        if named is not None and state.models.renames(named, model) \
                and call.body.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"{":
            # an alias (a JSON body; a form's is sent as it is): the router picks by name
            return json.dumps({**validation.parse_json(call.body), "model": model}).encode()
    if call.path in METERED_FORMS:
        ex.inference = True  # it generates, and its answer carries usage
        state.activity.touch()
    return call.body


def _forwarded_body(call: Call, state: AppState, ex: Exchange, info: RequestInfo | None) -> bytes:
    """The body as the backend gets it: the client's, byte for byte, unless it is fetched as
    a stream (to be folded) or goes to a fallback model."""
    if info is None:
        return call.body
    if not info.stream and call.path in unstream.ROUTES and info.body is not None and (
            info.max_tokens is None or info.tasks > 1
            or info.max_tokens >= state.config.stream_to_backend_min_tokens):
        # see gateway/upstream/fold.py; short answers skip it: llama-server streams cost it
        # per token, and what a short one can run on for after a hang-up is bounded.
        # Several tasks never do: llama-server's own body counts one task's tokens
        ex.unstream = True
        return unstream.stream_body({**info.body, "model": ex.model}, call.path)
    if ex.fallback is not None or state.models.renames(info.model, ex.model):
        # another model answers, or a router must be told the one resolved (an alias's,
        # the default where the client named none)
        return json.dumps({**(info.body or {}), "model": ex.model}).encode()
    return call.body


def _may_proceed(call: Call, state: AppState, ex: Exchange) -> float:
    """The key's allowlist and limits, the backend's readiness; the request's timeout."""
    auth.check_model(call.key, ex, call.method, state)  # 403 for a model outside the allowlist
    ratelimit.reserve_tokens(state, call.ticket, ex)  # tokens/min; the edge settles it
    timeout = slots.request_timeout(call.headers.get("x-request-timeout"),
                                    state.config.request_timeout)
    status = state.upstream.status
    if not status.ready:
        status = state.upstream.refresh()
    if state.draining or status.draining:
        raise BackendUnavailable("the server is shutting down", code="shutting_down", retry_after=5)
    if not status.ready:
        # a crash-looping backend's circuit stays open for a minute: say when it is tried again
        wait = 5.0 if status.retry_at is None else max(1.0, status.retry_at - time.time())
        raise BackendUnavailable(f"the backend is not ready ({status.state})", retry_after=wait)
    return timeout


def _cut_short(call: Call, ex: Exchange, timeout: float) -> None:
    """A request cancelled by shutdown or its timeout: a final event, a 503 or a 504."""
    ex.end = "shutdown" if ex.shutdown else "timeout"
    if ex.shutdown:
        _end_stream(call, ex, BackendUnavailable("the server is shutting down",
                                                 code="shutting_down", retry_after=5))
    elif call.started:  # headers already sent: end the stream with an event
        _end_stream(call, ex, UpstreamTimeout(f"the request exceeded its timeout of {timeout:g}s"))
    else:
        raise UpstreamTimeout(f"the backend did not answer within {timeout:g}s") from None


def retrieves_model(call: Call) -> bool:
    """GET /v1/models/{model}: answered by ``handle`` itself, never forwarded."""
    return call.method == "GET" and call.path.startswith("/v1/models/")


def _retrieve_model(call: Call, state: AppState, name: str) -> None:
    """GET /v1/models/{model} (the SDK's models.retrieve), which llama-server lacks."""
    # only a name the catalog lists (an empty catalog accepts any name for a request; an
    # alias, or any name with one model, reaches a model but is none)
    if state.models.resolve(name) != name or name not in state.models.names \
            or not auth.may_use(call.key, name):
        raise NotFound(f"model '{name}' does not exist", code="model_not_found", param="model")
    _respond(call, 200, json.dumps({"id": name, "object": "model", "created": 0,
                                    "owned_by": "llamagate"}).encode())


def _end_stream(call: Call, ex: Exchange, error: GatewayError) -> None:
    """Close a request cut short by shutdown or its timeout: an SSE error event, or the error."""
    ex.error = error.code
    if not call.started:
        raise error
    call.conn.write(call.frame(sse_error_event(error)))
    call.finish()


def _respond(call: Call, status: int, body: bytes, content_type: str | None = "application/json",
             headers: Mapping[str, str] | None = None) -> None:
    """A whole answer; the key's limits are settled first, so its headers include this one."""
    key = call.key
    if key is not None:
        if key.models is not None and status == 200 and call.path == "/v1/models":
            body = auth.filter_models(body, key)
        if call.ticket is not None:
            ratelimit.settle(call.state, call.ticket, key, call.ex)
    call.respond(status, body, content_type, headers)


async def _exchange(call: Call, state: AppState, ex: Exchange, raw: bytes,
                    info: RequestInfo | None) -> None:
    """forward → relay (streamed, folded or whole) → meter."""
    resp = await forward.send(call, state, ex, raw)
    if resp.status == 401:
        ex.upstream_failure = "auth"
        backend_errors.refused_key(resp)
    if resp.status == 503 and ex.member >= 0 and not ex.retried:
        # a pool's upstream that is loading: sent to another instead (the caller's retry)
        ex.upstream_failure = "loading"
        resp.close()
        raise BackendUnavailable("the upstream is loading its model", retry_after=2)
    if resp.status == 500 and info is not None and info.body is not None \
            and state.models.mode == "router":
        resp = await forward.after_failed_load(call, state, ex, resp, info)
    try:
        if resp.status == 200 and resp.content_type.startswith("text/event-stream"):
            if ex.stream:
                await sse.relay(call, resp, ex)
                return
            if ex.unstream:
                await _fold(call, resp, ex)
                return
        try:
            body = await resp.read()
        except BackendBroken as exc:
            ex.end, ex.upstream_failure = "backend_failed", "broken"
            raise BackendUnavailable(str(exc), retry_after=2) from None
        _meter_whole(ex, resp.status, body)
        if ex.tokens is None and resp.status == 200 and call.path in cut.COUNTED_AFTER:
            # an answer without counts (llama-server's native embeddings): its prompt is
            # counted now, before the answer settles the key's limits and usage
            await cut.charge(state, ex, call.path, None if info is None else info.body)
        if resp.status >= 400 and resp.content_type.startswith("application/json"):
            body = backend_errors.backend_error(resp.status, body)
        _respond(call, resp.status, body, resp.content_type or None, resp.headers)
    finally:
        if not ex.completed:
            resp.close()  # unfinished: drop the connection so llama-server stops the work


def _meter_whole(ex: Exchange, status: int, body: bytes) -> None:
    # no first_byte_at: llama-server sends a whole answer's head with its last token,
    # so this request has no time to first token to observe
    ex.completed = True
    if ex.inference and status == 200:
        # several tasks answered natively (/completion with n > 1 or several prompts): a
        # JSON array of results, each with its counts
        ex.tokens = tokens_from_results(body, ex.n) if ex.tasks > 1 and body[:1] == b"[" \
            else tokens_from_body(body)
        ex.finish = finish_reason(body)
    elif ex.inference and 400 <= status < 500:
        ex.tokens = (0, 0)  # refused before any work: its reservation is not a charge


async def _fold(call: Call, resp: Response, ex: Exchange) -> None:
    """A non-streaming request's answer, read as a stream and sent as one body."""
    collector = unstream.collector_for(call.path, ex.n)
    marker = cut.MARKERS.get(call.path)
    try:
        while chunk := await resp.read_chunk():
            if ex.first_byte_at is None:  # the backend's first event: its time to first token
                ex.first_byte_at = time.monotonic()
            collector.feed(chunk)
            if marker is not None:  # a split event may be counted late or not at all: fine
                ex.generated += cut.token_events(chunk, marker)
        body = collector.result()
    except BackendBroken as exc:
        ex.end, ex.upstream_failure = "backend_failed", "broken"
        raise BackendUnavailable(str(exc), retry_after=2) from None
    except unstream.UpstreamError as exc:
        # llama-server reported an error after it started streaming: answer as it would have
        ex.completed = True
        _respond(call, 500, backend_errors.backend_error(500, json.dumps(exc.body).encode()))
        return
    except ValueError:
        raise BackendUnavailable("the backend sent an unreadable stream", retry_after=2) from None
    ex.completed = True
    ex.tokens = tokens_from_body(body)
    ex.finish = finish_reason(body)
    _respond(call, 200, body, headers=resp.headers)
