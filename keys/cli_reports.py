"""CLI commands that only read: list, show, usage, audit. None of them prints a secret or hash."""

import argparse
from dataclasses import asdict

from keys import ops
from keys.cli_context import CliContext
from keys.durations import format_instant, format_seconds, parse_instant
from keys.errors import UnknownKeyError
from keys.model import ApiKey
from keys.table import format_table
from keys.usage import UsageRow


def key_status(key: ApiKey, now: float) -> str:
    """``disabled``, ``expired`` or ``active``; disabled wins because it is the deliberate act."""
    if key.disabled:
        return "disabled"
    return "expired" if key.is_expired(now) else "active"


def key_summary(key: ApiKey, now: float, last_used: float | None) -> dict[str, object]:
    """Everything about a key that may be shown: no secret, no hash."""
    grace = [p.valid_until for p in key.previous if p.valid_until > now]
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "scopes": sorted(key.scopes),
        "limits": asdict(key.limits),
        "models": None if key.models is None else sorted(key.models),
        "created": key.created,
        "expires": key.expires,
        "disabled": key.disabled,
        "status": key_status(key, now),
        "old_secret_valid_until": max(grace, default=None),
        "last_used": last_used,
    }


def cmd_list(ctx: CliContext, args: argparse.Namespace) -> int:
    keys = ctx.load_keys()
    last = ctx.last_used_all()
    if args.json:
        ctx.emit_json([key_summary(k, ctx.now, last.get(k.id)) for k in keys])
        return 0
    headers = (
        "ID",
        "NAME",
        "PREFIX",
        "SCOPES",
        "RPM",
        "TPM",
        "CONC",
        "MODELS",
        "EXPIRES",
        "STATUS",
        "LAST USED",
    )
    rows = [
        (
            k.id,
            k.name,
            f"{k.prefix}…",
            ",".join(sorted(k.scopes)),
            _limit(k.limits.requests_per_minute),
            _limit(k.limits.tokens_per_minute),
            _limit(k.limits.max_concurrent),
            "*" if k.models is None else ",".join(sorted(k.models)),
            format_instant(k.expires),
            key_status(k, ctx.now),
            _last_used(last.get(k.id)),
        )
        for k in keys
    ]
    ctx.emit(format_table(headers, rows))
    return 0


def cmd_show(ctx: CliContext, args: argparse.Namespace) -> int:
    key = ops.find(ctx.load_keys(), args.id)
    summary = key_summary(key, ctx.now, ctx.last_used_all().get(key.id))
    if args.json:
        ctx.emit_json(summary)
        return 0
    for name, value in summary.items():
        ctx.emit(f"{name + ':':<24}{_render(name, value)}")
    return 0


def cmd_usage(ctx: CliContext, args: argparse.Namespace) -> int:
    since = parse_instant(args.since, ctx.now, future=False) if args.since else None
    until = parse_instant(args.until, ctx.now, future=False) if args.until else None
    rows = ctx.usage(args.id, since, until)
    # Removed keys keep their history, so an id is unknown only if it has neither.
    if args.id is not None and not rows and all(k.id != args.id for k in ctx.store.load()):
        raise UnknownKeyError(args.id)
    if args.json:
        ctx.emit_json([asdict(r) for r in rows])
        return 0
    ctx.emit(_usage_table(rows))
    return 0


def _usage_table(rows: list[UsageRow]) -> str:
    body = [
        (
            r.key_id,
            r.model,
            format_instant(r.hour),
            str(r.requests),
            str(r.prompt_tokens),
            str(r.completion_tokens),
        )
        for r in rows
    ]
    total = (
        "TOTAL",
        "",
        "",
        str(sum(r.requests for r in rows)),
        str(sum(r.prompt_tokens for r in rows)),
        str(sum(r.completion_tokens for r in rows)),
    )
    headers = ("KEY", "MODEL", "HOUR (UTC)", "REQUESTS", "PROMPT", "COMPLETION")
    return format_table(headers, [*body, total])


def cmd_audit(ctx: CliContext, args: argparse.Namespace) -> int:
    since = parse_instant(args.since, ctx.now, future=False) if args.since else None
    entries = ctx.audit_entries(args.id, since, args.limit)
    if args.json:
        ctx.emit_json([asdict(e) for e in entries])
        return 0
    rows = [(format_instant(e.ts), e.actor, e.action, e.target or "-", _detail(e.detail)) for e in entries]
    ctx.emit(format_table(("TIME (UTC)", "ACTOR", "ACTION", "TARGET", "DETAIL"), rows))
    return 0


def _detail(detail: dict[str, object]) -> str:
    return " ".join(f"{k}={_render(k, v)}" for k, v in sorted(detail.items()) if v is not None)


_TIME_FIELDS = frozenset({"created", "expires", "last_used", "old_secret_valid_until"})


def _render(name: str, value: object) -> str:
    """One field of a key summary or audit detail, for humans."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float) and name in _TIME_FIELDS:
        return format_instant(value)
    if isinstance(value, int | float) and name == "grace_seconds":
        return format_seconds(value) if value else "0"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={'default' if v is None else v}" for k, v in value.items())
    if value is None:
        return "* (all)" if name == "models" else "-"
    return str(value)


def _limit(value: int | None) -> str:
    return "default" if value is None else str(value)


def _last_used(ts: float | None) -> str:
    return "never" if ts is None else format_instant(ts)
