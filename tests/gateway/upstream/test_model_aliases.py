"""Model names (issue 26): with one model any name reaches it, as with llama-server; with
several an unknown name is a 404 unless MODEL_ALIASES names its model (or `*` does). Key
allowlists, metrics and usage see the model a name resolves to; /v1/models lists only
served models."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from core.config import ConfigError, load_config
from gateway.admin.catalog import ModelCatalog
from gateway.errors import NotFound
from tests.support.fake_llama import METERED, FakeLlama
from tests.support.gateway import assert_openai_error, auth_config, serve_gateway
from tests.support.keytool import KeyTool
from tests.support.metrics import scrape

CHAT = "/v1/chat/completions"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_model_aliases_are_parsed_once_and_loudly() -> None:
    config = load_config({"MODEL_ALIASES": " gpt-4o = qwen2.5-7b,gpt-3.5-turbo=qwen2.5-7b,, *=q "})
    assert config.model_aliases == (("gpt-4o", "qwen2.5-7b"), ("gpt-3.5-turbo", "qwen2.5-7b"),
                                    ("*", "q"))
    assert load_config({}).model_aliases == ()
    for bad in ("gpt-4o", "=x", "x=", "a=b,a=c"):
        with pytest.raises(ConfigError, match="MODEL_ALIASES"):
            load_config({"MODEL_ALIASES": bad})


def test_one_model_answers_to_any_name() -> None:
    catalog = ModelCatalog(("tiny",), "tiny")
    assert [catalog.resolve(n) for n in ("tiny", "gpt-4o", "test", None, "")] == ["tiny"] * 5
    catalog.mode = "router"  # llama-server's router picks by name: one model, but a router's
    assert catalog.resolve("gpt-4o") is None


def test_several_models_resolve_aliases_then_the_wildcard() -> None:
    catalog = ModelCatalog(("alpha", "beta"), "alpha", mode="router",
                           aliases={"gpt-4o": "beta", "gone": "gamma"})
    assert catalog.resolve("alpha") == "alpha" and catalog.resolve("gpt-4o") == "beta"
    assert catalog.resolve(None) == "alpha"
    assert catalog.resolve("codellama70b") is None
    assert catalog.resolve("gone") is None  # its model is not served
    with pytest.raises(NotFound) as info:
        catalog.require("codellama70b")
    assert info.value.code == "model_not_found" and "alpha, beta" in str(info.value)
    catalog.aliases = {"*": "beta", "gpt-4o": "alpha", "beta": "alpha"}
    assert catalog.resolve("codellama70b") == "beta"  # the wildcard
    assert catalog.resolve("gpt-4o") == "alpha"  # a name of its own first
    assert catalog.resolve("beta") == "beta"  # a served name always means its own model


def test_only_a_router_is_sent_the_resolved_name() -> None:
    router = ModelCatalog(("alpha", "beta"), "alpha", mode="router")
    assert router.renames("gpt-4o", "beta") and router.renames(None, "alpha")
    assert not router.renames("beta", "beta")
    one = ModelCatalog(("tiny",), "tiny")  # a llama-server we start ignores the name
    assert not one.renames("gpt-4o", "tiny") and not one.renames(None, "tiny")
    external = ModelCatalog(("tiny",), "tiny", mode="external")  # BACKEND_URL: maybe a router
    assert external.renames("gpt-4o", "tiny") and not external.renames(None, "tiny")


async def test_any_name_reaches_the_one_model(fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    async with serve_gateway(fake.url, {}) as gateway:
        async with gateway.sdk() as client:
            for name in ("gpt-3.5-turbo", "test", "codellama70b"):
                reply = await client.chat.completions.create(model=name, messages=MESSAGES,
                                                             max_tokens=2)
                assert reply.choices[0].finish_reason == "length"
            assert [m.id for m in (await client.models.list()).data] == ["tiny"]
            with pytest.raises(openai.NotFoundError):  # only a model served can be retrieved
                await client.models.retrieve("gpt-3.5-turbo")
        text, samples = await scrape(http, gateway.url)
    # sent as they came: the one llama-server ignores the name
    assert [s.json()["model"] for s in fake.requests(CHAT)] == ["gpt-3.5-turbo", "test",
                                                                "codellama70b"]
    assert samples.get_value("llamagate_requests_total", route=CHAT, status="200", model="tiny",
                             key_id="-", ended="completed") == 3
    assert "gpt-3.5-turbo" not in text and "codellama70b" not in text


async def test_aliases_in_multi_model_mode(tmp_path: Path, metered_fake: FakeLlama,
                                           keytool: KeyTool, http: aiohttp.ClientSession) -> None:
    app_id, app = keytool.generate("app")
    _, other_only = keytool.generate("other-only", "--models", "other")
    _, admin = keytool.generate("ops", "--scopes", "admin")
    config = auth_config(tmp_path, model_aliases=(("gpt-4o", "other"), ("gpt-4", "tiny")))
    async with serve_gateway(metered_fake.url, config, models=METERED.models) as gw:
        gw.state.models.mode = "router"
        url = gw.url + CHAT
        async with http.post(url, json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 3},
                             headers=bearer(app)) as r:
            assert r.status == 200
        async with http.post(url, json={"model": "codellama70b", "messages": MESSAGES},
                             headers=bearer(app)) as r:
            assert r.status == 404
            assert_openai_error(await r.json(), "invalid_request_error", "model_not_found")
        # the allowlist applies to the model the name resolves to
        async with http.post(url, json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 2},
                             headers=bearer(other_only)) as r:
            assert r.status == 200
        async with http.post(url, json={"model": "gpt-4", "messages": MESSAGES, "max_tokens": 2},
                             headers=bearer(other_only)) as r:
            assert r.status == 403
            error = assert_openai_error(await r.json(), "permission_error", "model_not_allowed")
            assert "'tiny'" in error["message"]
        async with http.get(gw.url + "/v1/models", headers=bearer(app)) as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["tiny", "other"]
        async with http.get(gw.url + "/v1/models/gpt-4o", headers=bearer(app)) as r:
            assert r.status == 404
        async with http.get(gw.url + "/admin/usage", params={"key": app_id},
                            headers=bearer(admin)) as r:
            rows = (await r.json())["data"]
    # the router is told the model's own name; usage is the resolved model's
    assert [s.json()["model"] for s in metered_fake.requests(CHAT)] == ["other", "other"]
    assert [(row["model"], row["completion_tokens"]) for row in rows] == [("other", 3)]


async def test_a_wildcard_takes_every_unknown_name(metered_fake: FakeLlama,
                                                   http: aiohttp.ClientSession) -> None:
    async with serve_gateway(metered_fake.url, {"MODEL_ALIASES": "*=other"},
                             models=METERED.models) as gw:
        gw.state.models.mode = "router"
        for name in ("gpt-4o", "claude-3-5-sonnet", "tiny"):
            async with http.post(gw.url + CHAT, json={"model": name, "messages": MESSAGES,
                                                      "max_tokens": 2}) as r:
                assert r.status == 200
        _, samples = await scrape(http, gw.url)
    assert [s.json()["model"] for s in metered_fake.requests(CHAT)] == ["other", "other", "tiny"]
    assert samples.get_value("llamagate_requests_total", route=CHAT, status="200", model="other",
                             key_id="-", ended="completed") == 2
