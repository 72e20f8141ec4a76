"""The models this gateway routes to, and their state, as the serve process publishes it.

In multi-model mode the served set changes (profile switches, pulls, rescans) and
each model has a state: a model in cooldown after a failed load is refused (503,
Retry-After) or replaced by its profile's fallback; any other state is routed, and
llama-server's router loads an unloaded model while the request waits.

A name a request gives resolves (``resolve``) to a served model: itself when served, else
its MODEL_ALIASES entry, else the wildcard's (`*`), else, with one model, that model (a
lone llama-server answers to any name); with several an unknown name is None (404).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import BackendUnavailable, NotFound


@dataclass
class ModelCatalog:
    names: tuple[str, ...]
    default: str | None = None
    mode: str = "single"
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)  # last request per model, for TTL
    known: bool = True  # False: BACKEND_URL's list has not been read yet
    # re-reads serve's state file (the app sets it), so a request is never refused on an
    # older state than the health port has just reported
    reread: Callable[[], object] = field(default=lambda: None, repr=False, compare=False)
    aliases: Mapping[str, str] = field(default_factory=dict)  # MODEL_ALIASES; "*": any other

    def resolve(self, requested: str | None) -> str | None:
        """Name to route to; None when the model is unknown. An empty catalog accepts all;
        one not known yet refuses all (503), as the backend is not ready for them anyway,
        and a name it cannot check must not become a metric label value."""
        if not self.known:
            self.reread()
        if not self.known:
            raise BackendUnavailable("the backend is not ready (its models are not known yet)",
                                     retry_after=5)
        if requested is None or requested == "":
            return self.default or (self.names[0] if self.names else "-")
        if not self.names or requested in self.names:
            return requested
        aliased = self._aliased(requested)
        if aliased is not None:
            return aliased
        # neither a 404 nor "the one model" may come from an older list than the health port
        # reports (a stat of serve's file, unless it changed)
        self.reread()
        if self.known and (not self.names or requested in self.names):
            return requested
        return self._other_name(requested) if self.known else None

    def require(self, requested: str | None) -> str:
        """``resolve``, or 404 ``model_not_found`` naming the models served."""
        model = self.resolve(requested)
        if model is None:  # the name stays out of metric labels: a client must not mint them
            raise NotFound(f"model '{requested}' does not exist; available: "
                           f"{', '.join(self.names)}", code="model_not_found", param="model")
        return model

    def _aliased(self, requested: str) -> str | None:
        """The served model MODEL_ALIASES names for ``requested`` (or for `*`), if any."""
        aliases = self.aliases
        if not aliases:
            return None
        target = aliases.get(requested) or aliases.get("*")
        return target if target is not None and target in self.names else None

    def _other_name(self, requested: str) -> str | None:
        """The served model a name that is not one stands for, if any."""
        aliased = self._aliased(requested)
        if aliased is not None:
            return aliased
        return self.names[0] if self.single else None

    @property
    def single(self) -> bool:
        """One model, not behind llama-server's router (which picks by name): any name
        reaches it."""
        return len(self.names) == 1 and self.mode != "router"

    def renames(self, named: object, model: str) -> bool:
        """Whether a request naming ``named`` must be sent naming ``model``: a router (ours,
        or maybe the one at BACKEND_URL) picks its model by the name; a lone llama-server
        ignores it, so its requests go byte for byte."""
        if named == model or model == "-":
            return False
        if self.mode == "router":
            return True
        return self.mode in ("external", "pool") and isinstance(named, str) and named != ""

    def route(self, name: str, allowed: Callable[[str], bool] = lambda m: True) -> str:
        """The model that serves a request for `name`: itself, or its fallback while it cools
        down; raises 503 when it cools down with no usable fallback (one in cooldown too, or
        one the caller's key may not use: a fallback never widens what a key reaches)."""
        state = self.states.get(name)
        if state is None or state.get("state") != "cooldown":
            self.touch(name)
            return name
        fallback = self.fallback_of(name, allowed)
        if fallback is not None:
            self.touch(fallback)
            return fallback
        # serve.json is rewritten on state changes only, so its retry_in is as old as the
        # cooldown; the absolute end gives the time actually left
        until = state.get("cooldown_until")
        left = until - time.time() if isinstance(until, (int, float)) else \
            float(state.get("retry_in") or 1)
        retry = max(1, math.ceil(left))
        raise BackendUnavailable(
            f"model '{name}' failed to load and is cooling down for {retry}s: "
            f"{state.get('reason') or 'see /admin/models'}",
            code="model_unavailable", retry_after=retry)

    def touch(self, name: str) -> None:
        """A request goes to ``name`` (for its idle unload, and for the fleet to count a
        failed load as new)."""
        self.used[name] = time.time()

    def fallback_of(self, name: str, allowed: Callable[[str], bool] = lambda m: True) -> str | None:
        """The profile's fallback for ``name``, if there is one, out of cooldown and allowed."""
        state = self.states.get(name) or {}
        fallback = state.get("fallback")
        other = self.states.get(fallback) if isinstance(fallback, str) else None
        if other is None or other.get("state") == "cooldown" or not allowed(str(fallback)):
            return None
        return str(fallback)

    def update(self, serve_state: dict[str, Any]) -> None:
        names = serve_state.get("models")
        if isinstance(names, list) and names != list(self.names):
            self.names = tuple(str(n) for n in names)
            if self.default not in self.names:
                self.default = self.names[0] if self.names else None
        self.known = serve_state.get("models_known") is not False
        self.mode = str(serve_state.get("mode", self.mode))
        states = serve_state.get("model_states")
        self.states = states if isinstance(states, dict) else {}

    def listing(self) -> dict[str, Any]:
        """GET /v1/models in multi-model mode (OpenAI shape; state as an extra field) and for
        a pool (the union of what its upstreams serve)."""
        if self.mode == "pool":
            return {"object": "list", "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "llamagate"}
                for name in self.names]}
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "llamagate",
             "status": {"value": self.states.get(name, {}).get("state", "unknown")}}
            for name in self.names]}
