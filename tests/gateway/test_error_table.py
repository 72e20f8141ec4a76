"""One table from status to error type and code, one builder of the error body."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway import errors
from gateway.edge.call import refusal_error
from gateway.errors import (
    ERROR_TYPES,
    BackendUnavailable,
    BadGateway,
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    RateLimited,
    Unauthorized,
    UpstreamTimeout,
    error_body,
    error_for,
    error_parts,
    error_type,
    internal_error_body,
    sse_error_event,
)

# what docs/api.md's error table and the tests promise, pinned here once
EXPECTED = {
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


def test_the_table() -> None:
    assert ERROR_TYPES == EXPECTED


@pytest.mark.parametrize("cls", [GatewayError, BadRequest, Unauthorized, Forbidden, NotFound,
                                 MethodNotAllowed, RateLimited, BadGateway, BackendUnavailable,
                                 UpstreamTimeout])
def test_every_class_is_typed_by_the_table(cls: type[GatewayError]) -> None:
    assert (cls.type, cls.code) == ERROR_TYPES[cls.status]


def test_a_status_outside_the_table_is_typed_by_its_class() -> None:
    assert error_type(409) == ("invalid_request_error", "http_error")
    assert error_type(507) == ("server_error", "http_error")


@pytest.mark.parametrize("status", [400, 408, 413, 414, 431])
def test_refusals_take_type_and_code_from_the_table(status: int) -> None:
    error = refusal_error((status, "refused"))
    assert (error.status, error.type, error.code) == (status, *ERROR_TYPES[status])


def test_error_for_keeps_a_given_code() -> None:
    error = error_for(404, "no such model", code="model_not_found")
    assert (error.status, error.type, error.code) == (404, "invalid_request_error", "model_not_found")


def test_the_envelope() -> None:
    body = json.loads(error_body("bad", "invalid_request_error", "invalid_request", "messages",
                                 extra={"problems": []}))
    assert body == {"error": {"message": "bad", "type": "invalid_request_error",
                              "param": "messages", "code": "invalid_request", "problems": []}}
    status, headers, raw = error_parts(RateLimited("slow down", retry_after=1.2))
    assert (status, headers["Retry-After"]) == (429, "2")
    assert json.loads(raw)["error"]["type"] == "rate_limit_error"
    assert json.loads(internal_error_body())["error"] == {
        "message": "internal gateway error", "type": "server_error", "param": None,
        "code": "internal_error"}


def test_an_sse_error_event_is_typed_as_its_error() -> None:
    event = sse_error_event(BackendUnavailable("bye", code="shutting_down"))
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    error = json.loads(event[len(b"data: "):])["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "shutting_down")


def test_no_other_module_builds_the_envelope() -> None:
    # the one builder: nowhere else in the project spells the envelope's type key next to
    # "error" (read from the source, so a new copy fails here)
    root = Path(errors.__file__).resolve().parent.parent
    offenders = []
    for package in ("core", "backend", "keys", "health", "gateway", "llamagate"):
        for source in (root / package).rglob("*.py"):
            text = source.read_text()
            if source != Path(errors.__file__).resolve() and '{"error": {' in text:
                offenders.append(str(source.relative_to(root)))
    assert offenders == []
