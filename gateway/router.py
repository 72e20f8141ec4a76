"""Every route on the gateway port: its methods, the scope it needs, and its handler.

One table, read by the one pipeline (gateway/pipeline.py) for every request. The scope is
decided by the route that matched, which we wrote, never by the path string the client sent:
a route added later is closed until someone gives it a scope.

A route is an exact path, a template whose `{name}` segments match one path segment each
(the value arrives decoded in ``call.params``), or a prefix (``/v1/``) that takes every path
under it. A GET route answers HEAD too. Every route names its methods, the proxy's too: a
method no route takes is a 405 with ``Allow`` here, never a request forwarded to llama-server
(issue 21: an extension method's body, which llama-server does not read, was parsed by it as
requests of their own). Exact paths are one dict lookup; templates are
tried in the order they were added.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final
from urllib.parse import parse_qs, unquote

from gateway.edge.call import Call

Handler = Callable[[Call], Awaitable[None]]

# scopes (keys/model.py names them): "" is public, "metrics" may be made public by config
PUBLIC: Final = ""


@dataclass(frozen=True, slots=True, eq=False)  # eq=False: hashed by identity, at once
class Route:
    template: str
    methods: frozenset[str]
    scope: str
    handler: Handler
    matcher: re.Pattern[str] | None = None
    # a prefix route's paths that take fewer methods (the proxy's inference routes: POST)
    only: Mapping[str, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Match:
    """What the table says of a request: its route, or why none (404/405 with Allow)."""

    route: Route | None
    params: Mapping[str, str]
    allow: frozenset[str] = frozenset()  # the methods the path has, when it is not this one


_NO_PARAMS: Final[Mapping[str, str]] = MappingProxyType({})
_NO_ROUTE: Final = Match(None, _NO_PARAMS)
_SEGMENT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Router:
    def __init__(self) -> None:
        self._exact: dict[str, list[Route]] = {}
        self._templates: list[Route] = []
        self._prefixes: list[tuple[str, Route]] = []
        self._found: dict[Route, Match] = {}  # a route's match without parameters

    def add(self, methods: Iterable[str], template: str, handler: Handler, scope: str,
            only: Mapping[str, Iterable[str]] | None = None) -> None:
        """``only``: for a prefix, paths under it that take fewer of ``methods``."""
        allowed = _methods(methods)
        if template.endswith("*"):
            prefix = template[:-1]
            narrower = MappingProxyType({p: _methods(ms) & allowed for p, ms in (only or {}).items()})
            self._prefixes.append((prefix, Route(template, allowed, scope, handler, None, narrower)))
        elif "{" in template:
            pattern = "^" + _SEGMENT.sub(r"(?P<\1>[^/]+)", re.escape(template).replace(r"\{", "{")
                                         .replace(r"\}", "}")) + "$"
            self._templates.append(Route(template, allowed, scope, handler, re.compile(pattern)))
        else:
            self._exact.setdefault(template, []).append(Route(template, allowed, scope, handler))
        self._found.clear()

    def match(self, method: str, path: str, target: bytes) -> Match:
        """``path`` decoded; ``target`` as sent. Exact paths and templates match the path as
        sent, so a template's value may hold an encoded `/` (a model's name does), decoded in
        ``params``; a prefix (the proxy's `/v1/`) matches the decoded path it forwards."""
        # as sent: `/admin%2Fkeys` is no route, though it decodes to one
        raw = path if b"%" not in target else target.partition(b"?")[0].decode("latin-1")
        candidates = self._exact.get(raw)
        params: Mapping[str, str] = _NO_PARAMS
        if candidates is None:
            candidates = []
            for route in self._templates:
                assert route.matcher is not None
                found = route.matcher.match(raw)
                if found is not None:
                    candidates.append(route)
                    params = params or {k: unquote(v) for k, v in found.groupdict().items()}
            if not candidates:
                for prefix, route in self._prefixes:
                    if path.startswith(prefix):
                        fewer = route.only.get(path)
                        if fewer is not None and method not in fewer:
                            return Match(None, params, fewer)
                        candidates = [route]
                        break
        if not candidates:
            return _NO_ROUTE
        for route in candidates:
            if method in route.methods:
                if params:
                    return Match(route, params)
                # the same answer every time: made once (the token path meets this per request)
                found_match = self._found.get(route)
                if found_match is None:
                    found_match = self._found[route] = Match(route, _NO_PARAMS)
                return found_match
        return Match(None, params, frozenset().union(*(r.methods for r in candidates)))

    def routes(self) -> list[Route]:
        """Every route, for the OpenAPI document and the test that pins the table."""
        return [r for rs in self._exact.values() for r in rs] + self._templates + \
            [r for _, r in self._prefixes]


def _methods(methods: Iterable[str]) -> frozenset[str]:
    allowed = frozenset(m.upper() for m in methods)
    return allowed | {"HEAD"} if "GET" in allowed else allowed


def query_of(call: Call) -> dict[str, str]:
    """The query's parameters, each name's first value."""
    return {k: v[0] for k, v in parse_qs(call.query).items()} if call.query else {}


def reply_json(call: Call, body: object, status: int = 200) -> None:
    call.respond(status, json.dumps(body).encode())
