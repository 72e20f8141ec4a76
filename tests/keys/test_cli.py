import contextlib
import json
import stat
from pathlib import Path

import pytest

from keys.cli import main
from keys.codec import parse_keys
from keys.db import open_db
from keys.errors import UnknownKeyError
from keys.hashing import hash_secret
from keys.keyring import AuthFailure, Keyring
from keys.store import KeyStore
from keys.usage import HOUR, UsageEvent, UsageStore, aggregate, hour_bucket
from tests.keys.helpers import T0, Cli, FakeClock, Paths


def generate(cli: Cli, *extra: str) -> tuple[str, str]:
    result = cli("generate", "--json", *extra)
    assert result.rc == 0, result.err
    out = json.loads(result.out)
    return out["id"], out["secret"]


def keyring(paths: Paths) -> Keyring:
    return Keyring(KeyStore(paths.keys).load())


def audit_actions(cli: Cli) -> list[tuple[str, str, str]]:
    entries = json.loads(cli("audit", "--json").out)
    return [(e["actor"], e["action"], e["target"]) for e in entries]


def test_generate_prints_secret_once_and_stores_only_its_hash(cli: Cli, paths: Paths) -> None:
    result = cli(
        "generate",
        "--name",
        "alice",
        "--scopes",
        "inference,admin",
        "--rpm",
        "60",
        "--tpm",
        "1000",
        "--max-concurrent",
        "2",
        "--models",
        "qwen,llama",
    )
    assert result.rc == 0, result.err
    secret = next(line for line in result.out.splitlines() if line.startswith("lg-"))
    assert result.out.count(secret) == 1
    (key,) = parse_keys(paths.keys.read_text())
    assert key.id in result.out and key.secret_hash == hash_secret(secret)
    assert secret not in paths.keys.read_text()
    assert key.name == "alice" and key.scopes == frozenset({"inference", "admin"})
    assert key.limits.requests_per_minute == 60 and key.limits.tokens_per_minute == 1000
    assert key.limits.max_concurrent == 2 and key.models == frozenset({"qwen", "llama"})
    assert key.created == T0 and key.expires is None and not key.disabled
    assert stat.S_IMODE(paths.keys.stat().st_mode) == 0o600
    assert keyring(paths).authenticate(secret, T0).ok


def test_defaults(cli: Cli, paths: Paths) -> None:
    key_id, _ = generate(cli, "--name", "bob")
    key = keyring(paths).get(key_id)
    assert key is not None and key.scopes == {"inference"} and key.models is None
    assert key.limits.requests_per_minute is None


def test_list_and_show(cli: Cli) -> None:
    key_id, secret = generate(cli, "--name", "alice", "--rpm", "5")
    listing = cli("list")
    assert listing.rc == 0
    assert key_id in listing.out and "alice" in listing.out and f"{secret[:8]}…" in listing.out
    assert "never" in listing.out and "active" in listing.out
    (entry,) = json.loads(cli("list", "--json").out)
    assert entry["id"] == key_id and entry["limits"]["requests_per_minute"] == 5
    assert entry["prefix"] == secret[:8] and entry["last_used"] is None
    shown = cli("show", key_id)
    assert shown.rc == 0 and "alice" in shown.out
    assert json.loads(cli("show", key_id, "--json").out)["status"] == "active"


def test_list_shows_last_used(cli: Cli, paths: Paths) -> None:
    key_id, _ = generate(cli, "--name", "alice")
    with contextlib.closing(open_db(paths.db)) as conn:
        UsageStore(conn).write(aggregate([UsageEvent(key_id, "m", 1, 1, T0 + 30)]))
    (entry,) = json.loads(cli("list", "--json").out)
    assert entry["last_used"] == T0 + 30


def test_list_on_empty_store_does_not_create_files(cli: Cli, paths: Paths) -> None:
    assert cli("list").rc == 0
    assert not paths.keys.exists() and not paths.db.exists()


def test_disable_and_enable(cli: Cli, paths: Paths) -> None:
    key_id, secret = generate(cli, "--name", "alice")
    assert cli("disable", key_id).rc == 0
    assert keyring(paths).authenticate(secret, T0).reason is AuthFailure.DISABLED
    assert json.loads(cli("show", key_id, "--json").out)["status"] == "disabled"
    assert cli("enable", key_id).rc == 0
    assert keyring(paths).authenticate(secret, T0).ok


def test_remove(cli: Cli, paths: Paths) -> None:
    key_id, secret = generate(cli, "--name", "alice")
    assert cli("remove", key_id).rc == 0
    assert keyring(paths).authenticate(secret, T0).reason is AuthFailure.INVALID
    assert cli("show", key_id).rc == 2


def test_expiry(cli: Cli, paths: Paths, clock: FakeClock) -> None:
    key_id, secret = generate(cli, "--name", "temp", "--expires", "30d")
    ring = keyring(paths)
    assert ring.authenticate(secret, T0 + 30 * 86400 - 1).ok
    assert ring.authenticate(secret, T0 + 30 * 86400).reason is AuthFailure.EXPIRED
    clock.advance(31 * 86400)
    assert json.loads(cli("show", key_id, "--json").out)["status"] == "expired"


