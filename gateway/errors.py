"""The gateway's own errors, the one table of their types and the one renderer of
OpenAI-shaped error JSON.

    GatewayError                      status  type
     ├── BadRequest                   400     invalid_request_error
     ├── Unauthorized                 401     authentication_error
     ├── Forbidden                    403     permission_error
     ├── NotFound                     404     invalid_request_error
     ├── MethodNotAllowed             405     invalid_request_error   (Allow)
     ├── RateLimited                  429     rate_limit_error        (Retry-After)
     ├── BadGateway                   502     server_error
     ├── BackendUnavailable           503     service_unavailable     (Retry-After)
     └── UpstreamTimeout              504     timeout

Errors produced by llama-server keep their status, message and type, with the numeric
`code` it sends made a string (gateway/upstream/proxy.py); these are
the ones the gateway makes, and their `code` says so. A status answered without a
class of its own (the edge server's refusals, aiohttp's HTTP exceptions, the control
API's errors) takes its type and default code from the same table, ERROR_TYPES.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Final

from aiohttp import web

# status → (type, default code): every error the gateway makes is typed here and only here
ERROR_TYPES: Final[dict[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "payload_too_large"),
    414: ("invalid_request_error", "uri_too_long"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    431: ("invalid_request_error", "request_header_fields_too_large"),
    500: ("server_error", "internal_error"),
    502: ("server_error", "bad_gateway"),
    503: ("service_unavailable", "backend_unavailable"),
    504: ("timeout", "upstream_timeout"),
}


def error_type(status: int) -> tuple[str, str]:
    """(type, default code) of an error answered with ``status``; a status missing from
    ERROR_TYPES is the client's fault below 500 and the server's from 500 on."""
    found = ERROR_TYPES.get(status)
    if found is not None:
        return found
    return ("invalid_request_error", "http_error") if status < 500 else ("server_error", "http_error")


class GatewayError(Exception):
    status, type, code = (500, *ERROR_TYPES[500])

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.retry_after = retry_after
        self.headers = headers or {}


class BadRequest(GatewayError):
    status, type, code = (400, *ERROR_TYPES[400])


class Unauthorized(GatewayError):
    status, type, code = (401, *ERROR_TYPES[401])


class Forbidden(GatewayError):
    status, type, code = (403, *ERROR_TYPES[403])


class NotFound(GatewayError):
    status, type, code = (404, *ERROR_TYPES[404])


class MethodNotAllowed(GatewayError):
    status, type, code = (405, *ERROR_TYPES[405])


class RateLimited(GatewayError):
    status, type, code = (429, *ERROR_TYPES[429])


class BadGateway(GatewayError):
    status, type, code = (502, *ERROR_TYPES[502])


class BackendUnavailable(GatewayError):
    status, type, code = (503, *ERROR_TYPES[503])


class UpstreamTimeout(GatewayError):
    status, type, code = (504, *ERROR_TYPES[504])


def error_for(status: int, message: str, *, code: str | None = None) -> GatewayError:
    """An error answered with ``status``, typed by ERROR_TYPES, for a status without a
    class of its own (the edge server's refusals, aiohttp's HTTP exceptions)."""
    error = GatewayError(message)
    error.status = status
    error.type, error.code = error_type(status)
    if code is not None:
        error.code = code
    return error


def error_body(message: str, type_: str, code: str, param: str | None = None,
               extra: Mapping[str, object] | None = None) -> bytes:
    """The one builder of the OpenAI error envelope (``extra``: fields a caller adds)."""
    error: dict[str, object] = {"message": message, "type": type_, "param": param, "code": code}
    if extra:
        error.update(extra)
    return json.dumps({"error": error}).encode()


def internal_error_body() -> bytes:
    """The body of a 500 for a bug in the gateway (logged, with its traceback, by the caller)."""
    return error_body("internal gateway error", *ERROR_TYPES[500])


def error_parts(exc: GatewayError) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (Retry-After included) and body of the error's answer."""
    headers = dict(exc.headers)
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return exc.status, headers, error_body(exc.message, exc.type, exc.code, exc.param)


def error_response(exc: GatewayError) -> web.Response:
    status, headers, body = error_parts(exc)
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def sse_error_event(exc: GatewayError) -> bytes:
    """A final SSE event for a stream that cannot finish normally, typed as its error."""
    return b"data: " + error_body(exc.message, exc.type, exc.code, exc.param) + b"\n\n"
