"""The one reader of server-sent events: where events end, and each one's data.

As the SSE spec (HTML Living Standard, 9.2.6) reads a stream: a line ends at CRLF, LF or
CR; an empty line ends an event; a line starting with ":" is a comment; a field's value
loses one leading space; ``data`` lines join with LF. Events may be split anywhere across
reads, a CRLF pair included. The relay (gateway/upstream/sse.py) uses ``boundary`` to
hold back an unfinished event; the fold (gateway/upstream/fold.py) and the choice tally
(gateway/observe/metering.py) read each event's data with ``EventParser``.
"""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"\r\n|\r|\n")
# a line end followed by another: an empty line, the end of an event. A CR before an LF is
# half of a CRLF, not a line end of its own
_BLANK_LINE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")


def boundary(data: bytes) -> int:
    """Where the last whole event in ``data`` ends (0: none does)."""
    if data.endswith(b"\n\n"):  # llama-server's framing: the common case, at once
        return len(data)
    if b"\r" not in data:  # LF framing: the last blank line is the last LF pair (a C scan,
        end = data.rfind(b"\n\n")  # not a regex over every event of a large read)
        return end + 2 if end >= 0 else 0
    end = 0
    for match in _BLANK_LINE.finditer(data):
        end = match.end()
    return end


class EventParser:
    """Each whole event's data, from reads that may split events, lines and CRLF pairs.
    Events without data (comments, keep-alives) give nothing."""

    __slots__ = ("_cr", "_data", "_rest")

    def __init__(self) -> None:
        self._rest = b""  # an unfinished line
        self._data: list[bytes] = []  # the data lines of the unfinished event
        self._cr = False  # the last read ended with a CR: an LF starting the next is its pair

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._cr = chunk.endswith(b"\r")
        data = self._rest + chunk if self._rest else chunk
        lines = _LINE_END.split(data) if b"\r" in data else data.split(b"\n")
        self._rest = lines.pop()
        return self._lines(lines)

    def end(self) -> list[bytes]:
        """The stream has ended: its last event too, though no empty line closed it (the
        spec drops it; a stream cut short still had it sent, so it is counted)."""
        rest, self._rest, self._cr = self._rest, b"", False
        return self._lines([rest, b""] if rest else [b""])

    def _lines(self, lines: list[bytes]) -> list[bytes]:
        events: list[bytes] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data"):
                field, _, value = line.partition(b":")
                if field == b"data":
                    self._data.append(value[1:] if value.startswith(b" ") else value)
            # any other field (event, id, retry) or a comment: nothing the gateway reads
        return events
