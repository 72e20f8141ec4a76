"""docker/entrypoint.sh, run for real on this machine (as root, as CI runs) with a stand-in for
the image's llamagate that reports who it runs as: root gives DATA_DIR to the service user and
drops to it; any other user changes nothing. scripts/image_smoke.sh runs it in the built image
(PID 1 and tini, `podman exec`, a bind-mounted volume)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ship.project import ROOT

SCRIPT = ROOT / "docker" / "entrypoint.sh"
SERVICE = 10001

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the entrypoint's root path needs root (CI runs as root)"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing"),
]

REPORT = """#!/bin/sh
echo "ids=$(id -u):$(id -g) groups=$(id -G) home=$HOME args=$*"
grep -E '^(CapEff|CapInh|NoNewPrivs):' /proc/self/status
"""


@pytest.fixture
def entrypoint() -> Iterator[Path]:
    """The script, with the image's llamagate replaced by one that reports and exits, in a
    folder other users can reach (pytest's tmp_path is under a 0700 folder of root's)."""
    with tempfile.TemporaryDirectory() as folder:
        bin_dir = Path(folder)
        bin_dir.chmod(0o755)
        app = bin_dir / "app"
        app.write_text(REPORT)
        app.chmod(0o755)
        script = SCRIPT.read_text()
        assert "app=/opt/venv/bin/llamagate\n" in script
        copy = bin_dir / "entrypoint.sh"
        copy.write_text(script.replace("app=/opt/venv/bin/llamagate\n", f"app={app}\n"))
        copy.chmod(0o755)
        yield copy


def run(argv: list[str], data_dir: Path) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "HOME": "/root", "DATA_DIR": str(data_dir)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    words = dict(w.split("=", 1) for w in done.stdout.splitlines()[0].split(" ", 3))
    for line in done.stdout.splitlines()[1:]:
        key, value = line.split(":", 1)
        words[key] = value.strip()
    return words


def test_root_gives_a_root_owned_data_dir_to_the_service_user_and_drops(entrypoint: Path,
                                                                        tmp_path: Path) -> None:
    volume = tmp_path / "volume"  # a platform's volume: root's, 0700, with a root-owned file
    volume.mkdir(mode=0o700)
    (volume / "keys.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.write_text("not the service's")
    (volume / "link").symlink_to(outside)
    data_dir = volume / "llamagate"  # DATA_DIR may not exist yet

    got = run([str(entrypoint), "keys", "list"], volume)
    assert got["ids"] == f"{SERVICE}:{SERVICE}" and got["groups"] == str(SERVICE)
    assert got["home"] == "/home/llamagate" and got["args"] == "keys list"
    assert int(got["CapEff"], 16) == 0 and int(got["CapInh"], 16) == 0 and got["NoNewPrivs"] == "1"
    for path in (volume, volume / "keys.json"):
        assert path.stat().st_uid == SERVICE and path.stat().st_gid == SERVICE, path
    assert stat.S_IMODE(volume.stat().st_mode) == 0o700, "modes are left as they are"
    assert (volume / "link").lstat().st_uid == SERVICE
    assert outside.stat().st_uid == 0, "a link's target is never chowned"

    run([str(entrypoint), "serve"], data_dir)
    assert data_dir.is_dir() and data_dir.stat().st_uid == SERVICE


def test_any_other_user_runs_the_command_as_itself_and_changes_nothing(entrypoint: Path,
                                                                      tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    as_other = ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", str(entrypoint), "serve"]
    got = run(as_other, data_dir)
    assert got["ids"] == "4242:4242" and got["home"] == "/root" and got["args"] == "serve"
    assert data_dir.stat().st_uid == 0
