"""HTTP/1.1 requests with the request target sent byte for byte: client libraries normalise
`..`, `//` and percent-encoding, which would hide exactly what the bypass tests send."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

# Every variant of a protected route a client might try without a key.
BYPASS_PATHS = (
    "//v1/chat/completions", "/v1//chat/completions", "/v1/chat/completions/",
    "/v1/./chat/completions", "/./v1/chat/completions", "/V1/chat/completions",
    "/v1/Chat/Completions", "/v1%2Fchat%2Fcompletions", "/v1/chat%2Fcompletions",
    "/v1/chat/completions%3F", "/v1/chat/completions%23", "/v1/chat/completions%00",
    "/v1/%2e/chat/completions", "/%761/chat/completions", "/v1/chat/completions?x=/../",
    "/v1/../admin/keys/reload", "/v1/%2e%2e/admin/keys/reload", "/v1/%2E%2E/admin/keys/reload",
    "/v1/..%2fadmin/keys/reload", "/v1/%2e%2e%2fadmin%2fkeys%2freload", "/v1/chat/../../admin/keys",
    "/%61dmin/keys/reload", "/%2561dmin/keys/reload", "/ADMIN/keys/reload", "/Admin/keys",
    "/admin//keys/reload", "/admin/keys/reload/", "/admin/./keys/reload", "/admin%2Fkeys%2Freload",
    "/admin/keys%2Freload", "//admin/keys/reload", "/admin/keys/reload;x", "/admin\\keys\\reload",
    "/ping/../admin/keys/reload", "/health/../v1/chat/completions", "/health%2F..%2Fadmin/keys",
    "/metrics/", "//metrics", "/%6detrics", "/v1/../slots", "/v1/%2e%2e/props",
    "http://127.0.0.1/admin/keys/reload", "http://evil.example/v1/chat/completions",
)
CHAT_BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 2})


async def raw_request(base_url: str, method: str, target: str,
                      headers: dict[str, str] | None = None, body: str = "") -> tuple[int, Any]:
    """Send one request with ``target`` as given; return (status, parsed JSON body or None)."""
    parts = urlsplit(base_url)
    assert parts.hostname is not None and parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close",
                 "Content-Type: application/json", f"Content-Length: {len(body.encode())}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n" + body).encode())
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, payload = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, None
