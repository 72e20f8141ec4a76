"""Readiness rules of the health tier (pure: states and a clock in, verdict out).

/ping follows RunPod's load-balancer contract: 200 ready, 204 initializing,
503 unhealthy or draining. A writer whose heartbeat is older than `stale_after` is treated
as hung or dead, so a stopped gateway reads as unhealthy rather than a hang. A dead
gateway worker's file is not read at all (core/runtime.py): it counts as down
until serve has restarted it, not as hung for good. What the backend's own state
means is backend/readiness.py's, shared with the gateway's probes.
"""

from __future__ import annotations

from typing import Any

from backend.readiness import DRAINING, Readiness, backend_readiness

STALE_AFTER = 1.5


def judge(serve: dict[str, Any] | None, workers: list[dict[str, Any]], now: float,
          expected_workers: int, workers_seen: bool = True,
          stale_after: float = STALE_AFTER) -> Readiness:
    """`workers_seen`: every gateway worker has been up at least once since boot;
    until then a missing worker means starting, afterwards it means down."""
    if serve is None:
        return Readiness("initializing", 204, "service starting")
    if now - float(serve.get("ts", 0)) > stale_after:
        return Readiness("unhealthy", 503, "serve process not responding")
    phase = serve.get("phase")
    if phase in ("draining", "stopped"):
        return DRAINING
    backend = serve.get("backend", {})
    state = str(backend.get("state", "starting"))
    if any(now - float(w.get("ts", 0)) > stale_after for w in workers):
        return Readiness("unhealthy", 503, "gateway worker not responding")
    verdict = backend_readiness(state, int(backend.get("restarts", 0)))
    if verdict.ping == 503 or len(workers) >= expected_workers:
        return verdict
    if workers_seen and phase == "running" and state == "ready":
        return Readiness("unhealthy", 503, "gateway worker down")
    return Readiness("initializing", 204, "gateway starting")
