"""``key_mgmt``: manage API keys, read usage and the audit log.

With REDIS_URL set every command works on the fleet's Redis (keys/cli_fleet.py) instead of
the keys file and the usage database; ``migrate --to-redis`` copies those into it.

Exit codes: 0 success; 2 bad usage, bad duration or unknown id; 1 a file, database or Redis
could not be read or written. Errors are one line on stderr and never contain a secret (nor
REDIS_URL's password).
"""

import argparse
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn

from keys import cli_keys, cli_migrate, cli_reports
from keys.cli_context import CliContext, default_paths, redis_settings
from keys.durations import parse_duration
from keys.errors import KeyFileError, KeysError, describe_error
from keys.model import SCOPE_INFERENCE, SCOPES

PROG = "key_mgmt"
Handler = Callable[[CliContext, argparse.Namespace], int]


class UsageError(Exception):
    """A command line argparse rejected."""


class _Parser(argparse.ArgumentParser):
    # argparse prints usage and calls sys.exit(2); raising keeps main() in charge of the output
    # (one line) and of the exit code.
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _scopes(text: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    unknown = scopes - SCOPES
    if not scopes or unknown:
        bad = ", ".join(sorted(unknown)) or "(none)"
        raise argparse.ArgumentTypeError(f"unknown scope(s) {bad}; choose from {', '.join(sorted(SCOPES))}")
    return scopes


def _models(text: str) -> frozenset[str]:
    models = [m.strip() for m in text.split(",")]
    if not all(models):
        raise argparse.ArgumentTypeError("model names must be non-empty, e.g. --models a,b")
    return frozenset(models)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except KeysError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar."""
    # The global options are accepted before or after the subcommand; SUPPRESS keeps a
    # subcommand's unset copy from overwriting a value given before it.
    common = _Parser(add_help=False)
    common.add_argument(
        "--keys-file",
        type=Path,
        default=argparse.SUPPRESS,
        help="keys file (default: $AUTH_KEYS_FILE or $DATA_DIR/keys.json); with REDIS_URL "
        "only migrate reads it",
    )
    common.add_argument(
        "--usage-db",
        type=Path,
        default=argparse.SUPPRESS,
        help="usage and audit database (default: $DATA_DIR/usage.db); with REDIS_URL only "
        "migrate reads it",
    )
    parser = _Parser(prog=PROG, description="Manage llamagate API keys.", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(handler=handler)
        return p

    p = command("generate", cli_keys.cmd_generate, "create a key and print its secret once")
    p.add_argument("--name", required=True)
    p.add_argument(
        "--scopes",
        type=_scopes,
        default=frozenset({SCOPE_INFERENCE}),
        help="comma-separated subset of inference,admin,metrics (default: inference)",
    )
    p.add_argument("--expires", help="lifetime like 30d, or an ISO date (default: never)")
    p.add_argument("--rpm", type=_positive_int, help="requests per minute")
    p.add_argument("--tpm", type=_positive_int, help="tokens per minute")
    p.add_argument("--max-concurrent", type=_positive_int, help="concurrent requests")
    p.add_argument("--models", type=_models, help="comma-separated model allowlist")
    p.add_argument("--json", action="store_true")

    p = command("list", cli_reports.cmd_list, "list keys (never secrets)")
    p.add_argument("--json", action="store_true")
    p = command("show", cli_reports.cmd_show, "show one key")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    for name, handler, text in (
        ("remove", cli_keys.cmd_remove, "delete a key"),
        ("disable", cli_keys.cmd_disable, "stop a key from authenticating"),
        ("enable", cli_keys.cmd_enable, "let a disabled key authenticate again"),
    ):
        command(name, handler, text).add_argument("id")

    p = command("rotate", cli_keys.cmd_rotate, "give a key a new secret")
    p.add_argument("id")
    p.add_argument(
        "--grace",
        type=_duration,
        default=3600.0,
        help="how long the old secret keeps working, e.g. 1h; 0 = not at all",
    )
    p.add_argument("--json", action="store_true")

    p = command("usage", cli_reports.cmd_usage, "token usage per key, model and hour")
    p.add_argument("id", nargs="?")
    p.add_argument("--since", help="24h, 7d, or an ISO date (UTC unless a zone is given)")
    p.add_argument("--until", help="same forms as --since")
    p.add_argument("--json", action="store_true")

    p = command("audit", cli_reports.cmd_audit, "show the audit log")
    p.add_argument("id", nargs="?", help="only entries about this key")
    p.add_argument("--since")
    p.add_argument("--limit", type=_positive_int, default=100)
    p.add_argument("--json", action="store_true")

    p = command("import", cli_keys.cmd_import, "import a legacy key_id:api_key file")
    p.add_argument("file", type=Path)
    p.add_argument("--scopes", type=_scopes, default=frozenset({SCOPE_INFERENCE}))

    p = command("migrate", cli_migrate.cmd_migrate,
                "copy the keys file, usage and audit log into the Redis of REDIS_URL")
    p.add_argument("--to-redis", action="store_true", required=True,
                   help="the one direction there is (idempotent: run it again to finish)")
    return parser


def main(
    argv: list[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Run one CLI command and return its exit code."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        return _fail(str(exc), 2)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    environ = os.environ if environ is None else environ
    keys_default, db_default = default_paths(environ)
    try:
        fleet = redis_settings(environ)
    except KeysError as exc:
        return _fail(str(exc), 2)
    ctx = CliContext(
        keys_path=getattr(args, "keys_file", keys_default),
        usage_db=getattr(args, "usage_db", db_default),
        now=clock(),
        out=sys.stdout,
    )
    if fleet is not None:
        from keys.cli_fleet import FleetCli  # redis is imported only with REDIS_URL

        ctx.fleet = FleetCli(fleet)
    try:
        return _run(args.handler, ctx, args)
    finally:
        if ctx.fleet is not None:
            ctx.fleet.close()


def _run(handler: Handler, ctx: CliContext, args: argparse.Namespace) -> int:
    fleet_errors = ctx.fleet.errors if ctx.fleet is not None else ()
    try:
        return handler(ctx, args)
    except fleet_errors as exc:  # Redis unreachable or refusing: before OSError, TimeoutError is one
        assert ctx.fleet is not None
        return _fail(ctx.fleet.explain(exc), 1)
    except KeyFileError as exc:
        return _fail(str(exc), 1)
    except KeysError as exc:
        return _fail(str(exc), 2)
    except sqlite3.Error as exc:
        return _fail(f"usage database {ctx.usage_db}: {exc}", 1)
    except OSError as exc:
        return _fail(f"{exc.filename or 'I/O'}: {describe_error(exc)}", 1)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code
