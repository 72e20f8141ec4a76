"""The gateway's own errors and the one renderer of OpenAI-shaped error JSON.

    GatewayError                      status  type
     ├── BadRequest                   400     invalid_request_error
     │    └── PayloadTooLarge         413     invalid_request_error
     ├── Unauthorized                 401     authentication_error
     ├── Forbidden                    403     permission_error
     ├── NotFound                     404     not_found_error / invalid_request_error
     ├── MethodNotAllowed             405     invalid_request_error   (Allow)
     ├── RateLimited                  429     rate_limit_error        (Retry-After)
     ├── BackendUnavailable           503     service_unavailable     (Retry-After)
     └── UpstreamTimeout              504     timeout

Errors produced by llama-server itself are passed through unchanged; these are
the ones the gateway makes, and their `code` says so.
"""

from __future__ import annotations

import json
import math

from aiohttp import web


class GatewayError(Exception):
    status = 500
    type = "internal_error"
    code = "internal_error"

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
    status, type, code = 400, "invalid_request_error", "invalid_request"


class PayloadTooLarge(BadRequest):
    status, code = 413, "payload_too_large"


class Unauthorized(GatewayError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(GatewayError):
    status, type, code = 403, "permission_error", "permission_denied"


class NotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(GatewayError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class RateLimited(GatewayError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class BadGateway(GatewayError):
    status, type, code = 502, "server_error", "bad_gateway"


class BackendUnavailable(GatewayError):
    status, type, code = 503, "service_unavailable", "backend_unavailable"


class UpstreamTimeout(GatewayError):
    status, type, code = 504, "timeout", "upstream_timeout"


def error_body(message: str, type_: str, code: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param,
                                 "code": code}}).encode()


def error_parts(exc: GatewayError) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (Retry-After included) and body of the error's answer."""
    headers = dict(exc.headers)
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return exc.status, headers, error_body(exc.message, exc.type, exc.code, exc.param)


def error_response(exc: GatewayError) -> web.Response:
    status, headers, body = error_parts(exc)
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def sse_error_event(message: str, type_: str, code: str) -> bytes:
    """A final SSE event for a stream that cannot finish normally."""
    return b"data: " + error_body(message, type_, code) + b"\n\n"
