import asyncio
import logging
from pathlib import Path

import pytest

from keys import ops
from keys.keyring import AuthFailure
from keys.reloader import KeyReloader
from keys.store import KeySet, write_keys_file
from tests.keys.helpers import T0, StepSleep

SPEC = ops.KeySpec(name="svc", scopes=frozenset({"inference"}))


def with_new_key(keys: KeySet = ()) -> tuple[KeySet, str]:
    new_keys, (_key, secret) = ops.generate(keys, SPEC, T0)
    return new_keys, secret


def test_missing_file_means_no_key_works(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reloader = KeyReloader(tmp_path / "keys.json")
    with caplog.at_level(logging.WARNING, logger="llamagate.keys"):
        result = reloader.reload()
    assert result.ok and result.key_count == 0 and result.file_missing
    assert len(reloader.keyring) == 0
    assert reloader.keyring.authenticate("lg-anything", T0).reason is AuthFailure.INVALID
    assert "does not exist" in caplog.text


def test_file_removed_after_load_empties_the_keyring(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys, secret = with_new_key()
    write_keys_file(path, keys)
    reloader = KeyReloader(path)
    reloader.reload()
    path.unlink()
    assert reloader.poll() is not None
    assert not reloader.keyring.authenticate(secret, T0).ok


def test_reload_picks_up_a_change(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys, first = with_new_key()
    write_keys_file(path, keys)
    reloader = KeyReloader(path)
    assert reloader.reload().key_count == 1
    assert reloader.poll() is None  # nothing changed

    keys, second = with_new_key(keys)
    write_keys_file(path, keys)
    assert not reloader.keyring.authenticate(second, T0).ok
    result = reloader.poll()
    assert result is not None and result.ok and result.key_count == 2
    assert reloader.keyring.authenticate(first, T0).ok
    assert reloader.keyring.authenticate(second, T0).ok


@pytest.mark.parametrize("corrupt", ["{not json", '{"version": 1, "keys": [{"id": "x"}]}', '{"version": 9}'])
def test_corrupt_file_keeps_last_good_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, corrupt: str
) -> None:
    path = tmp_path / "keys.json"
    keys, secret = with_new_key()
    write_keys_file(path, keys)
    reloader = KeyReloader(path)
    reloader.reload()
    good = reloader.keyring

    path.write_text(corrupt)
    with caplog.at_level(logging.ERROR, logger="llamagate.keys"):
        result = reloader.reload()
    assert not result.ok and result.error and result.key_count == 1
    assert reloader.keyring is good
    assert reloader.keyring.authenticate(secret, T0).ok
    assert reloader.last_error == result.error
    assert "keeping 1 keys" in caplog.text

    # The poller reports a bad file once, not on every tick.
    caplog.clear()
    assert reloader.poll() is None
    assert caplog.text == ""

    # Fixing the file clears the error.
    keys, _ = with_new_key(keys)
    write_keys_file(path, keys)
    fixed = reloader.poll()
    assert fixed is not None and fixed.ok and reloader.last_error is None


async def test_watch_polls_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    sleep = StepSleep()
    reloader = KeyReloader(path, sleep=sleep)
    reloader.reload()
    task = asyncio.create_task(reloader.watch(interval=5))
    try:
        assert await sleep.entered.get() == 5
        keys, secret = with_new_key()
        write_keys_file(path, keys)
        await sleep.step()
        assert reloader.keyring.authenticate(secret, T0).ok
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
