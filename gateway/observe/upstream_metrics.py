"""The upstream pool's metrics, by upstream, read from the pool at scrape time: a request
pays nothing for them (plain integers on each member, gateway/upstream/members.py).

Without a pool the families are declared with no samples, so a dashboard's panels and the
documented families are the same in every mode.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.upstream.members import STATES
from gateway.upstream.pool import Pool


class UpstreamCollector(Collector):
    def __init__(self, pool: Pool | None) -> None:
        self._pool = pool

    def collect(self) -> Iterable[Metric]:
        label = ["upstream"]
        requests = CounterMetricFamily("llamagate_upstream_requests",
                                       "Requests sent to each upstream of the pool (a retry "
                                       "counts on both)", labels=label)
        errors = CounterMetricFamily("llamagate_upstream_errors",
                                     "Requests that failed on an upstream, by reason (refused, "
                                     "connect, broken, timeout, loading, status_5xx, auth)",
                                     labels=["upstream", "reason"])
        in_flight = GaugeMetricFamily("llamagate_upstream_in_flight_requests",
                                      "Requests of this gateway in flight on each upstream",
                                      labels=label)
        free = GaugeMetricFamily("llamagate_upstream_free_slots",
                                 "Each upstream's slots less the larger of its busy slots "
                                 "(/slots) and this gateway's requests on it", labels=label)
        ejections = CounterMetricFamily("llamagate_upstream_ejections",
                                        "Times each upstream was ejected (outlier detection)",
                                        labels=label)
        hits = CounterMetricFamily("llamagate_upstream_affinity_hits",
                                   "Requests sent back to the upstream that served their "
                                   "conversation last", labels=label)
        misses = CounterMetricFamily("llamagate_upstream_affinity_misses",
                                     "Requests of a known conversation sent to another upstream "
                                     "(theirs overloaded, ejected or down), by the one chosen",
                                     labels=label)
        state = GaugeMetricFamily("llamagate_upstream_state",
                                  "1 for each upstream's current state (ready, probation, "
                                  "ejected, starting, unreachable, error), 0 for the others",
                                  labels=["upstream", "state"])
        pool = self._pool
        if pool is not None:
            now = pool.clock()
            for m in pool.members:
                name = [m.name]
                requests.add_metric(name, m.requests)
                for reason, count in sorted(m.errors.items()):
                    errors.add_metric([m.name, reason], count)
                in_flight.add_metric(name, m.in_flight)
                free.add_metric(name, max(0, m.free))
                ejections.add_metric(name, m.ejections)
                hits.add_metric(name, m.affinity_hits)
                misses.add_metric(name, m.affinity_misses)
                current = m.shown_state(now)
                for s in STATES:
                    state.add_metric([m.name, s], 1 if s == current else 0)
        yield from (requests, errors, in_flight, free, ejections, hits, misses, state)
