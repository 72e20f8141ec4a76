"""CLI commands that change keys. Each one writes an audit entry with actor ``cli``.

Audit details carry names, scopes and times; secrets are printed to stdout exactly once and
never stored, logged or audited.
"""

import argparse
from pathlib import Path

from keys import ops
from keys.cli_context import CliContext
from keys.durations import format_instant, parse_instant
from keys.errors import DurationError, KeyFileError, describe_error
from keys.legacy import parse_legacy
from keys.model import ApiKey, Limits


def cmd_generate(ctx: CliContext, args: argparse.Namespace) -> int:
    expires = parse_instant(args.expires, ctx.now, future=True) if args.expires else None
    if expires is not None and expires <= ctx.now:
        raise DurationError(f"--expires {args.expires} is not in the future: the key would be "
                            "expired at once")
    spec = ops.KeySpec(
        name=args.name,
        scopes=args.scopes,
        expires=expires,
        limits=Limits(args.rpm, args.tpm, args.max_concurrent),
        models=args.models,
    )
    with ctx.audit_log() as audit:
        key, secret = ctx.store.update(lambda keys: ops.generate(keys, spec, ctx.now))
        audit("generate", key.id, _describe(key))
    if args.json:
        ctx.emit_json({"id": key.id, "name": key.name, "secret": secret})
    else:
        ctx.emit(f"Created key {key.id} ({key.name}; scopes: {', '.join(sorted(key.scopes))})")
        ctx.emit("Secret, shown only this once:")
        ctx.emit(secret)
    return 0


def cmd_remove(ctx: CliContext, args: argparse.Namespace) -> int:
    with ctx.audit_log() as audit:
        key = ctx.store.update(lambda keys: ops.remove(keys, args.id))
        audit("remove", key.id, {"name": key.name})
    ctx.emit(f"Removed key {key.id} ({key.name})")
    return 0


def cmd_disable(ctx: CliContext, args: argparse.Namespace) -> int:
    return _set_disabled(ctx, args.id, disabled=True)


def cmd_enable(ctx: CliContext, args: argparse.Namespace) -> int:
    return _set_disabled(ctx, args.id, disabled=False)


def _set_disabled(ctx: CliContext, key_id: str, *, disabled: bool) -> int:
    action = "disable" if disabled else "enable"
    with ctx.audit_log() as audit:
        key = ctx.store.update(lambda keys: ops.set_disabled(keys, key_id, disabled))
        audit(action, key.id)
    ctx.emit(f"Key {key.id} ({key.name}) {action}d")
    return 0


def cmd_rotate(ctx: CliContext, args: argparse.Namespace) -> int:
    grace: float = args.grace
    with ctx.audit_log() as audit:
        key, secret = ctx.store.update(lambda keys: ops.rotate(keys, args.id, ctx.now, grace))
        old_until = ctx.now + grace if grace > 0 else None
        audit("rotate", key.id, {"grace_seconds": grace, "old_secret_valid_until": old_until})
    if args.json:
        ctx.emit_json({"id": key.id, "secret": secret, "old_secret_valid_until": old_until})
        return 0
    ctx.emit(f"Rotated key {key.id} ({key.name})")
    if old_until is None:
        ctx.emit("The old secret stopped working now.")
    else:
        ctx.emit(f"The old secret keeps working until {format_instant(old_until)}.")
    ctx.emit("New secret, shown only this once:")
    ctx.emit(secret)
    return 0


def cmd_import(ctx: CliContext, args: argparse.Namespace) -> int:
    source: Path = args.file
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read {source}: {describe_error(exc)}") from exc
    entries = parse_legacy(text)
    with ctx.audit_log() as audit:
        added = ctx.store.update(lambda keys: ops.import_legacy(keys, entries, args.scopes, ctx.now))
        for key in added:
            audit("import", key.id, {"source": str(source), "scopes": sorted(key.scopes)})
    ctx.emit(f"Imported {len(added)} key(s): {', '.join(k.id for k in added) or '-'}")
    return 0


def _describe(key: ApiKey) -> dict[str, object]:
    return {
        "name": key.name,
        "scopes": sorted(key.scopes),
        "expires": key.expires,
        "requests_per_minute": key.limits.requests_per_minute,
        "tokens_per_minute": key.limits.tokens_per_minute,
        "max_concurrent": key.limits.max_concurrent,
        "models": None if key.models is None else sorted(key.models),
    }
