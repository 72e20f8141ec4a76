"""CORS for browser clients: exact origin match, header sets computed once.

Off when CORS_ORIGINS is empty. A preflight OPTIONS is answered 204 by the pipeline
(gateway/pipeline.py) before auth, since browsers never send credentials on a preflight.
Headers on real answers are added when their head is written, so streamed and
error answers get them too. `*` is answered literally and then never
together with Allow-Credentials.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_ALLOW_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
# for a preflight that names no headers, or names them in a way we do not reflect
_ALLOW_HEADERS = ("Authorization, Content-Type, X-API-Key, X-Request-ID, X-Request-Timeout, "
                  "OpenAI-Organization, OpenAI-Project")
_EXPOSE = ("X-Request-ID, X-Model-Fallback, Retry-After, x-ratelimit-limit-requests, "
           "x-ratelimit-remaining-requests, x-ratelimit-reset-requests, "
           "x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens")
# Access-Control-Request-Headers as browsers write it: a comma list of HTTP token names
# (RFC 9110 tchar; the two classes share no character, so matching is linear)
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_NAME_LIST = re.compile(rf"{_TOKEN}(?:[ \t]*,[ \t]*{_TOKEN})*").fullmatch
# what a browser sends is far below these; past them the list is not reflected
MAX_REQUESTED_LENGTH = 2048
MAX_REQUESTED_NAMES = 64


def allow_headers(requested: str | None) -> str:
    """Access-Control-Allow-Headers for a preflight: the names it asks for, reflected.

    A fixed list cannot keep up with the SDKs (the OpenAI JS SDK sends X-Stainless-*,
    others send their own), and with credentials `*` is not a wildcard, so an allowed
    origin may send any header it names, as long as the names are plain header names."""
    if requested is None:
        return _ALLOW_HEADERS
    requested = requested.strip(" \t")
    if not requested or len(requested) > MAX_REQUESTED_LENGTH or not _NAME_LIST(requested):
        return _ALLOW_HEADERS
    names = [n.strip(" \t") for n in requested.split(",")]
    if len(names) > MAX_REQUESTED_NAMES:
        return _ALLOW_HEADERS
    return ", ".join(names)


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    """A CORS preflight: OPTIONS asking for a method (``headers``: names in lower case)."""
    return method == "OPTIONS" and "access-control-request-method" in headers


class Cors:
    def __init__(self, origins: tuple[str, ...]) -> None:
        self.allowed = frozenset(origins)
        self.wildcard = "*" in self.allowed

    def _origin_headers(self, origin: str) -> dict[str, str]:
        if self.wildcard:
            return {"Access-Control-Allow-Origin": "*"}
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true"}

    def _allowed(self, origin: str | None) -> bool:
        return origin is not None and (self.wildcard or origin in self.allowed)

    def preflight(self, origin: str | None, requested: str | None) -> tuple[int, dict[str, str]]:
        """The answer to a preflight: 204, with the CORS headers when the origin is allowed."""
        if not self._allowed(origin):
            return 204, {"Vary": "Origin"}
        assert origin is not None
        # the allowed headers are the requested ones: a cache must key on them too
        return 204, {"Vary": "Origin, Access-Control-Request-Headers",
                     **self._origin_headers(origin),
                     "Access-Control-Allow-Methods": _ALLOW_METHODS,
                     "Access-Control-Allow-Headers": allow_headers(requested),
                     "Access-Control-Max-Age": "600"}

    def lines(self, origin: str | None) -> str:
        """The headers every answer (not a preflight) to ``origin`` carries, as header lines."""
        if not self.allowed:
            return ""
        return "Vary: Origin\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in self._answer_headers(origin).items())

    def _answer_headers(self, origin: str | None) -> dict[str, str]:
        """What an answer (not a preflight) to ``origin`` adds besides `Vary`."""
        if not self._allowed(origin):
            return {}
        assert origin is not None
        return self._origin_headers(origin) | {"Access-Control-Expose-Headers": _EXPOSE}
