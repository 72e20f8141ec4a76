"""`llamagate keys` manages the files the service reads, as the configuration resolves them."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from keys.audit import AuditLog
from keys.db import open_db
from llamagate.cli import main
from tests.support.keytool import KeyTool


def audit_actions(db: Path) -> list[str]:
    with contextlib.closing(open_db(db)) as conn:
        return [e.action for e in AuditLog(conn).list_audit()]


def generate(capsys: pytest.CaptureFixture[str], keytool: KeyTool) -> str:
    capsys.readouterr()
    assert main(["keys", "generate", "--name", "me", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    keytool.secrets.append(created["secret"])
    return str(created["id"])


def test_defaults_follow_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str], keytool: KeyTool) -> None:
    for name in ("AUTH_KEYS_FILE", "USAGE_DB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    key_id = generate(capsys, keytool)
    assert key_id in (tmp_path / "data" / "keys.json").read_text()
    assert audit_actions(tmp_path / "data" / "usage.db") == ["generate"]


def test_explicit_settings_and_options_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str],
                                           keytool: KeyTool) -> None:
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("AUTH_KEYS_FILE", str(tmp_path / "etc" / "keys.json"))
    monkeypatch.setenv("USAGE_DB", str(tmp_path / "var" / "usage.db"))
    key_id = generate(capsys, keytool)
    assert key_id in (tmp_path / "etc" / "keys.json").read_text()
    assert audit_actions(tmp_path / "var" / "usage.db") == ["generate"]
    assert main(["keys", "disable", key_id, "--usage-db", str(tmp_path / "other.db")]) == 0
    assert audit_actions(tmp_path / "other.db") == ["disable"]


def test_a_bad_setting_is_named(monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KEYS_RELOAD_INTERVAL", "soon")
    assert main(["keys", "list"]) == 2
    assert "KEYS_RELOAD_INTERVAL='soon'" in capsys.readouterr().err
