"""Request ids: taken from the client's X-Request-ID when sane, else generated; echoed on
every answer (gateway/pipeline.py's decorator) and put in the logging context.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from gateway.policy import validation

_SAFE = re.compile(r"[A-Za-z0-9._:\-]{1,128}").fullmatch

_KNOWN = validation.ROUTES | validation.NATIVE | {
    "/v1/models", "/v1/audio/transcriptions", "/health", "/ping", "/metrics", "/props", "/slots"}


def route_label(path: str) -> str:
    """Bounded-cardinality route name for metrics."""
    if path in _KNOWN:
        return path
    return "/v1/other" if path.startswith("/v1/") else "other"


def request_id_of(headers: Mapping[str, str]) -> str:
    """The client's id when it is 1-128 of ``[A-Za-z0-9._:-]``, else a new one."""
    rid = headers.get("x-request-id")
    if rid is not None and _SAFE(rid):
        return rid
    return os.urandom(16).hex()  # what uuid4().hex gives, without building a UUID
