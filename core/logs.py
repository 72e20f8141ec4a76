"""Structured logging: one JSON object per line, tagged with the process role.

The request id lives in a contextvar so every log line written while a request
is handled carries it without being passed around.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
import time
from typing import Any, TextIO

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# json.dumps with options builds an encoder per call (4 µs of the access line's 10)
_encode = json.JSONEncoder(default=str, separators=(",", ":")).encode
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        exc = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(record.created, record.levelname.lower(), record.name,
                         record.getMessage(), _fields(record), exc)

    def line(self, created: float, level: str, name: str, msg: str, fields: dict[str, Any],
             exc: str | None = None) -> str:
        entry: dict[str, Any] = {"ts": round(created, 3), "level": level, "role": self.role,
                                 "logger": name, "msg": msg}
        rid = request_id_var.get()
        if rid is not None:
            entry["request_id"] = rid
        entry.update(fields)
        if exc is not None:
            entry["exc"] = exc
        return _encode(entry)


def info_fields(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """``logger.info(msg, extra={"fields": fields})``. When the only handler on the way is
    the JSON ``LineHandler`` every process installs, the line goes straight to it: the same
    line, without a LogRecord and the logging module's per-record work (the access log
    writes one per request). Any other handler (a test's, an operator's) gets the record."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _sole_json_handler(logger)
    if handler is None:
        logger.info(msg, extra={"fields": fields})
        return
    formatter = handler.formatter
    assert isinstance(formatter, JsonFormatter)
    handler.add(formatter.line(time.time(), "info", logger.name, msg, fields))


def _sole_json_handler(logger: logging.Logger) -> LineHandler | None:
    found: LineHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if (found is not None or type(handler) is not LineHandler or handler.filters
                    or type(handler.formatter) is not JsonFormatter
                    or handler.level > logging.INFO):
                return None
            found = handler
        current = current.parent if current.propagate else None
    return found


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's own fields: ``extra={"fields": {...}}`` as given (the access line: one
    attribute to copy, none to look for), else every attribute ``extra`` added."""
    fields: dict[str, Any] | None = record.__dict__.get("fields")
    if fields is not None:
        return fields
    return {k: v for k, v in vars(record).items() if k not in _RESERVED and k[0] != "_"}


class TextFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        rid = request_id_var.get()
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items()
                         if not (rid and k == "request_id"))  # said once, below
        line = f"{stamp} {record.levelname[0]} [{self.role}] {record.name}: {record.getMessage()}"
        if rid:
            line += f" request_id={rid}"
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the lines logged during one event-loop iteration together, in one write, at
    its end (the access log writes a line per request: under load, many per iteration).
    Outside a running loop (startup, exit, other threads) a line is written at once."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add(line)

    def add(self, line: str) -> None:
        """Write a formatted line: at the end of this loop iteration, or now outside a loop."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self.acquire()  # also called directly (info_fields), not only from handle()
        try:
            if not self._lines and loop is not None:
                loop.call_soon(self.flush)
            self._lines.append(line)
        finally:
            self.release()
        if loop is None:
            self.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            if self._lines:
                self.stream.write("\n".join(self._lines) + "\n")
                self._lines.clear()
            self.stream.flush()
        except Exception:
            self._lines.clear()  # a broken stream: drop them rather than grow without end
        finally:
            self.release()


def setup_logging(role: str, level: str = "INFO", fmt: str = "json") -> None:
    # Our lines show no source file, thread or process name, so the logging module need not
    # look them up for every record (the access log writes one per request): about a third
    # of what a line cost.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = LineHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role) if fmt == "json" else TextFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access log duplicates ours
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("gguf").setLevel(logging.WARNING)
