"""Spellings of protected routes a client might try without a key, for the bypass tests
(sent byte for byte by tests/support/rawhttp.py's `exchange`)."""

from __future__ import annotations

import json

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
