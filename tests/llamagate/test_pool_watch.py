"""serve's view of an upstream pool as the backend's state: ready while one upstream is, the
union of their models."""

from __future__ import annotations

from backend.upstreams import UpstreamReport, UpstreamSpec
from llamagate.pool_watch import PoolWatch


def test_the_pool_is_ready_while_one_upstream_is() -> None:
    watch = PoolWatch([UpstreamSpec("http://a:1"), UpstreamSpec("http://b:1")])
    assert watch.models() is None
    assert watch.backend_state({"state": "starting", "restarts": 0})["state"] == "starting"
    watch.reports = [UpstreamReport("unreachable", False, ("A",)),
                     UpstreamReport("ready", True, ("A", "B"))]
    assert watch.models() == ("A", "B")
    assert watch.backend_state({"state": "starting", "restarts": 0})["state"] == "ready"
    watch.reports[1] = UpstreamReport("starting", False, ("A", "B"))
    assert watch.backend_state({"state": "starting", "restarts": 0})["state"] == "starting"
    # a local llama-server restarting says more than the remote ones' states
    assert watch.backend_state({"state": "restarting", "restarts": 2})["state"] == "restarting"
