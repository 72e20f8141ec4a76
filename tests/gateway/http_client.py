"""A raw HTTP/1.1 client for the edge server's tests: bytes out exactly as written,
answers split with httptools, so keep-alive, pipelining and framing are visible."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

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
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

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
