"""The local-disk buffer of usage on its way to the fleet's Redis: while Redis is away,
keys/usage_redis.py keeps the batches waiting and the tally never sent in a buffer file (one
per process, JSON, 0600, atomic replace) in its buffer directory, rewritten as they change.

At start, buffer files of processes that are gone (pid, boot and start time, as usage spools
are judged: keys/usage_spool.py) are taken and replayed under their own replica and
sequences, so two replicas taking one file count it once. Redis forgets a replica seven days
after its last apply, so a batch first sent more than six days ago (a day of margin for
clocks) is not replayed: it could count twice. It is kept in a ``stale-*`` file for an
operator instead, which no process takes.

The directory must be ours alone: a file another user could plant would be replayed as our
usage.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from core.private_files import FILE_MODE, private_dir
from keys.usage import Tally
from keys.usage_redis_batch import Batch, cut
from keys.usage_redis_scripts import DAY, KEEP_APPLIERS
from keys.usage_spool import process_identity, writer_alive

REPLAY_WITHIN: Final = KEEP_APPLIERS - DAY  # a batch first sent longer ago might count twice
PREFIX: Final = "redis-usage-"  # not "usage-": the spools' prefix, in a directory they may share
_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class Taken:
    """A buffer file of a process that is gone, read at start."""

    path: Path
    pid: int
    batches: list[Batch]


def unsafe_to_replay(batches: Iterable[Batch], now: float) -> list[Batch]:
    """The batches first sent more than REPLAY_WITHIN before ``now``: Redis may have forgotten
    that it applied them."""
    return [b for b in batches if b.sent is not None and now - b.sent > REPLAY_WITHIN]


def encode_buffer(fleet: str, replica: str, next_seq: int, held: Sequence[Batch],
                  tally: Tally, *, final: bool) -> bytes:
    """A buffer file: the batches waiting, and the tally never sent, which a process taking
    the file sends as ``next_seq`` of ``replica`` (as this process would have)."""
    pid = os.getpid()
    return json.dumps({
        "version": _VERSION, "pid": pid, "identity": process_identity(pid), "fleet": fleet,
        "replica": replica, "next_seq": next_seq, "final": final, "written": time.time(),
        "batches": [b.encode() for b in held],
        "unsent": {"rows": [[k, m, h, *t] for (k, m, h), t in tally.totals.items()],
                   "last_used": tally.last_used},
    }).encode()


def encode_set_aside(fleet: str, batches: Sequence[Batch]) -> bytes:
    """A ``stale-*`` file: batches that cannot be replayed safely, for an operator."""
    return json.dumps({"version": _VERSION, "fleet": fleet,
                       "batches": [b.encode() for b in batches]}).encode()


def _decode_batch(d: Mapping[str, Any]) -> Batch:
    rows = tuple((str(m), int(h), int(r), int(p), int(c)) for m, h, r, p, c in d["rows"])
    last, sent = d["last"], d["sent"]
    return Batch(str(d["replica"]), int(d["seq"]), str(d["key"]), rows,
                 None if last is None else float(last), None if sent is None else float(sent))


def _decode_buffer(data: Mapping[str, Any]) -> list[Batch]:
    batches = [_decode_batch(d) for d in data["batches"]]
    unsent = Tally()
    for k, m, h, r, p, c in data["unsent"]["rows"]:
        unsent.totals[(str(k), str(m), int(h))] = [int(r), int(p), int(c)]
    unsent.last_used.update({str(k): float(ts) for k, ts in data["unsent"]["last_used"].items()})
    fresh, _ = cut(unsent, str(data["replica"]), int(data["next_seq"]), set())
    return batches + fresh


def write_file(directory: Path, name: str, body: bytes) -> None:
    """Replace ``directory/name`` atomically with a 0600 file. The directory must be ours and
    writable by us alone, in a parent no one else can swap it in: others could plant usage
    for us to replay."""
    private_dir(directory)
    st, up = os.lstat(directory), os.lstat(directory.parent)
    # under a shared /tmp, another user may have made a level first, to swap ours for theirs
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022 \
            or up.st_uid not in (0, os.getuid()) \
            or (up.st_mode & 0o022 and not up.st_mode & stat.S_ISVTX):
        raise PermissionError(f"usage buffer directory {directory} is not a private directory of ours")
    tmp = directory / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), FILE_MODE)
        f.write(body)
    os.replace(tmp, directory / name)


def orphans(directory: Path, own: str, fleet: str) -> tuple[list[Taken], list[Path]]:
    """Buffer files of this fleet whose writers are gone (or closed for good), and the paths of
    files that cannot be read (left in place)."""
    taken: list[Taken] = []
    bad: list[Path] = []
    try:
        paths = sorted(directory.glob(f"{PREFIX}*.json"))
    except OSError:
        return taken, bad
    for path in paths:
        if path.name == own:
            continue
        try:
            data = json.loads(path.read_bytes())
            if data["fleet"] != fleet:
                continue  # another Redis or prefix: its own gateway replays it
            pid, identity = int(data["pid"]), str(data["identity"])
            if data["final"] is not True and writer_alive(pid, identity):
                continue
            taken.append(Taken(path, pid, _decode_buffer(data)))
        except FileNotFoundError:
            continue  # taken by another process meanwhile
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            bad.append(path)
    return taken, bad


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
