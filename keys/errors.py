"""Errors raised by the keys package.

    KeysError
     ├── KeyFormatError      a key record or the keys document is malformed
     ├── KeyFileError        the keys file cannot be read, parsed or written
     ├── LegacyImportError   a line of a legacy ``key_id:api_key`` file is bad
     ├── UnknownKeyError     no key has the given id
     ├── DuplicateKeyError   an id or secret is already in the store
     └── DurationError       a duration or point in time cannot be parsed

Messages never contain a secret: they name ids, fields and line numbers only.
"""


class KeysError(Exception):
    """Base of every error the keys package raises on purpose."""


class KeyFormatError(KeysError, ValueError):
    """A key record or the keys document does not match the format."""


class KeyFileError(KeysError):
    """The keys file is unreadable, corrupt, or could not be written."""


class LegacyImportError(KeysError, ValueError):
    """A legacy ``key_id:api_key`` line is malformed; ``line_no`` is 1-based."""

    def __init__(self, line_no: int, problem: str) -> None:
        super().__init__(f"line {line_no}: {problem}")
        self.line_no = line_no


class UnknownKeyError(KeysError, LookupError):
    """No key with this id exists."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"unknown key id {key_id!r}")
        self.key_id = key_id


class DuplicateKeyError(KeysError, ValueError):
    """An id or a secret would appear twice in the store."""


class DurationError(KeysError, ValueError):
    """A duration (``30s``, ``15m``, ``1h``, ``7d``) or date cannot be parsed."""


def describe_error(exc: BaseException) -> str:
    """A short cause for messages: the OS error text, else the exception type."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
