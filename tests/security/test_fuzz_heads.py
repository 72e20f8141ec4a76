"""A bounded fuzz of request heads (issue 21, Tests): a few thousand mutations of valid
heads (bytes flipped, CR, LF and NUL inserted, headers duplicated or oversized, odd methods
and targets, heads cut short), each on a connection of its own to the gateway in front of
the fake llama-server. Whatever arrives, the gateway answers it without a 5xx, or closes
the connection, within a deadline: no mutation hangs a connection or breaks the server.

The seed is fixed, so every run sends the same bytes; a failure names the case to replay."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tests.support.fake_llama import FakeLlama
from tests.support.gateway import auth_config, serve_gateway
from tests.support.keytool import KeyTool

SEED = 21
CASES = 3000
PARALLEL = 16
DEADLINE = 5.0  # seconds for one connection to be answered or closed

CHAT = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 2}).encode()
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE",
           b"CONNECT", b"PURGE", b"SEARCH", b"PROPFIND", b"QUERY", b"get", b"G ET", b"", b"\x00"]
TARGETS = [b"/v1/chat/completions", b"/v1/models", b"/admin/keys", b"/metrics", b"/ping",
           b"/health", b"/openapi.json", b"/nowhere", b"*", b"http://x/v1/models", b"/v1/../admin",
           b"/%2e%2e/admin", b"//v1/models", b"/v1/models?" + b"a" * 9000, b"/\xff\xfe", b"", b"/v1/x%00",
           b"/" + b"a" * 70_000]


def _heads(secret: str) -> list[list[bytes]]:
    """Valid requests as lists of lines (request line, headers; the body last)."""
    key = f"Authorization: Bearer {secret}".encode()
    post = [b"POST /v1/chat/completions HTTP/1.1", b"Host: test", key,
            b"Content-Type: application/json", b"Content-Length: %d" % len(CHAT), CHAT]
    return [
        post,
        [b"GET /v1/models HTTP/1.1", b"Host: test", key, b""],
        [b"GET /admin/keys HTTP/1.1", b"Host: test", b"x-api-key: " + secret.encode(), b""],
        [b"GET /ping HTTP/1.1", b"Host: test", b""],
        [b"GET /metrics HTTP/1.0", key, b""],
        [b"POST /v1/chat/completions HTTP/1.1", b"Host: test", key, b"Transfer-Encoding: chunked",
         b"", b"%x\r\n%b\r\n0\r\n" % (len(CHAT), CHAT)],
        [b"OPTIONS /v1/chat/completions HTTP/1.1", b"Host: test", b"Origin: http://a.example",
         b"Access-Control-Request-Method: POST", b""],
    ]


def _join(lines: list[bytes]) -> bytes:
    return b"\r\n".join(lines[:-1]) + b"\r\n\r\n" + lines[-1]


def _mutations(rng: random.Random) -> list[Callable[[list[bytes]], bytes]]:
    def flip(lines: list[bytes]) -> bytes:
        data = bytearray(_join(lines))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)

    def insert(lines: list[bytes]) -> bytes:
        data = _join(lines)
        at = rng.randrange(len(data))
        return data[:at] + rng.choice([b"\r", b"\n", b"\x00", b"\r\n", b"\r\n\r\n", b" ", b"\t"]) + data[at:]

    def duplicate(lines: list[bytes]) -> bytes:
        i = rng.randrange(1, max(2, len(lines) - 1))
        return _join(lines[:i] + [lines[i - 1] if i > 1 else lines[1]] * rng.randint(1, 3) + lines[i:])

    def oversize(lines: list[bytes]) -> bytes:
        big = b"X-Big: " + b"a" * rng.choice([100, 8_000, 70_000, 200_000])
        many = [b"X-H%d: v" % n for n in range(rng.choice([10, 200, 3_000]))]
        return _join([lines[0], rng.choice([big, *many[:1]]), *many, *lines[1:]])

    def request_line(lines: list[bytes]) -> bytes:
        version = rng.choice([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"", b"HTTP/9"])
        line = b" ".join(x for x in (rng.choice(METHODS), rng.choice(TARGETS), version))
        return _join([line, *lines[1:]])

    def header_tricks(lines: list[bytes]) -> bytes:
        trick = rng.choice([b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: 1e9",
                            b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked",
                            b"Content-Length : 3", b" Host: x", b"Host: a", b"Expect: 100-continue",
                            b"Content-Encoding: gzip", b"Connection: upgrade", b"Upgrade: h2c",
                            b"x-api-key: \x94", b"Authorization: Bearer", b"NoColon", b": empty"])
        return _join([*lines[:-1][: rng.randrange(1, len(lines))], trick, *lines[len(lines) - 1:]])

    def truncate(lines: list[bytes]) -> bytes:
        data = _join(lines)
        return data[:rng.randrange(len(data))]

    return [flip, insert, duplicate, oversize, request_line, header_tricks, truncate]


def _cases(secret: str) -> list[bytes]:
    rng = random.Random(SEED)
    heads, mutations = _heads(secret), _mutations(rng)
    return [rng.choice(mutations)(rng.choice(heads)) for _ in range(CASES)]


async def _send(port: int, data: bytes) -> bytes:
    """``data`` on a connection of its own, then EOF; everything the server sent back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        writer.write_eof()
        await writer.drain()
        return await reader.read()
    except ConnectionResetError:
        return b""  # the server closed on us: an answer too
    finally:
        writer.close()


async def test_mutated_heads_get_no_5xx_and_hang_no_connection(
        tmp_path: Path, fake: FakeLlama, keytool: KeyTool) -> None:
    _, secret = keytool.generate("fuzz", "--scopes", "inference,admin,metrics")
    config = replace(auth_config(tmp_path), auth_failures_per_minute=1_000_000,
                     max_queue_size=64)
    cases = _cases(secret)
    server_errors: list[str] = []
    hung: list[str] = []
    gate = asyncio.Semaphore(PARALLEL)
    async with serve_gateway(fake.url, config) as gw:
        async def one(i: int, data: bytes) -> None:
            async with gate:
                try:
                    answer = await asyncio.wait_for(_send(gw.port, data), DEADLINE)
                except TimeoutError:
                    hung.append(f"case {i}: {data[:120]!r}")
                    return
            for line in answer.split(b"\r\n"):
                if line.startswith(b"HTTP/1.") and line[9:10] == b"5":
                    server_errors.append(f"case {i}: {line!r} for {data[:120]!r}")

        await asyncio.gather(*(one(i, data) for i, data in enumerate(cases)))
    assert hung == [], f"{len(hung)} hung connections:\n" + "\n".join(hung[:20])
    assert server_errors == [], f"{len(server_errors)} 5xx:\n" + "\n".join(server_errors[:20])
