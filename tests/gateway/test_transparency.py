"""Drop-in (issue 26): a client written for llama-server works unchanged through the gateway.
The same requests go to a real llama-server directly and through `llamagate serve` in front
of that same llama-server (auth off, BACKEND_URL, BACKEND_API_KEY): every llama-server route
the gateway serves, streamed and not, over raw HTTP and through the OpenAI and Anthropic SDKs.
Each pair must have the same status and the same JSON keys (values are the model's; greedy
sampling makes both runs write the same tokens, so that a stream's events, which depend on
where a token's UTF-8 bytes end, are the same kinds both ways). Header differences are
allowed and documented (docs/api.md: X-Request-ID, the rate-limit headers, Server), and so is
the shape of llama-server's error JSON (its number `code` a string, `param` added).

Where the gateway answers otherwise on purpose, the difference is pinned here too, with its
reason in docs/api.md: a body that is not JSON (llama-server 500, the gateway 400), and the
routes kept closed (POST /props, /lora-adapters, /slots/{id}?action=)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import requests

from tests.support.llama import LlamaServer, running_llama_server
from tests.support.service import Service

pytestmark = pytest.mark.llama_server  # every test here runs the real binary

M = [{"role": "user", "content": "hi"}]
# (method, path, body): every llama-server route the gateway serves, streamed and not
CASES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/chat/completions", {"messages": M, "max_tokens": 4}),
    ("POST", "/v1/chat/completions", {"messages": M, "max_tokens": 80}),  # fetched as a stream
    ("POST", "/v1/chat/completions", {"messages": M, "max_tokens": 4, "stream": True}),
    ("POST", "/v1/chat/completions", {"messages": M, "max_tokens": 4, "stream": True,
                                      "stream_options": {"include_usage": True}}),
    ("POST", "/v1/chat/completions", {"messages": [], "max_tokens": 4}),
    ("POST", "/v1/chat/completions", {"messages": M, "max_tokens": 4, "model": "gpt-3.5-turbo"}),
    ("POST", "/v1/chat/completions", {"messages": M, "max_tokens": 2, "n": 2}),
    ("POST", "/chat/completions", {"messages": M, "max_tokens": 4}),
    ("POST", "/v1/completions", {"prompt": "once", "max_tokens": 4}),
    ("POST", "/v1/completions", {"prompt": ["one", "two"], "max_tokens": 4, "stream": True}),
    ("POST", "/v1/embeddings", {"input": "hi"}),
    ("POST", "/v1/embeddings", {"content": "hi"}),
    ("POST", "/v1/messages", {"messages": M, "max_tokens": 4}),
    ("POST", "/v1/messages", {"messages": M, "max_tokens": 4, "stream": True}),
    ("POST", "/v1/messages", {"messages": [], "max_tokens": 4}),
    ("POST", "/v1/messages/count_tokens", {"messages": M}),
    ("POST", "/v1/responses", {"input": "hi", "max_output_tokens": 4}),
    ("POST", "/v1/responses", {"input": "hi", "max_output_tokens": 4, "stream": True}),
    ("POST", "/responses", {"input": [], "max_output_tokens": 4}),
    ("POST", "/v1/chat/completions/input_tokens", {"messages": M}),
    ("POST", "/v1/rerank", {"query": "q", "documents": ["a", "b"]}),
    ("POST", "/v1/reranking", {"query": "q", "texts": ["a", "b"]}),
    ("GET", "/v1/models", None),
    ("GET", "/models", None),
    ("POST", "/completion", {"prompt": "once", "n_predict": 4}),
    ("POST", "/completion", {"prompt": "once", "n_predict": 4, "stream": True}),
    ("POST", "/completion", {"prompt": ["one", "two"], "n_predict": 2}),
    ("POST", "/completion", {"prompt": "once", "n_predict": 2, "n": 2, "stream": True}),
    ("POST", "/completion", {"prompt": [1, "mixed", 2], "n_predict": 2, "model": "test"}),
    ("POST", "/completions", {"prompt": "once", "n_predict": 4}),
    ("POST", "/completions", {"prompt": "once", "n_predict": 4, "stream": True}),
    ("POST", "/infill", {"input_prefix": "def f(", "input_suffix": "):", "n_predict": 4}),
    ("POST", "/embedding", {"content": "hi"}),
    ("POST", "/embeddings", {"content": ["hi", "there"]}),
    ("POST", "/rerank", {"query": "q", "documents": ["a", "b"], "top_n": 1}),
    ("POST", "/reranking", {"query": "q", "documents": ["a"]}),
    ("POST", "/tokenize", {"content": "hello world", "with_pieces": True}),
    ("POST", "/tokenize", {}),
    ("POST", "/detokenize", {"tokens": [400, 401]}),
    ("POST", "/apply-template", {"messages": M}),
    ("GET", "/props", None),
    ("GET", "/slots", None),
]
# requests llama-server refuses, each field the gateway checks: the same status both ways
REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {}),  # messages
    ("/v1/chat/completions", {"messages": "hi"}),
    ("/v1/chat/completions", {"messages": M, "stream": "yes"}),
    ("/v1/chat/completions", {"messages": M, "max_tokens": "5"}),
    ("/v1/chat/completions", {"messages": M, "max_tokens": -2}),
    ("/v1/chat/completions", {"messages": M, "max_tokens": 2**31}),
    ("/v1/chat/completions", {"messages": M, "max_completion_tokens": [1]}),
    ("/v1/chat/completions", {"messages": M, "max_tokens": 1, "n": 0}),
    ("/v1/chat/completions", {"messages": M, "max_tokens": 1, "n": "2"}),
    ("/v1/completions", {"max_tokens": 1}),  # prompt
    ("/v1/completions", {"prompt": "a", "n_predict": "2"}),
    ("/v1/embeddings", {}),  # input or content
    ("/v1/messages", {"messages": M, "max_tokens": "4"}),
    ("/v1/messages", {"messages": M, "max_tokens": 4, "stream": 1}),
    ("/v1/responses", {}),  # input
    ("/v1/responses", {"input": "hi", "max_output_tokens": "4"}),
    ("/v1/rerank", {}),  # query
    ("/v1/rerank", {"query": 5, "documents": ["a"]}),
    ("/completion", {}),  # prompt
    ("/completion", {"prompt": "a", "n_predict": -2}),
    ("/completion", {"prompt": "a", "n_predict": "2"}),
    ("/completion", {"prompt": "a", "stream": "yes"}),
    ("/completion", {"prompt": "a", "n": 0}),
    ("/embedding", {}),  # input or content
    ("/rerank", {"query": ["q"], "documents": ["a"]}),
    ("/apply-template", {}),  # messages
    ("/apply-template", {"messages": "x"}),
    # and some the gateway leaves to llama-server: its answer, whatever it is
    ("/v1/chat/completions", {"messages": [{"content": "no role"}], "max_tokens": 1}),
    ("/v1/messages", {}),
    ("/v1/embeddings", {"input": 5}),
    ("/tokenize", {"content": 5}),
    ("/detokenize", {"tokens": "a"}),
]


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[LlamaServer]:
    with running_llama_server(tmp_path_factory.mktemp("llama"), tiny_model,
                              "--embeddings", "--reranking") as server:
        yield server


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, backend: LlamaServer) -> Iterator[Service]:
    svc = Service(tmp_path_factory.mktemp("gateway"), {
        "BACKEND_URL": backend.url, "BACKEND_API_KEY": backend.key, "AUTH_ENABLED": "false"})
    with svc.running():
        yield svc


def _shape(value: Any, depth: int = 3) -> Any:
    """The keys of a JSON value, nested to ``depth``; a list by its first element."""
    if isinstance(value, dict):
        return {k: _shape(v, depth - 1) if depth else None for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_shape(value[0], depth)] if value and depth else []
    return type(value).__name__ if value is not None else None


def _answer(r: requests.Response) -> tuple[int, str, Any]:
    """Status, media type, and the keys of the JSON body, or of each kind of SSE event."""
    media = r.headers.get("Content-Type", "").split(";")[0]
    if media == "text/event-stream":
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        kinds = {json.dumps(_shape(json.loads(e)), sort_keys=True) for e in events if e != "[DONE]"}
        return r.status_code, media, (sorted(kinds), events[-1] == "[DONE]")
    body = r.json() if r.content else None
    if isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict):
        # an error's fields; llama-server's number `code` is a string here, and `param` is
        # added: OpenAI's error shape (docs/api.md, Errors)
        return r.status_code, media, {"error": sorted(set(body["error"]) - {"param"})}
    return r.status_code, media, _shape(body)


def _both(backend: LlamaServer, gateway: Service, method: str, path: str,
          body: Any) -> tuple[tuple[int, str, Any], tuple[int, str, Any]]:
    """The same request, direct and through the gateway."""
    direct = requests.request(method, backend.url + path, json=body, headers=backend.headers,
                              timeout=60)
    through = requests.request(method, gateway.url + path, json=body, timeout=60)
    assert "X-Request-ID" in through.headers
    return _answer(direct), _answer(through)


@pytest.mark.parametrize(("method", "path", "body"), CASES,
                         ids=[f"{m} {p} {json.dumps(b)[:60]}" for m, p, b in CASES])
def test_raw_http_gets_what_llama_server_answers(backend: LlamaServer, gateway: Service,
                                                 method: str, path: str,
                                                 body: dict[str, Any] | None) -> None:
    greedy = None if body is None else {**body, "temperature": 0}
    direct, through = _both(backend, gateway, method, path, greedy)
    assert through == direct


@pytest.mark.parametrize(("path", "body"), REFUSED,
                         ids=[f"{p} {json.dumps(b)[:60]}" for p, b in REFUSED])
def test_what_llama_server_refuses_is_refused_alike(backend: LlamaServer, gateway: Service,
                                                    path: str, body: dict[str, Any]) -> None:
    direct, through = _both(backend, gateway, "POST", path, body)
    assert direct[0] >= 400
    assert through[0] == direct[0]  # the gateway's error, or llama-server's passed on


def test_a_body_that_is_not_json_is_the_documented_difference(backend: LlamaServer,
                                                              gateway: Service) -> None:
    for path in ("/v1/chat/completions", "/completion", "/tokenize"):
        direct = requests.post(backend.url + path, data=b"{not json", headers=backend.headers,
                               timeout=30)
        through = requests.post(gateway.url + path, data=b"{not json", timeout=30)
        # llama-server's 500 is a client's error, which the SDKs would retry in vain
        assert (direct.status_code, through.status_code) == (500, 400)
        assert through.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(("method", "target", "status"), [
    ("POST", "/props", 405), ("GET", "/lora-adapters", 404), ("POST", "/lora-adapters", 404),
    ("POST", "/slots/0?action=erase", 404)])
def test_state_changing_routes_are_the_documented_difference(
        backend: LlamaServer, gateway: Service, method: str, target: str, status: int) -> None:
    through = requests.request(method, gateway.url + target, json=[], timeout=30)
    assert through.status_code == status
    direct = requests.request(method, backend.url + target, json=[], headers=backend.headers,
                              timeout=30)
    assert direct.status_code != status  # llama-server would have answered it


def _dumped(value: Any) -> Any:
    return _shape(value.model_dump(exclude_unset=True))


def _openai_calls(client: openai.OpenAI) -> list[Any]:
    messages: Any = M
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                          temperature=0)
    stream = client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=4,
                                            stream=True, temperature=0)
    chunks = sorted({json.dumps(_dumped(c), sort_keys=True) for c in stream})
    text = client.completions.create(model="tiny", prompt="once", max_tokens=4, temperature=0)
    embedding = client.embeddings.create(model="tiny", input=["hi", "there"])
    response = client.responses.create(model="tiny", input="hi", max_output_tokens=16,
                                       temperature=0)
    models = client.models.list()
    return [_dumped(chat), chunks, _dumped(text), _dumped(embedding), _dumped(response),
            _dumped(models)]


def test_the_openai_sdk_gets_what_llama_server_answers(backend: LlamaServer,
                                                       gateway: Service) -> None:
    direct = openai.OpenAI(base_url=backend.url + "/v1", api_key=backend.key, max_retries=0)
    through = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    with direct, through:
        assert _openai_calls(through) == _openai_calls(direct)


def _anthropic_calls(client: anthropic.Anthropic) -> list[Any]:
    greedy = {"temperature": 0}  # (this SDK takes no temperature argument of its own)
    message = client.messages.create(model="claude-3-5-sonnet-latest", max_tokens=4,
                                     extra_body=greedy,
                                     messages=[{"role": "user", "content": "hi"}])
    with client.messages.stream(model="tiny", max_tokens=4, extra_body=greedy,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        events = sorted({json.dumps(_dumped(e), sort_keys=True) for e in stream})
    counted = client.messages.count_tokens(model="tiny",
                                           messages=[{"role": "user", "content": "hi"}])
    return [_dumped(message), events, _dumped(counted)]


def test_the_anthropic_sdk_gets_what_llama_server_answers(backend: LlamaServer,
                                                          gateway: Service) -> None:
    direct = anthropic.Anthropic(base_url=backend.url, api_key=backend.key, max_retries=0)
    through = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0)
    with direct, through:
        assert _anthropic_calls(through) == _anthropic_calls(direct)
