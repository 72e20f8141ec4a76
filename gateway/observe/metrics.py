"""Prometheus metrics of the gateway, bound to an injected registry.

With several gateway workers (GATEWAY_WORKERS > 1) the serve process sets
PROMETHEUS_MULTIPROC_DIR, prometheus_client then keeps values in shared files
and `collect_registry()` sums them, so any worker's /metrics reports totals.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.observe.histograms import FastHistogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1)
_TOKEN_BUCKETS = (1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
_REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1)


_M = TypeVar("_M", covariant=True)


class Observer(Protocol):
    def observe(self, value: float) -> None: ...


class Labelled(Protocol[_M]):
    def labels(self, *values: str) -> _M: ...


class HistogramLike(Labelled[Observer], Observer, Protocol):
    """prometheus_client's Histogram, or gateway/observe/histograms.py's in one process."""


def _histogram(name: str, documentation: str, labelnames: Sequence[str] = (), *,
               buckets: Sequence[float], registry: CollectorRegistry) -> HistogramLike:
    if multiprocess_enabled():  # several workers: values shared through prometheus_client's files
        return Histogram(name, documentation, labelnames, buckets=buckets, registry=registry)
    return FastHistogram(name, documentation, labelnames, buckets=buckets, registry=registry)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Children(Generic[_M]):
    """``metric.labels(*values)``, remembered: prometheus_client's lookup validates and
    converts every value on each call, which cost more than the update itself. Label
    values are bounded (routes, statuses, catalog models, key ids), and so is this."""

    __slots__ = ("_cache", "_metric")

    def __init__(self, metric: Labelled[_M]) -> None:
        self._metric = metric
        self._cache: dict[tuple[str, ...], _M] = {}

    def __call__(self, *values: str) -> _M:
        child = self._cache.get(values)
        if child is None:
            child = self._cache[values] = self._metric.labels(*values)
        return child


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "llamagate_requests", "Requests answered, by route, status, model, key id and how "
            "they ended (completed, client_closed, backend_failed, timeout, shutdown)",
            ["route", "status", "model", "key_id", "ended"], registry=registry)
        self.duration = _histogram(
            "llamagate_request_duration_seconds",
            "Time from request to the end of the response (end to end), by route, model and status",
            ["route", "model", "status"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.inter_token = _histogram(
            "llamagate_inter_token_latency_seconds",
            "Mean time between a streamed answer's tokens after the first, one observation "
            "per stream", ["model"], buckets=_ITL_BUCKETS, registry=registry)
        self.request_prompt_tokens = _histogram(
            "llamagate_request_prompt_tokens", "Prompt tokens per request",
            ["model"], buckets=_TOKEN_BUCKETS, registry=registry)
        self.request_completion_tokens = _histogram(
            "llamagate_request_completion_tokens", "Completion tokens per request",
            ["model"], buckets=_TOKEN_BUCKETS, registry=registry)
        self.finish_reasons = Counter(
            "llamagate_request_finish_reasons", "Why generations ended (stop, length, "
            "tool_calls, content_filter, other), for answers that completed",
            ["model", "reason"], registry=registry)
        self.overhead = _histogram(
            "llamagate_gateway_overhead_seconds",
            "The gateway's own time before a request is handed to the backend: from its "
            "arrival, less its wait for a slot", ["route"], buckets=_OVERHEAD_BUCKETS,
            registry=registry)
        self.ttft = _histogram(
            "llamagate_time_to_first_token_seconds",
            "Time from request to the backend's first event: streamed answers, and "
            "non-streaming ones the gateway fetches as streams",
            ["model"], buckets=_TTFT_BUCKETS, registry=registry)
        self.queue_wait = _histogram(
            "llamagate_queue_wait_seconds", "Time spent waiting for a backend slot",
            buckets=_QUEUE_BUCKETS, registry=registry)
        self.prompt_tokens = Counter(
            "llamagate_prompt_tokens", "Prompt tokens processed, from the backend's usage",
            ["model", "key_id"], registry=registry)
        self.completion_tokens = Counter(
            "llamagate_completion_tokens", "Completion tokens generated, from the backend's usage",
            ["model", "key_id"], registry=registry)
        self.in_flight = Gauge(
            "llamagate_in_flight_requests", "Requests holding a backend slot",
            registry=registry, multiprocess_mode="livesum")
        self.queue_depth = Gauge(
            "llamagate_queue_depth", "Requests waiting for a backend slot",
            registry=registry, multiprocess_mode="livesum")
        # single process: the gauges read the admission counters at scrape time, which costs
        # requests nothing; multiprocess mode cannot call functions, so requests move them
        self.live_gauges = False
        self.rejections = Counter(
            "llamagate_rejections", "Requests refused by the gateway, by reason",
            ["reason"], registry=registry)
        self.cut_short = Counter(
            "llamagate_responses_cut_short",
            "Answers that ended before the backend's end after their status was sent (a "
            "stream's 200 counts in llamagate_requests_total), by reason",
            ["route", "reason"], registry=registry)
        # usage recording (keys/usage_recorder.py), moved at each flush; livesum: a worker
        # that is gone no longer holds events (its spool is another worker's to write)
        self.usage_pending = Gauge(
            "llamagate_usage_pending_events",
            "Usage events recorded but not yet in the usage database",
            registry=registry, multiprocess_mode="livesum")
        self.usage_write_failures = Counter(
            "llamagate_usage_write_failures",
            "Attempts to open or write the usage database that failed",
            registry=registry)
        # a fleet's Redis (follow_fleet): registered only where REDIS_URL is set
        self.redis_up: Gauge | None = None
        self.redis_latency: HistogramLike | None = None
        self.usage_buffered: Gauge | None = None
        # the per-request paths take labelled children from here
        self.requests_for = Children(self.requests)
        self.duration_for = Children(self.duration)
        self.inter_token_for = Children(self.inter_token)
        self.request_prompt_tokens_for = Children(self.request_prompt_tokens)
        self.request_completion_tokens_for = Children(self.request_completion_tokens)
        self.finish_reasons_for = Children(self.finish_reasons)
        self.overhead_for = Children(self.overhead)
        self.ttft_for = Children(self.ttft)
        self.prompt_tokens_for = Children(self.prompt_tokens)
        self.completion_tokens_for = Children(self.completion_tokens)
        self.rejections_for = Children(self.rejections)
        self.cut_short_for = Children(self.cut_short)

    def follow_fleet(self) -> None:
        """The metrics of a fleet's Redis (REDIS_URL), only where there is one."""
        registry = self.registry
        self.redis_up = Gauge(
            "llamagate_redis_up", "1 while the fleet's Redis answers this replica, 0 while not",
            registry=registry, multiprocess_mode="livemin")
        self.redis_latency = _histogram(
            "llamagate_redis_latency_seconds",
            "Round trips to the fleet's Redis (a pipeline of the calls of one loop turn)",
            buckets=_REDIS_BUCKETS, registry=registry)
        self.usage_buffered = Gauge(
            "llamagate_usage_buffered",
            "Usage events kept on local disk while the fleet's Redis is unreachable",
            registry=registry, multiprocess_mode="livesum")

    def follow(self, admission: _Counts) -> None:
        """Read in-flight and queue depth from `admission` at scrape time (one process only)."""
        if multiprocess_enabled():
            return
        self.in_flight.set_function(lambda: admission.in_flight)
        self.queue_depth.set_function(lambda: admission.queued)
        self.live_gauges = True


