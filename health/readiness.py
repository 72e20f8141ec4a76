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


def data_files(workers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The workers' usage recording and key set, as /health shows them: the first worker in
    trouble speaks for all (each has its own database connection and keyring); the events
    pending and dropped add up, and usage is spooled if any worker's is."""
    shown: dict[str, dict[str, Any]] = {}
    for part in ("usage", "keys", "fleet"):
        states = [w[part] for w in workers if isinstance(w.get(part), dict)]
        if not states:
            continue
        worst = next((s for s in states if not s.get("ok", True)), states[0])
        shown[part] = dict(worst)
        if part == "usage":
            for count in ("pending", "dropped"):
                shown[part][count] = sum(int(s.get(count, 0)) for s in states)
            shown[part]["spooled"] = any(s.get("spooled") for s in states)
    return shown


def with_data_files(verdict: Readiness, shown: dict[str, dict[str, Any]]) -> Readiness:
    """A healthy service whose usage database or keys file is failing, or whose fleet's Redis
    does not answer, is degraded, with /ping still 200: requests are served (usage waits in
    memory and a spool, the last good keys authenticate), and a balancer must not take the
    service out for it."""
    if verdict.status != "healthy":
        return verdict
    reasons = []
    usage = shown.get("usage", {})
    if not usage.get("ok", True):
        reasons.append(f"usage not written: {usage.get('error')}")
    keys = shown.get("keys", {})
    if not keys.get("ok", True):
        using = keys.get("using") or "no key works"
        where = "key set in Redis" if keys.get("source") == "redis" else "keys file"
        reasons.append(f"{where} unusable ({using}): {keys.get('error')}")
    fleet = shown.get("fleet", {})
    if not fleet.get("ok", True):
        reasons.append(f"Redis at {fleet.get('redis')} unreachable (limits per REDIS_FAILURE_MODE, "
                       "usage buffered on local disk)")
    if not reasons:
        return verdict
    return Readiness("degraded", verdict.ping, "; ".join(reasons))


def upstreams(serve: dict[str, Any], workers: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """An upstream pool as /health shows it: each upstream's probe as serve publishes it, with
    what the gateway worker adds (its state after outlier ejection, requests in flight, free
    slots, why it was ejected). None without a pool."""
    probed = serve.get("upstreams")
    if not isinstance(probed, list):
        return None
    routed = next((w["upstreams"] for w in workers if isinstance(w.get("upstreams"), list)
                   and len(w["upstreams"]) == len(probed)), None)
    shown = []
    for i, probe in enumerate(probed):
        entry = {"name": probe.get("name"), "state": probe.get("state"), "in_flight": 0,
                 "slots": probe.get("slots"), "busy_slots": probe.get("busy"),
                 "free_slots": None, "models": probe.get("models") or [],
                 "ejection_reason": None}
        if routed is not None and isinstance(routed[i], dict):
            worker = routed[i]
            entry.update({k: worker.get(k) for k in ("state", "in_flight", "slots",
                                                      "free_slots", "ejection_reason")})
        shown.append(entry)
    return shown
