import contextlib
import sqlite3
from pathlib import Path

import pytest

from keys.audit import AuditLog
from keys.db import open_db
from tests.keys.helpers import T0


def test_record_and_list(tmp_path: Path) -> None:
    with contextlib.closing(open_db(tmp_path / "usage.db")) as conn:
        log = AuditLog(conn)
        log.record_audit(ts=T0, actor="cli", action="generate", target="key_1", detail={"a": 1})
        log.record_audit(ts=T0 + 1, actor="key_admin", action="disable", target="key_1")
        log.record_audit(ts=T0 + 2, actor="cli", action="generate", target="key_2")
        entries = log.list_audit()
        assert [(e.actor, e.action, e.target) for e in entries] == [
            ("cli", "generate", "key_1"),
            ("key_admin", "disable", "key_1"),
            ("cli", "generate", "key_2"),
        ]
        assert entries[0].detail == {"a": 1} and entries[1].detail == {}
        assert [e.action for e in log.list_audit(target="key_1")] == ["generate", "disable"]
        assert [e.target for e in log.list_audit(actor="cli", since=T0 + 1)] == ["key_2"]
        assert [e.target for e in log.list_audit(limit=1)] == ["key_2"]


@pytest.mark.parametrize("statement", ["UPDATE audit_log SET actor = 'someone'", "DELETE FROM audit_log"])
def test_audit_log_is_append_only(tmp_path: Path, statement: str) -> None:
    with contextlib.closing(open_db(tmp_path / "usage.db")) as conn:
        AuditLog(conn).record_audit(ts=T0, actor="cli", action="remove", target="key_1")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(statement)
