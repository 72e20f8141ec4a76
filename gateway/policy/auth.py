"""Authentication and authorization of every request by API key.

Which scope a request needs is decided by the route that matched in gateway/router.py's
table (its template, which we wrote), never by the path string the client sent:
`/admin/...` routes need `admin`, `/metrics` needs `metrics` (unless METRICS_PUBLIC), every
other route `inference`. Only the probe routes are public; a path that matches no route
still needs a valid key before it gets its 404 (gateway/pipeline.py).
Paths that are not in canonical form (empty, `.` or `..` segments, characters that were
percent-encoded delimiters) are refused with 404 before anything else, because the proxy
forwards `/v1/...` paths to llama-server and its HTTP client would resolve `..` there.

Per request: one SHA-256 and one dict lookup (``Keyring.authenticate``). Failed attempts are
counted per client address; past AUTH_FAILURES_PER_MINUTE that address gets 429 without its
key being looked at, while other addresses are unaffected. Logs carry key ids, never keys.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping

from gateway.errors import Forbidden, RateLimited, Unauthorized
from gateway.exchange import Exchange
from gateway.state import AppState
from keys.keyring import AuthFailure, Keyring, allows_model
from keys.model import ApiKey

log = logging.getLogger("llamagate.auth")

PUBLIC = frozenset({"/ping", "/health", "/health/live", "/health/ready", "/openapi.json"})
_EMPTY = Keyring()
# RFC 3986 path characters once decoded, minus "%" (a second decoding layer), "?" and "#"
# (an encoded query or fragment would be re-parsed as one on the way to the backend).
_PATH_CHARS = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@/-]*")
_FAILURES = {
    AuthFailure.MISSING: ("missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                          "missing_api_key"),
    AuthFailure.INVALID: ("invalid API key", "invalid_api_key"),
    AuthFailure.EXPIRED: ("this API key has expired", "expired_api_key"),
    AuthFailure.DISABLED: ("this API key is disabled", "disabled_api_key"),
}


# the paths nearly every request has, known canonical without a look at each character
_HOT_CANONICAL = PUBLIC | {"/", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
                           "/v1/embeddings"}


def is_canonical(path: str) -> bool:
    """True for a decoded path with no empty, `.` or `..` segment and only plain characters."""
    if path in _HOT_CANONICAL:
        return True
    if not path.startswith("/") or not _PATH_CHARS.fullmatch(path):
        return False
    return all(seg not in ("", ".", "..") for seg in path[1:].split("/"))


# a percent-encoded `/`, `\`, `?`, `#` or `%` in the path: once decoded (as the proxy
# forwards it) it names another path than the client wrote, so it is no route at all
_ENCODED_DELIMITER = re.compile(rb"^[^?]*%(2[fF]|5[cC]|3[fF]|23|25)").match


def is_canonical_target(path: str, target: bytes) -> bool:
    """``is_canonical`` for the decoded ``path``, and no encoded delimiter in the raw
    request ``target`` it came from."""
    return is_canonical(path) and not (b"%" in target and _ENCODED_DELIMITER(target))


def presented_secret(headers: Mapping[str, str], prefer: str = "authorization") -> str | None:
    """The key from `Authorization: Bearer` or, failing that, `x-api-key`; the other way
    round when ``prefer`` (AUTH_HEADER) is "x-api-key": a balancer in front (RunPod's) may
    put its own key in Authorization, and the client's llamagate key then travels in
    x-api-key.

    ``headers``: aiohttp's (case-insensitive) or the edge server's (names in lower case).
    """
    if prefer == "x-api-key":
        api_key = headers.get("x-api-key", "").strip()
        if api_key:
            return api_key
    header = headers.get("authorization", "")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key", "").strip() or None


def authenticate(headers: Mapping[str, str], remote: str | None, state: AppState) -> ApiKey:
    """Return the request's key or raise 401 (or 429 for an address that keeps failing)."""
    throttle = state.auth_failures
    address = remote or "-"
    if throttle is not None:
        wait = throttle.retry_after(address)
        if wait > 0:
            raise RateLimited("too many failed authentications from this address",
                              code="too_many_auth_failures", retry_after=wait)
    keyring = state.keys.keyring if state.keys is not None else _EMPTY
    result = keyring.authenticate(presented_secret(headers, state.config.auth_header),
                                  state.clock())
    if result.key is not None:
        if state.usage is not None:  # any request is a use (a metrics scraper's key too)
            state.usage.seen(result.key.id, time.time())
        return result.key
    reason = result.reason or AuthFailure.INVALID
    # Only presented keys count: a client that sends none is not guessing.
    if throttle is not None and reason is not AuthFailure.MISSING:
        throttle.failure(address)
    log.info("authentication failed", extra={"reason": reason.value, "remote": address})
    message, code = _FAILURES[reason]
    raise Unauthorized(message, code=code)


def may_use(key: ApiKey | None, model: str) -> bool:
    """Whether the request's key (None: auth off) may use `model`."""
    return key is None or allows_model(key, model)


def check_model(key: ApiKey | None, ex: Exchange, method: str, state: AppState) -> None:
    """403 unless the request's key may use the model; called by the proxy once it is known.

    Requests that name no model run on the backend's default model, so a key with an
    allowlist may send them only when that model is on it; reads (GET, HEAD) are listings.
    """
    if key is None or key.models is None:
        return
    if ex.inference or ex.model != "-":  # the model the body names
        model: str | None = ex.model
    elif method in ("GET", "HEAD"):
        return
    else:
        models = state.models
        model = models.default or (models.names[0] if models.names else None)
    if model is None or not allows_model(key, model):
        raise Forbidden(f"this API key may not use model '{model or '-'}'",
                        code="model_not_allowed", param="model")


def filter_models(body: bytes, key: ApiKey) -> bytes:
    """Drop the models the key may not use from a model listing (the backend's or ours)."""
    try:
        listing = json.loads(body)
    except ValueError:
        return body
    if not isinstance(listing, dict):
        return body
    for field, name_keys in (("data", ("id",)), ("models", ("name", "model", "id"))):
        entries = listing.get(field)
        if isinstance(entries, list):
            listing[field] = [e for e in entries if _entry_allowed(e, name_keys, key)]
    return json.dumps(listing).encode()


def _entry_allowed(entry: object, name_keys: tuple[str, ...], key: ApiKey) -> bool:
    # Every name the entry goes by must be allowed, so an alias cannot smuggle a model in.
    if not isinstance(entry, dict):
        return False
    names = [entry[k] for k in name_keys if isinstance(entry.get(k), str)]
    return bool(names) and all(allows_model(key, n) for n in names)
