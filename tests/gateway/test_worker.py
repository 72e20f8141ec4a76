"""GATEWAY_WORKERS=2: two worker processes share the port (SO_REUSEPORT), and
whichever answers a scrape reports the totals of both (layer 3, the real service)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.metrics import Samples
from tests.support.service import Service

N = 24


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("workers")
    svc = Service(tmp, {"MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny", "AUTH_ENABLED": "false",
                        "GATEWAY_WORKERS": "2", "PARALLEL": "2"})
    with svc.running():
        yield svc


def _answered_by(svc: Service) -> set[int]:
    """Pids of the gateway workers that wrote an access line."""
    return {json.loads(line)["worker_pid"] for line in svc.log().splitlines()
            if '"logger":"llamagate.access"' in line}


@pytest.mark.llama_server
def test_two_workers_report_the_totals_of_both(two_workers: Service) -> None:
    completion_tokens = 0
    for i in range(N):
        # a new connection each time, so the kernel spreads them over both workers
        with requests.Session() as s:
            r = s.post(f"{two_workers.url}/v1/completions",
                       json={"prompt": f"p{i}", "max_tokens": 2}, timeout=30)
            assert r.status_code == 200
            completion_tokens += r.json()["usage"]["completion_tokens"]
    # both workers served some (else this test could not tell totals from one worker's count)
    assert len(_answered_by(two_workers)) == 2
    for _ in range(8):
        with requests.Session() as s:
            samples = Samples.parse(s.get(f"{two_workers.url}/metrics", timeout=10).text)
        assert samples.total("llamagate_requests_total") == N
        assert samples.get_value("llamagate_requests_total", route="/v1/completions", status="200",
                                 model="tiny", key_id="-", ended="completed") == N
        assert samples.get_value("llamagate_completion_tokens_total", model="tiny",
                                 key_id="-") == completion_tokens
        assert samples.get_value("llamagate_in_flight_requests") == 0
        assert samples.get_value("llamacpp_requests_processing", model="tiny") == 0
