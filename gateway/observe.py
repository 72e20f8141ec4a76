"""Metrics and the access log: one JSON line and one set of observations per
request, written when the response is finished (streams included)."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.exchange import Exchange, exchange_of
from gateway.metrics import GatewayMetrics
from gateway.state import APP_STATE

access_log = logging.getLogger("llamagate.access")

# probes and scrapes must not flood the log or the request metrics
_QUIET = frozenset({"/ping", "/health", "/health/live", "/health/ready", "/metrics"})


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in _QUIET:
        return await handler(request)
    state = request.app[APP_STATE]
    ex = exchange_of(request)
    status = 499  # client closed the request, unless we learn otherwise
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        ex.error = ex.error or "client_disconnected"
        raise
    except ConnectionResetError:
        ex.error = ex.error or "client_disconnected"
        raise
    finally:
        _record(state.metrics, ex, status, request)


def _record(metrics: GatewayMetrics, ex: Exchange, status: int, request: web.Request) -> None:
    duration = time.monotonic() - ex.started
    metrics.requests.labels(ex.route, str(status), ex.model, ex.key_id).inc()
    metrics.duration.labels(ex.route).observe(duration)
    if ex.queue_wait is not None:
        metrics.queue_wait.observe(ex.queue_wait)
    ttft = ex.ttft
    if ttft is not None and ex.inference:
        metrics.ttft.labels(ex.model).observe(ttft)
    if ex.tokens is not None:
        metrics.prompt_tokens.labels(ex.model, ex.key_id).inc(ex.tokens[0])
        metrics.completion_tokens.labels(ex.model, ex.key_id).inc(ex.tokens[1])
    fields = {
        # the id is also in the logging context; naming it here keeps the line complete
        # even if a handler formats the record later, outside this request's context
        "request_id": ex.request_id,
        "worker_pid": os.getpid(),  # which of GATEWAY_WORKERS served it
        "method": request.method, "route": ex.route, "status": status, "key_id": ex.key_id,
        "model": ex.model, "stream": ex.stream, "duration_ms": round(duration * 1000, 2),
        "ttft_ms": None if ttft is None else round(ttft * 1000, 2),
        "queue_ms": None if ex.queue_wait is None else round(ex.queue_wait * 1000, 2),
        "tokens_in": ex.tokens[0] if ex.tokens else None,
        "tokens_out": ex.tokens[1] if ex.tokens else None,
        "error": ex.error,
    }
    if ex.prompt is not None:  # set only with LOG_PROMPTS=true
        fields["prompt"] = ex.prompt
    access_log.info("request", extra=fields)
