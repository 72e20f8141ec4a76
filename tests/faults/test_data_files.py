"""Unwritable and corrupt data files under the real `llamagate serve` and llama-server (issue 22).

- A usage database that cannot be written when the workers start: requests are served, /health
  is degraded and names the failure, the metrics count it, and once the file is writable the
  usage is written without a restart.
- A worker SIGKILLed while the database fails: its usage, spooled, is written once the database
  is writable, exactly once.
- A worker restarted while keys.json is corrupt serves the last good keys, and /health says so.

The database is made unwritable with `chattr +i` (tests/support/immutable.py): CI runs as root,
which a chmod does not stop. These tests need root (CAP_LINUX_IMMUTABLE) and a filesystem that
keeps the attribute (ext4, xfs, or overlayfs over them); they fail, saying so, elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from keys import usage_spool
from keys.db import open_db
from keys.store import last_good_path
from keys.usage import UsageStore
from tests.health.processes import metric
from tests.support.immutable import immutable, set_immutable
from tests.support.keytool import KeyTool
from tests.support.service import Service
from tests.support.wait import wait_for

pytestmark = pytest.mark.llama_server  # every test here runs the real binary


@pytest.fixture
def spool(keytool: KeyTool) -> Iterator[Path]:
    """Where the service spools usage of this test's database (under TMPDIR, outside
    tmp_path); removed after the test, whatever it left."""
    directory = usage_spool.spool_dir(keytool.usage_db)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _service(keys: KeyTool, model: Path, **env: str) -> Service:
    return Service(keys.keys_file.parent.parent, {
        "MODEL_PATH": str(model), "MODEL_NAME": "tiny", "AUTH_ENABLED": "true",
        "AUTH_KEYS_FILE": str(keys.keys_file), "USAGE_DB": str(keys.usage_db),
        "LOG_LEVEL": "info", **env})


def _complete(svc: Service, secret: str) -> requests.Response:
    return requests.post(f"{svc.url}/v1/completions", timeout=60,
                         headers={"Authorization": f"Bearer {secret}"},
                         json={"prompt": "a", "max_tokens": 2})


def _completed_tokens(svc: Service, secret: str) -> int:
    r = _complete(svc, secret)
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["completion_tokens"])


def _on_disk(db: Path) -> tuple[int, int]:
    """(requests, completion tokens) in the usage database."""
    with contextlib.closing(open_db(db)) as conn:
        rows = UsageStore(conn).usage()
    return sum(r.requests for r in rows), sum(r.completion_tokens for r in rows)


def _usage(svc: Service) -> dict[str, Any]:
    return dict(svc.health().get("usage") or {})


def _metrics(svc: Service, secret: str) -> str:
    r = requests.get(f"{svc.url}/metrics", headers={"Authorization": f"Bearer {secret}"},
                     timeout=10)
    assert r.status_code == 200, r.text
    return r.text


def _kill_worker(svc: Service) -> None:
    [victim] = svc.health()["workers"]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        workers = svc.health()["workers"]
        return len(workers) == 1 and victim not in workers and svc.ping() == 200
    wait_for(replaced, "serve to restart the killed worker", within=30)


def test_usage_is_written_once_the_database_is_writable_again(
        keytool: KeyTool, tiny_model: Path, spool: Path) -> None:
    _, secret = keytool.generate("client", "--scopes", "inference,metrics")
    db = keytool.usage_db
    open_db(db).close()
    with immutable(db):
        svc = _service(keytool, tiny_model, GATEWAY_WORKERS="2")
        with svc.running():
            tokens = sum(_completed_tokens(svc, secret) for _ in range(4))
            # served all along, and the health tier says what is wrong
            wait_for(lambda: _usage(svc).get("pending") == 4 and _usage(svc).get("spooled"),
                     "/health to count 4 events waiting, spooled")
            body = svc.health()
            assert body["status"] == "degraded" and svc.ping() == 200
            assert body["usage"]["ok"] is False
            assert "Operation not permitted" in body["usage"]["error"]
            assert "usage not written" in body["reason"]
            # each worker moves the gauge at its next attempt, which backs off while failing
            def both_counted() -> str | None:
                text = _metrics(svc, secret)
                return text if metric(text, "llamagate_usage_pending_events") == 4 else None

            text = wait_for(both_counted, "the pending gauge to count both workers' events",
                            within=15)
            assert metric(text, "llamagate_usage_write_failures_total") >= 2  # both workers

            set_immutable(db, False)
            wait_for(lambda: _on_disk(db) == (4, tokens), "the usage in the database", within=30)
            wait_for(lambda: svc.health()["status"] == "healthy", "/health healthy again")
            assert _usage(svc)["ok"] is True and _usage(svc)["pending"] == 0
            assert metric(_metrics(svc, secret), "llamagate_usage_pending_events") == 0
            # logged when it started failing, per worker, not at every attempt
            assert svc.log().count("cannot be written") == 2, svc.log()
            assert svc.log().count("written again") == 2
            assert "dropping" not in svc.log()
    assert _on_disk(db) == (4, tokens)  # the shutdown added nothing


def test_usage_of_a_worker_killed_while_the_database_fails_is_written_once(
        keytool: KeyTool, tiny_model: Path, spool: Path) -> None:
    _, secret = keytool.generate("client")
    db = keytool.usage_db
    open_db(db).close()
    with immutable(db):
        svc = _service(keytool, tiny_model)
        with svc.running():
            tokens = sum(_completed_tokens(svc, secret) for _ in range(3))
            wait_for(lambda: _usage(svc).get("pending") == 3 and _usage(svc).get("spooled"),
                     "the worker to spool its 3 waiting events")
            _kill_worker(svc)
            # the new worker fails on the database as well; the dead one's events are its spool
            wait_for(lambda: _usage(svc).get("ok") is False, "the new worker to fail too")
            assert len(list(spool.glob("usage-*.json"))) == 1

            set_immutable(db, False)
            wait_for(lambda: _on_disk(db) == (3, tokens), "the killed worker's usage", within=30)
            assert list(spool.glob("usage-*.json")) == []
            tokens += _completed_tokens(svc, secret)
            wait_for(lambda: _on_disk(db)[0] == 4, "the next request's usage", within=30)
            assert _on_disk(db) == (4, tokens)  # the spool was not written again
            assert "recovered 3 usage events" in svc.log()


def test_a_worker_restarted_on_a_corrupt_keys_file_serves_the_last_good_keys(
        keytool: KeyTool, tiny_model: Path) -> None:
    _, secret = keytool.generate("client")
    svc = _service(keytool, tiny_model, KEYS_RELOAD_INTERVAL="0.5")
    with svc.running():
        assert _complete(svc, secret).status_code == 200
        copy = last_good_path(keytool.keys_file)
        wait_for(copy.exists, "the last good copy of the keys")
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600 and secret not in copy.read_text()

        keytool.keys_file.write_text('{"version": 1,\n "keys": [\n oops')
        wait_for(lambda: svc.health().get("keys", {}).get("ok") is False,
                 "/health to see the corrupt keys file")
        _kill_worker(svc)

        assert _complete(svc, secret).status_code == 200  # not 401 for everyone
        body = svc.health()
        assert body["status"] == "degraded" and svc.ping() == 200
        assert body["keys"]["using"].startswith("last good copy from ")
        assert "not valid JSON" in body["keys"]["error"] and body["keys"]["keys"] == 1
        assert "keys file unusable" in body["reason"]
        assert secret not in svc.log()
