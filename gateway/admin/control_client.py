"""Admin routes for models, pulls and profiles: checked here, executed by the serve process.

    GET    /admin/models                  registry: metadata, status, overrides, serving state
    POST   /admin/models/rescan           re-read MODELS_DIR
    PUT    /admin/models/{name}           edit overrides (enabled, alias, tier, tags, settings)
    POST   /admin/models/{name}/load      load now (multi-model mode)
    POST   /admin/models/{name}/unload    unload now (multi-model mode)
    POST   /admin/pull                    {"repo", "file" | "pattern", "revision"} → 202 + job
    GET    /admin/jobs[/{id}]             pull jobs with progress
    DELETE /admin/jobs/{id}               cancel a pull
    GET    /admin/profile, PUT /admin/profile   {"profile": name}

The admin scope is checked by the pipeline (gateway/pipeline.py) before these run. The request is
forwarded to llamagate/control.py over the runtime directory's Unix socket, and every
change is appended to the audit log with the acting key's id.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import aiohttp
from aiohttp import web

from gateway.admin.routes import Auditor, actor_of
from gateway.edge.call import Call
from gateway.errors import BackendUnavailable
from gateway.router import Handler, Router
from keys.model import SCOPE_ADMIN

if TYPE_CHECKING:  # a fleet's audit stream (REDIS_URL), imported where there is one
    from keys.audit_redis import RedisAuditor

# admin path → control path; "{x}" segments are filled from the match
_ROUTES: list[tuple[str, str, str, str | None]] = [
    # method, admin route, audit action (None: a read, not audited)
    ("GET", "/admin/models", "/models", None),
    ("POST", "/admin/models/rescan", "/models/rescan", "rescan_models"),
    ("PUT", "/admin/models/{name}", "/models/{name}", "edit_model"),
    ("POST", "/admin/models/{name}/load", "/models/{name}/load", "load_model"),
    ("POST", "/admin/models/{name}/unload", "/models/{name}/unload", "unload_model"),
    ("POST", "/admin/pull", "/pull", "pull"),
    ("GET", "/admin/jobs", "/jobs", None),
    ("GET", "/admin/jobs/{id}", "/jobs/{id}", None),
    ("DELETE", "/admin/jobs/{id}", "/jobs/{id}", "cancel_pull"),
    ("GET", "/admin/profile", "/profile", None),
    ("PUT", "/admin/profile", "/profile", "switch_profile"),
]


def install(router: Router, socket_path: Path, audit: Auditor | RedisAuditor
            ) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    """Add the admin routes to ``router``; returns the cleanup context that owns their
    Unix-socket session."""
    sessions: list[aiohttp.ClientSession] = []  # the one session, while the app runs

    def forward(target: str, action: str | None) -> Handler:
        async def handler(call: Call) -> None:
            path = target.format(**{k: _segment(v) for k, v in call.params.items()})
            body = call.body
            if not sessions:
                raise BackendUnavailable("model management is unavailable (not started)",
                                         retry_after=5)
            try:
                async with sessions[0].request(
                        call.method, f"http://control{path}", data=body or None,
                        headers={"Content-Type": "application/json"} if body else None,
                        timeout=aiohttp.ClientTimeout(total=120)) as resp:
                    payload = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise BackendUnavailable(f"model management is unavailable ({type(exc).__name__})",
                                         retry_after=5) from None
            if action is not None:
                await audit.record(actor_of(call), action, _target(call.params, body),
                                   {"status": status, **_summary(body)})
            call.respond(status, payload)
        return handler

    for method, admin, target, action in _ROUTES:
        router.add([method], admin, forward(target, action), SCOPE_ADMIN)

    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path))
                                         ) as session:
            sessions.append(session)
            try:
                yield
            finally:
                sessions.clear()

    return ctx


def _segment(value: str) -> str:
    return quote(value, safe="")


def _target(params: Mapping[str, str], body: bytes) -> str | None:
    if "name" in params:
        return params["name"]
    if "id" in params:
        return params["id"]
    summary = _summary(body)
    return str(summary.get("repo") or summary.get("profile") or "") or None


def _summary(body: bytes) -> dict[str, object]:
    """The request's fields worth auditing (never a token: the Hub token is server-side)."""
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    keep = ("repo", "file", "pattern", "revision", "profile", "enabled", "alias", "tier")
    return {k: data[k] for k in keep if k in data and isinstance(data[k], (str, bool, type(None)))}
