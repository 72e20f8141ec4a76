"""Readiness rules of the health tier (pure: states and a clock in, verdict out).

/ping follows RunPod's load-balancer contract: 200 ready, 204 initializing,
503 unhealthy. A writer whose heartbeat is older than `stale_after` is treated
as hung or dead, so a stopped gateway reads as unhealthy rather than a hang. A dead
gateway worker's file is not read at all (core/runtime.py): it counts as down
until serve has restarted it, not as hung for good.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STALE_AFTER = 1.5


@dataclass(frozen=True)
class Verdict:
    status: str  # initializing | healthy | degraded | unhealthy | draining
    ping: int
    reason: str


def judge(serve: dict[str, Any] | None, workers: list[dict[str, Any]], now: float,
          expected_workers: int, workers_seen: bool = True,
          stale_after: float = STALE_AFTER) -> Verdict:
    """`workers_seen`: every gateway worker has been up at least once since boot;
    until then a missing worker means starting, afterwards it means down."""
    if serve is None:
        return Verdict("initializing", 204, "service starting")
    if now - float(serve.get("ts", 0)) > stale_after:
        return Verdict("unhealthy", 503, "serve process not responding")
    phase = serve.get("phase")
    if phase in ("draining", "stopped"):
        return Verdict("draining", 503, "shutting down")
    backend = serve.get("backend", {}).get("state", "starting")
    stale = [w for w in workers if now - float(w.get("ts", 0)) > stale_after]
    if stale:
        return Verdict("unhealthy", 503, "gateway worker not responding")
    if backend == "circuit_open":
        return Verdict("unhealthy", 503, "backend keeps crashing (circuit open)")
    if backend in ("error", "unreachable", "stopped", "stopping"):
        return Verdict("unhealthy", 503, f"backend {backend}")
    if len(workers) < expected_workers:
        if workers_seen and phase == "running" and backend == "ready":
            return Verdict("unhealthy", 503, "gateway worker down")
        return Verdict("initializing", 204, "gateway starting")
    if backend == "ready":
        return Verdict("healthy", 200, "ready")
    restarted = int(serve.get("backend", {}).get("restarts", 0)) > 0
    if backend == "restarting" or (backend == "starting" and restarted):
        return Verdict("degraded", 204, "backend restarting")
    return Verdict("initializing", 204, f"backend {backend}")
