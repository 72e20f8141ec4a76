"""The last good copy of the keys (issue 22): a process that starts while keys.json is corrupt
serves the keys of the latest good load instead of none, and says so."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from keys import ops
from keys.reloader import KeyReloader
from keys.store import KeySet, last_good_path, write_keys_file
from tests.keys.helpers import T0

SPEC = ops.KeySpec(name="svc", scopes=frozenset({"inference"}))


def with_new_key(keys: KeySet = ()) -> tuple[KeySet, str]:
    new_keys, (_key, secret) = ops.generate(keys, SPEC, T0)
    return new_keys, secret


def test_a_good_load_leaves_a_private_copy_without_secrets(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys, secret = with_new_key()
    write_keys_file(path, keys)
    KeyReloader(path).reload()
    copy = last_good_path(path)
    assert copy.name == "keys.json.last-good"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert secret not in copy.read_text()  # hashes only, as in the file


def test_a_process_started_on_a_corrupt_file_serves_the_last_good_keys(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.json"
    keys, secret = with_new_key()
    write_keys_file(path, keys)
    KeyReloader(path).reload()  # a worker that loaded it once
    path.write_text('{"version": 1,\n "keys": [\n oops')

    restarted = KeyReloader(path)
    with caplog.at_level(logging.WARNING, logger="llamagate.keys"):
        result = restarted.reload()
    assert not result.ok and result.key_count == 1
    assert restarted.keyring.authenticate(secret, T0).ok
    report = restarted.report()
    assert report["ok"] is False and report["keys"] == 1
    assert "not valid JSON" in str(report["error"]) and "line 3" in str(report["error"])
    assert str(report["using"]).startswith("last good copy from ")
    assert "last good copy" in caplog.text and secret not in caplog.text

    keys, second = with_new_key(keys)  # the file mended: its keys, and the copy follows
    write_keys_file(path, keys)
    assert restarted.reload().ok
    assert restarted.report() == {"ok": True, "keys": 2, "error": None, "using": None,
                                  "file_missing": False}
    assert KeyReloader(last_good_path(path)).reload().key_count == 2


def test_without_a_copy_a_corrupt_file_means_no_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    reloader = KeyReloader(path)
    assert reloader.reload().key_count == 0
    assert reloader.report()["ok"] is False and reloader.report()["using"] is None


def test_a_missing_file_does_not_bring_the_copy_back(tmp_path: Path) -> None:
    # deleting keys.json is a choice (no key works), not a fault to paper over
    path = tmp_path / "keys.json"
    keys, secret = with_new_key()
    write_keys_file(path, keys)
    KeyReloader(path).reload()
    path.unlink()
    reloader = KeyReloader(path)
    assert reloader.reload().file_missing
    assert not reloader.keyring.authenticate(secret, T0).ok


def test_writing_the_file_retires_the_copy(tmp_path: Path) -> None:
    # `llamagate keys revoke` while no worker runs, then a damaged file: the copy must not
    # bring the revoked key back
    path = tmp_path / "keys.json"
    keys, secret = with_new_key()
    write_keys_file(path, keys)
    KeyReloader(path).reload()
    write_keys_file(path, ())  # revoked
    assert not last_good_path(path).exists()
    path.write_text("{not json")
    reloader = KeyReloader(path)
    reloader.reload()
    assert not reloader.keyring.authenticate(secret, T0).ok


def test_a_running_process_keeps_its_own_keys_not_the_copy(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys, secret = with_new_key()
    write_keys_file(path, keys)
    reloader = KeyReloader(path)
    reloader.reload()
    path.write_text("{not json")
    reloader.reload()
    assert reloader.keyring.authenticate(secret, T0).ok
    assert reloader.report()["using"] is None  # its own last good load, as before


def test_a_copy_that_cannot_be_written_is_reported_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.json"
    keys, _ = with_new_key()
    write_keys_file(path, keys)
    last_good_path(path).mkdir()  # a directory where the copy goes: it cannot be replaced
    reloader = KeyReloader(path)
    with caplog.at_level(logging.WARNING, logger="llamagate.keys"):
        assert reloader.reload().ok
        write_keys_file(path, with_new_key(keys)[0])
        assert reloader.reload().ok
    assert caplog.text.count("cannot keep a last good copy") == 1
