"""Optional OpenTelemetry export (OTLP over HTTP): a trace per request and the request
metrics, pushed, so they outlive a serverless worker that is scaled away between two
Prometheus scrapes. Prometheus pull (/metrics) is unchanged.

On when OTEL_EXPORTER_OTLP_ENDPOINT is set (core/config.py reads it; every other OTEL_*
variable, from the headers to the export intervals and OTEL_SERVICE_NAME, is the SDK's
own). Nothing is done while a request runs: its spans are built when it is recorded, from
the times the exchange kept, so a request costs nothing more with export off and no
awaits or context switches with it on.

Spans: one SERVER span per request (`POST /v1/chat/completions`), child of the client's
`traceparent` when it sent one, with children for the wait for a backend slot (`queue`),
the backend's answer head (`upstream`: connect, send, and for a whole answer the
generation), the time to the first token (`first token`) and the stream after it
(`stream`). Metrics follow the OpenTelemetry HTTP and GenAI conventions' names.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AnyValue

from gateway.exchange import Exchange
from gateway.observe.process_metrics import llamagate_version

_PROPAGATOR = TraceContextTextMapPropagator()


class Telemetry:
    """The process's tracer and meter providers and the instruments record() feeds."""

    def __init__(self) -> None:
        resource = Resource.create({"service.version": llamagate_version(),
                                    "service.instance.id": f"{socket.gethostname()}:{os.getpid()}"})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "llamagate"}))
        self.tracer_provider = TracerProvider(resource=resource)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.meter_provider = MeterProvider(
            resource=resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())])
        self.tracer = self.tracer_provider.get_tracer("llamagate")
        meter = self.meter_provider.get_meter("llamagate")
        self.requests = meter.create_counter(
            "llamagate.requests", unit="{request}", description="Requests answered")
        self.duration = meter.create_histogram(
            "http.server.request.duration", unit="s",
            description="Time from request to the end of the response")
        self.ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time from request to the backend's first event")
        self.per_token = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="A stream's mean gap between tokens after the first")
        self.tokens = meter.create_counter(
            "gen_ai.token.usage", unit="{token}", description="Tokens read and generated")

    def record(self, ex: Exchange, status: int, method: str, ended: str) -> None:
        now_mono, now_ns = time.monotonic(), time.time_ns()

        def wall(mono: float) -> int:
            return now_ns - int((now_mono - mono) * 1e9)

        model = ex.model
        attrs: dict[str, AnyValue] = {"http.route": ex.route, "http.response.status_code": status,
                                      "gen_ai.request.model": model, "llamagate.ended": ended}
        self.requests.add(1, attrs)
        self.duration.record(now_mono - ex.started, attrs)
        if ex.ttft is not None and ex.inference:
            self.ttft.record(ex.ttft, {"gen_ai.request.model": model})
        tokens = ex.tokens
        if tokens is not None:
            self.tokens.add(tokens[0], {"gen_ai.request.model": model, "gen_ai.token.type": "input"})
            self.tokens.add(tokens[1], {"gen_ai.request.model": model,
                                        "gen_ai.token.type": "output"})
            if ex.stream and ex.completed and ex.first_byte_at is not None and tokens[1] > 1:
                self.per_token.record((now_mono - ex.first_byte_at) / (tokens[1] - 1),
                                      {"gen_ai.request.model": model})
        self._spans(ex, status, method, ended, wall, now_ns)

    def _spans(self, ex: Exchange, status: int, method: str, ended: str,
               wall: Callable[[float], int], now_ns: int) -> None:
        parent = _parent(ex.traceparent)
        span = self.tracer.start_span(
            f"{method} {ex.route}", context=parent, kind=SpanKind.SERVER,
            start_time=wall(ex.started), attributes={
                "http.request.method": method, "http.route": ex.route,
                "http.response.status_code": status, "gen_ai.request.model": ex.model,
                "llamagate.request_id": ex.request_id, "llamagate.key_id": ex.key_id,
                "llamagate.ended": ended, "llamagate.stream": ex.stream})
        if ex.tokens is not None:
            span.set_attribute("gen_ai.usage.input_tokens", ex.tokens[0])
            span.set_attribute("gen_ai.usage.output_tokens", ex.tokens[1])
        if status >= 500 or ended not in ("completed", "client_closed"):
            span.set_status(Status(StatusCode.ERROR, ex.error or ended))
        inside = trace.set_span_in_context(span)
        sent = ex.forwarded_at
        if sent is not None:
            if ex.queue_wait is not None:
                self._child("queue", inside, wall(sent - ex.queue_wait), wall(sent))
            if ex.answered_at is not None:
                self._child("upstream", inside, wall(sent), wall(ex.answered_at))
            if ex.first_byte_at is not None:
                self._child("first token", inside, wall(sent), wall(ex.first_byte_at))
                if ex.stream:
                    self._child("stream", inside, wall(ex.first_byte_at), now_ns)
        span.end(end_time=now_ns)

    def _child(self, name: str, parent: Context, start: int, end: int) -> None:
        self.tracer.start_span(name, context=parent, start_time=start).end(end_time=end)

    def shutdown(self) -> None:
        """Export what is buffered (at most the SDK's export timeout), then stop."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _parent(traceparent: str | None) -> Context | None:
    if traceparent is None:
        return None
    carrier: Mapping[str, str] = {"traceparent": traceparent}
    return _PROPAGATOR.extract(carrier)
