"""`llamagate keys` run in-process on one key store, remembering every secret it printed
(the `keytool` fixture checks that none of them reached a log record)."""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from keys.cli import main as keys_main


@dataclass
class KeyTool:
    """Runs key_mgmt in-process on one store; every secret it prints is remembered."""

    keys_file: Path
    usage_db: Path
    secrets: list[str] = field(default_factory=list)
    clock: Callable[[], float] = time.time

    def run(self, *argv: str) -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = keys_main(["--keys-file", str(self.keys_file), "--usage-db", str(self.usage_db),
                            *argv], environ={}, clock=self.clock)
        return rc, out.getvalue() + err.getvalue()

    def ok(self, *argv: str) -> str:
        rc, out = self.run(*argv)
        assert rc == 0, out
        return out

    def generate(self, name: str, *options: str) -> tuple[str, str]:
        """Create a key; returns (id, secret)."""
        created = json.loads(self.ok("generate", "--name", name, "--json", *options))
        self.secrets.append(created["secret"])
        return created["id"], created["secret"]

    def rotate(self, key_id: str, grace: str) -> str:
        rotated = json.loads(self.ok("rotate", key_id, "--grace", grace, "--json"))
        self.secrets.append(rotated["secret"])
        return str(rotated["secret"])
