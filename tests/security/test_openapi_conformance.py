"""/openapi.json matches the answers (issue 21, bug 7): schemathesis generates requests for
every operation the document declares, the admin ones included, and each answer must be one
the document lists for that operation, with the declared content type, headers and body
schema; no 5xx the document does not list (503 and 504 are, where they apply).

The gateway runs in-process with auth on, before the fake llama-server; the model-admin
routes point at a control socket that does not exist, so they answer their documented 503.
Examples are bounded and derandomized, so the run is the same every time (~30 s)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case
from schemathesis.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok

from gateway.app import Wiring, create_app, serve
from gateway.state import APP_STATE
from tests.support.fake_llama import BACKEND_KEY, MODEL, FakeLlama
from tests.support.gateway import auth_config
from tests.support.keytool import KeyTool
from tests.support.wait import wait_until

EXAMPLES = 25  # per operation
Operation = APIOperation[Any, Any, Any, Any]
CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def _run(url: str, document: dict[str, Any], secret: str) -> list[str]:
    """Every operation, EXAMPLES cases each; returns the failures, one line each."""
    schema = schemathesis.openapi.from_dict(document)
    results = list(schema.get_all_operations())
    assert all(isinstance(r, Ok) for r in results), results  # every operation is well formed
    operations = [r.ok() for r in results if isinstance(r, Ok)]
    assert len(operations) >= 20, [op.label for op in operations]
    with requests.Session() as session:
        return [line for op in operations for line in _fuzz(op, url, session, secret)]


def _fuzz(operation: Operation, url: str, session: requests.Session, secret: str) -> list[str]:
    documented = set(operation.definition.raw["responses"])
    failures: list[str] = []

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(), keyed=st.booleans())
    def check(case: Case[Operation], keyed: bool) -> None:
        headers = {"Authorization": f"Bearer {secret}"} if keyed else {}
        response = case.call(base_url=url, session=session, headers=headers, timeout=10)
        where = f"{operation.label} -> {response.status_code} ({case.formatted_path})"
        if response.status_code >= 500 and str(response.status_code) not in documented:
            failures.append(f"{where}: server error {response.text[:200]}")
            return
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as group:
            failures.extend(f"{where}: {type(e).__name__} {' '.join(str(e).split())[:200]}"
                            for e in group.exceptions)

    check()
    return failures


async def test_every_answer_matches_the_document(tmp_path: Path, fake: FakeLlama,
                                                 keytool: KeyTool) -> None:
    _, secret = keytool.generate("all", "--scopes", "inference,admin,metrics")
    config = replace(auth_config(tmp_path), auth_failures_per_minute=1_000_000)
    app = create_app(config, Wiring(backend_url=fake.url, backend_key=BACKEND_KEY,
                                    runtime_dir=None, models=(MODEL,),
                                    control_socket=tmp_path / "no-control.sock"))
    served = await serve(app, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{served.port}"
    try:
        await wait_until(lambda: app[APP_STATE].upstream.status.ready, "the backend", within=10)
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"GET /openapi.json HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        raw = await reader.read()
        writer.close()
        document = json.loads(raw.partition(b"\r\n\r\n")[2])
        failures = await asyncio.to_thread(_run, url, document, secret)
    finally:
        await served.close()
    summary = sorted({line.split(" (")[0] + ": " + line.split("): ")[-1] for line in failures})
    assert summary == [], "\n".join(summary)
