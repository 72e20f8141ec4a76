"""The OpenAPI document of the gateway port, served at /openapi.json.

Written by hand (the routes are few and the bodies are OpenAI's); a test checks
that its paths and methods are exactly the routes the app registers, and a
schemathesis run (tests/security/test_openapi_conformance.py) that the answers match it.

Statuses: every operation may be refused by the HTTP edge before it is routed (400
unparsable, 408 too slow, 413 body too large, 414 target too long, 431 head too large);
every keyed one with 401 (no or bad key), 403 (scope, model allowlist) and 429 (the
key's limits, or too many failed keys from the address). Each error is the one envelope
gateway/errors.py builds (``error`` holding message, type, param and code), ``code``
a string (the proxy maps llama-server's numeric codes to strings).
"""

from __future__ import annotations

import json
from typing import Any

from gateway.edge.call import Call
from gateway.router import Handler

_REASONS = {
    "400": "invalid request", "401": "missing or invalid API key",
    "403": "the key lacks the scope, or may not use the model", "404": "not found",
    "405": "method not allowed (the Allow header lists the methods)",
    "408": "the request was not received in time", "409": "conflict",
    "413": "body too large", "414": "request target too long",
    "422": "the request is valid but cannot be done",
    "429": "rate limited (Retry-After says when to come back)",
    "431": "request head too large", "500": "the keys file could not be read",
    "502": "llama-server's answer was broken", "503": "unavailable (Retry-After when known)",
    "504": "llama-server did not answer in time", "507": "not enough disk space",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                                "schema": {"type": "string"}}}
_EDGE = ("400", "408", "413", "414", "431")  # the edge's refusals, on every route
_KEYED = ("401", "403", "429")  # what auth and the key's limits answer
_PROXIED = ("404", "502", "503", "504")  # what the proxy adds (404: an unknown model)
_CONTROL = ("400", "403", "404", "409", "422", "502", "503", "507")  # serve's model API
_JSON_BODY = {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
_JSON = {"application/json": {"schema": {"type": "object"}}}


def _error(status: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _REASONS[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if status in ("429", "503"):
        response["headers"] = _RETRY_AFTER
    return response


def _responses(ok: dict[str, Any], *statuses: str, keyed: bool = True) -> dict[str, Any]:
    """``ok`` (the success answers), then the errors the operation may answer."""
    errors = {*_EDGE, *(_KEYED if keyed else ()), *statuses}
    return ok | {status: _error(status) for status in sorted(errors)}


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _inference(summary: str, field: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary, "security": [{"bearer": []}, {"apiKey": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": [field],
            "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"},
                           "max_tokens": {"type": "integer", "minimum": -1}}}}}},
        "parameters": [{"name": "X-Request-Timeout", "in": "header", "required": False,
                        "schema": {"type": "number", "minimum": 1, "maximum": 600}}],
        "responses": _responses(
            {"200": {"description": "completion (JSON, or text/event-stream when stream=true)"}},
            *_PROXIED)}}


def _native(method: str, summary: str) -> dict[str, Any]:
    """One of llama-server's native routes (gateway/upstream/llama_routes.py): its answer, or
    the gateway's errors."""
    return {method: {"summary": summary, "responses": {
        "default": {"description": "llama-server's answer, in its own format"}}
        | _responses({}, "400", "413", *_PROXIED)}}


_NATIVE: dict[str, Any] = {
    "/completion": _native("post", "Text completion (llama-server's native format)"),
    "/completions": _native("post", "Text completion (llama-server's native format)"),
    "/infill": _native("post", "Fill in the middle (llama-server)"),
    "/embedding": _native("post", "Embeddings (llama-server's native format)"),
    "/embeddings": _native("post", "Embeddings (llama-server's native format)"),
    "/rerank": _native("post", "Rerank documents (llama-server)"),
    "/reranking": _native("post", "Rerank documents (llama-server)"),
    "/tokenize": _native("post", "Tokenize text (llama-server; no backend slot)"),
    "/detokenize": _native("post", "Token ids to text (llama-server; no backend slot)"),
    "/apply-template": _native("post", "A chat's prompt by the model's template (llama-server)"),
    "/props": _native("get", "The model's properties (llama-server; ?model= with several)"),
    "/slots": _native("get", "The backend's slots, their prompts included (admin scope)"),
}


def _admin_op(summary: str, ok: str = "200", *, body: bool = False,
              params: tuple[str, ...] = ()) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary,
                          "responses": _responses({ok: {"description": "JSON", "content": _JSON}},
                                                  *_CONTROL)}
    if params:
        op["parameters"] = [_path_param(p) for p in params]
    if body:
        op["requestBody"] = _JSON_BODY
    return op


