"""No header the gateway writes can end its line early: a name or value holding CR, LF or
NUL (the gateway's own, or a backend's passed through) is dropped, never written, in whole
answers, streamed ones and the decorator's lines alike."""

from __future__ import annotations

import pytest

from gateway.edge.call import Call
from tests.gateway.edge.support import Edge, Scenario, run_on
from tests.support.rawhttp import request

UNSAFE = {
    "X-Split": "a\r\nSet-Cookie: injected=1",  # a whole header smuggled in
    "X-Bare-Lf": "a\nSet-Cookie: injected=2",
    "X-Bare-Cr": "a\rb",
    "X-Nul": "a\x00b",
    "X-Name\r\nSet-Cookie: injected=3": "name",
}
SAFE = {"X-Safe": "kept", "X-Also-Safe": "kept: too"}


async def _handler(edge: Edge, call: Call) -> None:
    headers = {**SAFE, **UNSAFE}
    if call.path == "/v1/whole":
        call.respond(200, b"whole", "text/plain", headers)
    elif call.path == "/v1/type":
        call.respond(200, b"typed", "text/plain\r\nSet-Cookie: injected=4")
    else:
        call.start(200, headers)
        await call.write(b"streamed")
        call.finish()


def check(answer_headers: dict[str, str]) -> None:
    assert "set-cookie" not in answer_headers
    for name in UNSAFE:
        assert name.split("\r")[0].lower() not in answer_headers
    assert {k: answer_headers[k.lower()] for k in SAFE} == SAFE
    assert answer_headers["x-decorated"] == "yes"  # the decorator's good line stays
    assert "x-bad" not in answer_headers


@pytest.mark.parametrize("path", ["/v1/whole", "/v1/stream"])
def test_a_header_with_cr_lf_or_nul_is_never_written(loop: str, path: str) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("GET", path) + request("GET", "/v1/type"))
        answer, typed = await client.answers(2)
        assert answer.status == 200
        assert answer.body == (b"whole" if path == "/v1/whole" else b"streamed")
        check(answer.headers)
        assert typed.body == b"typed"
        assert "content-type" not in typed.headers  # dropped whole, not cut at the CR
        assert "set-cookie" not in typed.headers
        assert answer.keep_alive and typed.keep_alive  # the connection still frames answers
    run_with(loop, scenario)


def run_with(loop: str, scenario: Scenario) -> None:
    run_on(loop, scenario, handler=_handler, decorate="X-Decorated: yes\r\nX-Bad: a\nb\r\n")


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)
