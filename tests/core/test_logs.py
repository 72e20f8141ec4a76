"""The log handler every process installs: lines of one event-loop iteration written
together, lines outside a loop at once, and the access line's fields as given."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from core.logs import JsonFormatter, LineHandler, TextFormatter, info_fields


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


def _tree(stream: CountingStream) -> tuple[logging.Logger, logging.Logger]:
    """A parent with the JSON LineHandler, as setup_logging installs on the root, and a child."""
    parent = _logger(stream, JsonFormatter("gateway"))
    child = logging.getLogger(f"{parent.name}.access")
    child.handlers[:] = []
    child.propagate = True
    return parent, child


def test_info_fields_writes_the_same_line_as_a_record_would() -> None:
    fields = {"request_id": "r1", "status": 200, "model": "tiny", "stream": False, "ttft_ms": None}
    direct, through_records = CountingStream(), CountingStream()
    _, child = _tree(direct)
    info_fields(child, "request", fields)
    _, child2 = _tree(through_records)
    child2.info("request", extra={"fields": fields})
    one, two = (json.loads(s.getvalue()) for s in (direct, through_records))
    assert one.pop("ts") > 0 and two.pop("ts") > 0
    assert one == {**two, "logger": one["logger"]}
    assert one["logger"].endswith(".access") and one["status"] == 200 and one["ttft_ms"] is None


def test_info_fields_gives_a_record_to_any_other_handler() -> None:
    stream = CountingStream()
    parent, child = _tree(stream)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    parent.addHandler(Keep())
    info_fields(child, "request", {"status": 503})
    assert [r.__dict__["fields"] for r in seen] == [{"status": 503}]
    assert json.loads(stream.getvalue())["status"] == 503  # and ours still writes it