_MODEL_ADMIN: dict[str, Any] = {
    "/admin/models": {"get": _admin_op("Registry: metadata, status, overrides, serving state")},
    "/admin/models/rescan": {"post": _admin_op("Re-read MODELS_DIR")},
    "/admin/models/{name}": {"put": _admin_op("Edit a model's overrides", body=True,
                                              params=("name",))},
    "/admin/models/{name}/load": {"post": _admin_op("Load now (multi-model mode)", "202",
                                                    params=("name",))},
    "/admin/models/{name}/unload": {"post": _admin_op("Unload now (multi-model mode)", "202",
                                                      params=("name",))},
    "/admin/pull": {"post": _admin_op('Pull from the Hub: {"repo", "file" | "pattern", "revision"}',
                                      "202", body=True)},
    "/admin/jobs": {"get": _admin_op("Pull jobs, newest first")},
    "/admin/jobs/{id}": {"get": _admin_op("One pull job with progress", params=("id",)),
                         "delete": _admin_op("Cancel a pull", params=("id",))},
    "/admin/profile": {"get": _admin_op("Served profile and model states"),
                       "put": _admin_op('Switch profile: {"profile": name}', body=True)},
}

_KEYS_ADMIN: dict[str, Any] = {
    "/admin/keys": {"get": {"summary": "Keys, without secrets",
                            "responses": _responses({"200": {"description": "key list",
                                                             "content": _JSON}})}},
    "/admin/keys/reload": {"post": {
        "summary": "Re-read the keys file (500: it is unreadable; the last good keys stay)",
        "responses": _responses({"200": {"description": "key count", "content": _JSON},
                                 "500": {"description": _REASONS["500"], "content": _JSON}})}},
    "/admin/usage": {"get": {
        "summary": "Usage by key, model and hour",
        "parameters": [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                       for n in ("key", "since", "until")],
        "responses": _responses({"200": {"description": "usage rows", "content": _JSON}})}},
}

_ERROR_FIELDS = {"type": "object", "required": ["message", "type", "code"], "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "string"},
    "param": {"type": ["string", "null"]}}}
_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": _ERROR_FIELDS}}


def _paths() -> dict[str, Any]:
    public: dict[str, Any] = {"security": []}
    return {
        "/v1/chat/completions": _inference("Chat completion (OpenAI)", "messages"),
        "/v1/completions": _inference("Text completion (OpenAI)", "prompt"),
        "/v1/embeddings": _inference("Embeddings (OpenAI)", "input"),
        "/v1/models": {"get": {"summary": "Models this key may use", "responses": _responses(
            {"200": {"description": "OpenAI model list", "content": _JSON}}, *_PROXIED)}},
        "/v1/{path}": {"x-methods": "any", "get": {
            "summary": "Any other llama-server /v1 route, passed through",
            "parameters": [_path_param("path")],
            "responses": {"default": {"description": "llama-server's answer"}}
            | _responses({}, "405", *_PROXIED)}},
        "/ping": {"get": {"summary": "200 ready, 204 initializing, 503 unhealthy", **public,
                          "responses": _responses({"200": {"description": "ready"},
                                                   "204": {"description": "initializing"},
                                                   "503": {"description": "unhealthy or draining"}},
                                                  keyed=False)}},
        "/health": {"get": {"summary": "Status as JSON", **public, "responses": _responses(
            {"200": {"description": "healthy or initializing", "content": _JSON},
             "503": {"description": "unhealthy", "content": _JSON}}, keyed=False)}},
        "/metrics": {"get": {"summary": "Prometheus metrics (JSON with Accept: application/json)",
                             "responses": _responses({"200": {"description": "text exposition"}})}},
        "/openapi.json": {"get": {"summary": "This document", **public, "responses": _responses(
            {"200": {"description": "OpenAPI 3.1", "content": _JSON}}, keyed=False)}},
    }


def document(admin: bool, models_admin: bool = False) -> dict[str, Any]:
    paths = _paths() | _NATIVE
    if admin:
        paths |= _KEYS_ADMIN
    if admin and models_admin:
        paths |= _MODEL_ADMIN
    return {
        "openapi": "3.1.0",
        "info": {"title": "llamagate", "version": "0.1.0",
                 "description": "OpenAI-compatible gateway in front of llama.cpp's llama-server"},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
            "schemas": {"Error": _ERROR_SCHEMA},
        },
        "security": [{"bearer": []}, {"apiKey": []}],
    }


def handler(admin: bool, models_admin: bool = False) -> Handler:
    body = json.dumps(document(admin, models_admin)).encode()  # the same document every time

    async def openapi(call: Call) -> None:
        call.respond(200, body)

    return openapi
