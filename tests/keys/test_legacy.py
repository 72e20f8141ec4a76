import pytest

from keys import ops
from keys.errors import DuplicateKeyError, LegacyImportError
from keys.keyring import Keyring
from keys.legacy import parse_legacy
from tests.keys.helpers import T0

LEGACY = """\
# old keys file
alice:sk-alice-0123456789abcdef

bob : sk-bob:with:colons
"""


def test_parse_skips_comments_and_blanks() -> None:
    entries = parse_legacy(LEGACY)
    assert [(e.line_no, e.key_id, e.secret) for e in entries] == [
        (2, "alice", "sk-alice-0123456789abcdef"),
        (4, "bob", "sk-bob:with:colons"),
    ]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("alice:sk-1\nno-colon-sk-secret\n", 2, "expected key_id:api_key"),
        ("\n\n:sk-secret\n", 3, "expected key_id:api_key"),
        ("alice:\n", 1, "expected key_id:api_key"),
        ("bad id:sk-secret\n", 1, "key id may only"),
        ("a:sk-1\nb:sk-2\na:sk-3\n", 3, "already used on line 1"),
    ],
)
def test_bad_line_is_named_without_its_content(text: str, line: int, message: str) -> None:
    with pytest.raises(LegacyImportError, match=message) as info:
        parse_legacy(text)
    assert info.value.line_no == line
    assert str(info.value).startswith(f"line {line}:")
    assert "sk-" not in str(info.value)


def test_imported_secrets_keep_authenticating() -> None:
    keys, added = ops.import_legacy((), parse_legacy(LEGACY), frozenset({"inference"}), T0)
    assert [k.id for k in added] == ["alice", "bob"]
    ring = Keyring(keys)
    alice = ring.authenticate("sk-alice-0123456789abcdef", T0)
    assert alice.ok and alice.key is not None and alice.key.id == "alice"
    assert ring.authenticate("sk-bob:with:colons", T0).ok
    assert all("sk-" not in k.secret_hash for k in keys)


def test_import_clashing_with_existing_id_fails_whole() -> None:
    keys, _ = ops.import_legacy((), parse_legacy("alice:sk-1111\n"), frozenset(), T0)
    with pytest.raises(DuplicateKeyError, match="'alice' already exists"):
        ops.import_legacy(keys, parse_legacy("carol:sk-2222\nalice:sk-3333\n"), frozenset(), T0)


def test_import_of_a_secret_already_stored_fails() -> None:
    keys, _ = ops.import_legacy((), parse_legacy("alice:sk-1111\n"), frozenset(), T0)
    with pytest.raises(DuplicateKeyError, match="share a secret"):
        ops.import_legacy(keys, parse_legacy("carol:sk-1111\n"), frozenset(), T0)
