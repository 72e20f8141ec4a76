"""Refusals answered as the gateway answers them (OpenAI-shaped error JSON through
``refusal_error``, as gateway/stages.py), on the edge server of tests/gateway/edge/support.py
with the timeouts a test chooses: for the tests of stalled requests and compressed bodies."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.edge.call import Call, refusal_error
from gateway.errors import error_parts
from tests.gateway.edge.support import Edge, Scenario
from tests.gateway.edge.support import run_on as run_edge


async def _handler(edge: Edge, call: Call) -> None:
    edge.calls.append(call)
    if call.refusal is not None:
        status, headers, body = error_parts(refusal_error(call.refusal))
        call.respond(status, body, headers=headers)
    elif call.path == "/v1/echo":  # the body and the coding as the handler sees them
        encodings = [v for n, v in call.raw_headers if n.lower() == b"content-encoding"]
        call.respond(200, call.body, "text/plain", {
            "X-Seen-Encoding": call.headers.get("content-encoding", "-"),
            "X-Seen-Raw-Encodings": str(len(encodings))})
    elif call.path == "/v1/slow":
        await asyncio.sleep(edge.slow)
        call.respond(200, b"slow", "text/plain")
    else:
        call.respond(404, b"no", "text/plain")


def run_on(loop: str, scenario: Scenario, **timeouts: Any) -> None:
    """``scenario`` against a server answering as above, built with ``timeouts`` (HttpServer's
    defaults for those not given)."""
    run_edge(loop, scenario, handler=_handler, tunnel=_handler, decorate="",
             **{"keepalive_timeout": 75.0, **timeouts})
