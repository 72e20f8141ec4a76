import json
from dataclasses import replace

import pytest

from keys.codec import dump_keys, key_to_dict, parse_keys
from keys.errors import KeyFormatError
from keys.hashing import display_prefix, hash_secret, new_secret
from keys.model import ApiKey, Limits, PreviousSecret
from tests.keys.helpers import T0


def sample_key() -> ApiKey:
    secret = new_secret()
    return ApiKey(
        id="key_0123abcd",
        name="alice",
        secret_hash=hash_secret(secret),
        prefix=display_prefix(secret),
        scopes=frozenset({"inference", "metrics"}),
        created=T0,
        expires=T0 + 86400,
        limits=Limits(requests_per_minute=60, tokens_per_minute=None, max_concurrent=2),
        models=frozenset({"qwen"}),
        previous=(PreviousSecret(hash_secret(new_secret()), T0 + 60),),
    )


def document(*keys: dict[str, object]) -> str:
    return json.dumps({"version": 1, "keys": list(keys)})


def test_round_trip() -> None:
    key = sample_key()
    assert parse_keys(dump_keys([key])) == (key,)


def test_document_is_versioned() -> None:
    assert json.loads(dump_keys([]))["version"] == 1
    with pytest.raises(KeyFormatError, match="version 2"):
        parse_keys(json.dumps({"version": 2, "keys": []}))


def test_unknown_field_rejected() -> None:
    raw = key_to_dict(sample_key()) | {"disabeld": True}
    with pytest.raises(KeyFormatError, match="disabeld"):
        parse_keys(document(raw))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("scopes", ["root"], "unknown scope"),
        ("created", "yesterday", "created"),
        ("created", float("nan"), "finite"),
        ("disabled", "no", "disabled"),
        ("hash", "md5:abc", "hash"),
        ("limits", {"requests_per_minute": 0}, "at least 1"),
        ("limits", {"requests_per_minute": True}, "requests_per_minute"),
        ("models", [""], "empty model"),
        ("id", "has space", "invalid key id"),
    ],
)
def test_bad_values_rejected(field: str, value: object, message: str) -> None:
    raw = key_to_dict(sample_key()) | {field: value}
    with pytest.raises(KeyFormatError, match=message):
        parse_keys(document(raw))


def test_duplicate_ids_rejected() -> None:
    a = sample_key()
    b = replace(sample_key(), id=a.id)
    with pytest.raises(KeyFormatError, match="duplicate key id"):
        parse_keys(dump_keys([a, b]))


def test_invalid_json_error_does_not_quote_the_file() -> None:
    secret = new_secret()
    with pytest.raises(KeyFormatError) as info:
        parse_keys('{"version": 1, "keys": [' + secret)
    assert secret not in str(info.value)
