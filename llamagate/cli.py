"""The `llamagate` command: serve, keys, pull, make-test-model."""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command, rest = (args[0], args[1:]) if args else ("serve", [])
    if command in ("-h", "--help", "help"):
        print("usage: llamagate {serve|keys|pull|make-test-model} [options]")
        return 0
    if command == "serve":
        from core.entry import config_or_exit
        from llamagate.serve import serve

        return serve(config_or_exit("serve"))
    if command == "keys":
        return _keys(rest)
    if command == "pull":
        from llamagate.pull_cli import main as pull_main
        return pull_main(rest)
    if command == "make-test-model":
        from llamagate.tiny_model import main as model_main
        return model_main(rest)
    print(f"llamagate: unknown command {command!r}; try serve, keys, pull, make-test-model",
          file=sys.stderr)
    return 2


def _keys(rest: list[str]) -> int:
    """`llamagate keys`: key_mgmt on the files the service uses (AUTH_KEYS_FILE, USAGE_DB,
    both defaulting under DATA_DIR as the config resolves it); an explicit
    --keys-file/--usage-db still wins."""
    from core.config import ConfigError, load_config
    from keys.cli import main as keys_main

    try:
        config = load_config(os.environ)
    except ConfigError as exc:
        print(f"llamagate: {exc}", file=sys.stderr)
        return 2
    environ = {**os.environ, "DATA_DIR": str(config.data_dir),
               "AUTH_KEYS_FILE": str(config.auth_keys_file)}
    # key_mgmt derives its database from DATA_DIR alone; the service honours USAGE_DB too.
    return keys_main(["--usage-db", str(config.usage_db), *rest], environ=environ)


if __name__ == "__main__":
    sys.exit(main())
