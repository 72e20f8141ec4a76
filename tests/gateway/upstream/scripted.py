"""A backend that answers with bytes the test wrote, for the answers neither llama-server nor
the fake upstream (tests/gateway/fake_upstream.py) gives on demand: 1xx heads, CR or CRLF
framed streams, headers of every kind. It speaks just enough HTTP/1.1 for that: a request
head, a body of Content-Length bytes, keep-alive until the client closes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

HEALTH = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
          b'{"status":"ok"}')

NOT_FOUND = (b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
             b"{}")


def answer(status: str, body: bytes, *headers: str) -> bytes:
    """A whole response: ``status`` as in "200 OK", ``headers`` as "Name: value" lines."""
    lines = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 {status}\r\n{lines}Content-Length: {len(body)}\r\n\r\n".encode() + body


@dataclass
class Scripted:
    """``answers[(method, path)]``: the bytes written for each such request (/health is
    answered ok); ``seen``: (method, path, body) of every request but /health's."""

    answers: dict[tuple[str, str], bytes] = field(default_factory=dict)
    seen: list[tuple[str, str, bytes]] = field(default_factory=list)
    url: str = ""
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target = head.split(b" ", 2)[:2]
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                path = target.decode().partition("?")[0]
                if path == "/health":
                    writer.write(HEALTH)
                else:
                    self.seen.append((method.decode(), path, body))
                    writer.write(self.answers.get((method.decode(), path), NOT_FOUND))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
