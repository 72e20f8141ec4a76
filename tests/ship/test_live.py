"""Against the real service (llama-server, tiny model, auth off): every metric the Grafana
dashboard queries is in a real /metrics scrape at the path Prometheus scrapes, and the
images' HEALTHCHECK command passes on a ready health port and fails otherwise."""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.ship.dockerfile import Instruction
from tests.ship.metric_names import exposed_names, queried_names
from tests.ship.project import DASHBOARD, DOCKERFILES, PROMETHEUS, dockerfile, yaml_file
from tests.support.service import Service, free_port

pytestmark = pytest.mark.llama_server  # every test here runs the real binary


# a fleet's metrics, registered only with REDIS_URL (tests/fleet checks them in a fleet's scrape)
_FLEET_ONLY = {"llamagate_redis_up", "llamagate_redis_latency_seconds_bucket",
               "llamagate_usage_buffered"}
_NOT_IN_THIS_SCRAPE: frozenset[str] = frozenset({
    "llamagate_redis_up", "llamagate_redis_latency_seconds", "llamagate_usage_buffered"})


def dashboard_queries() -> dict[str, list[str]]:
    """Panel (or template variable) title → its PromQL expressions."""
    dash = json.loads(DASHBOARD.read_text())
    queries = {p["title"]: [t["expr"] for t in p["targets"]] for p in dash["panels"]}
    for var in dash["templating"]["list"]:
        queries[f"variable ${var['name']}"] = [var["query"]["query"]]
    return queries


@pytest.fixture(scope="module")
def scrape(service: Service) -> str:
    """/metrics after one chat completion and one streamed one, at Prometheus's scrape path."""
    chat: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
                            "max_tokens": 8}
    r = requests.post(f"{service.url}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200
    with requests.post(f"{service.url}/v1/chat/completions", json={**chat, "stream": True},
                       stream=True, timeout=60) as r:
        assert r.status_code == 200
        assert b"data: [DONE]" in b"".join(r.iter_content(None))
    [job] = yaml_file(PROMETHEUS)["scrape_configs"]
    r = requests.get(f"{service.url}{job['metrics_path']}", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    return r.text


def test_every_metric_the_dashboard_queries_is_exposed(scrape: str) -> None:
    exposed = exposed_names(scrape)
    missing = {title: sorted(set().union(*map(queried_names, exprs)) - exposed - _FLEET_ONLY)
               for title, exprs in dashboard_queries().items()}
    missing = {title: names for title, names in missing.items() if names}
    assert not missing, f"queried but not in /metrics: {missing}"


def test_the_dashboard_covers_the_gateway_metrics(scrape: str) -> None:
    queried = set().union(*(queried_names(e) for exprs in dashboard_queries().values() for e in exprs))
    ours = {name for name in exposed_names(scrape)
            if name.startswith("llamagate_") and not name.endswith(("_created", "_count", "_sum"))}
    # a histogram is charted through its buckets
    assert ours - queried == set(), f"exported but on no panel: {sorted(ours - queried)}"
    assert "key_id" in DASHBOARD.read_text(), "per-key usage"


def test_the_scrape_carries_llama_servers_own_metrics(scrape: str) -> None:
    assert any(name.startswith("llamacpp_") for name in exposed_names(scrape))


class _Ping(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def initializing_health_port() -> Iterator[int]:
    """A /ping that answers 204, as the health port does while the model loads."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ping)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def run_healthcheck(kind: str, port: int) -> int:
    flags, rest = dockerfile(kind).final.one("HEALTHCHECK").flags()
    argv = Instruction("CMD", rest.removeprefix("CMD "), 0).exec_form()
    assert argv is not None and argv[0] == "python"
    env = {"PORT_HEALTH": str(port), "PATH": ""}
    return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True,
                          timeout=30).returncode


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_healthcheck_command_passes_only_when_ping_is_200(
        kind: str, service: Service, initializing_health_port: int) -> None:
    assert run_healthcheck(kind, service.port_health) == 0
    assert run_healthcheck(kind, initializing_health_port) != 0
    assert run_healthcheck(kind, free_port()) != 0  # nothing listening


# a family a scrape of the `service` fixture (one model, auth off) may not declare

def test_the_docs_metrics_table_lists_every_exported_family(scrape: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from tests.ship.project import ROOT
    exported = {f.name + ("_total" if f.type == "counter" else "")
                for f in text_string_to_metric_families(scrape)
                if f.name.startswith("llamagate_") and not f.name.endswith("_created")}
    api = (ROOT / "docs" / "api.md").read_text()
    table = api[api.index("## Metrics"):]
    documented = set(re.findall(r"^\| `(llamagate_[a-z_]+)` \|", table, re.MULTILINE))
    assert exported - documented == set(), "exported but not in docs/api.md's metrics table"
    assert documented - exported - _NOT_IN_THIS_SCRAPE == set(), "documented but not exported"
