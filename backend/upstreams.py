"""The upstreams of a pool (BACKEND_URLS, BACKENDS_FILE), and the serve process's watch on
each: its /health, the models it lists (aliases included), its slots and how many are busy.

Like BACKEND_URL's llama-server (backend/external.py), an upstream is ready when its /health
says so and its model list has been read since it did; the list is read again every
MODELS_REFRESH seconds while it stays ready. Its slots come from /props (`total_slots`) with
the list, and the busy ones from /slots on every poll, where its key lets us read them (the
gateway then counts other clients' requests too); otherwise the gateway counts its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import yaml

from backend.external import MODELS_REFRESH, MissTolerance, health_state, probe_health

log = logging.getLogger("llamagate.serve")

# how often each upstream's /health (and /slots) is read
PROBE_INTERVAL: Final = 1.0


@dataclass(frozen=True)
class UpstreamSpec:
    url: str
    key: str | None = None
    weight: float = 1.0
    models: tuple[str, ...] | None = None  # the names routed to it; None: whatever it lists

    @property
    def name(self) -> str:
        """host:port and path, as metrics and /health name it: never the URL's credentials."""
        parts = urlsplit(self.url)
        return parts.netloc.rpartition("@")[2] + parts.path.rstrip("/")

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "key": self.key, "weight": self.weight,
                "models": None if self.models is None else list(self.models)}


def spec_from_json(data: dict[str, Any]) -> UpstreamSpec:
    models = data.get("models")
    return UpstreamSpec(str(data["url"]), data.get("key") or None, float(data.get("weight", 1.0)),
                        None if models is None else tuple(str(m) for m in models))


def read_backends_file(path: Path, default_key: str | None) -> list[UpstreamSpec]:
    """BACKENDS_FILE: a YAML list (or a mapping with a `backends` list) of upstreams, each a
    URL or a mapping with url and optional key, weight and models. Raises ValueError naming
    every problem."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"BACKENDS_FILE {path}: cannot be read ({exc})") from exc
    if isinstance(data, dict):
        data = data.get("backends")
    if not isinstance(data, list) or not data:
        raise ValueError(f"BACKENDS_FILE {path}: expected a list of upstreams (or backends: [...])")
    specs, problems = [], []
    for i, item in enumerate(data, 1):
        entry: dict[str, Any] = {"url": item} if isinstance(item, str) else item
        try:
            specs.append(_entry(entry, default_key))
        except (ValueError, TypeError, KeyError) as exc:
            problems.append(f"entry {i}: {exc}")
    if problems:
        raise ValueError(f"BACKENDS_FILE {path}: " + "; ".join(problems))
    return specs


def _entry(entry: dict[str, Any], default_key: str | None) -> UpstreamSpec:
    if not isinstance(entry, dict):
        raise TypeError("expected a URL or a mapping with url")
    unknown = set(entry) - {"url", "key", "weight", "models"}
    if unknown:
        raise ValueError(f"unknown field {', '.join(sorted(unknown))}")
    url = entry["url"]
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError("url must be an http:// or https:// URL")
    weight = entry.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise ValueError("weight must be a number above 0")
    models = entry.get("models")
    if models is not None and (not isinstance(models, list) or not models
                               or not all(isinstance(m, str) and m for m in models)):
        raise ValueError("models must be a list of model names")
    key = entry.get("key")
    if key is not None and not isinstance(key, str):
        raise ValueError("key must be a string")
    return UpstreamSpec(url.rstrip("/"), key or default_key, float(weight),
                        None if models is None else tuple(models))


def pool_specs(urls: tuple[str, ...], file_specs: list[UpstreamSpec], first: UpstreamSpec | None,
               default_key: str | None) -> list[UpstreamSpec]:
    """The pool's upstreams in order: the local llama-server or BACKEND_URL's, BACKEND_URLS,
    then BACKENDS_FILE's; a URL named twice is refused."""
    specs = ([first] if first else []) + [UpstreamSpec(u, default_key) for u in urls] + file_specs
    seen: set[str] = set()
    for spec in specs:
        if spec.url in seen:
            raise ValueError(f"upstream {spec.name} is named twice (BACKEND_URL, BACKEND_URLS, "
                             "BACKENDS_FILE)")
        seen.add(spec.url)
    return specs