def test_expires_accepts_an_iso_date(cli: Cli, paths: Paths) -> None:
    key_id, _ = generate(cli, "--name", "temp", "--expires", "2030-01-01")
    key = keyring(paths).get(key_id)
    assert key is not None and key.expires == 1893456000.0


def test_rotate_with_grace(cli: Cli, paths: Paths, clock: FakeClock) -> None:
    key_id, old = generate(cli, "--name", "alice")
    clock.advance(100)
    result = cli("rotate", key_id, "--grace", "1h", "--json")
    assert result.rc == 0, result.err
    new = json.loads(result.out)["secret"]
    assert new != old and json.loads(result.out)["old_secret_valid_until"] == T0 + 100 + 3600
    ring = keyring(paths)
    rotated = T0 + 100
    assert ring.authenticate(old, rotated + 3599).ok
    assert ring.authenticate(old, rotated + 3600).reason is AuthFailure.INVALID
    assert ring.authenticate(new, rotated + 3600).ok
    assert json.loads(cli("show", key_id, "--json").out)["old_secret_valid_until"] == (rotated + 3600)


def test_rotate_text_output_prints_new_secret_once(cli: Cli) -> None:
    key_id, _ = generate(cli, "--name", "alice")
    result = cli("rotate", key_id)
    secret = next(line for line in result.out.splitlines() if line.startswith("lg-"))
    assert result.out.count(secret) == 1 and "keeps working until" in result.out


def test_rotate_with_zero_grace_is_immediate(cli: Cli, paths: Paths) -> None:
    key_id, old = generate(cli, "--name", "alice")
    new = json.loads(cli("rotate", key_id, "--grace", "0", "--json").out)["secret"]
    ring = keyring(paths)
    assert ring.authenticate(old, T0).reason is AuthFailure.INVALID
    assert ring.authenticate(new, T0).ok


def test_second_rotation_drops_previous_secrets_past_grace(cli: Cli, paths: Paths, clock: FakeClock) -> None:
    key_id, first = generate(cli, "--name", "alice")
    second = json.loads(cli("rotate", key_id, "--grace", "10m", "--json").out)["secret"]
    clock.advance(3600)
    third = json.loads(cli("rotate", key_id, "--grace", "10m", "--json").out)["secret"]
    key = keyring(paths).get(key_id)
    assert key is not None and len(key.previous) == 1
    ring = keyring(paths)
    assert not ring.authenticate(first, clock.now).ok
    assert ring.authenticate(second, clock.now).ok
    assert ring.authenticate(third, clock.now).ok


@pytest.mark.parametrize("command", ["show", "remove", "disable", "enable", "rotate"])
def test_unknown_id_exits_2_naming_it(cli: Cli, command: str) -> None:
    generate(cli, "--name", "alice")
    result = cli(command, "key_doesnotexist")
    assert result.rc == 2
    assert "key_doesnotexist" in result.err and len(result.err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--name", "x", "--expires", "30x"], "bad time '30x'"),
        (["generate", "--name", "x", "--expires", "0s"], "not in the future"),
        (["generate", "--name", "x", "--expires", "2020-01-01"], "not in the future"),
        (["rotate", "key_x", "--grace", "soon"], "bad duration 'soon'"),
        (["generate", "--name", "x", "--scopes", "root"], "unknown scope"),
        (["generate", "--name", "x", "--rpm", "0"], "positive integer"),
        (["generate", "--name", "x", "--models", "a,,b"], "non-empty"),
        (["generate"], "--name"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
        (["usage", "--since", "yesterday-ish"], "bad time"),
    ],
)
def test_bad_usage_exits_2_with_one_line(cli: Cli, argv: list[str], message: str) -> None:
    result = cli(*argv)
    assert result.rc == 2
    assert message in result.err and len(result.err.strip().splitlines()) == 1


def test_unwritable_keys_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = [
        "--keys-file",
        str(blocker / "keys.json"),
        "--usage-db",
        str(tmp_path / "u.db"),
        "generate",
        "--name",
        "x",
    ]
    assert main(argv, environ={}) == 1
    err = capsys.readouterr().err
    assert "cannot" in err and len(err.strip().splitlines()) == 1


def test_unwritable_usage_db_exits_1_before_changing_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    keys = tmp_path / "keys.json"
    argv = ["--keys-file", str(keys), "--usage-db", str(blocker / "u.db"), "generate", "--name", "x"]
    assert main(argv, environ={}) == 1
    assert not keys.exists()
    assert "lg-" not in capsys.readouterr().out


def test_corrupt_keys_file_exits_1(cli: Cli, paths: Paths) -> None:
    paths.keys.parent.mkdir(parents=True)
    paths.keys.write_text("{oops")
    result = cli("list")
    assert result.rc == 1 and "invalid" in result.err
    assert cli("generate", "--name", "x").rc == 1
    assert paths.keys.read_text() == "{oops"


