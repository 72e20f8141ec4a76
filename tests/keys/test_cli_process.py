"""The CLI as real processes: the shim script, and concurrent writers sharing one keys file."""

import json
import subprocess
import sys
from pathlib import Path

from keys.keyring import Keyring
from keys.store import KeyStore
from tests.keys.helpers import REPO_ROOT, T0, Paths

SCRIPT = REPO_ROOT / "scripts" / "key_mgmt.py"
# Each writer process runs many generate commands back to back, so the read-modify-write
# cycles of the writers interleave.
WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
from keys.cli import main
keys_file, usage_db, tag, count = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
for n in range(count):
    rc = main(["--keys-file", keys_file, "--usage-db", usage_db, "generate", "--json",
               "--name", f"{tag}-{n}"], environ={})
    if rc != 0:
        sys.exit(rc)
"""


def test_script_shim_generates_a_working_key(paths: Paths, tmp_path: Path) -> None:
    # Run from another directory: the shim must find the package by itself.
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *paths.args(), "generate", "--name", "sub", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    result = Keyring(KeyStore(paths.keys).load()).authenticate(out["secret"], T0)
    assert result.key is not None and result.key.id == out["id"]

    bad = subprocess.run(
        [sys.executable, str(SCRIPT), *paths.args(), "show", "key_missing"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "key_missing" in bad.stderr


def test_concurrent_writers_lose_no_update(paths: Paths) -> None:
    writers, per_writer = 4, 12
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(REPO_ROOT),
                str(paths.keys),
                str(paths.db),
                f"w{w}",
                str(per_writer),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(writers)
    ]
    secrets: list[str] = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        secrets += [json.loads(chunk)["secret"] for chunk in _json_objects(out)]

    keys = KeyStore(paths.keys).load()
    expected = {f"w{w}-{n}" for w in range(writers) for n in range(per_writer)}
    assert {k.name for k in keys} == expected and len(keys) == len(expected)
    ring = Keyring(keys)
    assert len(secrets) == len(expected)
    assert all(ring.authenticate(s, T0).ok for s in secrets)


def _json_objects(text: str) -> list[str]:
    decoder = json.JSONDecoder()
    objects, at = [], 0
    while (at := _skip_space(text, at)) < len(text):
        _, end = decoder.raw_decode(text, at)
        objects.append(text[at:end])
        at = end
    return objects


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at
