"""OpenTelemetry export (gateway/observe/otel.py) against an OTLP/HTTP receiver that decodes
what it is sent with the protocol's own protobuf messages: a trace per request, child of the
client's traceparent, with its stages as child spans; the request metrics pushed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.support.fake_llama import FakeLlama
from tests.support.gateway import serve_gateway
from tests.support.wait import wait_until

CHAT = "/v1/chat/completions"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@dataclass
class Receiver:
    url: str = ""
    spans: list[dict[str, object]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    got = Receiver()

    async def traces(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in message.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    got.spans.append({
                        "name": span.name, "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                        "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                        "service": service.get("service.name"),
                        "attrs": {a.key: a.value for a in span.attributes}})
        return web.Response(content_type="application/x-protobuf")

    async def metrics(request: web.Request) -> web.Response:
        message = ExportMetricsServiceRequest.FromString(await request.read())
        for resource_metrics in message.resource_metrics:
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    if metric.HasField("sum"):
                        got.metrics[metric.name] = sum(p.as_int or p.as_double
                                                       for p in metric.sum.data_points)
                    elif metric.HasField("histogram"):
                        got.metrics[metric.name] = sum(p.count for p in metric.histogram.data_points)
        return web.Response(content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    app.router.add_post("/v1/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    got.url = f"http://127.0.0.1:{port}"
    try:
        yield got
    finally:
        await runner.cleanup()


async def test_each_request_is_a_trace_with_its_stages_and_the_metrics_are_pushed(
        receiver: Receiver, fake: FakeLlama, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the SDK reads its own variables from the environment; ours is read by load_config
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    async with serve_gateway(fake.url, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}) as gw:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with http.post(gw.url + CHAT, json=body, headers={"traceparent": TRACEPARENT}) as r:
            assert r.status == 200
            await r.read()
        await wait_until(lambda: any(s["name"] == f"POST {CHAT}" for s in receiver.spans),
                         "the request's span", within=10)
        await wait_until(lambda: receiver.metrics.get("llamagate.requests", 0) >= 1,
                         "the request counter pushed", within=10)
    [server] = [s for s in receiver.spans if s["name"] == f"POST {CHAT}"]
    assert server["trace_id"] == TRACE_ID and server["parent"] == "00f067aa0ba902b7"
    assert server["service"] == "llamagate"
    attrs = server["attrs"]
    assert isinstance(attrs, dict)
    assert attrs["http.response.status_code"].int_value == 200
    assert attrs["gen_ai.request.model"].string_value == "tiny"
    assert attrs["gen_ai.usage.output_tokens"].int_value > 0
    children = {s["name"]: s for s in receiver.spans if s["parent"] == server["span_id"]}
    assert set(children) == {"queue", "upstream", "first token", "stream"}
    for child in children.values():  # inside the request, in time and in the trace
        assert child["trace_id"] == TRACE_ID
        assert server["start"] <= child["start"] <= child["end"] <= server["end"]  # type: ignore[operator]
    assert receiver.metrics["http.server.request.duration"] >= 1
    assert receiver.metrics["gen_ai.token.usage"] > 0


async def test_without_the_endpoint_nothing_is_loaded_or_sent(
        fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    async with serve_gateway(fake.url, {}) as gw:
        assert gw.state.telemetry is None
        async with http.post(gw.url + CHAT, json={"model": "tiny", "messages": [
                {"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
