"""Owns the live keyring and swaps in a new one when the keys file changes.

``reload()`` is synchronous and cheap (the file is a few KB), so it runs on the event loop: from
the ``watch`` poller, a SIGHUP handler or an admin endpoint. Request handlers read ``keyring`` and
get an immutable snapshot; a reload replaces the reference and never mutates a snapshot in use.

A missing file means no key works (fail closed). A corrupt or unreadable file keeps the last good
keyring, because locking every client out over a bad edit is worse than serving the previous set.
A process that starts while the file is corrupt has no keyring of its own yet: it serves the
last good copy that every successful load leaves beside the file (``keys.json.last-good``, hashes
only, 0600), where a worker restarted meanwhile finds it (issue 22: a restarted worker came up
with 0 keys and answered every request 401). ``report()`` says which set is in force and why.
"""

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from keys.errors import KeyFileError, KeyFormatError
from keys.keyring import Keyring
from keys.store import KeySet, last_good_path, read_keys_file, read_last_good, save_last_good

# (inode, size, mtime_ns, ctime_ns); None while the file does not exist. Atomic writes replace
# the inode, and the size and times catch editors that rewrite in place.
FileSignature = tuple[int, int, int, int] | None
Sleep = Callable[[float], Awaitable[None]]
# Signature of a path that exists but cannot be stat'ed (e.g. a permission problem): a state of
# its own, so the poller reports it once and notices when it clears.
_UNSTATABLE: FileSignature = (-1, -1, -1, -1)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did. ``ok`` is False when the file was bad and the old keys were kept."""

    ok: bool
    key_count: int
    error: str | None = None
    # The file does not exist: a valid state (no key works), reported so an operator sees it.
    file_missing: bool = False


def file_signature(path: Path) -> FileSignature:
    """Return the change-detection signature of ``path``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return _UNSTATABLE
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class KeyReloader:
    """Holds the current ``Keyring`` for the keys file at ``path``.

    The constructor does no I/O and starts with an empty keyring; call ``reload()`` once at
    startup before serving.
    """

    def __init__(
        self,
        path: Path,
        *,
        logger: logging.Logger | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._path = path
        self._log = logger or logging.getLogger("llamagate.keys")
        self._sleep = sleep
        self._keyring = Keyring()
        self._signature: FileSignature = None
        self._last_error: str | None = None
        self._loaded = False  # a keyring (the file's or the last good copy's) is in force
        self._using: str | None = None  # set while the keyring is the last good copy
        self._missing = False
        self._copy_error: str | None = None

    @property
    def keyring(self) -> Keyring:
        """The current snapshot; read it once per request."""
        return self._keyring

    @property
    def last_error(self) -> str | None:
        """Why the latest reload failed, or None after a good one."""
        return self._last_error

    def report(self) -> dict[str, object]:
        """The state for /health: whether the file loaded, and which keys are in force."""
        return {"ok": self._last_error is None, "keys": len(self._keyring),
                "error": self._last_error, "using": self._using, "file_missing": self._missing}

    def reload(self) -> ReloadResult:
        """Re-read the keys file now, whether or not it looks changed."""
        # Take the signature before reading: a write that lands after the read then shows up as
        # a change on the next poll instead of being missed.
        signature = file_signature(self._path)
        try:
            keys = read_keys_file(self._path)
            keyring = Keyring(keys)
        except FileNotFoundError:
            self._signature = None
            self._install(Keyring())
            self._missing = True
            self._log.warning("keys file %s does not exist: no API key will authenticate", self._path)
            return ReloadResult(ok=True, key_count=0, file_missing=True)
        except (KeyFileError, KeyFormatError) as exc:
            # Remember the bad file's signature so the poller reports it once, not every tick.
            self._signature = signature
            if not self._loaded:
                self._fall_back(exc)
                return ReloadResult(ok=False, key_count=len(self._keyring), error=str(exc))
            self._last_error = str(exc)
            self._log.error(
                "keys reload failed, keeping %d keys from the last good load: %s",
                len(self._keyring),
                exc,
            )
            return ReloadResult(ok=False, key_count=len(self._keyring), error=str(exc))
        self._signature = signature
        self._install(keyring)
        self._log.info("loaded %d API keys from %s", len(keyring), self._path)
        self._keep(keys)
        return ReloadResult(ok=True, key_count=len(keyring))

    def poll(self) -> ReloadResult | None:
        """Reload if the file's signature changed since the last reload; else return None."""
        if file_signature(self._path) == self._signature:
            return None
        return self.reload()

    async def watch(self, interval: float = 2.0) -> None:
        """Poll for changes every ``interval`` seconds until cancelled."""
        while True:
            await self._sleep(interval)
            self.poll()

    def _install(self, keyring: Keyring) -> None:
        self._keyring = keyring
        self._last_error = None
        self._loaded = True
        self._using = None
        self._missing = False

    def _keep(self, keys: KeySet) -> None:
        """Save the keys just loaded as the last good copy; a copy that cannot be written is
        reported once, and the keys stay in force."""
        try:
            save_last_good(self._path, keys)
        except OSError as exc:
            if self._copy_error is None:
                self._log.warning("cannot keep a last good copy of the keys at %s: %s",
                                  last_good_path(self._path), exc)
            self._copy_error = str(exc)
            return
        self._copy_error = None

    def _fall_back(self, exc: Exception) -> None:
        """The file is unusable and no keyring was ever in force here: the last good copy."""
        self._last_error = str(exc)
        try:
            keys, saved = read_last_good(self._path)
        except (FileNotFoundError, KeyFileError) as copy_exc:
            self._log.error("keys file unusable and no last good copy (%s): no API key will "
                            "authenticate: %s", copy_exc.__class__.__name__, exc)
            return
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(saved))
        self._keyring = Keyring(keys)
        self._loaded = True
        self._using = f"last good copy from {when}"
        self._log.warning("keys file unusable, serving the %d keys of the last good copy "
                          "saved %s: %s", len(keys), when, exc)
