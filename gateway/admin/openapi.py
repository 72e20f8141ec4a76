"""The OpenAPI document of the gateway port, served at /openapi.json.

Written by hand (the routes are few and the bodies are OpenAI's); a test checks
that its paths and methods are exactly the routes the app registers.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.edge.call import Call
from gateway.router import Handler

_ERROR = {"description": "OpenAI-shaped error",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_JSON_BODY = {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}


def _inference(summary: str, field: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary, "security": [{"bearer": []}, {"apiKey": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": [field],
            "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"},
                           "max_tokens": {"type": "integer", "minimum": 1}}}}}},
        "parameters": [{"name": "X-Request-Timeout", "in": "header", "required": False,
                        "schema": {"type": "number", "minimum": 1, "maximum": 600}}],
        "responses": {"200": {"description": "completion (JSON, or text/event-stream when stream=true)"},
                      **{code: _ERROR for code in ("400", "401", "403", "404", "413", "429", "503",
                                                   "504")}}}}


def _admin_op(summary: str, ok: str = "200", *, body: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary,
                          "responses": {ok: {"description": "JSON"}, "400": _ERROR, "404": _ERROR}}
    if body:
        op["requestBody"] = _JSON_BODY
    return op


_MODEL_ADMIN: dict[str, Any] = {
    "/admin/models": {"get": _admin_op("Registry: metadata, status, overrides, serving state")},
    "/admin/models/rescan": {"post": _admin_op("Re-read MODELS_DIR")},
    "/admin/models/{name}": {"put": _admin_op("Edit a model's overrides", body=True)},
    "/admin/models/{name}/load": {"post": _admin_op("Load now (multi-model mode)", "202")},
    "/admin/models/{name}/unload": {"post": _admin_op("Unload now (multi-model mode)", "202")},
    "/admin/pull": {"post": _admin_op('Pull from the Hub: {"repo", "file" | "pattern", "revision"}',
                                      "202", body=True)},
    "/admin/jobs": {"get": _admin_op("Pull jobs, newest first")},
    "/admin/jobs/{id}": {"get": _admin_op("One pull job with progress"),
                         "delete": _admin_op("Cancel a pull")},
    "/admin/profile": {"get": _admin_op("Served profile and model states"),
                       "put": _admin_op('Switch profile: {"profile": name}', body=True)},
}


def document(admin: bool, models_admin: bool = False) -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/v1/chat/completions": _inference("Chat completion (OpenAI)", "messages"),
        "/v1/completions": _inference("Text completion (OpenAI)", "prompt"),
        "/v1/embeddings": _inference("Embeddings (OpenAI)", "input"),
        "/v1/models": {"get": {"summary": "Models this key may use",
                               "responses": {"200": {"description": "OpenAI model list"},
                                             "401": _ERROR}}},
        "/v1/{path}": {"x-methods": "any", "get": {
            "summary": "Any other llama-server /v1 route, passed through",
            "parameters": [{"name": "path", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": {"description": "llama-server's answer"}}}},
        "/ping": {"get": {"summary": "200 ready, 204 initializing, 503 unhealthy", "security": [],
                          "responses": {"200": {"description": "ready"},
                                        "204": {"description": "initializing"},
                                        "503": {"description": "unhealthy or draining"}}}},
        "/health": {"get": {"summary": "Status as JSON", "security": [],
                            "responses": {"200": {"description": "healthy or initializing"},
                                          "503": {"description": "unhealthy"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (JSON with Accept: application/json)",
                             "responses": {"200": {"description": "text exposition"}}}},
        "/openapi.json": {"get": {"summary": "This document", "security": [],
                                  "responses": {"200": {"description": "OpenAPI 3.1"}}}},
    }
    if admin:
        paths |= {
            "/admin/keys": {"get": {"summary": "Keys, without secrets",
                                    "responses": {"200": {"description": "key list"}}}},
            "/admin/keys/reload": {"post": {"summary": "Re-read the keys file",
                                            "responses": {"200": {"description": "key count"}}}},
            "/admin/usage": {"get": {"summary": "Usage by key, model and hour",
                                     "parameters": [{"name": n, "in": "query", "required": False,
                                                     "schema": {"type": "string"}}
                                                    for n in ("key", "since", "until")],
                                     "responses": {"200": {"description": "usage rows"}}}},
        }
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
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "object", "required": ["message", "type", "code"], "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"},
                    "code": {"type": ["string", "null"]}, "param": {"type": ["string", "null"]}}}}}},
        },
        "security": [{"bearer": []}, {"apiKey": []}],
    }


def handler(admin: bool, models_admin: bool = False) -> Handler:
    body = json.dumps(document(admin, models_admin)).encode()  # the same document every time

    async def openapi(call: Call) -> None:
        call.respond(200, body)

    return openapi
