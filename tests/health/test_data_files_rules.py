"""/health's account of the workers' data files (issue 22): a failing usage database or an
unusable keys file makes a healthy service degraded, and /ping stays 200."""

from __future__ import annotations

from backend.readiness import Readiness
from health.readiness import data_files, with_data_files

HEALTHY = Readiness("healthy", 200, "ready")
USAGE_OK = {"ok": True, "pending": 2, "error": None, "spooled": False, "dropped": 1}
USAGE_FAILING = {"ok": False, "pending": 5, "error": "attempt to write a readonly database",
                 "spooled": True, "dropped": 0}
KEYS_BAD = {"ok": False, "keys": 3, "error": "keys file /d/keys.json is invalid: not valid JSON",
            "using": "last good copy from 2024-01-01T00:00:00Z"}


def test_a_failing_usage_database_degrades_but_keeps_serving() -> None:
    shown = data_files([{"usage": USAGE_OK}, {"usage": USAGE_FAILING}])
    # the worst speaks, the counts add up
    assert shown == {"usage": {**USAGE_FAILING, "pending": 7, "dropped": 1}}
    verdict = with_data_files(HEALTHY, shown)
    assert verdict.status == "degraded" and verdict.ping == 200
    assert "usage not written: attempt to write a readonly database" in verdict.reason


def test_an_unusable_keys_file_names_the_keys_in_force() -> None:
    verdict = with_data_files(HEALTHY, data_files([{"keys": KEYS_BAD}]))
    assert verdict == Readiness("degraded", 200, "keys file unusable (last good copy from "
                                "2024-01-01T00:00:00Z): keys file /d/keys.json is invalid: "
                                "not valid JSON")


def test_fine_data_files_or_none_change_nothing() -> None:
    assert with_data_files(HEALTHY, data_files([{"usage": USAGE_OK}])) is HEALTHY
    assert data_files([{"in_flight": 0}]) == {}  # auth off: no usage, no keys
    unhealthy = Readiness("unhealthy", 503, "backend stopped")
    assert with_data_files(unhealthy, data_files([{"usage": USAGE_FAILING}])) is unhealthy
