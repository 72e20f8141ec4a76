"""The backend client sends only what llama-server routes: a GET's or HEAD's body is left
behind and other methods never go out (issue 21: bytes llama-server does not read are parsed
as requests of their own), and a connection whose answer came before its request was sent
is closed, never reused."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gateway.upstream.client import BackendPool
from tests.gateway.upstream.conftest import Scenario
from tests.support.fake_llama import FakeLlama
from tests.support.wait import wait_until

COMPLETIONS = "/v1/completions"
JSON = "Content-Type: application/json\r\n"


async def _raw_backend(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                         Awaitable[None]]) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_a_get_or_head_goes_out_without_its_body_and_other_methods_not_at_all(
        run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama) -> None:
        heads: list[bytes] = []
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while head := await reader.readuntil(b"\r\n\r\n"):
                heads.append(head)
                writer.write(ok)
                await writer.drain()
                if len(heads) == 2:
                    heads.append(await reader.read(100))  # anything after the heads: nothing
                    break
            writer.close()
            await writer.wait_closed()

        server, url = await _raw_backend(serve)
        pool = BackendPool(url, 1)
        try:
            for method in ("GET", "HEAD"):
                resp = await pool.request(method, "/v1/models", b"POST /completion HTTP/1.1")
                await resp.read()
            await wait_until(lambda: len(heads) == 3, "the backend to read what it was sent")
            assert b"content-length" not in heads[0].lower() + heads[1].lower(), heads
            assert heads[2] == b"", heads
            for method in ("PURGE", "PUT", "DELETE", "TRACE", "CONNECT"):
                with pytest.raises(ValueError):
                    await pool.request(method, "/v1/models", b"x")
        finally:
            pool.close()
            server.close()
            await server.wait_closed()
    run(scenario)


def test_an_answer_before_the_request_was_sent_closes_its_connection(
        run: Callable[[Scenario], None]) -> None:
    """A backend that refuses a request from its head, without reading its body: the rest of
    the body would be parsed by it as the next request, so the connection is not reused,
    and what was left of the body is not sent."""
    async def scenario(fake: FakeLlama) -> None:
        connections: list[asyncio.StreamWriter] = []
        received: list[int] = []
        refused = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n\r\nno"

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(writer)
            await reader.readuntil(b"\r\n\r\n")
            writer.write(refused)  # at once, keep-alive, the body unread
            await writer.drain()
            total = 0
            try:
                while chunk := await reader.read(1 << 20):
                    total += len(chunk)
            except ConnectionError:
                pass
            writer.close()
            await writer.wait_closed()
            received.append(total)

        server, url = await _raw_backend(serve)
        pool = BackendPool(url, 2)
        big = b"x" * (64 << 20)  # far more than the sockets' buffers hold
        try:
            resp = await pool.request("POST", COMPLETIONS, big, JSON)
            assert resp.status == 413 and await resp.read() == b"no"
            await wait_until(lambda: received, "the refused connection to be closed")
            assert received[0] < len(big)  # the rest of the body never went out
            resp = await pool.request("POST", COMPLETIONS, b"{}", JSON)
            assert resp.status == 413
            assert len(connections) == 2  # the second request went on a new connection
        finally:
            pool.close()
            await wait_until(lambda: len(received) == len(connections), "the backend's handlers")
            server.close()
            await server.wait_closed()
    run(scenario)
