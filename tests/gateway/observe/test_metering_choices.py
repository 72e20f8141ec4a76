"""Usage with `n` > 1: llama-server ends each choice with a final event of its own, and every
choice's tokens are metered (gateway/observe/metering.py). The streams below are what llama-server
(0.3.36's) sent for the tiny model with n=2, max_tokens=2, byte for byte."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from backend.argv import ServerSpec
from backend.supervisor import Supervisor
from core import runtime
from gateway.observe.metering import ChoiceTally, tokens_from_body, tokens_from_stream
from gateway.upstream.fold import Collector
from tests.support.gateway import Gateway, serve_gateway
from tests.support.metrics import scrape
from tests.support.service import free_port, llama_server

# chat, stream_options.include_usage: after each choice's finish chunk a usage chunk
# (choices: []) with that choice's usage and timings, each with the whole prompt
CHAT_USAGE = (
    b'data: {"choices":[{"finish_reason":null,"index":1,"delta":{"role":"assistant","content":null'
    b'}}],"created":1796405587,"id":"chatcmpl-Ng1heOGfjIpszcyMDyS6nFyhoF6qPR6V","model":"/tmp/cap/'
    b'tiny.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":1,"delta":{"content":" ple"}}],"created":179'
    b'6405587,"id":"chatcmpl-Ng1heOGfjIpszcyMDyS6nFyhoF6qPR6V","model":"/tmp/cap/tiny.gguf","syste'
    b'm_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null'
    b'}}],"created":1796405587,"id":"chatcmpl-Ng1heOGfjIpszcyMDyS6nFyhoF6qPR6V","model":"/tmp/cap/'
    b'tiny.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" he"}}],"created":1796'
    b'405587,"id":"chatcmpl-Ng1heOGfjIpszcyMDyS6nFyhoF6qPR6V","model":"/tmp/cap/tiny.gguf","system'
    b'_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":1,"delta":{"content":" qu"}}],"created":1796'
    b'405587,"id":"chatcmpl-Ng1heOGfjIpszcyMDyS6nFyhoF6qPR6V","model":"/tmp/cap/tiny.gguf","system'
    b'_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":"length","index":1,"delta":{}}],"created":1796405587,"id"'
    b':"chatcmpl-Ng1heOGfjIpszcyMDyS6nFyhoF6qPR6V","model":"/tmp/cap/tiny.gguf","system_fingerprin'
    b't":"b1-0c1e570","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[],"created":1796405587,"id":"chatcmpl-Ng1heOGfjIpszcyMDyS6nFyhoF6qPR6V","m'
    b'odel":"/tmp/cap/tiny.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk'
    b'","usage":{"completion_tokens":2,"prompt_tokens":12,"total_tokens":14,"prompt_tokens_details'
    b'":{"cached_tokens":11}},"timings":{"cache_n":11,"prompt_n":1,"prompt_ms":0.408,"prompt_per_t'
    b'oken_ms":0.408,"prompt_per_second":2450.9803921568628,"predicted_n":2,"predicted_ms":0.905,"'
    b'predicted_per_token_ms":0.905,"predicted_per_second":1104.9723756906078}}\n\n'
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1796405587,"id"'
    b':"chatcmpl-Ng1heOGfjIpszcyMDyS6nFyhoF6qPR6V","model":"/tmp/cap/tiny.gguf","system_fingerprin'
    b't":"b1-0c1e570","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[],"created":1796405587,"id":"chatcmpl-Ng1heOGfjIpszcyMDyS6nFyhoF6qPR6V","m'
    b'odel":"/tmp/cap/tiny.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk'
    b'","usage":{"completion_tokens":2,"prompt_tokens":12,"total_tokens":14,"prompt_tokens_details'
    b'":{"cached_tokens":11}},"timings":{"cache_n":11,"prompt_n":1,"prompt_ms":0.431,"prompt_per_t'
    b'oken_ms":0.431,"prompt_per_second":2320.185614849188,"predicted_n":2,"predicted_ms":0.94,"pr'
    b'edicted_per_token_ms":0.94,"predicted_per_second":1063.8297872340427}}\n\n'
    b"data: [DONE]\n\n"
)

# chat without include_usage: `timings` in each choice's finish chunk
CHAT_BARE = (
    b'data: {"choices":[{"finish_reason":null,"index":1,"delta":{"role":"assistant","content":null'
    b'}}],"created":1796405587,"id":"chatcmpl-C5BHQyNWHg3utDdwpcEFlDvzNjBcRMed","model":"/tmp/cap/'
    b'tiny.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":1,"delta":{"content":" time"}}],"created":17'
    b'96405587,"id":"chatcmpl-C5BHQyNWHg3utDdwpcEFlDvzNjBcRMed","model":"/tmp/cap/tiny.gguf","syst'
    b'em_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null'
    b'}}],"created":1796405587,"id":"chatcmpl-C5BHQyNWHg3utDdwpcEFlDvzNjBcRMed","model":"/tmp/cap/'
    b'tiny.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" all"}}],"created":179'
    b'6405587,"id":"chatcmpl-C5BHQyNWHg3utDdwpcEFlDvzNjBcRMed","model":"/tmp/cap/tiny.gguf","syste'
    b'm_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":1,"delta":{"content":"v"}}],"created":179640'
    b'5587,"id":"chatcmpl-C5BHQyNWHg3utDdwpcEFlDvzNjBcRMed","model":"/tmp/cap/tiny.gguf","system_f'
    b'ingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":"length","index":1,"delta":{}}],"created":1796405587,"id"'
    b':"chatcmpl-C5BHQyNWHg3utDdwpcEFlDvzNjBcRMed","model":"/tmp/cap/tiny.gguf","system_fingerprin'
    b't":"b1-0c1e570","object":"chat.completion.chunk","timings":{"cache_n":11,"prompt_n":1,"promp'
    b't_ms":35.674,"prompt_per_token_ms":35.674,"prompt_per_second":28.03161966698436,"predicted_n'
    b'":2,"predicted_ms":1.025,"predicted_per_token_ms":1.025,"predicted_per_second":975.609756097'
    b"5611}}\n\n"
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"\'"}}],"created":17964'
    b'05587,"id":"chatcmpl-C5BHQyNWHg3utDdwpcEFlDvzNjBcRMed","model":"/tmp/cap/tiny.gguf","system_'
    b'fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1796405587,"id"'
    b':"chatcmpl-C5BHQyNWHg3utDdwpcEFlDvzNjBcRMed","model":"/tmp/cap/tiny.gguf","system_fingerprin'
    b't":"b1-0c1e570","object":"chat.completion.chunk","timings":{"cache_n":11,"prompt_n":1,"promp'
    b't_ms":35.888,"prompt_per_token_ms":35.888,"prompt_per_second":27.864467231386538,"predicted_'
    b'n":2,"predicted_ms":0.881,"predicted_per_token_ms":0.881,"predicted_per_second":1135.0737797'
    b"956867}}\n\n"
    b"data: [DONE]\n\n"
)

# text completion: usage and timings in each choice's finish chunk
TEXT = (
    b'data: {"choices":[{"text":" ot","index":1,"logprobs":null,"finish_reason":null}],"created":1'
    b'796405587,"model":"/tmp/cap/tiny.gguf","system_fingerprint":"b1-0c1e570","object":"text_comp'
    b'letion","id":"chatcmpl-c6oF6otPjbJscLCSBJzfX2uvW3g06rJR"}\n\n'
    b'data: {"choices":[{"text":"U","index":0,"logprobs":null,"finish_reason":null}],"created":179'
    b'6405587,"model":"/tmp/cap/tiny.gguf","system_fingerprint":"b1-0c1e570","object":"text_comple'
    b'tion","id":"chatcmpl-c6oF6otPjbJscLCSBJzfX2uvW3g06rJR"}\n\n'
    b'data: {"choices":[{"text":" her","index":1,"logprobs":null,"finish_reason":null}],"created":'
    b'1796405587,"model":"/tmp/cap/tiny.gguf","system_fingerprint":"b1-0c1e570","object":"text_com'
    b'pletion","id":"chatcmpl-c6oF6otPjbJscLCSBJzfX2uvW3g06rJR"}\n\n'
    b'data: {"choices":[{"text":"","index":1,"logprobs":null,"finish_reason":"length"}],"created":'
    b'1796405587,"model":"/tmp/cap/tiny.gguf","system_fingerprint":"b1-0c1e570","object":"text_com'
    b'pletion","usage":{"completion_tokens":2,"prompt_tokens":3,"total_tokens":5,"prompt_tokens_de'
    b'tails":{"cached_tokens":2}},"id":"chatcmpl-c6oF6otPjbJscLCSBJzfX2uvW3g06rJR","timings":{"cac'
    b'he_n":2,"prompt_n":1,"prompt_ms":0.555,"prompt_per_token_ms":0.555,"prompt_per_second":1801.'
    b'8018018018017,"predicted_n":2,"predicted_ms":0.865,"predicted_per_token_ms":0.865,"predicted'
    b'_per_second":1156.0693641618498}}\n\n'
    b'data: {"choices":[{"text":" ther","index":0,"logprobs":null,"finish_reason":null}],"created"'
    b':1796405587,"model":"/tmp/cap/tiny.gguf","system_fingerprint":"b1-0c1e570","object":"text_co'
    b'mpletion","id":"chatcmpl-c6oF6otPjbJscLCSBJzfX2uvW3g06rJR"}\n\n'
    b'data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],"created":'
    b'1796405587,"model":"/tmp/cap/tiny.gguf","system_fingerprint":"b1-0c1e570","object":"text_com'
    b'pletion","usage":{"completion_tokens":2,"prompt_tokens":3,"total_tokens":5,"prompt_tokens_de'
    b'tails":{"cached_tokens":2}},"id":"chatcmpl-c6oF6otPjbJscLCSBJzfX2uvW3g06rJR","timings":{"cac'
    b'he_n":2,"prompt_n":1,"prompt_ms":0.579,"prompt_per_token_ms":0.579,"prompt_per_second":1727.'
    b'1157167530225,"predicted_n":2,"predicted_ms":0.901,"predicted_per_token_ms":0.901,"predicted'
    b'_per_second":1109.8779134295228}}\n\n'
    b"data: [DONE]\n\n"
)

PROMPT = {"chat": 12, "text": 3}  # what each choice's usage/timings say, the prompt's tokens


@pytest.mark.parametrize("stream,chat,prompt", [
    (CHAT_USAGE, True, PROMPT["chat"]), (TEXT, False, PROMPT["text"])])
def test_a_folded_body_counts_every_choice_and_the_prompt_once(
        stream: bytes, chat: bool, prompt: int) -> None:
    collector = Collector(chat=chat, n=2)
    collector.feed(stream)
    body = json.loads(collector.result())
    assert len(body["choices"]) == 2
    assert body["usage"]["completion_tokens"] == 4
    assert body["usage"]["prompt_tokens"] == prompt
    assert body["usage"]["total_tokens"] == prompt + 4
    assert tokens_from_body(collector.result()) == (prompt, 4)


@pytest.mark.parametrize("stream,prompt", [
    (CHAT_USAGE, PROMPT["chat"]), (CHAT_BARE, PROMPT["chat"]), (TEXT, PROMPT["text"])])
@pytest.mark.parametrize("size", [1, 7, 100, 1 << 16])
def test_a_tally_fed_chunk_by_chunk_counts_every_choice(stream: bytes, prompt: int,
                                                        size: int) -> None:
    tally = ChoiceTally(2)  # n=2, one prompt
    for at in range(0, len(stream), size):
        tally.feed(stream[at:at + size])
    assert tally.result() == (prompt, 4)


def test_one_choice_is_counted_as_before() -> None:
    final = (b'data: {"choices":[],"object":"chat.completion.chunk","usage":{"completion_tokens":3,'
             b'"prompt_tokens":12,"total_tokens":15},"timings":{"cache_n":11,"prompt_n":1,'
             b'"predicted_n":3}}\n\ndata: [DONE]\n\n')
    assert tokens_from_stream(b"", final) == (12, 3)
    collector = Collector(chat=True)
    collector.feed(final)
    assert json.loads(collector.result())["usage"]["completion_tokens"] == 3


@pytest.fixture
async def backend_url(tmp_path: Path, tiny_model: Path) -> AsyncIterator[tuple[str, str]]:
    key = secrets.token_urlsafe(16)
    key_file = tmp_path / "backend.key"
    runtime.write_secret(key_file, key)
    spec = ServerSpec(binary=llama_server(), model_path=tiny_model, alias="tiny", port=free_port(),
                      api_key_file=key_file, ctx=4096, parallel=2)
    supervisor = Supervisor(spec, start_timeout=60, stop_grace=5)
    await supervisor.start()
    try:
        yield supervisor.url, key
    finally:
        await supervisor.stop()


@pytest.fixture
async def gateway(backend_url: tuple[str, str]) -> AsyncIterator[Gateway]:
    url, key = backend_url
    async with serve_gateway(url, {}, models=("tiny",), backend_key=key) as gw:
        yield gw


@pytest.mark.llama_server
@pytest.mark.parametrize("max_tokens", [100, 7])  # 7: under STREAM_TO_BACKEND_MIN_TOKENS
async def test_a_non_stream_answer_with_two_choices_is_metered_whole(
        gateway: Gateway, http: aiohttp.ClientSession, max_tokens: int) -> None:
    # fetched as a stream and folded, however short: llama-server's own body counts one choice
    async with gateway.sdk() as client:
        reply = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "tell me a story"}],
            max_tokens=max_tokens, n=2)
    assert reply.usage is not None
    assert [c.finish_reason for c in reply.choices] == ["length", "length"]
    assert reply.usage.completion_tokens == 2 * max_tokens
    _, samples = await scrape(http, gateway.url)
    key = {"model": "tiny", "key_id": "-"}
    assert samples.get_value("llamagate_completion_tokens_total", **key) == 2 * max_tokens
    assert samples.get_value("llamacpp_tokens_predicted_total", model="tiny") == 2 * max_tokens
    # the prompt was evaluated once (a fresh llama-server: none of it from the cache)
    assert samples.get_value("llamagate_prompt_tokens_total", **key) == reply.usage.prompt_tokens
    assert samples.get_value("llamacpp_prompt_tokens_total", model="tiny") == (
        reply.usage.prompt_tokens)


@pytest.mark.llama_server
@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_stream_with_two_choices_is_metered_whole(
        gateway: Gateway, http: aiohttp.ClientSession, include_usage: bool) -> None:
    """The choice that finishes first has its final event long before the stream's tail."""
    async with gateway.sdk() as client:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "tell me a story"}],
            max_tokens=150, n=2, stream=True,
            stream_options={"include_usage": True} if include_usage else None)
        finished = [chunk.choices[0].finish_reason async for chunk in stream
                    if chunk.choices and chunk.choices[0].finish_reason]
    assert finished == ["length", "length"]
    _, samples = await scrape(http, gateway.url)
    key = {"model": "tiny", "key_id": "-"}
    assert samples.get_value("llamagate_completion_tokens_total", **key) == 300
    assert samples.get_value("llamagate_prompt_tokens_total", **key) == samples.get_value(
        "llamacpp_prompt_tokens_total", model="tiny")
