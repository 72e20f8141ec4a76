"""The `llamagate` command: serve, keys, pull, make-test-model.

`llamagate` alone (or followed by flags) serves, as the images run it. Every command takes
--help and exits 0 after printing it; a command or flag that does not exist exits 2 with a
message naming the closest one.
"""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from importlib import metadata

COMMANDS = {
    "serve": "run the service: gateway, health tier and a supervised llama-server (the default)",
    "keys": "create, list, rotate, disable API keys; show usage and the audit log",
    "pull": "download a GGUF model from the Hugging Face Hub into MODELS_DIR",
    "make-test-model": "write the tiny random-weight model used by the demo and the tests",
}
USAGE = "usage: llamagate [--version] [--help] [COMMAND] [options]"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    lines += ["", "`llamagate COMMAND --help` describes a command; `llamagate serve --help` lists",
              "every setting with its flag, environment variable and default."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    first = args[0] if args else "serve"
    if first in ("-h", "--help", "help"):
        print(usage())
        return 0
    if first in ("-V", "--version"):
        print(versions())
        return 0
    if first.startswith("-"):  # flags alone: serve with them
        return _serve(args)
    rest = args[1:]
    if first == "serve":
        return _serve(rest)
    if first == "keys":
        return _keys(rest)
    if first == "pull":
        from llamagate.pull_cli import main as pull_main
        return pull_main(rest)
    if first == "make-test-model":
        from llamagate.tiny_model import main as model_main
        return model_main(rest)
    close = difflib.get_close_matches(first, list(COMMANDS), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    print(f"llamagate: unknown command {first!r}{hint}\n{USAGE}", file=sys.stderr)
    return 2


def _serve(argv: list[str]) -> int:
    from core.config import ConfigError, load_config
    from llamagate import serve_flags

    try:
        overlay = serve_flags.parse(argv)
    except serve_flags.UsageError as exc:
        print(f"llamagate serve: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    # The flags become the environment of serve and of the children it starts (health,
    # gateway workers), each of which reads its settings through core.config from it.
    os.environ.update(overlay)
    try:
        load_config(os.environ)
    except ConfigError as exc:
        problems = serve_flags.explain(exc.problems, overlay)
        print("llamagate: invalid configuration:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    from core.entry import config_or_exit
    from llamagate.serve import serve

    return serve(config_or_exit("serve"))


def _keys(rest: list[str]) -> int:
    """`llamagate keys`: key_mgmt on the files the service uses (AUTH_KEYS_FILE, USAGE_DB,
    both defaulting under DATA_DIR as the config resolves it); an explicit
    --keys-file/--usage-db still wins."""
    from core.config import ConfigError, load_config
    from keys.cli import main as keys_main

    if {"-h", "--help"} & set(rest):  # help needs no configuration, even a broken one
        return keys_main(rest)
    try:
        config = load_config(os.environ)
    except ConfigError as exc:
        print(f"llamagate: {exc}", file=sys.stderr)
        return 2
    environ = {**os.environ, "DATA_DIR": str(config.data_dir),
               "AUTH_KEYS_FILE": str(config.auth_keys_file)}
    # key_mgmt derives its database from DATA_DIR alone; the service honours USAGE_DB too.
    return keys_main(["--usage-db", str(config.usage_db), *rest], environ=environ)


def versions() -> str:
    """llamagate's version and that of the llama-server serve would start."""
    try:
        ours = metadata.version("llamagate")
    except metadata.PackageNotFoundError:
        ours = "unknown (not installed)"
    return f"llamagate {ours}\nllama-server {_llama_server_version()}"


def _llama_server_version() -> str:
    from backend.binary import BinaryNotFound, find_llama_server
    from core.config import ConfigError, load_config

    try:
        explicit = load_config(os.environ).llama_server_path
    except ConfigError:
        explicit = None
    try:
        binary = find_llama_server(explicit)
    except BinaryNotFound:
        return "not found (LLAMA_SERVER_PATH, `make llama-server`'s cache, PATH)"
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                              timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown: {binary} --version failed ({exc})"
    # llama-server prints `version: N (commit)` and `built with …` on stderr
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    found = [line for line in lines if line.startswith(("version:", "built with"))] or lines[:2]
    return f"{'; '.join(found) or 'unknown'} ({binary})"


if __name__ == "__main__":
    sys.exit(main())