def test_global_options_after_the_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys, db = tmp_path / "k.json", tmp_path / "u.db"
    argv = ["generate", "--name", "x", "--keys-file", str(keys), "--usage-db", str(db)]
    assert main(argv, environ={}) == 0
    assert keys.exists() and db.exists()


def test_paths_default_from_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--name", "x"], environ={"DATA_DIR": str(tmp_path / "d")}) == 0
    assert (tmp_path / "d" / "keys.json").exists() and (tmp_path / "d" / "usage.db").exists()
    env = {"DATA_DIR": str(tmp_path / "d"), "AUTH_KEYS_FILE": str(tmp_path / "elsewhere.json")}
    assert main(["generate", "--name", "y"], environ=env) == 0
    assert (tmp_path / "elsewhere.json").exists()


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"], environ={}) == 0
    assert "generate" in capsys.readouterr().out


def test_import_legacy_file(cli: Cli, paths: Paths, tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.txt"
    legacy.write_text("# legacy\nalice:sk-alice-secret-000001\n\nbob:sk-bob-secret-000002\n")
    result = cli("import", str(legacy), "--scopes", "inference,metrics")
    assert result.rc == 0, result.err
    assert "Imported 2 key(s): alice, bob" in result.out
    ring = keyring(paths)
    alice = ring.authenticate("sk-alice-secret-000001", T0)
    assert alice.key is not None and alice.key.id == "alice"
    assert alice.key.scopes == {"inference", "metrics"}
    assert ring.authenticate("sk-bob-secret-000002", T0).ok
    assert "sk-alice" not in paths.keys.read_text()
    again = cli("import", str(legacy))
    assert again.rc == 2 and "'alice' already exists" in again.err


def test_import_bad_line_names_it_and_imports_nothing(cli: Cli, paths: Paths, tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.txt"
    legacy.write_text("alice:sk-alice-secret\n# note\nsk-orphan-secret\n")
    result = cli("import", str(legacy))
    assert result.rc == 2 and "line 3" in result.err
    assert "sk-orphan" not in result.err
    assert not paths.keys.exists()


def test_import_missing_file_exits_1(cli: Cli, tmp_path: Path) -> None:
    result = cli("import", str(tmp_path / "nope.txt"))
    assert result.rc == 1 and "nope.txt" in result.err


def test_usage_command(cli: Cli, paths: Paths, clock: FakeClock) -> None:
    key_id, _ = generate(cli, "--name", "alice")
    h0 = hour_bucket(T0)
    with contextlib.closing(open_db(paths.db)) as conn:
        UsageStore(conn).write(
            aggregate(
                [
                    UsageEvent(key_id, "qwen", 10, 5, h0 - 48 * HOUR),
                    UsageEvent(key_id, "qwen", 20, 7, h0 - HOUR),
                    UsageEvent(key_id, "qwen", 1, 1, h0 + 1),
                    UsageEvent("key_gone", "qwen", 2, 2, h0 + 1),
                ]
            )
        )
    rows = json.loads(cli("usage", key_id, "--since", "24h", "--json").out)
    assert [(r["hour"], r["requests"], r["prompt_tokens"]) for r in rows] == [
        (h0 - HOUR, 1, 20),
        (h0, 1, 1),
    ]
    everything = cli("usage")
    assert everything.rc == 0 and "key_gone" in everything.out
    assert everything.out.splitlines()[-1].split() == ["TOTAL", "4", "33", "15"]
    until = json.loads(cli("usage", "--until", "2023-11-14T00:00", "--json").out)
    assert [r["prompt_tokens"] for r in until] == [10]
    assert cli("usage", "key_gone").rc == 0  # removed keys keep their history
    unknown = cli("usage", "key_never")
    assert unknown.rc == 2 and "key_never" in unknown.err


def test_every_mutation_is_audited_as_cli(cli: Cli, tmp_path: Path) -> None:
    key_id, _ = generate(cli, "--name", "alice")
    cli("disable", key_id)
    cli("enable", key_id)
    cli("rotate", key_id)
    legacy = tmp_path / "legacy.txt"
    legacy.write_text("old:sk-old-secret-1\n")
    cli("import", str(legacy))
    cli("remove", key_id)
    cli("list")
    cli("show", "old")
    assert audit_actions(cli) == [
        ("cli", "generate", key_id),
        ("cli", "disable", key_id),
        ("cli", "enable", key_id),
        ("cli", "rotate", key_id),
        ("cli", "import", "old"),
        ("cli", "remove", key_id),
    ]
    text = cli("audit", key_id)
    assert text.rc == 0 and "rotate" in text.out and "import" not in text.out


def test_failed_mutation_is_not_audited(cli: Cli) -> None:
    generate(cli, "--name", "alice")
    assert cli("disable", "key_nope").rc == 2
    assert [a[1] for a in audit_actions(cli)] == ["generate"]


def test_unknown_key_error_names_the_id() -> None:
    assert "key_abc" in str(UnknownKeyError("key_abc"))


@pytest.mark.parametrize("name", ["", "two\nlines", "x" * 201])
def test_bad_name_exits_2(cli: Cli, name: str) -> None:
    result = cli("generate", "--name", name)
    assert result.rc == 2 and "name must be" in result.err
