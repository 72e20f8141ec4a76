"""The served models in multi-model mode, and what happens to each over time.

The serve process owns this. It decides which registry models the router
serves (a profile, else every servable model in MODELS_DIR), writes the router's
preset, and every ``POLL`` seconds reads the router's model states to:

- start a cooldown when a model fails to load, so requests stop retrying it (the
  gateway refuses it, or serves the profile's fallback, until the cooldown ends;
  after that the next request may try again, and a new failure starts a new one);
- unload a loaded model nobody used for MODEL_TTL_SECONDS (last use comes from the
  gateway workers' heartbeats);
- publish each model's state for the gateway, /health and the admin routes.

MAX_LOADED_MODELS is the router's own --models-max (least recently used first).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.models.errors import ProfileError, UnknownModel
from backend.models.profiles import Profile, load_profiles
from backend.models.registry import ModelEntry, ModelRegistry
from backend.router import RoutedModel, RouterClient, RouterError, RouterStatus, preset_text
from core.config import Config

log = logging.getLogger("llamagate.fleet")

POLL = 0.25  # seconds between reads of the router's model states


class FleetError(Exception):
    def __init__(self, message: str, code: str = "invalid_request", http_status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


@dataclass
class ModelState:
    state: str = "unloaded"  # unloaded | loading | loaded | sleeping | failed | cooldown
    reason: str | None = None
    cooldown_until: float = 0.0
    loaded_since: float = 0.0
    failures: int = 0


def plan_models(config: Config, registry: ModelRegistry, profile: Profile | None) -> list[RoutedModel]:
    """Preset sections for a profile, or for every servable registry model."""
    if profile is None:
        return [_routed(e.name, e) for e in registry.entries() if e.servable and e.path]
    served = []
    for pm in profile.models:
        entry = registry.get(pm.model)
        if not entry.servable or entry.path is None:
            raise FleetError(f"profile {profile.name!r}: model {pm.model!r} is {entry.status}"
                             f"{'' if entry.override.enabled else ' and disabled'}; it cannot be served")
        base = _routed(pm.served_name, entry)
        served.append(RoutedModel(
            name=pm.served_name, path=entry.path,
            ctx=pm.ctx_size if pm.ctx_size is not None else base.ctx,
            ngl=pm.n_gpu_layers if pm.n_gpu_layers is not None else base.ngl,
            parallel=pm.parallel if pm.parallel is not None else base.parallel,
            extra_args=base.extra_args + pm.extra_args, preload=pm.preload, fallback=pm.fallback))
    return served


def _routed(name: str, entry: ModelEntry) -> RoutedModel:
    o = entry.override
    assert entry.path is not None
    return RoutedModel(name=name, path=entry.path, ctx=o.ctx_size, ngl=o.n_gpu_layers,
                       parallel=o.parallel, extra_args=o.extra_args)


def read_profile(config: Config, registry: ModelRegistry, name: str) -> Profile:
    """The named profile from PROFILES_FILE, read now (so edits apply on a switch)."""
    if not config.profiles_file.is_file():
        raise FleetError(f"no profiles file at {config.profiles_file} (PROFILES_FILE)",
                         "profile_not_found", 404)
    known = set(registry.names()) | {e.key for e in registry.entries()}
    profiles = load_profiles(config.profiles_file, known)
    try:
        return profiles.get(name)
    except KeyError:
        raise FleetError(f"no profile {name!r} in {config.profiles_file}; "
                         f"profiles: {', '.join(profiles.names()) or '(none)'}",
                         "profile_not_found", 404) from None


class Fleet:
    def __init__(self, config: Config, registry: ModelRegistry, preset_path: Path,
                 common: list[tuple[str, str]], *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.registry = registry
        self.preset_path = preset_path
        self.common = common
        self.clock = clock
        self.profile: Profile | None = None
        self.models: dict[str, RoutedModel] = {}
        self.states: dict[str, ModelState] = {}
        self.ports: dict[str, int] = {}  # each model's child port, to find its log lines
        self.client: RouterClient | None = None
        self.last_used: Callable[[], dict[str, float]] = dict
        self.on_change: Callable[[], None] = lambda: None
        self._lock = asyncio.Lock()

    # --- what is served -------------------------------------------------------
    def configure(self, profile: Profile | None) -> None:
        """Choose the served set and write the preset (raises FleetError / UnknownModel)."""
        models = plan_models(self.config, self.registry, profile)
        if not models:
            raise FleetError("no servable model: put GGUF files in MODELS_DIR or pull one")
        try:
            text = preset_text(models, self.common)
        except ValueError as exc:  # extra_args that are not options, a name that is no section
            raise FleetError(f"cannot write the router preset: {exc}") from None
        self.preset_path.write_text(text)
        self.profile = profile
        self.models = {m.name: m for m in models}
        self.states = {n: self.states.get(n, ModelState()) for n in self.models}

    async def switch(self, profile_name: str | None) -> None:
        """Serve another profile (None: every model); a profile that cannot be read or planned
        leaves the running one in place."""
        async with self._lock:
            profile = None
            if profile_name is not None:
                profile = await asyncio.to_thread(read_profile, self.config, self.registry,
                                                  profile_name)
            self.configure(profile)
            await self._reload()
        await self.preload()

    async def refresh(self) -> None:
        """After a rescan or an override edit: re-plan the same profile."""
        async with self._lock:
            self.configure(self.profile)
            await self._reload()

    async def _reload(self) -> None:
        if self.client is not None:
            # the router re-reads the preset and unloads running models that changed or left
            await self.client.models(reload=True)
        self.on_change()

    async def preload(self) -> None:
        """Load the profile's `preload: true` models; a refusal is logged, not raised (the
        model's state and a request for it will tell the rest)."""
        if self.client is None:
            return  # the watch loop preloads when it starts
        for model in list(self.models.values()):
            if model.preload:
                try:
                    await self.load(model.name)
                except Exception as exc:  # noqa: BLE001
                    log.warning("preload of %s failed: %s", model.name, exc)

    # --- one model ------------------------------------------------------------
    def require(self, name: str) -> RoutedModel:
        model = self.models.get(name)
        if model is None:
            raise UnknownModel(name)
        return model

    async def load(self, name: str) -> None:
        self.require(name)
        assert self.client is not None
        state = self.states[name]
        # an operator's load is a deliberate retry: the cooldown ends now
        state.cooldown_until, state.reason, state.failures = 0.0, None, 0
        try:
            await self.client.load(name)
        except RouterError as exc:
            if "already" not in str(exc):
                raise

    async def unload(self, name: str) -> None:
        self.require(name)
        assert self.client is not None
        try:
            await self.client.unload(name)
        except RouterError as exc:
            if "not" not in str(exc):  # "model is not running": nothing to do
                raise

    # --- the poll loop --------------------------------------------------------
    async def watch(self, client: RouterClient, last_error: Callable[[str], str | None]) -> None:
        self.client = client
        try:
            await self.preload()
        except Exception as exc:  # noqa: BLE001 - a refused preload must not end the watch
            log.warning("preload failed: %s", exc)
        while True:
            try:
                statuses = await client.models()
            except Exception as exc:  # noqa: BLE001 - the router restarting; keep watching
                log.debug("router /models: %s", exc)
            else:
                if self.observe(statuses, self.last_used(), last_error):
                    self.on_change()
                try:
                    await self._expire_idle()
                except Exception as exc:  # noqa: BLE001 - e.g. the router went away mid-unload
                    log.warning("idle unload failed: %s", exc)
            await asyncio.sleep(POLL)  # poll period of the router's model states

    def observe(self, statuses: dict[str, RouterStatus], used: dict[str, float],
                last_error: Callable[[str], str | None]) -> bool:
        """Fold one reading of the router's states in; True when anything changed."""
        now = self.clock()
        changed = False
        for name, state in self.states.items():
            status = statuses.get(name, RouterStatus("unloaded"))
            if status.port is not None:
                self.ports[name] = status.port
            before = (state.state, state.reason)
            if status.state == "failed" and state.state == "loaded":
                # it had loaded: a crash, not a failed load, so no cooldown; the router loads
                # it again for its next request, and only a failure after that one counts
                state.failures, state.cooldown_until, state.state = 1, now, "failed"
                state.reason = (f"llama-server exited with code {status.exit_code} after it had "
                                "loaded; the next request loads it again")
                log.error("model %s stopped after it had loaded (exit code %s); its next request "
                          "loads it again", name, status.exit_code)
            elif status.state == "failed":
                # a new failure: none recorded yet, or a request tried again after the cooldown
                fresh = state.failures == 0 or (state.state != "cooldown" and
                                                used.get(name, 0.0) >= state.cooldown_until)
                if fresh and state.cooldown_until <= now:
                    state.failures += 1
                    state.cooldown_until = now + self.config.model_cooldown_seconds
                    detail = last_error(name)
                    state.reason = (f"llama-server exited with code {status.exit_code} while "
                                    f"loading it" + (f": {detail}" if detail else ""))
                    log.error("model %s failed to load; cooling down for %gs", name,
                              self.config.model_cooldown_seconds, extra={"reason": state.reason})
                state.state = "cooldown" if state.cooldown_until > now else "failed"
            else:
                if status.state == "loaded" and state.state != "loaded":
                    state.loaded_since = now
                if status.state == "loaded":
                    state.failures, state.reason, state.cooldown_until = 0, None, 0.0
                state.state = status.state
            changed |= before != (state.state, state.reason)
        return changed

    async def _expire_idle(self) -> None:
        ttl = self.config.model_ttl_seconds
        if not ttl:
            return
        now = self.clock()
        used = self.last_used()
        for name, state in self.states.items():
            if state.state != "loaded":
                continue
            last = max(used.get(name, 0.0), state.loaded_since)
            if now - last >= ttl:
                # last use is when a request started: one still running is use, not idleness
                assert self.client is not None
                if await self.client.busy(name):
                    continue
                log.info("unloading %s: unused for %ss (MODEL_TTL_SECONDS)", name, ttl)
                try:
                    await self.unload(name)
                except RouterError as exc:
                    log.warning("unload of %s failed: %s", name, exc)

    # --- published state ------------------------------------------------------
    def published(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        out = {}
        for name, model in self.models.items():
            state = self.states[name]
            out[name] = {
                "state": state.state, "reason": state.reason,
                "retry_in": round(max(0.0, state.cooldown_until - now), 1),
                # absolute, so readers of a published copy (serve.json) compute a fresh wait
                "cooldown_until": state.cooldown_until if state.state == "cooldown" else None,
                "fallback": model.fallback, "path": str(model.path)}
        return out


def merge_last_used(workers: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Latest use of each model over every gateway worker's heartbeat."""
    merged: dict[str, float] = {}
    for w in workers:
        for name, ts in (w.get("models_used") or {}).items():
            if isinstance(ts, (int, float)) and ts > merged.get(name, 0.0):
                merged[name] = float(ts)
    return merged


__all__ = ["Fleet", "FleetError", "ModelState", "ProfileError", "merge_last_used", "plan_models"]
