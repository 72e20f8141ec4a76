"""Turns every failure into OpenAI-shaped error JSON; no stack trace leaves the process."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import GatewayError, error_for, error_response, internal_error_body
from gateway.exchange import EXCHANGE

log = logging.getLogger("llamagate.gateway")


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    message = exc.reason
    if exc.status == 413:
        message = "request body is too large (MAX_BODY_BYTES)"
    elif exc.status == 404:
        message = "no such route"
    error = error_for(exc.status, message)
    error.headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    return error


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
        error = _from_http_exception(exc)
        _note(request, error.code)
        return error_response(error)
    except (ConnectionResetError, OSError) as exc:
        # the client went away mid-response; there is nobody to answer
        log.info("client connection lost: %s", type(exc).__name__)
        raise
    except Exception:
        log.exception("unhandled error")
        return web.Response(status=500, content_type="application/json",
                            body=internal_error_body())
