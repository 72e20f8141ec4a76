"""A gateway worker process: `python -m gateway.worker --wiring JSON`.

Started by the serve process (one or GATEWAY_WORKERS of them sharing the port
with SO_REUSEPORT). On SIGTERM or SIGINT it drains: new requests get 503 with
Retry-After, requests in flight get up to SHUTDOWN_GRACE_SECONDS to finish;
SIGUSR1 (serve's second signal) cuts the drain short.
SIGHUP reloads the keys file with auth on (gateway/keys_wiring.py) and is
ignored otherwise: it must never end a worker.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from backend.upstreams import UpstreamSpec, spec_from_json
from core.entry import config_or_exit, loop_factory
from gateway.app import Wiring, create_app, serve
from gateway.drain import drain
from gateway.state import APP_STATE

log = logging.getLogger("llamagate.gateway")


def parse_wiring(raw: str) -> Wiring:
    data = json.loads(raw)
    key = None
    if data.get("backend_key_file"):
        key = Path(data["backend_key_file"]).read_text().strip()
    # the key only ever comes in a file: the wiring is on the command line
    return Wiring(backend_url=data["backend_url"], backend_key=key or None,
                  runtime_dir=Path(data["runtime_dir"]) if data.get("runtime_dir") else None,
                  models=tuple(data.get("models", ())),
                  models_known=data.get("models_known") is not False,
                  control_socket=Path(data["control_socket"]) if data.get("control_socket") else None,
                  admission_socket=Path(data["admission_socket"])
                  if data.get("admission_socket") else None,
                  limits_file=Path(data["limits_file"]) if data.get("limits_file") else None,
                  worker_index=int(data.get("worker_index", 0)),
                  health_socket=Path(data["health_socket"]) if data.get("health_socket") else None,
                  upstreams=_upstreams(data.get("upstreams_file")))


def _upstreams(path: str | None) -> tuple[UpstreamSpec, ...]:
    """A pool's upstreams, keys included: from a private file, as the backend key is."""
    if not path:
        return ()
    return tuple(spec_from_json(entry) for entry in json.loads(Path(path).read_text()))


async def run(app: web.Application, host: str, port: int, reuse_port: bool) -> None:
    state = app[APP_STATE]
    served = await serve(app, host, port, reuse_port=reuse_port)
    log.info("gateway listening", extra={"host": host, "port": port, "pid": os.getpid()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def cut_short() -> None:
        stop.set()
        state.drain_deadline_now()

    # SIGTERM (serve's stop) and SIGINT (a terminal's Ctrl-C reaches serve's whole process
    # group) start the drain, however many arrive, in whatever order: only serve's SIGUSR1
    # (its second signal) cuts the drain short.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, cut_short)
    await stop.wait()
    await drain(state)
    await served.close()


def main(argv: list[str] | None = None) -> int:
    # Ignored until the keys reload takes SIGHUP over (auth on), and after it gives it back:
    # a SIGHUP to serve's process group (a terminal hangup, `tini -g`) reaches this process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="gateway.worker")
    parser.add_argument("--wiring", required=True)
    args = parser.parse_args(argv)
    config = config_or_exit("gateway")
    wiring = parse_wiring(args.wiring)
    app = create_app(config, wiring)
    # Everything made so far lives as long as the process: keep it out of every collection,
    # and collect the young generation less often (a request allocates a few hundred
    # containers). A/B runs on the static upstream were within their noise, so this is
    # kept for the shorter pauses, not for a measured gain.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(run(app, config.host, config.port, config.gateway_workers > 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
