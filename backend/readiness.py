"""What a backend state means for readiness: the one rule both probe tiers follow.

The health process (health/readiness.py) and the gateway's own probes
(gateway/observe/probes.py) each add what only they can see (stale heartbeats,
gateway workers; the worker's own drain), then defer to ``backend_readiness`` for
llama-server's state, so the two ports never disagree about the backend.

/ping follows RunPod's load-balancer contract: 200 ready, 204 initializing, 503
unhealthy or draining.

    state          /ping  status
    ready          200    healthy
    starting       204    initializing   (degraded once it has restarted)
    restarting     204    degraded
    stopping       503    draining       (shutting down: a balancer must stop sending)
    stopped        503    unhealthy
    circuit_open   503    unhealthy
    unresponsive   503    unhealthy      (llama-server running but not answering /health:
                                           stopped, wedged; see backend/liveness.py)
    model_unavailable 503 unhealthy      (a restart waits for its model file to come back)
    error          503    unhealthy      (an external backend answering /health with an error)
    unreachable    503    unhealthy      (an external backend not answering)
    anything else  204    initializing
"""

from __future__ import annotations

from dataclasses import dataclass

# the states of backend/supervisor.py's BackendState and backend/external.py's health_state
STATES = ("ready", "starting", "restarting", "stopping", "stopped", "circuit_open",
          "unresponsive", "model_unavailable", "error", "unreachable")


@dataclass(frozen=True)
class Readiness:
    status: str  # initializing | healthy | degraded | unhealthy | draining
    ping: int  # 200 | 204 | 503
    reason: str


DRAINING = Readiness("draining", 503, "shutting down")


def backend_readiness(state: str, restarts: int = 0) -> Readiness:
    """The verdict for a backend in ``state`` that has been restarted ``restarts`` times."""
    if state == "ready":
        return Readiness("healthy", 200, "ready")
    if state == "stopping":
        return Readiness("draining", 503, "backend stopping")
    if state == "circuit_open":
        return Readiness("unhealthy", 503, "backend keeps crashing (circuit open)")
    if state == "unresponsive":
        return Readiness("unhealthy", 503, "backend not answering (hung or stopped)")
    if state == "model_unavailable":
        return Readiness("unhealthy", 503, "backend's model file unavailable (see last_error)")
    if state in ("error", "unreachable", "stopped"):
        return Readiness("unhealthy", 503, f"backend {state}")
    if state == "restarting" or (state == "starting" and restarts > 0):
        return Readiness("degraded", 204, "backend restarting")
    return Readiness("initializing", 204, f"backend {state}")
