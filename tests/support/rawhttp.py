"""The tests' one raw HTTP/1.1 client: bytes out exactly as written (client libraries
normalise `..`, `//` and percent-encoding, which would hide exactly what some tests send),
answers split with httptools, so keep-alive, pipelining and framing are visible, and a
connection a test can drop at a moment of its choosing (as a browser tab closing does).

`Client` is one connection; `request`, `chunked` and `json_request` build the bytes it
sends; `exchange` is one request on a connection of its own, answered as (status, JSON).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools


@dataclass
class Answer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    keep_alive: bool = True


class _Collector:
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[Answer] = []
        self.current = Answer()

    def on_message_begin(self) -> None:
        self.current = Answer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.current.status = self.parser.get_status_code()
        self.current.keep_alive = self.parser.should_keep_alive()
        self.done.append(self.current)


class Client:
    """One connection; ``send`` writes raw bytes, ``answers`` reads n whole answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._collector = _Collector()
        self._handed = 0

    @classmethod
    async def connect(cls, where: int | str) -> Client:
        """A connection to a port of 127.0.0.1, or to a base URL's host and port."""
        if isinstance(where, int):
            host, port = "127.0.0.1", where
        else:
            parts = urlsplit(where)
            assert parts.hostname is not None and parts.port is not None, where
            host, port = parts.hostname, parts.port
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    @classmethod
    async def sending(cls, where: int | str, data: bytes) -> Client:
        """``connect``, then ``send`` ``data``."""
        client = await cls.connect(where)
        await client.send(data)
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answers(self, n: int, within: float = 5.0) -> list[Answer]:
        collector = self._collector
        while len(collector.done) - self._handed < n:
            data = await asyncio.wait_for(self.reader.read(65536), within)
            if not data:
                raise AssertionError(f"connection closed after {len(collector.done)} answers")
            collector.parser.feed_data(data)
        out = collector.done[self._handed:self._handed + n]
        self._handed += n
        return out

    async def answer(self, within: float = 5.0) -> Answer:
        return (await self.answers(1, within))[0]

    async def closed(self, within: float = 5.0) -> bool:
        """True once the server has closed the connection (nothing more to read)."""
        rest = await asyncio.wait_for(self.reader.read(), within)
        return rest == b""

    async def read_all(self, within: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.read(), within)

    async def read_head(self, within: float = 5.0) -> bytes:
        """The bytes up to the end of the answer's head, unparsed."""
        return await self.read_until(b"\r\n\r\n", within)

    async def read_until(self, marker: bytes, within: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(marker), within)

    async def drop(self) -> float:
        """Close the connection at once; returns when it was closed (time.monotonic)."""
        self.writer.close()
        closed = time.monotonic()
        await self.writer.wait_closed()
        return closed

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: test"]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(method: str, path: str, pieces: list[bytes]) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    return head + b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def json_request(path: str, body: Any = None, headers: dict[str, str] | None = None) -> bytes:
    """POST of ``body`` as JSON, or a GET when there is none."""
    data = json.dumps(body).encode() if body is not None else b""
    lines = [f"{'POST' if body is not None else 'GET'} {path} HTTP/1.1", "Host: test",
             "Content-Type: application/json", f"Content-Length: {len(data)}",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


async def exchange(base_url: str, method: str, target: str,
                   headers: dict[str, str] | None = None, body: str = "") -> tuple[int, Any]:
    """Send one request with ``target`` as given, on a connection of its own that the
    server closes; return (status, parsed JSON body or None)."""
    netloc = urlsplit(base_url).netloc
    lines = [f"{method} {target} HTTP/1.1", f"Host: {netloc}", "Connection: close",
             "Content-Type: application/json", f"Content-Length: {len(body.encode())}",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    client = await Client.sending(base_url, ("\r\n".join(lines) + "\r\n\r\n" + body).encode())
    try:
        answer = await client.answer()
    finally:
        await client.close()
    try:
        return answer.status, json.loads(answer.body)
    except ValueError:
        return answer.status, None
