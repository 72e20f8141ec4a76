"""/openapi.json matches the routes the app really registers, both ways."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from gateway.state import APP_STATE
from tests.support.gateway import Gateway

# what the proxy's route (`/v1/*`) answers, as (path, method); "*": any method but OPTIONS
EDGE_ROUTES = frozenset({(p, "POST") for p in ("/v1/chat/completions", "/v1/completions",
                                                "/v1/embeddings")}
                        | {("/v1/models", "GET"), ("/v1/{path}", "*")})


def registered(app: web.Application) -> set[tuple[str, str]]:
    """The route table's routes as (path, method); the proxy's `/v1/*` is EDGE_ROUTES'."""
    routes = set()
    for route in app[APP_STATE].router.routes():
        if route.template == "/v1/*":
            continue
        routes |= {(route.template, m) for m in route.methods if m not in ("HEAD", "OPTIONS")}
    return routes


def documented(doc: dict[str, object]) -> set[tuple[str, str]]:
    out = set()
    for path, item in doc["paths"].items():  # type: ignore[attr-defined]
        if item.get("x-methods") == "any":
            out.add((path, "*"))
            continue
        out |= {(path, m.upper()) for m in item if m in ("get", "post", "put", "delete", "patch")}
    return out


@pytest.mark.parametrize("auth", ["false", "true"])
async def test_openapi_matches_the_routes(start_gateway, http: aiohttp.ClientSession,  # type: ignore[no-untyped-def]
                                          auth: str) -> None:
    gateway: Gateway = await start_gateway(AUTH_ENABLED=auth)
    async with http.get(f"{gateway.url}/openapi.json") as resp:
        assert resp.status == 200  # public, also with auth on
        doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    docs = documented(doc)
    # the inference routes and /v1/models have routes of their own; every other /v1 path
    # goes to the catch-all, documented as /v1/{path}
    assert {p for p, _ in docs if p.startswith("/v1/")} == {
        "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/{path}"}
    assert docs == registered(gateway.app) | EDGE_ROUTES  # the table's, and the proxy's
    assert any(p.startswith("/admin/") for p in doc["paths"]) == (auth == "true")
