"""serve's side of an upstream pool (BACKEND_URLS, BACKENDS_FILE): one watch per upstream
(backend/upstreams.py), and what serve publishes of them for the gateway worker and the
health process: each upstream's state, models and slots, the union of their models, and the
pool's state as the backend's (ready while any upstream is, so /ping is 200 while one can
answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backend.upstreams import (
    UpstreamReport,
    UpstreamSpec,
    UpstreamWatch,
    pool_specs,
    read_backends_file,
)
from core import runtime
from core.config import Config

log = logging.getLogger("llamagate.serve")

# the pool's state when no upstream is ready: the most hopeful of theirs
_HOPE = ("starting", "error", "unreachable")


class PoolWatch:
    def __init__(self, specs: list[UpstreamSpec]) -> None:
        self.specs = specs
        self.reports: list[UpstreamReport] = [UpstreamReport("starting", False, None)
                                              for _ in specs]

    @property
    def ready(self) -> bool:
        return any(r.ready for r in self.reports)

    def models(self) -> tuple[str, ...] | None:
        """The union of what the upstreams serve, in their order; None before any list."""
        lists = [r.published(s)["models"] for s, r in zip(self.specs, self.reports, strict=True)]
        if all(m is None for m in lists):
            return None
        return tuple(dict.fromkeys(name for names in lists if names for name in names))

    def backend_state(self, local: dict[str, Any]) -> dict[str, Any]:
        """The pool as the backend's state: ready while one upstream is; else the most
        hopeful state among them (or the local llama-server's, while it restarts)."""
        if self.ready:
            return {**local, "state": "ready"}
        states = {r.state for r in self.reports}
        if local.get("state") not in (None, "ready", "starting"):
            return local  # the local llama-server's restart or circuit says more
        state = next((s for s in _HOPE if s in states), "unreachable")
        return {**local, "state": state}

    def published(self) -> list[dict[str, Any]]:
        return [r.published(s) for s, r in zip(self.specs, self.reports, strict=True)]

    async def run(self, changed: Callable[[], None]) -> None:
        """Watch every upstream until cancelled; ``changed`` after any report that differs."""
        def reporter(i: int) -> Callable[[UpstreamReport], None]:
            def report(r: UpstreamReport) -> None:
                if r != self.reports[i]:
                    self.reports[i] = r
                    changed()
            return report

        tasks = [asyncio.create_task(UpstreamWatch(s).follow(reporter(i)), name=f"upstream-{i}")
                 for i, s in enumerate(self.specs)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def prepare_pool(config: Config, first: UpstreamSpec | None, runtime_dir: Path
                       ) -> tuple[PoolWatch, Path]:
    """The pool's watch, and the private file that hands its upstreams (keys included) to
    the gateway worker: `ps` shows a worker's command line, so they never go there."""
    listed = [] if config.backends_file is None else await asyncio.to_thread(
        read_backends_file, config.backends_file, config.backend_api_key)
    specs = pool_specs(config.backend_urls, listed, first, config.backend_api_key)
    if any(spec.key is None for spec in specs):
        log.warning("an upstream of the pool has no key: its llama-server should demand one "
                    "(--api-key-file), given as BACKEND_API_KEY or in BACKENDS_FILE")
    path = runtime_dir / "upstreams.json"
    runtime.write_secret(path, json.dumps([spec.to_json() for spec in specs]))
    return PoolWatch(specs), path
