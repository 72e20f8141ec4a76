"""Per-request record filled in along the pipeline and read by the access log
and metrics once the response is finished."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web


@dataclass(eq=False, slots=True)  # slots: created and read on every request
class Exchange:
    request_id: str
    route: str
    started: float = field(default_factory=time.monotonic)
    key_id: str = "-"
    model: str = "-"
    stream: bool = False
    max_tokens: int | None = None
    queue_wait: float | None = None
    first_byte_at: float | None = None
    tokens: tuple[int, int] | None = None
    completed: bool = False
    error: str | None = None
    inference: bool = False
    shutdown: bool = False  # ended by a drain deadline
    prompt: object = None  # messages/prompt/input, kept only with LOG_PROMPTS=true
    fallback: str | None = None  # the model that answered for one cooling down (X-Model-Fallback)
    deadline: float = 0.0  # loop time after which the timeout sweeper cancels the request
    timed_out: bool = False
    unstream: bool = False  # a non-streaming completion fetched as a stream (gateway/upstream/fold.py)
    n: int = 1  # choices per prompt
    tasks: int = 1  # final events the backend ends with: n per prompt (gateway/observe/metering.py)
    # how it ended, when not as it should (gateway/observe/record.py ENDS): None is completed
    end: str | None = None
    forwarded: bool = False  # handed to the backend: from then on its prompt is charged
    generated: int = 0  # token events relayed: a cut-short request's completion (upstream/cut.py)
    head: bytes = b""  # a stream's first chunk (an Anthropic stream's input tokens are in it)
    estimated: bool = False  # tokens counted by the gateway's estimate, not the backend
    finish: str | None = None  # why the generation ended (metering.finish_reason)
    forwarded_at: float | None = None  # when it was handed to the backend: the gateway's share
    answered_at: float | None = None  # when the backend's answer head came (OpenTelemetry spans)
    traceparent: str | None = None  # the client's W3C trace context, kept only for OTLP export
    # an upstream pool (gateway/upstream/pool.py): the upstream holding its slot (-1: none, or
    # no pool), what that upstream answered (0: nothing), why it failed (see pool.RETRYABLE),
    # and whether it was sent again to another after such a failure
    member: int = -1
    upstream_status: int = 0
    upstream_failure: str | None = None
    retried: bool = False

    @property
    def ttft(self) -> float | None:
        return None if self.first_byte_at is None else self.first_byte_at - self.started


# typed request-dict key: aiohttp >= 3.12 warns on plain strings, and warnings fail tests
EXCHANGE = web.RequestKey("llamagate.exchange", Exchange)


def exchange_of(request: web.Request) -> Exchange:
    ex: Exchange = request[EXCHANGE]
    return ex
