"""Turns every failure into OpenAI-shaped error JSON; no stack trace leaves the process."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import GatewayError, error_body, error_response
from gateway.exchange import EXCHANGE

log = logging.getLogger("llamagate.gateway")

_HTTP_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "payload_too_large"),
}


def _from_http_exception(exc: web.HTTPException) -> web.Response:
    type_, code = _HTTP_TYPES.get(exc.status, ("server_error", "http_error"))
    message = exc.reason
    if exc.status == 413:
        message = "request body is too large (MAX_BODY_BYTES)"
    elif exc.status == 404:
        message = "no such route"
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    return web.Response(status=exc.status, body=error_body(message, type_, code),
                        content_type="application/json", headers=headers)


def _note(request: web.Request, code: str) -> None:
    # the access line says why the gateway answered with an error
    ex = request.get(EXCHANGE)
    if ex is not None and ex.error is None:
        ex.error = code


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        _note(request, exc.code)
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        _note(request, _HTTP_TYPES.get(exc.status, ("", "http_error"))[1])
        return _from_http_exception(exc)
    except (ConnectionResetError, OSError) as exc:
        # the client went away mid-response; there is nobody to answer
        log.info("client connection lost: %s", type(exc).__name__)
        raise
    except Exception:
        log.exception("unhandled error")
        return web.Response(status=500, content_type="application/json",
                            body=error_body("internal gateway error", "server_error",
                                            "internal_error"))
