from dataclasses import replace

import pytest

from keys.errors import KeyFormatError
from keys.hashing import display_prefix, hash_secret, new_key_id, new_secret
from keys.keyring import AuthFailure, Keyring, allows_model, has_scope, visible_models
from keys.model import ApiKey, PreviousSecret
from tests.keys.helpers import T0


def make_key(secret: str, **changes: object) -> ApiKey:
    key = ApiKey(
        id=new_key_id(),
        name="test",
        secret_hash=hash_secret(secret),
        prefix=display_prefix(secret),
        scopes=frozenset({"inference"}),
        created=T0,
    )
    return replace(key, **changes)  # type: ignore[arg-type]


def test_secret_format() -> None:
    secret = new_secret()
    assert secret.startswith("lg-") and len(secret) == 46
    assert display_prefix(secret) == secret[:8]
    assert new_key_id().startswith("key_") and len(new_key_id()) == 12


def test_short_legacy_secret_shows_at_most_a_third() -> None:
    assert display_prefix("abcdef") == "ab"


def test_valid_secret_authenticates() -> None:
    secret = new_secret()
    key = make_key(secret)
    result = Keyring([key]).authenticate(secret, T0)
    assert result.ok and result.key == key and result.reason is None
    assert not result.via_previous_secret


@pytest.mark.parametrize("presented", [None, ""])
def test_missing_secret(presented: str | None) -> None:
    result = Keyring([make_key(new_secret())]).authenticate(presented, T0)
    assert not result.ok and result.reason is AuthFailure.MISSING


def test_unknown_secret_is_invalid() -> None:
    result = Keyring([make_key(new_secret())]).authenticate(new_secret(), T0)
    assert result.key is None and result.reason is AuthFailure.INVALID


def test_expired_key() -> None:
    secret = new_secret()
    ring = Keyring([make_key(secret, expires=T0 + 60)])
    assert ring.authenticate(secret, T0 + 59.9).ok
    assert ring.authenticate(secret, T0 + 60).reason is AuthFailure.EXPIRED


def test_disabled_key_and_disabled_wins_over_expired() -> None:
    secret = new_secret()
    ring = Keyring([make_key(secret, disabled=True, expires=T0)])
    assert ring.authenticate(secret, T0 + 1).reason is AuthFailure.DISABLED


def test_previous_secret_works_until_grace_ends_then_is_invalid() -> None:
    old, new = new_secret(), new_secret()
    key = make_key(new, previous=(PreviousSecret(hash_secret(old), T0 + 3600),))
    ring = Keyring([key])
    during = ring.authenticate(old, T0 + 3599)
    assert during.ok and during.key == key and during.via_previous_secret
    assert ring.authenticate(old, T0 + 3600).reason is AuthFailure.INVALID
    assert ring.authenticate(new, T0 + 7200).ok


def test_previous_secret_of_disabled_key_is_refused() -> None:
    old, new = new_secret(), new_secret()
    prev = (PreviousSecret(hash_secret(old), T0 + 3600),)
    ring = Keyring([make_key(new, previous=prev, disabled=True)])
    assert ring.authenticate(old, T0).reason is AuthFailure.DISABLED


def test_duplicate_secret_rejected() -> None:
    secret = new_secret()
    with pytest.raises(KeyFormatError, match="share a secret"):
        Keyring([make_key(secret), make_key(secret)])


def test_lookup_by_id() -> None:
    key = make_key(new_secret())
    ring = Keyring([key])
    assert ring.get(key.id) == key and ring.get("nope") is None
    assert len(ring) == 1 and list(ring) == [key]


def test_scopes_do_not_imply_each_other() -> None:
    key = make_key(new_secret(), scopes=frozenset({"admin"}))
    assert has_scope(key, "admin")
    assert not has_scope(key, "metrics") and not has_scope(key, "inference")


def test_model_allowlist() -> None:
    open_key = make_key(new_secret())
    limited = make_key(new_secret(), models=frozenset({"qwen", "llama"}))
    assert allows_model(open_key, "anything")
    assert allows_model(limited, "qwen") and not allows_model(limited, "mistral")
    assert visible_models(limited, ["mistral", "llama", "qwen"]) == ["llama", "qwen"]


def test_unknown_scope_rejected_on_construction() -> None:
    with pytest.raises(KeyFormatError, match="unknown scope"):
        make_key(new_secret(), scopes=frozenset({"root"}))