def make_registries() -> tuple[CollectorRegistry, CollectorRegistry]:
    """(registry metrics are created in, registry that is exposed)."""
    if multiprocess_enabled():
        exposed = CollectorRegistry()
        MultiProcessCollector(exposed)  # type: ignore[no-untyped-call]
        return CollectorRegistry(), exposed
    registry = CollectorRegistry()
    return registry, registry


def label_backend_metrics(text: str, model: str, keep_colons: bool = False) -> str:
    """Add a model label to each sample of llama-server's exposition.

    llama-server names its families `llamacpp:*`; promtool (rightly: ':' is for
    recording rules) rejects those names, so by default they are exposed as `llamacpp_*`.
    ``keep_colons`` (BACKEND_METRICS_NAMES=llamacpp) keeps llama-server's names for
    dashboards written against them. A family typed `counter` without the `_total`
    suffix (llamacpp:n_tokens_max, a running maximum) is re-typed `gauge`: that is what
    it is, and promtool rejects the other.
    """
    def rename(name: str) -> str:
        return name if keep_colons else name.replace(":", "_")

    out = []
    escaped = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    label = f'model="{escaped}"'
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            kind, _, rest = line.partition(" TYPE ")
            if kind == "#" and rest.endswith(" counter") and not rest[:-8].endswith("_total"):
                line = f"# TYPE {rest[:-8]} gauge"
            words = line.split(" ", 3)
            if len(words) > 2:  # "# HELP name ..." / "# TYPE name kind"
                words[2] = rename(words[2])
                line = " ".join(words)
            out.append(line)
            continue
        name, sep, rest = line.partition("{")
        if sep:
            out.append(f"{rename(name)}{{{label}{'' if rest.startswith('}') else ','}{rest}")
        else:
            metric, _, value = line.partition(" ")
            out.append(f"{rename(metric)}{{{label}}} {value}")
    return "\n".join(out) + "\n"


class _Counts(Protocol):
    in_flight: int

    @property
    def queued(self) -> int: ...
