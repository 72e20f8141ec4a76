"""llama-server's native routes (issue 26, gateway/upstream/llama_routes.py) in front of the
fake llama-server: the whole route table pinned, each native route's scope, the ones that
stay closed, which take a backend slot, the bounds on their bodies, and the model a
multi-model backend is asked for. Their answers and metering against the real llama-server:
test_native_metering.py and tests/gateway/test_transparency.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import Wiring, create_app
from gateway.state import APP_STATE
from tests.gateway.conftest import StartGateway
from tests.support.fake_llama import METERED, FakeLlama
from tests.support.gateway import assert_openai_error, auth_config, serve_gateway
from tests.support.keytool import KeyTool
from tests.support.metrics import scrape
from tests.support.wait import wait_until

MESSAGES = [{"role": "user", "content": "hi"}]
# (method, path) → a body llama-server takes there
NATIVE: dict[tuple[str, str], dict[str, Any] | None] = {
    ("POST", "/completion"): {"prompt": "hi", "n_predict": 2},
    ("POST", "/completions"): {"prompt": "hi", "n_predict": 2},
    ("POST", "/infill"): {"input_prefix": "def f(", "input_suffix": "):", "n_predict": 2},
    ("POST", "/embedding"): {"content": "hi"},
    ("POST", "/embeddings"): {"content": "hi"},
    ("POST", "/rerank"): {"query": "q", "documents": ["a", "b"]},
    ("POST", "/reranking"): {"query": "q", "documents": ["a", "b"]},
    ("POST", "/tokenize"): {"content": "hi"},
    ("POST", "/detokenize"): {"tokens": [1, 2]},
    ("POST", "/apply-template"): {"messages": MESSAGES},
    ("GET", "/props"): None,
}
# what llama-server would do for whoever asks, kept from inference keys: each answered by the
# gateway (404 no route, 405 a route that takes other methods) and never forwarded
CLOSED = [("POST", "/props", 405), ("POST", "/slots/0?action=erase", 404),
          ("POST", "/slots/0?action=save", 404), ("GET", "/lora-adapters", 404),
          ("POST", "/lora-adapters", 404), ("POST", "/models/load", 404),
          ("POST", "/models/unload", 404), ("GET", "/models/sse", 404), ("POST", "/slots", 405),
          ("GET", "/tools", 404), ("POST", "/cors-proxy", 404), ("PUT", "/completion", 405)]

# every route on the gateway port: (path, methods, scope); "" is public. Pinned so that
# nothing reaches llama-server, or anyone, by accident: a new route is added here on purpose
TABLE = {
    ("/ping", "GET HEAD", ""), ("/health", "GET HEAD", ""), ("/openapi.json", "GET HEAD", ""),
    ("/metrics", "GET HEAD", "metrics"),
    ("/v1/*", "GET HEAD POST", "inference"),
    ("/completion", "POST", "inference"), ("/completions", "POST", "inference"),
    ("/infill", "POST", "inference"), ("/embedding", "POST", "inference"),
    ("/embeddings", "POST", "inference"), ("/rerank", "POST", "inference"),
    ("/reranking", "POST", "inference"), ("/tokenize", "POST", "inference"),
    ("/detokenize", "POST", "inference"), ("/apply-template", "POST", "inference"),
    ("/props", "GET HEAD", "inference"), ("/slots", "GET HEAD", "admin"),
}
ADMIN = {
    ("/admin/keys/reload", "POST", "admin"), ("/admin/keys", "GET HEAD", "admin"),
    ("/admin/usage", "GET HEAD", "admin"),
}
MODEL_ADMIN = {
    ("/admin/models", "GET HEAD", "admin"), ("/admin/models/rescan", "POST", "admin"),
    ("/admin/pull", "POST", "admin"), ("/admin/jobs", "GET HEAD", "admin"),
    ("/admin/profile", "GET HEAD", "admin"), ("/admin/profile", "PUT", "admin"),
    ("/admin/models/{name}", "PUT", "admin"), ("/admin/models/{name}/load", "POST", "admin"),
    ("/admin/models/{name}/unload", "POST", "admin"), ("/admin/jobs/{id}", "GET HEAD", "admin"),
    ("/admin/jobs/{id}", "DELETE", "admin"),
}
# under /v1/*, the routes that take POST only
V1_POST_ONLY = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages",
                "/v1/responses", "/v1/rerank", "/v1/reranking"}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _table(tmp_path: Path, auth: bool, control: bool) -> set[tuple[str, str, str]]:
    config = auth_config(tmp_path, auth_enabled=auth)
    app = create_app(config, Wiring(backend_url="http://127.0.0.1:9", backend_key=None,
                                    runtime_dir=None, models=("tiny",),
                                    control_socket=tmp_path / "control.sock" if control else None))
    routes = app[APP_STATE].router.routes()
    prefix = next(r for r in routes if r.template == "/v1/*")
    assert set(prefix.only) == V1_POST_ONLY and all(m == {"POST"} for m in prefix.only.values())
    return {(r.template, " ".join(sorted(r.methods)), r.scope) for r in routes}


@pytest.mark.parametrize(("auth", "control"), [(False, False), (True, False), (True, True)])
def test_the_route_table_is_pinned(tmp_path: Path, auth: bool, control: bool) -> None:
    expected = TABLE | (ADMIN if auth else set()) | (MODEL_ADMIN if control else set())
    assert _table(tmp_path, auth, control) == expected


@pytest.mark.parametrize(("method", "path"), list(NATIVE), ids=[p for _, p in NATIVE])
async def test_a_native_route_is_forwarded_as_it_came(
        tmp_path: Path, fake: FakeLlama, keytool: KeyTool, http: aiohttp.ClientSession,
        method: str, path: str) -> None:
    app_id, app = keytool.generate("app")
    _, scraper = keytool.generate("scraper", "--scopes", "metrics")
    body = NATIVE[method, path]
    raw = None if body is None else json.dumps(body).encode()
    async with serve_gateway(fake.url, auth_config(tmp_path, metrics_public=True)) as gw:
        async with http.request(method, gw.url + path, data=raw) as r:
            assert r.status == 401
        async with http.request(method, gw.url + path, data=raw, headers=bearer(scraper)) as r:
            assert r.status == 403
            assert_openai_error(await r.json(), "permission_error", "missing_scope")
        assert fake.requests(path) == []
        async with http.request(method, gw.url + path, data=raw,
                                headers={**bearer(app), "X-Request-ID": "native-1"}) as r:
            assert r.status == 404  # the fake's own answer: it has no such route
            assert r.headers["X-Request-ID"] == "native-1"
        _, samples = await scrape(http, gw.url)
    [seen] = fake.requests(path)
    assert (seen.method, seen.body, seen.query) == (method, raw or b"", "")
    assert seen.headers["X-Request-ID"] == "native-1"
    # its own route label, the model it ran on
    assert samples.get_value("llamagate_requests_total", route=path, status="404", model="tiny",
                             key_id=app_id, ended="completed") == 1


async def test_slots_need_the_admin_scope(tmp_path: Path, fake: FakeLlama, keytool: KeyTool,
                                          http: aiohttp.ClientSession) -> None:
    """GET /slots shows what every slot is doing, its prompt included: other clients'
    prompts are not an inference key's to read."""
    _, app = keytool.generate("app")
    _, ops = keytool.generate("ops", "--scopes", "admin")
    async with serve_gateway(fake.url, auth_config(tmp_path)) as gw:
        async with http.get(gw.url + "/slots", headers=bearer(app)) as r:
            assert r.status == 403
            assert_openai_error(await r.json(), "permission_error", "missing_scope")
        assert fake.requests("/slots") == []
        async with http.get(gw.url + "/slots", headers=bearer(ops)) as r:
            assert r.status == 404  # the fake's
    assert len(fake.requests("/slots")) == 1


