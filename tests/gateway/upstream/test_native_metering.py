"""llama-server's native routes are metered as the /v1 ones (issue 26), against the real
llama-server with the tiny model (layer 3): each request's tokens in the key's usage and
the token metrics are the counts llama-server itself reports for it (`tokens_evaluated` and
`tokens_predicted`, its OpenAI usage for the same input), streamed or not, with several
tasks, cut short; tokenizing is not metered. A multi-model router is asked for the default
model when a native request names none."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.gateway import Gateway, auth_config, serve_gateway
from tests.support.keytool import KeyTool
from tests.support.llama import LlamaServer, running_llama_server
from tests.support.metrics import scrape
from tests.support.rawhttp import Client, json_request
from tests.support.wait import wait_until

pytestmark = pytest.mark.llama_server  # every test here runs the real binary


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[LlamaServer]:
    with running_llama_server(tmp_path_factory.mktemp("llama"), tiny_model,
                              "--embeddings", "--reranking") as server:
        yield server


@pytest.fixture
async def gateway(tmp_path: Path, backend: LlamaServer, keytool: KeyTool
                  ) -> AsyncIterator[tuple[Gateway, str]]:
    _, secret = keytool.generate("app")
    config = auth_config(tmp_path, metrics_public=True, ctx=0)
    async with serve_gateway(backend.url, config, models=("tiny",),
                             backend_key=backend.key) as gw:
        yield gw, secret


async def _tokens(http: aiohttp.ClientSession, gw: Gateway) -> tuple[float, float]:
    _, samples = await scrape(http, gw.url)
    return (samples.total("llamagate_prompt_tokens_total"),
            samples.total("llamagate_completion_tokens_total"))


async def _metered(http: aiohttp.ClientSession, gw: Gateway, secret: str, path: str,
                   body: dict[str, Any]) -> tuple[tuple[float, float], bytes]:
    """The tokens one request was charged (the metrics' increase) and its answer."""
    before = await _tokens(http, gw)
    async with http.post(gw.url + path, json=body,
                         headers={"Authorization": f"Bearer {secret}"}) as r:
        assert r.status == 200, await r.text()
        answer = await r.read()
    after = await _tokens(http, gw)
    return (after[0] - before[0], after[1] - before[1]), answer


def _events(answer: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in answer.decode().splitlines()
            if line.startswith("data: {")]


@pytest.mark.parametrize("path", ["/completion", "/completions"])
async def test_a_native_completion_is_metered_as_llama_server_counts_it(
        gateway: tuple[Gateway, str], http: aiohttp.ClientSession, path: str) -> None:
    gw, secret = gateway
    charged, answer = await _metered(http, gw, secret, path,
                                     {"prompt": "once upon a time", "n_predict": 5})
    result = json.loads(answer)
    assert charged == (result["tokens_evaluated"], result["tokens_predicted"]) == (
        result["tokens_evaluated"], 5)
    charged, answer = await _metered(http, gw, secret, path,
                                     {"prompt": "once upon a time", "n_predict": 4, "stream": True})
    final = _events(answer)[-1]
    assert final["stop"] is True
    assert charged == (final["tokens_evaluated"], 4)


async def test_several_native_tasks_are_each_metered(gateway: tuple[Gateway, str],
                                                     http: aiohttp.ClientSession) -> None:
    """n > 1: one prompt (evaluated once), n completions; several prompts: each prompt and
    its completion. Whole (a JSON array of results) or streamed (a final event each)."""
    gw, secret = gateway
    charged, answer = await _metered(http, gw, secret, "/completion",
                                     {"prompt": "hello there", "n_predict": 3, "n": 2})
    results = json.loads(answer)
    assert len(results) == 2
    assert charged == (results[0]["tokens_evaluated"], 6)
    prompts = {"prompt": ["hello there", "a longer prompt than the first"], "n_predict": 2}
    for stream in (False, True):
        charged, answer = await _metered(http, gw, secret, "/completion",
                                         {**prompts, "stream": stream})
        finals = [e for e in _events(answer) if e.get("stop")] if stream else json.loads(answer)
        assert len(finals) == 2
        assert charged == (sum(f["tokens_evaluated"] for f in finals), 4)


@pytest.mark.parametrize(("path", "body"), [
    ("/embedding", {"content": "hello world"}),
    ("/embeddings", {"content": ["hello world", "the rain in spain"]}),
    ("/embedding", {"input": [[1, 400, 401]]}),
    ("/v1/embeddings", {"content": "hello world"}),  # llama-server answers natively to `content`
])
async def test_native_embeddings_are_metered_as_their_openai_usage(
        gateway: tuple[Gateway, str], backend: LlamaServer, http: aiohttp.ClientSession,
        path: str, body: dict[str, Any]) -> None:
    """llama-server's native embeddings answer carries no counts: the gateway counts the
    prompt with llama-server's /tokenize; the OpenAI route's usage for the same input says
    what llama-server counted."""
    gw, secret = gateway
    charged, answer = await _metered(http, gw, secret, path, body)
    assert isinstance(json.loads(answer), list)  # the native answer, unchanged
    async with http.post(f"{backend.url}/v1/embeddings", headers=backend.headers,
                         json={"input": body.get("content", body.get("input"))}) as r:
        openai_form = await r.json()
    assert charged == (openai_form["usage"]["prompt_tokens"], 0)


@pytest.mark.parametrize("path", ["/rerank", "/reranking"])
async def test_native_rerank_is_metered_from_its_usage(gateway: tuple[Gateway, str],
                                                       http: aiohttp.ClientSession,
                                                       path: str) -> None:
    gw, secret = gateway
    charged, answer = await _metered(http, gw, secret, path,
                                     {"query": "weather", "documents": ["rain", "a cat"]})
    assert charged == (json.loads(answer)["usage"]["prompt_tokens"], 0)


async def test_tokenizing_is_not_metered(gateway: tuple[Gateway, str],
                                         http: aiohttp.ClientSession) -> None:
    gw, secret = gateway
    for path, body in (("/tokenize", {"content": "hello world"}),
                       ("/detokenize", {"tokens": [400, 401]}),
                       ("/apply-template", {"messages": [{"role": "user", "content": "hi"}]})):
        charged, _ = await _metered(http, gw, secret, path, body)
        assert charged == (0, 0), path


async def test_a_native_stream_cut_short_is_charged_what_was_relayed(
        gateway: tuple[Gateway, str], http: aiohttp.ClientSession) -> None:
    gw, secret = gateway
    before = await _tokens(http, gw)
    client = await Client.sending(gw.url, json_request(
        "/completion", {"prompt": "once upon a time", "n_predict": 100_000, "stream": True},
        headers={"Authorization": f"Bearer {secret}"}))
    assert b" 200 " in await client.read_head(30)
    seen = b""
    while seen.count(b'"stop":false') < 3:  # three token events, at least
        seen += await client.read_until(b"\n\n", 30)
    evaluated = json.loads(seen.split(b"data: ", 2)[1].split(b"\n")[0])["tokens_evaluated"]
    await client.drop()
    await wait_until(lambda: gw.state.admission.in_flight == 0 and not gw.state.active,
                     "the cut request to be charged", within=10)
    after = await _tokens(http, gw)
    prompt, completion = after[0] - before[0], after[1] - before[1]
    assert prompt == evaluated  # counted again by llama-server's /tokenize
    assert completion >= 3  # every token event relayed, more than the client read perhaps


async def test_a_router_runs_a_native_request_naming_no_model_on_the_default(
        tmp_path: Path, tiny_model: Path, http: aiohttp.ClientSession) -> None:
    """llama-server's router refuses a request naming no model (400); through the gateway it
    runs on the default model, and `?model=` picks a model's /props."""
    preset = tmp_path / "preset.ini"
    preset.write_text(f"[*]\nctx-size = 1024\nparallel = 1\nthreads = 1\n\n"
                      f"[alpha]\nmodel = {tiny_model}\n\n[beta]\nmodel = {tiny_model}\n")
    with running_llama_server(tmp_path, None, preset=preset) as router:
        async with http.post(f"{router.url}/completion", headers=router.headers,
                             json={"prompt": "hi", "n_predict": 2}) as r:
            assert r.status == 400, await r.text()  # "model name is missing from the request"
        async with serve_gateway(router.url, {"CTX": "0"}, models=("alpha", "beta"),
                                 backend_key=router.key) as gw:
            gw.state.models.mode = "router"  # as serve.py publishes it for a router it runs
            async with http.post(gw.url + "/completion", json={"prompt": "hi", "n_predict": 2}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["model"] == "alpha"
            async with http.get(gw.url + "/props?model=beta") as r:
                assert r.status == 200
                assert (await r.json())["model_alias"] == "beta"
            async with http.get(gw.url + "/props") as r:  # the default's, not the router's own
                assert r.status == 200
                assert (await r.json())["model_alias"] == "alpha"
