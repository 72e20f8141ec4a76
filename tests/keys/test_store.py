import os
import stat
from pathlib import Path

import filelock
import pytest

from keys import ops
from keys.errors import KeyFileError, KeyFormatError
from keys.model import ApiKey
from keys.store import KeySet, KeyStore, read_keys_file, write_keys_file
from tests.keys.helpers import T0

SPEC = ops.KeySpec(name="alice", scopes=frozenset({"inference"}))


def add_one(keys: KeySet) -> tuple[KeySet, ApiKey]:
    new_keys, (key, _secret) = ops.generate(keys, SPEC, T0)
    return new_keys, key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_missing_file_holds_no_keys(tmp_path: Path) -> None:
    assert KeyStore(tmp_path / "keys.json").load() == ()
    with pytest.raises(FileNotFoundError):
        read_keys_file(tmp_path / "keys.json")


def test_update_creates_file_with_mode_0600(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "sub" / "keys.json")
    key = store.update(add_one)
    assert store.load() == (key,)
    assert mode(store.path) == 0o600


def test_rewrite_replaces_a_looser_mode(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    write_keys_file(path, [])
    os.chmod(path, 0o644)
    KeyStore(path).update(add_one)
    assert mode(path) == 0o600


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    write_keys_file(path, [])
    inode = path.stat().st_ino
    KeyStore(path).update(add_one)
    assert path.stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json", "keys.json.lock"]


def test_unchanged_keys_are_not_rewritten(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    store.update(add_one)
    before = store.path.stat().st_ino
    assert store.update(lambda keys: (keys, "same")) == "same"
    assert store.path.stat().st_ino == before


def test_failed_change_writes_nothing(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    key = store.update(add_one)

    def broken(keys: KeySet) -> tuple[KeySet, None]:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        store.update(broken)
    assert store.load() == (key,)


def test_corrupt_file_raises_key_file_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    with pytest.raises(KeyFileError, match="invalid"):
        KeyStore(path).load()
    with pytest.raises(KeyFileError):
        KeyStore(path).update(add_one)
    assert path.read_text() == "{not json"


def test_lock_held_elsewhere_times_out(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json", lock_timeout=0.05)
    # A second FileLock object takes its own flock, which conflicts like another process's.
    with filelock.FileLock(tmp_path / "keys.json.lock"), pytest.raises(KeyFileError, match="locked"):
        store.update(add_one)
    assert store.load() == ()


def test_unwritable_location_raises_key_file_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(KeyFileError):
        KeyStore(blocker / "keys.json").update(add_one)


def test_store_refuses_to_write_duplicate_ids(tmp_path: Path) -> None:
    keys, _ = add_one(())
    with pytest.raises(KeyFormatError, match="duplicate"):
        write_keys_file(tmp_path / "keys.json", keys * 2)
    assert not (tmp_path / "keys.json").exists()
