"""The health process: `python -m health.server --runtime-dir DIR`.

Its own process and event loop, so it answers when the gateway is busy, hung or
dead. It only reads the state files the other processes write; it never calls
them, so a stuck gateway cannot make it hang. Probes here are not activity.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from backend.readiness import Readiness
from core import runtime
from core.config import Config
from core.entry import config_or_exit
from core.gpu import gpu_info
from health.readiness import data_files, judge, upstreams, with_data_files

VERSION = "0.1.0"
CONFIG = web.AppKey("config", Config)
RUNTIME_DIR = web.AppKey("runtime_dir", Path)
WORKERS_SEEN = web.AppKey("workers_seen", dict[str, bool])


def _verdict(app: web.Application) -> tuple[dict[str, Any] | None, list[dict[str, Any]], Readiness]:
    rdir = app[RUNTIME_DIR]
    serve = runtime.read_state(rdir / runtime.SERVE_FILE)
    workers = runtime.read_workers(rdir)
    expected = app[CONFIG].gateway_workers
    seen = app[WORKERS_SEEN]
    if not seen["all"] and len(workers) >= expected:
        seen["all"] = True
    verdict = judge(serve, workers, time.time(), expected, seen["all"])
    return serve, workers, with_data_files(verdict, data_files(workers))


async def ping(request: web.Request) -> web.Response:
    _, _, verdict = _verdict(request.app)
    return web.Response(status=verdict.ping)


async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def ready(request: web.Request) -> web.Response:
    _, _, verdict = _verdict(request.app)
    ok = verdict.ping == 200
    return web.json_response({"ready": ok, "reason": verdict.reason},
                             status=200 if ok else 503)


async def health(request: web.Request) -> web.Response:
    serve, workers, verdict = _verdict(request.app)
    config = request.app[CONFIG]
    serve = serve or {}
    backend = dict(serve.get("backend", {}))
    started = float(serve.get("started", time.time()))
    gpus = await asyncio.to_thread(gpu_info)
    body = {
        "status": verdict.status,
        "reason": verdict.reason,
        "version": VERSION,
        "uptime_s": round(time.time() - started, 1),
        "platform": config.platform.value,
        "backend": {"state": backend.get("state"), "restarts": backend.get("restarts", 0),
                    "pid": backend.get("pid"), "last_error": backend.get("last_error")},
        "models": serve.get("models", []),
        # multi-model mode: each served model's state (loaded, unloaded, loading, cooldown…)
        "model_states": {name: {k: v for k, v in st.items() if k != "path"}
                         for name, st in (serve.get("model_states") or {}).items()},
        "profile": serve.get("profile"),
        # an upstream pool (BACKEND_URLS, BACKENDS_FILE): each llama-server behind the gateway
        **({"upstreams": pool} if (pool := upstreams(serve, workers)) is not None else {}),
        "in_flight": sum(int(w.get("in_flight", 0)) for w in workers),
        "queued": sum(int(w.get("queued", 0)) for w in workers),
        "workers": [int(w.get("pid", 0)) for w in workers],
        "auth": config.auth_enabled,
        # the usage database and the keys file as the workers see them (auth on only)
        **data_files(workers),
        "gpu": gpus,
    }
    code = 503 if verdict.ping == 503 else 200
    return web.json_response(body, status=code)


def create_app(config: Config, runtime_dir: Path) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app[RUNTIME_DIR] = runtime_dir
    app[WORKERS_SEEN] = {"all": False}
    app.router.add_get("/ping", ping)
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.on_response_prepare.append(_server_header)
    return app


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "llamagate"  # not aiohttp's, which names its version


async def _serve(app: web.Application, host: str, port: int, unix: Path | None) -> None:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site: web.BaseSite = (web.TCPSite(runner, host, port) if unix is None
                              else web.UnixSite(runner, str(unix)))
        await site.start()
        stopped = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
        await stopped.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    # Only SIGTERM (from serve, or the kernel when serve dies) stops this process. A SIGINT
    # or SIGHUP sent to serve's process group (Ctrl-C, a terminal hangup, `tini -g`) is
    # serve's to act on: health answers through a drain (`/ping` 503) until serve stops it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="health.server")
    parser.add_argument("--runtime-dir", required=True, type=Path)
    # PORT == PORT_HEALTH: no port of its own; the gateway answers the probes by asking here
    parser.add_argument("--unix", type=Path, default=None, help="listen on this socket instead")
    args = parser.parse_args(argv)
    config = config_or_exit("health")
    asyncio.run(_serve(create_app(config, args.runtime_dir), config.host, config.port_health,
                       args.unix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
