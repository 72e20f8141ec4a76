"""One set of readiness rules: the health port and the gateway's own probes judge the
backend's state by backend/readiness.py, and so agree on every state."""

from __future__ import annotations

import ast
import inspect
from types import ModuleType
from typing import Any

import pytest

import health.readiness
import health.server
from backend.readiness import DRAINING, STATES, Readiness, backend_readiness
from backend.supervisor import BackendState
from gateway.observe import probes
from gateway.upstream.backend import BackendStatus
from health.readiness import judge

NOW = 1000.0

# state, restarts → (/ping, status)
RULES = [
    ("ready", 0, 200, "healthy"),
    ("ready", 3, 200, "healthy"),
    ("starting", 0, 204, "initializing"),
    ("starting", 1, 204, "degraded"),
    ("restarting", 1, 204, "degraded"),
    ("stopping", 0, 503, "draining"),  # shutting down: a balancer must stop sending
    ("stopped", 0, 503, "unhealthy"),
    ("circuit_open", 5, 503, "unhealthy"),
    ("unresponsive", 0, 503, "unhealthy"),  # running but not answering: hung or stopped
    ("model_unavailable", 1, 503, "unhealthy"),
    ("error", 0, 503, "unhealthy"),
    ("unreachable", 0, 503, "unhealthy"),
    ("unknown", 0, 204, "initializing"),
]


@pytest.mark.parametrize(("state", "restarts", "ping", "status"), RULES)
def test_backend_state_rules(state: str, restarts: int, ping: int, status: str) -> None:
    verdict = backend_readiness(state, restarts)
    assert (verdict.ping, verdict.status) == (ping, status)
    assert verdict.reason


def test_every_backend_state_has_a_rule() -> None:
    known = {s.value for s in BackendState} | {"error", "unreachable"}
    assert set(STATES) == known
    assert known <= {state for state, *_ in RULES}


def _health_tier(state: str, restarts: int) -> Readiness:
    serve = {"phase": "running", "backend": {"state": state, "restarts": restarts}, "ts": NOW}
    return judge(serve, [{"ts": NOW}], NOW, 1)


def _gateway_tier(state: str, restarts: int) -> Readiness:
    return probes.verdict(False, BackendStatus(state=state, ready=state == "ready",
                                               restarts=restarts))


@pytest.mark.parametrize(("state", "restarts"), [(s, r) for s in (*STATES, "unknown")
                                                 for r in (0, 1)])
def test_both_tiers_agree_on_every_backend_state(state: str, restarts: int) -> None:
    expected = backend_readiness(state, restarts)
    assert _health_tier(state, restarts) == expected
    assert _gateway_tier(state, restarts) == expected


def test_both_tiers_agree_on_draining() -> None:
    serve: dict[str, Any] = {"phase": "draining", "backend": {"state": "ready"}, "ts": NOW}
    assert judge(serve, [{"ts": NOW}], NOW, 1) == DRAINING
    assert probes.verdict(False, BackendStatus(state="ready", ready=True, draining=True)) == DRAINING
    assert probes.verdict(True, BackendStatus(state="ready", ready=True)) == DRAINING


def _calls(module: ModuleType, function: str) -> set[str]:
    tree = ast.parse(inspect.getsource(getattr(module, function)))
    return {node.func.id for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}


def test_both_probe_handlers_use_the_shared_rules() -> None:
    assert "backend_readiness" in _calls(health.readiness, "judge")
    assert "backend_readiness" in _calls(probes, "verdict")
    assert "judge" in _calls(health.server, "_verdict")
    for handler in ("ping", "health"):
        assert "_verdict" in _calls(health.server, handler)
        assert "verdict" in _calls(probes, handler)