@dataclass(frozen=True)
class UpstreamReport:
    state: str  # backend/external.py's health_state: ready, starting, unreachable, error
    ready: bool
    models: tuple[str, ...] | None  # the last list read; None until one has been
    slots: int | None = None  # total_slots from /props
    busy: int | None = None  # slots processing, from /slots; None: not readable

    def published(self, spec: UpstreamSpec) -> dict[str, Any]:
        models = self.models if spec.models is None or self.models is None \
            else tuple(m for m in spec.models if m in self.models)
        return {"name": spec.name, "state": self.state, "ready": self.ready,
                "models": None if models is None else list(models), "slots": self.slots,
                "busy": self.busy}


class UpstreamWatch:
    """One upstream, polled every PROBE_INTERVAL: what it serves and whether it is ready."""

    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self.headers = {"Authorization": f"Bearer {spec.key}"} if spec.key else {}

    async def follow(self, report: Callable[[UpstreamReport], None],
                     interval: float = PROBE_INTERVAL, refresh: float = MODELS_REFRESH) -> None:
        timeout = aiohttp.ClientTimeout(total=max(2.0, interval))
        models: tuple[str, ...] | None = None
        slots: int | None = None
        listed: float | None = None  # when the list was read in the current ready period
        last = ""
        slots_open = True  # /slots answered (a key without access, or --no-slots: stop asking)
        tolerance = MissTolerance()
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                code, refused = await probe_health(session, self.spec.url, timeout, self.headers)
                if tolerance.forgives(code, refused, last == "ready"):
                    await asyncio.sleep(interval)  # poll period
                    continue
                state, ready = health_state(code)
                if not ready:
                    listed, slots_open = None, True
                elif listed is None or time.monotonic() - listed >= refresh:
                    fresh = await self._list(session)
                    if fresh is not None:
                        models, listed = fresh, time.monotonic()
                        slots = await self._total_slots(session)
                    elif listed is None:  # answers /health, not /v1/models (yet)
                        state, ready = "starting", False
                busy = None
                if ready and slots_open:
                    busy = await self._busy(session)
                    slots_open = busy is not None
                if state != last:
                    log.info("upstream %s %s", self.spec.name, state,
                             extra={"upstream": self.spec.name})
                    last = state
                report(UpstreamReport(state, ready, models, slots, busy))
                await asyncio.sleep(interval)  # poll period

    async def _get(self, session: aiohttp.ClientSession, path: str) -> Any:
        try:
            async with session.get(f"{self.spec.url}{path}", headers=self.headers) as resp:
                if resp.status != 200:
                    return None
                return await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None

    async def _list(self, session: aiohttp.ClientSession) -> tuple[str, ...] | None:
        """Every name the upstream answers to: each model's id and its aliases (--alias a,b)."""
        data = await self._get(session, "/v1/models")
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            return None
        names: dict[str, None] = {}
        for item in items:
            if isinstance(item, dict) and "id" in item:
                names[str(item["id"])] = None
                aliases = item.get("aliases")
                if isinstance(aliases, list):
                    names.update((str(a), None) for a in aliases if isinstance(a, str) and a)
        return tuple(names)

    async def _total_slots(self, session: aiohttp.ClientSession) -> int | None:
        props = await self._get(session, "/props")
        total = props.get("total_slots") if isinstance(props, dict) else None
        return total if isinstance(total, int) and total > 0 else None

    async def _busy(self, session: aiohttp.ClientSession) -> int | None:
        slots = await self._get(session, "/slots")
        if not isinstance(slots, list):
            return None
        return sum(1 for s in slots if isinstance(s, dict) and s.get("is_processing"))
