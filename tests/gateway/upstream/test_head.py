"""HEAD through the proxy: the GET's status and headers, its body's length, no body."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import aiohttp

from tests.support.gateway import Gateway


async def _head_then_get(url: str, path: str) -> tuple[bytes, bytes]:
    """A HEAD and then a GET on one keep-alive connection: a body after the HEAD's head
    would be read as the start of the GET's answer."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        heads = []
        for method in ("HEAD", "GET"):
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
            heads.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5))
        return heads[0], heads[1]
    finally:
        writer.close()
        await writer.wait_closed()


def _fields(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)
            if name}


async def test_a_head_answers_with_the_get_s_status_and_length(
        gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.get(gateway.url + "/v1/models") as r:
        status, content_type, body = r.status, r.headers["Content-Type"], await r.read()
    assert status == 200 and body
    async with http.head(gateway.url + "/v1/models") as r:
        assert r.status == status
        assert r.headers["Content-Type"] == content_type
        assert int(r.headers["Content-Length"]) == len(body)


async def test_a_head_of_an_unknown_route_answers_as_its_get(
        gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.get(gateway.url + "/v1/nothing-here") as r:
        status, body = r.status, await r.read()
    assert status == 404
    async with http.head(gateway.url + "/v1/nothing-here") as r:
        assert r.status == 404 and int(r.headers["Content-Length"]) == len(body)


async def test_a_head_answer_has_no_body(gateway: Gateway) -> None:
    head, get = await _head_then_get(gateway.url, "/v1/models")
    assert head.startswith(b"HTTP/1.1 200 ") and int(_fields(head)["content-length"]) > 0
    assert get.startswith(b"HTTP/1.1 200 ")  # not the HEAD's body read as a status line
    assert _fields(get)["content-length"] == _fields(head)["content-length"]
