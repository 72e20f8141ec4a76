"""The observe stage's end: when an answer is finished (streams included), one JSON access
line and one set of metric observations (gateway/pipeline.py opens the record)."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Final

from core.logs import info_fields
from gateway.exchange import Exchange
from gateway.observe.metrics import GatewayMetrics

if TYPE_CHECKING:  # imported only where export is on: the SDK is not loaded otherwise
    from gateway.observe.otel import Telemetry

access_log = logging.getLogger("llamagate.access")

# probes and scrapes must not flood the log or the request metrics
QUIET: Final = frozenset({"/ping", "/health", "/health/live", "/health/ready", "/metrics"})
# how a request ended (Exchange.end; None reads as completed): the answer was delivered
# whole, whatever its status, or the client left, the backend failed under it, its timeout
# or the shutdown grace ended it. Bounded: these are the label's only values.
ENDS: Final = ("completed", "client_closed", "backend_failed", "timeout", "shutdown")


def record(metrics: GatewayMetrics, ex: Exchange, status: int, method: str,
           telemetry: Telemetry | None = None) -> None:
    duration = time.monotonic() - ex.started
    model, key_id, tokens = ex.model, ex.key_id, ex.tokens
    ended = ex.end or "completed"
    if telemetry is not None:  # OTLP export on (gateway/observe/otel.py)
        telemetry.record(ex, status, method, ended)
    metrics.requests_for(ex.route, str(status), model, key_id, ended).inc()
    metrics.duration_for(ex.route, model, str(status)).observe(duration)
    if ex.forwarded_at is not None:
        metrics.overhead_for(ex.route).observe(
            ex.forwarded_at - ex.started - (ex.queue_wait or 0.0))
    if ex.queue_wait is not None:
        metrics.queue_wait.observe(ex.queue_wait)
    ttft = ex.ttft
    if ttft is not None and ex.inference:
        metrics.ttft_for(model).observe(ttft)
    if status < 400 and not ex.completed and ex.error is not None:
        # begun as a success, ended early: backend gone, timeout, drain, or the client left
        metrics.cut_short_for(ex.route, ex.error).inc()
    if tokens is not None:
        metrics.prompt_tokens_for(model, key_id).inc(tokens[0])
        metrics.completion_tokens_for(model, key_id).inc(tokens[1])
        if ex.inference:
            _per_request(metrics, ex, model, tokens[1])
    if not access_log.isEnabledFor(logging.INFO):
        return  # LOG_LEVEL above info: do not build a line nobody writes
    fields = {
        # the id is also in the logging context; naming it here keeps the line complete
        # even if a handler formats the record later, outside this request's context
        "request_id": ex.request_id,
        "worker_pid": os.getpid(),  # which of GATEWAY_WORKERS served it
        "method": method, "route": ex.route, "status": status, "key_id": key_id,
        "model": model, "stream": ex.stream, "duration_ms": round(duration * 1000, 2),
        "ttft_ms": None if ttft is None else round(ttft * 1000, 2),
        "queue_ms": None if ex.queue_wait is None else round(ex.queue_wait * 1000, 2),
        "tokens_in": tokens[0] if tokens else None,
        "tokens_out": tokens[1] if tokens else None,
        "ended": ended,
        "error": ex.error,
    }
    if ex.estimated:  # cut short with the backend unable to count its prompt (upstream/cut.py)
        fields["tokens_estimated"] = True
    if ex.prompt is not None:  # set only with LOG_PROMPTS=true
        fields["prompt"] = ex.prompt
    info_fields(access_log, "request", fields)


def _per_request(metrics: GatewayMetrics, ex: Exchange, model: str, completion: int) -> None:
    """An inference request's own distributions: its tokens, why it ended, and for a stream
    the mean gap between tokens after the first (from its first event to its end)."""
    tokens = ex.tokens
    assert tokens is not None
    metrics.request_prompt_tokens_for(model).observe(tokens[0])
    metrics.request_completion_tokens_for(model).observe(completion)
    if ex.finish is not None:
        metrics.finish_reasons_for(model, ex.finish).inc()
    if ex.stream and ex.completed and ex.first_byte_at is not None and completion > 1:
        metrics.inter_token_for(model).observe(
            (time.monotonic() - ex.first_byte_at) / (completion - 1))
