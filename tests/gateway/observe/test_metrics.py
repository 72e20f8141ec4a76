"""/metrics in front of the fake backend: request, token and rejection counters,
llama-server's families merged with a model label, JSON on request, promtool-clean."""

from __future__ import annotations

import json

import aiohttp
from openai.types.chat import ChatCompletionMessageParam

from gateway.observe.metrics import label_backend_metrics
from tests.gateway.conftest import StartGateway
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway
from tests.support.metrics import Samples, promtool_check, scrape

CHAT = "/v1/chat/completions"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


async def _traffic(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.post(gateway.url + CHAT, json={"messages": MESSAGES, "max_tokens": 5}) as r:
        assert r.status == 200
    async with http.post(gateway.url + CHAT, json={"messages": MESSAGES, "stream": True}) as r:
        await r.read()
    # one model: any name reaches it (issue 26), and is counted as that model's request
    async with http.post(gateway.url + CHAT, json={"messages": MESSAGES, "model": "nope",
                                                   "max_tokens": 5}) as r:
        assert r.status == 200


async def test_request_token_and_backend_metrics(gateway: Gateway, fake: FakeLlama,
                                                 http: aiohttp.ClientSession) -> None:
    await _traffic(gateway, http)
    text, samples = await scrape(http, gateway.url)
    labels = {"route": CHAT, "model": "tiny", "key_id": "-"}
    assert samples.get_value("llamagate_requests_total", ended="completed", status="200", **labels) == 3
    # the name a client sent is not a label value: cardinality stays bounded
    assert "nope" not in text
    # 5 and 5 from the replies' usage; 3 from the stream's final `timings` event
    assert samples.get_value("llamagate_completion_tokens_total", model="tiny", key_id="-") == 13
    assert samples.get_value("llamagate_prompt_tokens_total", model="tiny", key_id="-") == 21
    # the stream's; the short non-streaming answer came whole, with no first token to time
    assert samples.get_value("llamagate_time_to_first_token_seconds_count", model="tiny") == 1
    assert samples.get_value("llamagate_queue_wait_seconds_count") == 3
    assert samples.total("llamagate_request_duration_seconds_count", route=CHAT) == 3
    assert samples.get_value("llamagate_in_flight_requests") == 0
    assert samples.get_value("llamagate_queue_depth") == 0
    assert samples.get_value("llamagate_backend_up") == 1
    # llama-server's own families, with the model as a label and promtool-clean names
    # (llamacpp:* → llamacpp_*); scrapes are not requests
    assert samples.get_value("llamacpp_requests_processing", model="tiny") == 0
    assert samples.get_value("llamacpp_prompt_tokens_total", model="tiny") == 14
    assert "# TYPE llamacpp_n_tokens_max gauge" in text and "llamacpp:" not in text
    assert samples.total("llamagate_requests_total", route="/metrics") == 0
    # per request: end to end by model and status, tokens, why each ended, our own share
    assert samples.get_value("llamagate_request_duration_seconds_count", route=CHAT,
                             model="tiny", status="200") == 3
    assert samples.get_value("llamagate_request_completion_tokens_count", model="tiny") == 3
    assert samples.get_value("llamagate_request_completion_tokens_sum", model="tiny") == 13
    assert samples.get_value("llamagate_request_prompt_tokens_sum", model="tiny") == 21
    assert samples.total("llamagate_request_finish_reasons_total", model="tiny") == 3
    assert samples.get_value("llamagate_gateway_overhead_seconds_count", route=CHAT) == 3
    # one stream of 3 tokens: one mean gap observed
    assert samples.get_value("llamagate_inter_token_latency_seconds_count", model="tiny") == 1
    # the backend and this process, read at scrape time
    assert samples.get_value("llamagate_backend_restarts_total") == 0
    assert samples.total("llamagate_build_info") == 1
    assert samples.total("llamagate_process_resident_memory_bytes", process="gateway") > 0
    promtool_check(text)


async def test_backend_metric_names_as_llama_server_writes_them(
        start_gateway: StartGateway, fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    # for dashboards written against llama-server's own names (promtool lints them)
    gateway = await start_gateway(BACKEND_METRICS_NAMES="llamacpp")
    text, samples = await scrape(http, gateway.url)
    assert samples.get_value("llamacpp:prompt_tokens_total", model="tiny") == 14
    assert "llamacpp_" not in text and "# TYPE llamacpp:n_tokens_max gauge" in text


async def test_metrics_as_json(gateway: Gateway, fake: FakeLlama,
                               http: aiohttp.ClientSession) -> None:
    await _traffic(gateway, http)
    async with http.get(gateway.url + "/metrics", headers={"Accept": "application/json"}) as r:
        assert r.status == 200 and r.content_type == "application/json"
        families = await r.json()
    requests = families["llamagate_requests"]
    assert requests["type"] == "counter" and requests["help"]
    ok = [s for s in requests["samples"]
          if s["name"] == "llamagate_requests_total" and s["labels"]["status"] == "200"]
    assert [(s["labels"], s["value"]) for s in ok] == [
        ({"route": CHAT, "status": "200", "model": "tiny", "key_id": "-", "ended": "completed"},
         3.0)]
    backend = families["llamacpp_requests_processing"]
    assert backend["samples"] == [{"name": "llamacpp_requests_processing",
                                   "labels": {"model": "tiny"}, "value": 0.0}]
    assert families["llamagate_time_to_first_token_seconds"]["type"] == "histogram"
    json.dumps(families)  # plain JSON all the way down


async def test_backend_metrics_are_left_out_while_it_is_down(gateway: Gateway, fake: FakeLlama,
                                                             http: aiohttp.ClientSession) -> None:
    gateway.state.upstream.status.ready = False
    text, samples = await scrape(http, gateway.url)
    assert "llamacpp:" not in text
    assert samples.get_value("llamagate_backend_up") == 0
    promtool_check(text)


def test_label_backend_metrics() -> None:
    text = ('# HELP a:x_total help\n# TYPE a:x_total counter\na:x_total 3\n'
            '# TYPE a:max counter\na:max 9\n'
            'a:g{slot="1"} 2\na:e{} 1\n\n')
    kept = label_backend_metrics(text, 'ti"ny', keep_colons=True)
    assert kept.splitlines() == [
        "# HELP a:x_total help", "# TYPE a:x_total counter", 'a:x_total{model="ti\\"ny"} 3',
        "# TYPE a:max gauge", 'a:max{model="ti\\"ny"} 9',
        'a:g{model="ti\\"ny",slot="1"} 2', 'a:e{model="ti\\"ny"} 1']
    parsed = Samples.parse(kept)
    assert parsed.get_value("a:g", model='ti"ny', slot="1") == 2
    # by default the names lose their colons, and nothing else changes
    assert label_backend_metrics(text, 'ti"ny') == kept.replace("a:", "a_")
