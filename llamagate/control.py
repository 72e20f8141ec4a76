"""The serve process's control API, on a Unix socket in the 0700 runtime directory.

Model management has exactly one owner: the registry, the pull jobs and the
router's served set live in the serve process, so two gateway workers can never
run the same download or race on the overrides file. The gateway's /admin/models,
/admin/pull, /admin/jobs and /admin/profile routes check the admin scope and
forward here (gateway/admin/control_client.py); nothing else can reach this socket.

    GET    /models                  registry + serving state
    POST   /models/rescan
    PUT    /models/{name}           override patch
    POST   /models/{name}/load      multi-model mode
    POST   /models/{name}/unload    multi-model mode
    POST   /pull                    {"repo", "file" | "pattern", "revision"} → 202 job
    GET    /jobs, /jobs/{id}
    DELETE /jobs/{id}               cancel
    GET    /profile, PUT /profile   {"profile": name | null}
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from backend.models.errors import ModelsError, ProfileError, UnknownModel, ValidationError
from backend.models.pull import PullManager
from backend.models.registry import ModelRegistry
from backend.router import RouterError, args_to_options
from gateway.errors import error_body, error_type
from llamagate.fleet import Fleet, FleetError

log = logging.getLogger("llamagate.control")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Owner(Protocol):
    """What the serve process gives the control API."""

    registry: ModelRegistry
    pulls: PullManager
    fleet: Fleet | None
    mode: str

    async def models_changed(self) -> None: ...


def error(status: int, message: str, code: str, **extra: Any) -> web.Response:
    """The OpenAI error envelope, typed by the gateway's table (gateway/errors.py)."""
    body = error_body(message, error_type(status)[0], code, extra=extra)
    return web.Response(status=status, body=body, content_type="application/json")


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except ProfileError as exc:
        problems = [{"line": line, "field": field, "message": msg} for line, field, msg in exc.problems]
        return error(400, str(exc), exc.code, problems=problems)
    except UnknownModel as exc:
        return error(404, str(exc), exc.code)
    except ModelsError as exc:
        return error(exc.http_status, str(exc), exc.code)
    except FleetError as exc:
        return error(exc.http_status, str(exc), exc.code)
    except RouterError as exc:
        return error(502, f"the backend refused: {exc}", "backend_error")
    except Exception:
        log.exception("control request failed")
        return error(500, "internal error; see the server log", "internal_error")


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise FleetError("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise FleetError("the body must be a JSON object")
    return body


def create_control_app(owner: Owner) -> web.Application:
    app = web.Application(middlewares=[errors], client_max_size=1 << 20)

    def listing() -> dict[str, Any]:
        serving = owner.fleet.published() if owner.fleet else {}
        by_path: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for served, state in serving.items():
            by_path.setdefault(state["path"], []).append((served, state))
        models = []
        for entry in owner.registry.entries():
            item = entry.to_dict()
            item["serving"] = [{"name": n, **{k: v for k, v in s.items() if k != "path"}}
                               for n, s in by_path.get(str(entry.path), [])]
            models.append(item)
        fleet = owner.fleet
        return {"object": "list", "mode": owner.mode, "data": models,
                "profile": fleet.profile.name if fleet and fleet.profile else None}

    async def get_models(request: web.Request) -> web.Response:
        return web.json_response(listing())

    async def rescan(request: web.Request) -> web.Response:
        await asyncio.to_thread(owner.registry.scan)
        await owner.models_changed()
        return web.json_response(listing())

    async def put_model(request: web.Request) -> web.Response:
        patch = await _json(request)
        args = patch.get("extra_args")
        if isinstance(args, list) and all(isinstance(a, str) for a in args):
            # the router's preset needs options (and their values), not free argv: refuse
            # before the override is saved, or every later start would fail on it
            try:
                args_to_options(args)
            except ValueError as exc:
                raise ValidationError([("extra_args", str(exc))]) from None
        entry = await asyncio.to_thread(owner.registry.update, request.match_info["name"], patch)
        await owner.models_changed()
        return web.json_response(entry.to_dict())

    def need_fleet() -> Fleet:
        if owner.fleet is None:
            raise FleetError("this needs multi-model mode (PROFILE, or several models in MODELS_DIR "
                             f"without MODEL_PATH); this server runs in {owner.mode} mode",
                             "not_multi_model", 409)
        return owner.fleet

    async def load(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await need_fleet().load(name)
        return web.json_response({"model": name, "action": "load", "accepted": True}, status=202)

    async def unload(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await need_fleet().unload(name)
        return web.json_response({"model": name, "action": "unload", "accepted": True}, status=202)

    async def pull(request: web.Request) -> web.Response:
        body = await _json(request)
        repo, file = body.get("repo"), body.get("file") or body.get("pattern")
        revision = body.get("revision")
        if not isinstance(repo, str) or not isinstance(file, str) or \
                (revision is not None and not isinstance(revision, str)):
            raise FleetError('expected {"repo": str, "file" or "pattern": str, "revision": str?}')
        if body.get("file") and body.get("pattern"):  # which one was meant cannot be told
            raise FleetError('give "file" or "pattern", not both')
        job = owner.pulls.submit(repo, file, revision)
        return web.json_response(job.to_dict(), status=202)

    async def jobs(request: web.Request) -> web.Response:
        return web.json_response({"object": "list",
                                  "data": [j.to_dict() for j in owner.pulls.list()]})

    async def job(request: web.Request) -> web.Response:
        return web.json_response(owner.pulls.get(request.match_info["id"]).to_dict())

    async def cancel(request: web.Request) -> web.Response:
        return web.json_response((await owner.pulls.cancel(request.match_info["id"])).to_dict())

    async def get_profile(request: web.Request) -> web.Response:
        fleet = owner.fleet
        return web.json_response({
            "mode": owner.mode, "profile": fleet.profile.name if fleet and fleet.profile else None,
            "models": fleet.published() if fleet else {}})

    async def put_profile(request: web.Request) -> web.Response:
        body = await _json(request)
        name = body.get("profile")
        if name is not None and not isinstance(name, str):
            raise FleetError('expected {"profile": "<name>"} (null serves every model)')
        await need_fleet().switch(name)
        return await get_profile(request)

    app.router.add_get("/models", get_models)
    app.router.add_post("/models/rescan", rescan)
    app.router.add_put("/models/{name}", put_model)
    app.router.add_post("/models/{name}/load", load)
    app.router.add_post("/models/{name}/unload", unload)
    app.router.add_post("/pull", pull)
    app.router.add_get("/jobs", jobs)
    app.router.add_get("/jobs/{id}", job)
    app.router.add_delete("/jobs/{id}", cancel)
    app.router.add_get("/profile", get_profile)
    app.router.add_put("/profile", put_profile)
    return app
