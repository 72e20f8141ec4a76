"""Files and directories only the service's user may read: every data file 0600, every
directory the service creates 0700, whatever the umask (issue 21: usage.db and pulls.sqlite3
were created 0644 beside a 0600 keys.json).

Modes are set where each file is created, not through the process umask: the CLI, the
tests and every process that opens a store get them alike, and files that are not private
(downloaded models, the generated demo model) keep the usual modes.

SQLite creates a database's `-wal` and `-shm` files with the database file's own mode
(its unix VFS chmods them to it), so creating the database file 0600 first makes all three
private; ``private_sqlite`` does that, and tightens the files an older version left 0644.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> None:
    """Create ``path`` and any missing parent, each created level 0700. A directory that
    already exists keeps its mode: it may be a volume or a directory the operator made."""
    missing = []
    level = path
    while not level.is_dir():
        missing.append(level)
        if level.parent == level:
            break
        level = level.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            directory.mkdir(mode=DIR_MODE)
            os.chmod(directory, DIR_MODE)  # mkdir's mode passes through the umask


def private_file(path: Path) -> None:
    """Create ``path`` empty if it is missing, and make it 0600 either way.

    An existing file is never opened: closing any descriptor of a file drops every POSIX
    lock the process holds on it, SQLite's among them. A second connection's setup (the
    audit log's, beside the usage recorder's) once dropped the recorder's lock that way; the
    next `llamagate keys usage` then took itself for the database's last user, checkpointed
    and deleted the WAL file the gateway was still writing to, and every later flush was
    lost (issue 22)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    except FileExistsError:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path)) from None
        os.chmod(path, FILE_MODE)
        return
    try:
        os.fchmod(fd, FILE_MODE)  # O_CREAT's mode passes through the umask
    finally:
        os.close(fd)


def private_sqlite(path: Path) -> None:
    """Before ``sqlite3.connect(path)``: the directory made, the database file created (or
    tightened) 0600, and its journal files, where an older version left them, 0600 too."""
    private_dir(path.parent)
    private_file(path)
    for suffix in SQLITE_SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path.with_name(path.name + suffix), FILE_MODE)
