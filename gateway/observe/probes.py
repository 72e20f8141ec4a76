"""The gateway's own endpoints: probes on the main port and /metrics."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from backend.readiness import DRAINING, Readiness, backend_readiness
from gateway.edge.call import Call
from gateway.observe.metrics import label_backend_metrics
from gateway.observe.model_metrics import merge_expositions
from gateway.router import reply_json
from gateway.state import AppState
from gateway.upstream.backend import BackendStatus


def verdict(draining: bool, status: BackendStatus) -> Readiness:
    """This worker's readiness: draining (its own drain or serve's), else the backend's
    state judged by the rules the health port uses too (backend/readiness.py)."""
    if draining or status.draining:
        return DRAINING
    return backend_readiness(status.state, status.restarts)


async def ping(call: Call) -> None:
    state: AppState = call.state
    call.respond(verdict(state.draining, state.upstream.status).ping, b"", content_type=None)


async def health(call: Call) -> None:
    state: AppState = call.state
    status = state.upstream.status
    ready = verdict(state.draining, status)
    pool = state.pool
    counts = pool if pool is not None else state.admission
    body = {
        "status": ready.status,
        "backend": {"state": status.state, "restarts": status.restarts},
        "models": list(state.models.names),
        "model_states": {n: s.get("state") for n, s in state.models.states.items()},
        "in_flight": counts.in_flight,
        "queued": counts.queued,
        "auth": state.config.auth_enabled,
    }
    if pool is not None:
        body["upstreams"] = pool.report()
    reply_json(call, body, status=503 if ready.ping == 503 else 200)


async def _scrape(state: AppState, model: str | None) -> str:
    upstream = state.upstream
    # autoload=false: a model unloaded since its state was read must not load for a scrape
    query = "" if model is None else f"?model={quote(model, safe='')}&autoload=false"
    try:
        async with upstream.session.get(f"{upstream.base_url}/metrics{query}",
                                        headers=upstream.headers(None, "metrics-scrape"),
                                        timeout=aiohttp.ClientTimeout(total=2)) as resp:
            if resp.status != 200:
                return ""
            return await resp.text()
    except (TimeoutError, aiohttp.ClientError):
        return ""


async def _backend_metrics(state: AppState) -> str:
    """llama-server's own metrics, labelled with the model; '' if unavailable.

    In multi-model mode each loaded model's child is scraped through the router (a
    scrape never loads a model)."""
    if not state.upstream.status.ready or state.pool is not None:
        return ""  # a pool's llama-servers are scraped each on its own (docs/deployment.md)
    catalog = state.models
    colons = state.config.backend_metrics_names == "llamacpp"
    if catalog.mode != "router":
        return label_backend_metrics(await _scrape(state, None), catalog.default or "-", colons)
    loaded = [n for n in catalog.names if catalog.states.get(n, {}).get("state") == "loaded"]
    texts = await asyncio.gather(*(_scrape(state, n) for n in loaded))
    return merge_expositions(label_backend_metrics(t, n, colons)
                             for t, n in zip(texts, loaded, strict=True) if t)


async def metrics(call: Call) -> None:
    state: AppState = call.state
    ours = generate_latest(state.exposed_registry).decode()
    theirs = await _backend_metrics(state)
    if "application/json" in call.headers.get("accept", ""):
        families = {}
        for family in text_string_to_metric_families(ours + theirs):
            families[family.name] = {
                "type": family.type, "help": family.documentation,
                "samples": [{"name": s.name, "labels": s.labels, "value": s.value}
                            for s in family.samples]}
        reply_json(call, families)
        return
    call.respond(200, (ours + theirs).encode(), content_type=CONTENT_TYPE_LATEST)

