"""The log handler every process installs: lines of one event-loop iteration written
together, lines outside a loop at once, and the access line's fields as given."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from llamagate.logs import JsonFormatter, LineHandler, TextFormatter


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def _logger(stream: CountingStream, formatter: logging.Formatter) -> logging.Logger:
    handler = LineHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"llamagate.test.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_lines_of_one_loop_iteration_go_out_in_one_write() -> None:
    stream = CountingStream()
    log = _logger(stream, JsonFormatter("gateway"))

    async def main() -> tuple[int, int]:
        for i in range(3):
            log.info("request", extra={"fields": {"n": i}})
        during = stream.writes
        await asyncio.sleep(0)  # one turn of the loop: the handler's flush runs
        return during, stream.writes

    during, after = asyncio.run(main())
    assert (during, after) == (0, 1)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["n"] for line in lines] == [0, 1, 2]


def test_outside_a_loop_a_line_is_written_at_once() -> None:
    stream = CountingStream()
    log = _logger(stream, JsonFormatter("serve"))
    log.info("starting", extra={"port": 8000})
    assert stream.writes == 1
    line = json.loads(stream.getvalue())
    assert (line["msg"], line["port"], line["role"]) == ("starting", 8000, "serve")


def test_the_text_format_names_the_request_id_once() -> None:
    stream = CountingStream()
    log = _logger(stream, TextFormatter("gateway"))
    log.info("request", extra={"fields": {"request_id": "r1", "status": 200}})
    text = stream.getvalue()
    assert text.count("request_id=r1") == 1
    assert "status=200" in text
