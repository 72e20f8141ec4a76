"""CORS for browser clients: exact origin match, header sets computed once.

Off when CORS_ORIGINS is empty. Preflight OPTIONS is answered by the middleware
with 204, before auth, since browsers never send credentials on a preflight.
Headers on real responses are added in `on_response_prepare`, so streamed and
error responses get them too. `*` is answered literally and then never
together with Allow-Credentials.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

_ALLOW_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
_ALLOW_HEADERS = ("Authorization, Content-Type, X-API-Key, X-Request-ID, X-Request-Timeout, "
                  "OpenAI-Organization, OpenAI-Project")
_EXPOSE = ("X-Request-ID, Retry-After, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
           "x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, "
           "x-ratelimit-reset-tokens")


class Cors:
    def __init__(self, origins: tuple[str, ...]) -> None:
        self.allowed = frozenset(origins)
        self.wildcard = "*" in self.allowed
        self._preflight = {"Access-Control-Allow-Methods": _ALLOW_METHODS,
                           "Access-Control-Allow-Headers": _ALLOW_HEADERS,
                           "Access-Control-Max-Age": "600"}

    def _origin_headers(self, origin: str) -> dict[str, str]:
        if self.wildcard:
            return {"Access-Control-Allow-Origin": "*"}
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true"}

    def _allowed(self, origin: str | None) -> bool:
        return origin is not None and (self.wildcard or origin in self.allowed)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            origin = request.headers.get("Origin")
            headers = {"Vary": "Origin"}
            if self._allowed(origin):
                assert origin is not None
                headers |= self._origin_headers(origin) | self._preflight
            return web.Response(status=204, headers=headers)
        return await handler(request)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        if not self.allowed:
            return  # CORS off: nothing to add on the hot path
        headers = response.headers
        vary = headers.get("Vary")
        # the preflight answer already varies on Origin: one `Vary: Origin`, not one per layer
        if vary is None:
            headers["Vary"] = "Origin"
        elif "origin" not in vary.lower():
            headers["Vary"] = f"{vary}, Origin"
        response.headers.update(self._answer_headers(request.headers.get("Origin")))

    def lines(self, origin: str | None) -> str:
        """The same headers as ``on_prepare``, as header lines, for the edge server's answers."""
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
