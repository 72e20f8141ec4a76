"""No secret reaches the keys file, listings, the audit log, error output or logs."""

import contextlib
import json
import logging
from pathlib import Path

import pytest

from keys.db import open_db
from keys.reloader import KeyReloader
from keys.usage_recorder import UsageRecorder
from tests.keys.helpers import T0, Cli, Paths

LEGACY_SECRET = "sk-legacy-0123456789abcdef"


async def test_no_secret_anywhere(
    cli: Cli, paths: Paths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets: list[str] = []
    outputs: list[str] = []

    def run(*argv: str) -> str:
        result = cli(*argv)
        assert result.rc == 0, result.err
        outputs.append(result.out + result.err)
        return str(result.out)

    first = json.loads(run("generate", "--name", "alice", "--json"))
    key_id = first["id"]
    secrets.append(first["secret"])
    secrets.append(json.loads(run("rotate", key_id, "--json"))["secret"])
    legacy = tmp_path / "legacy.txt"
    legacy.write_text(f"old:{LEGACY_SECRET}\n")
    run("import", str(legacy))
    secrets.append(LEGACY_SECRET)
    generated = run("generate", "--name", "bob")
    secrets.append(next(line for line in generated.splitlines() if line.startswith("lg-")))
    # Those commands print their secret once by design; every other output must not.
    outputs.clear()

    bad_import = tmp_path / "bad.txt"
    bad_import.write_text(f"this line has no colon {LEGACY_SECRET}\n")
    bad = cli("import", str(bad_import))
    assert bad.rc == 2
    outputs.append(bad.err)

    for argv in (
        ["list"],
        ["list", "--json"],
        ["show", key_id],
        ["show", key_id, "--json"],
        ["audit"],
        ["audit", "--json"],
        ["usage"],
    ):
        outputs.append(run(*argv))

    recorder = UsageRecorder(paths.db)
    await recorder.open()
    recorder.record(key_id, "m", 1, 1, T0)
    await recorder.close()

    reloader = KeyReloader(paths.keys)
    reloader.reload()
    for secret in secrets:
        reloader.keyring.authenticate(secret, T0)
    # A corrupt file whose broken JSON contains a secret must not be quoted in the error log.
    paths.keys.write_text('{"version": 1, "keys": [' + secrets[0])
    assert not reloader.reload().ok

    with contextlib.closing(open_db(paths.db)) as conn:
        db_dump = "\n".join(conn.iterdump())
    stored = (paths.keys.with_name("keys.json.lock").read_text(), db_dump)
    haystacks = {"outputs": "\n".join(outputs), "logs": caplog.text, "stored": "\n".join(stored)}
    for name, text in haystacks.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {name}"
        assert "sha256:" not in text or name == "stored", f"a hash leaked into {name}"
    assert "sha256:" not in db_dump


def test_keys_file_holds_hashes_only(cli: Cli, paths: Paths) -> None:
    out = json.loads(cli("generate", "--name", "alice", "--json").out)
    text = paths.keys.read_text()
    assert out["secret"] not in text
    assert out["secret"][8:] not in text  # not even the part past the display prefix
