"""gateway/observe/histograms.py exposes what prometheus_client's Histogram would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.observe.histograms import FastHistogram
from tests.support.metrics import Samples

BUCKETS = (0.01, 0.1, 1, 10)
VALUES = (0.0, 0.01, 0.05, 0.1, 0.5, 1, 2, 10, 11, 1e9)  # on the bounds, between, beyond


def _samples(make: type) -> Samples:
    registry = CollectorRegistry()
    hist = make("t_seconds", "doc", ["model"], buckets=BUCKETS, registry=registry)
    for value in VALUES:
        hist.labels("a").observe(value)
    hist.labels("b").observe(0.2)
    text = generate_latest(registry).decode()
    return Samples({k: v for k, v in Samples.parse(text).items() if not k[0].endswith("_created")})


def test_the_same_samples_as_prometheus_clients_histogram() -> None:
    fast, reference = _samples(FastHistogram), _samples(Histogram)
    assert fast == reference
    assert fast.get_value("t_seconds_bucket", model="a", le="0.01") == 2  # le: less or equal
    assert fast.get_value("t_seconds_bucket", model="a", le="+Inf") == len(VALUES)


def test_an_unlabelled_histogram_observes_directly() -> None:
    registry = CollectorRegistry()
    hist = FastHistogram("w_seconds", "doc", buckets=BUCKETS, registry=registry)
    hist.observe(0.5)
    samples = Samples.parse(generate_latest(registry).decode())
    assert samples.get_value("w_seconds_count") == 1 and samples.get_value("w_seconds_sum") == 0.5