@pytest.mark.parametrize(("method", "target", "status"), CLOSED, ids=[f"{m} {t}" for m, t, _ in CLOSED])
async def test_what_changes_llama_servers_state_stays_closed(
        start_gateway: StartGateway, fake: FakeLlama, http: aiohttp.ClientSession,
        method: str, target: str, status: int) -> None:
    gateway = await start_gateway()  # auth off: closed to everyone alike
    async with http.request(method, gateway.url + target, json=[{"id": 0, "scale": 0.0}]) as r:
        assert r.status == status
        assert_openai_error(await r.json(), "invalid_request_error",
                            "not_found" if status == 404 else "method_not_allowed")
    assert fake.requests() == []


async def test_tokenizing_takes_no_slot_and_generating_waits_for_one(
        start_gateway: StartGateway, fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    """llama-server answers /tokenize, /detokenize, /apply-template and /props in its HTTP
    threads: they neither wait behind generations nor hold a slot from them."""
    gateway = await start_gateway(MAX_CONCURRENT_REQUESTS="1")
    fake.switches.hang_before_headers = True
    held = asyncio.create_task(http.post(gateway.url + "/v1/chat/completions",
                                         json={"messages": MESSAGES, "max_tokens": 2}))
    try:
        await fake.wait_for_requests(1, "/v1/chat/completions")
        for method, path in (("POST", "/tokenize"), ("POST", "/detokenize"),
                             ("POST", "/apply-template"), ("GET", "/props")):
            async with http.request(method, gateway.url + path, json=NATIVE[method, path]) as r:
                assert r.status == 404  # answered (by the fake) while the one slot is taken
        assert gateway.state.admission.in_flight == 1
        waiting = asyncio.create_task(http.post(gateway.url + "/completion",
                                                json=NATIVE["POST", "/completion"]))
        await wait_until(lambda: gateway.state.admission.queued == 1,
                         "the native completion to queue for the slot", within=5)
        assert fake.requests("/completion") == []
        fake.release.set()
        async with await held as r:
            assert r.status == 200
        async with await waiting as r:
            assert r.status == 404  # the fake's, once it had the slot
    finally:
        fake.release.set()
    assert len(fake.requests("/completion")) == 1


BOUNDS = [
    ("/completion", {"prompt": "a" * 3000, "n_predict": 2}, 413, "prompt_too_large", "prompt"),
    ("/completion", {"prompt": "hi", "n_predict": 5000}, 400, "context_length_exceeded",
     "n_predict"),
    ("/completions", {"prompt": ["a" * 1600, "b" * 1600]}, 413, "prompt_too_large", "prompt"),
    ("/infill", {"input_prefix": "a" * 1000, "input_suffix": "b" * 2000}, 413,
     "prompt_too_large", "input_suffix"),
    ("/embedding", {"content": "a" * 3000}, 413, "prompt_too_large", "content"),
    ("/rerank", {"query": "q", "documents": ["a" * 3000]}, 413, "prompt_too_large", "documents"),
    ("/tokenize", {"content": "a" * 3000}, 413, "prompt_too_large", "content"),
    ("/apply-template", {"messages": [{"role": "user", "content": "a"}] * 5}, 400,
     "too_many_messages", "messages"),
]


@pytest.mark.parametrize(("path", "body", "status", "code", "param"), BOUNDS,
                         ids=[f"{b[0]}-{b[3]}" for b in BOUNDS])
async def test_native_bodies_are_bounded_as_the_v1_ones(
        start_gateway: StartGateway, fake: FakeLlama, http: aiohttp.ClientSession, path: str,
        body: dict[str, Any], status: int, code: str, param: str) -> None:
    gateway = await start_gateway(MAX_PROMPT_BYTES="2048", MAX_MESSAGES="4", CTX="4096")
    async with http.post(gateway.url + path, json=body) as r:
        assert r.status == status
        error = assert_openai_error(await r.json(), "invalid_request_error", code)
    assert error["param"] == param
    assert fake.requests() == []


async def test_a_router_is_asked_for_the_resolved_model(metered_fake: FakeLlama,
                                                        http: aiohttp.ClientSession) -> None:
    """llama-server's router picks by the body's `model` or the query's, and refuses a request
    naming none: the gateway names the default, or an alias's model, there."""
    async with serve_gateway(metered_fake.url, {"MODEL_ALIASES": "gpt-4o=other"},
                             models=METERED.models) as gw:
        gw.state.models.mode = "router"  # the fake stands in for llama-server's router
        for body in ({"prompt": "hi"}, {"prompt": "hi", "model": "gpt-4o"},
                     {"prompt": "hi", "model": "other"}):
            async with http.post(gw.url + "/completion", json=body) as r:
                assert r.status == 404  # the fake's
        async with http.post(gw.url + "/tokenize", json={"content": "hi", "model": 5}) as r:
            await r.read()
        for query in ("", "?model=gpt-4o", "?fail_on_no_slot=1&model=tiny"):
            async with http.get(gw.url + "/props" + query) as r:
                await r.read()
        async with http.post(gw.url + "/completion", json={"prompt": "hi", "model": "nope"}) as r:
            assert r.status == 404
            assert_openai_error(await r.json(), "invalid_request_error", "model_not_found")
        async with http.get(gw.url + "/props?model=nope") as r:
            assert r.status == 404
            assert_openai_error(await r.json(), "invalid_request_error", "model_not_found")
    assert [s.json()["model"] for s in metered_fake.requests("/completion")] == [
        "tiny", "other", "other"]
    assert [s.json() for s in metered_fake.requests("/tokenize")] == [
        {"content": "hi", "model": "tiny"}]
    assert [s.query for s in metered_fake.requests("/props")] == [
        "model=tiny", "model=other", "fail_on_no_slot=1&model=tiny"]


async def test_one_llama_server_gets_the_request_as_it_came(fake: FakeLlama,
                                                            http: aiohttp.ClientSession) -> None:
    async with serve_gateway(fake.url, {}) as gw:
        async with http.post(gw.url + "/completion", json={"prompt": "hi", "model": "gpt-4o"}):
            pass
        async with http.get(gw.url + "/props?model=gpt-4o"):
            pass
    assert [s.json()["model"] for s in fake.requests("/completion")] == ["gpt-4o"]
    assert [s.query for s in fake.requests("/props")] == ["model=gpt-4o"]


async def test_a_keys_allowlist_holds_on_native_routes(tmp_path: Path, metered_fake: FakeLlama,
                                                       keytool: KeyTool,
                                                       http: aiohttp.ClientSession) -> None:
    _, other_only = keytool.generate("other-only", "--models", "other")
    config = auth_config(tmp_path, model_aliases=(("gpt-4o", "other"),))
    async with serve_gateway(metered_fake.url, config, models=METERED.models) as gw:
        for method, path, body in (("POST", "/completion", {"prompt": "hi"}),
                                   ("POST", "/tokenize", {"content": "hi"}),
                                   ("GET", "/props", None)):
            async with http.request(method, gw.url + path, json=body,
                                    headers=bearer(other_only)) as r:
                assert r.status == 403, path  # the default model, tiny, is not on its list
                assert_openai_error(await r.json(), "permission_error", "model_not_allowed")
        async with http.post(gw.url + "/completion", json={"prompt": "hi", "model": "gpt-4o"},
                             headers=bearer(other_only)) as r:
            assert r.status == 404  # the fake's: allowed, as gpt-4o is other
        async with http.get(gw.url + "/props?model=other", headers=bearer(other_only)) as r:
            assert r.status == 404  # the fake's
    assert len(metered_fake.requests("/completion")) == 1
    assert len(metered_fake.requests("/props")) == 1
