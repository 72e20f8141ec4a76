"""/health's view of an upstream pool: serve's probes, with what the gateway worker adds."""

from __future__ import annotations

from typing import Any

from health.readiness import upstreams


def test_health_shows_each_upstream_as_the_worker_routes_by_it() -> None:
    serve: dict[str, Any] = {"upstreams": [
        {"name": "a:1", "state": "ready", "ready": True, "models": ["A"], "slots": 2, "busy": 1},
        {"name": "b:1", "state": "unreachable", "ready": False, "models": None, "slots": None,
         "busy": None}]}
    routed = [{"name": "a:1", "state": "ejected", "in_flight": 0, "slots": 2, "free_slots": 1,
               "models": ["A"], "ejection_reason": "refused"},
              {"name": "b:1", "state": "unreachable", "in_flight": 0, "slots": 4, "free_slots": 4,
               "models": [], "ejection_reason": None}]
    shown = upstreams(serve, [{"upstreams": routed}])
    assert shown is not None
    assert shown[0] == {"name": "a:1", "state": "ejected", "in_flight": 0, "slots": 2,
                        "busy_slots": 1, "free_slots": 1, "models": ["A"],
                        "ejection_reason": "refused"}
    assert shown[1]["state"] == "unreachable" and shown[1]["models"] == []
    # no worker yet: serve's probes alone
    assert upstreams(serve, [])[0]["state"] == "ready"  # type: ignore[index]
    assert upstreams({}, []) is None  # no pool
