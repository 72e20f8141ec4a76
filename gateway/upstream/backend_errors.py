"""llama-server's errors as the gateway passes them on: its JSON error with a string `code`
(it writes the HTTP status as a number), and its 401 to the gateway's own key turned into
the operator's 502 rather than the client's 401."""

from __future__ import annotations

import json
import logging
from typing import Final

from gateway.errors import BadGateway, error_type
from gateway.upstream.client import Response

log = logging.getLogger("llamagate.gateway.proxy")


# llama-server's error types that say more than its status; any other takes the gateway's
# code for the status (gateway/errors.py ERROR_TYPES)
_BACKEND_CODES: Final = {"exceed_context_size_error": "context_length_exceeded",
                                 "not_supported_error": "not_supported",
                                 "unavailable_error": "backend_unavailable"}


def backend_error(status: int, body: bytes) -> bytes:
    """llama-server's error JSON in the gateway's error shape: its `code` is the HTTP status
    as a number, where the documented schema has a string. Message, type, status and its
    other fields are kept; anything else is passed on unchanged."""
    if b'"code"' not in body:
        return body
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    error = parsed.get("error") if isinstance(parsed, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    if not isinstance(error, dict) or code is None or isinstance(code, str):
        return body
    kind = error.get("type")
    error["code"] = _BACKEND_CODES.get(kind, "") if isinstance(kind, str) else ""
    error["code"] = error["code"] or error_type(status)[1]
    error.setdefault("param", None)
    return json.dumps(parsed).encode()


def refused_key(resp: Response) -> None:
    """llama-server checks only the gateway's own key (BACKEND_API_KEY): its 401 is the
    operator's to fix, and passed on it would tell the client its valid key was wrong."""
    resp.close()
    global _refused_key_logged
    if not _refused_key_logged:
        _refused_key_logged = True
        log.error("the backend refused the gateway's key: check BACKEND_API_KEY")
    raise BadGateway("the backend refused the gateway's credentials; the operator must check "
                     "its backend key", code="backend_auth_failed")


_refused_key_logged = False
