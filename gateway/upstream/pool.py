"""The upstream pool (BACKEND_URLS, BACKENDS_FILE): several llama-servers behind one
gateway worker, each request admitted to one of them.

Admission and routing are one step. A request for a model takes a slot on an upstream that
serves it (gateway/upstream/members.py says which may, and how one is chosen); when none has
a slot free it waits in one queue shared by every upstream, first in, first out: a freed
slot goes to the oldest waiter that upstream can serve. MAX_QUEUE_SIZE and QUEUE_TIMEOUT
bound the queue as they bound a single backend's.

Prefix affinity (gateway/upstream/affinity.py, POOL_AFFINITY): a conversation goes back to
the upstream that served it last, where llama-server keeps its prompt cached, and waits for
a slot there if it must, unless that one has more than POOL_AFFINITY_MARGIN requests in
flight beyond the least loaded upstream that serves the model (or is out of routing); then
it goes where least-request routing sends it, and stays there.

What each request's end says about its upstream is recorded by ``release``: failures feed
outlier ejection (gateway/upstream/outlier.py); the proxy retries a request that failed
before the client saw a byte once, on another upstream (gateway/upstream/proxy.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from typing import Any, Final

from gateway.errors import BackendUnavailable
from gateway.exchange import Exchange
from gateway.policy.admission import UNMEASURED_DRAIN, AdmissionClosed, QueueFull, QueueTimeout
from gateway.upstream.affinity import AffinityTable, conversation_key
from gateway.upstream.backend import Upstream
from gateway.upstream.members import Member, choose
from gateway.upstream.outlier import EJECTED

# Exchange.upstream_failure values that let a request be sent again elsewhere (nothing of the
# answer reached the client): no connection, one that broke, an answer of 503 (loading), a
# refusal of the gateway's key
RETRYABLE: Final = frozenset({"refused", "connect", "broken", "loading", "auth"})
# failures that eject at once: nothing listens, or the model is not loaded
_AT_ONCE: Final = frozenset({"refused", "loading"})


class _Waiter:
    __slots__ = ("exclude", "future", "key", "model")

    def __init__(self, future: asyncio.Future[Member], model: str, key: int | None,
                 exclude: int) -> None:
        self.future = future
        self.model = model
        self.key = key
        self.exclude = exclude


class Pool:
    def __init__(self, members: list[Member], max_queue: int, timeout: float,
                 affinity: bool = True, margin: int = 2, limit: int = 0, fallback_slots: int = 4,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.members = members
        # what an upstream is sent at once: ``limit`` (MAX_CONCURRENT_REQUESTS) when set, else
        # its slots as /props says, else ``fallback_slots`` (PARALLEL)
        self.limit = limit
        self.fallback_slots = fallback_slots
        self.max_queue = max_queue
        self.timeout = timeout
        self.affinity = affinity and len(members) > 1
        self.margin = margin
        self.clock = clock
        self.in_flight = 0
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._table = AffinityTable()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    # -- admission -------------------------------------------------------------------
    def take(self, ex: Exchange, body: dict[str, Any] | None, exclude: int = -1) -> int | None:
        """A slot now on an upstream serving ``ex.model`` (``ex.member`` says which), if one
        is free and nobody waits for it: None. Otherwise the conversation key to ``wait``
        with (-1: none). Raises BackendUnavailable when no upstream serving the model is up.
        (Not a coroutine: most requests find a slot, and take it without one.)"""
        model = ex.model
        key = conversation_key(body) if self.affinity and body is not None else None
        now = self.clock()
        if self._waiters:
            self._dispatch(now)  # an ejection ended or a probe came back: the queue goes first
        routable = self._routable(model, exclude, now)
        if not routable:
            raise BackendUnavailable(f"no upstream serving model '{model}' is ready",
                                     retry_after=self._retry_after(model, now))
        placed = self._place(routable, key)
        if placed is not None:
            ex.member = placed.index
            return None
        return -1 if key is None else key

    async def wait(self, ex: Exchange, key: int, exclude: int = -1) -> None:
        """``take``'s slot, once the shared queue gives one. Raises QueueFull, QueueTimeout
        or AdmissionClosed."""
        if len(self._waiters) >= self.max_queue:
            raise QueueFull(UNMEASURED_DRAIN)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), ex.model, None if key == -1 else key, exclude)
        if exclude >= 0:
            self._waiters.appendleft(waiter)  # a retry: it has waited its turn already
        else:
            self._waiters.append(waiter)
        timer = loop.call_later(self.timeout, _expire, waiter.future)
        try:
            member = await waiter.future
        except asyncio.CancelledError:
            fut = waiter.future
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._give_back(fut.result())  # granted while being cancelled: pass it on
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        ex.member = member.index

    async def acquire(self, ex: Exchange, body: dict[str, Any] | None, exclude: int = -1) -> None:
        """``take``, and ``wait`` if it must."""
        key = self.take(ex, body, exclude)
        if key is not None:
            await self.wait(ex, key, exclude)

    def release(self, ex: Exchange) -> None:
        """The request's slot back, and what its end says about the upstream."""
        index = ex.member
        if index < 0:
            return
        member = self.members[index]
        status = ex.upstream_status
        if ex.upstream_failure is None and 0 < status < 500:  # answered: the common case
            outlier = member.outlier
            if outlier.failures or outlier.probation:
                outlier.answered(self.clock())
        else:
            failure = failure_of(ex)
            if failure is not None:
                now = self.clock()
                member.errors[failure] = member.errors.get(failure, 0) + 1
                if member.outlier.failed(now, failure, failure in _AT_ONCE):
                    member.ejections += 1
                    if not member.ready:  # its probe found it down before this failure came
                        member.outlier.probed(False, now)
        member.in_flight -= 1
        self.in_flight -= 1
        if self._waiters:
            self._dispatch(self.clock())

    def refuse_waiting(self) -> None:
        """Draining: the queued requests are refused now (503), not served late."""
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(AdmissionClosed("the server is shutting down"))

    def _give_back(self, member: Member) -> None:
        member.in_flight -= 1
        self.in_flight -= 1
        if self._waiters:
            self._dispatch(self.clock())

    def _take(self, member: Member) -> Member:
        member.in_flight += 1
        member.requests += 1
        self.in_flight += 1
        return member

    def _routable(self, model: str, exclude: int, now: float) -> list[Member]:
        # Member.routable written out: this runs for every request
        return [m for m in self.members if m.ready and model in m.models
                and now >= m.outlier.until and m.index != exclude]

    def _place(self, routable: list[Member], key: int | None) -> Member | None:
        """The upstream that takes the request now (taken), or None: it waits. A known
        conversation goes home, waiting for a slot there, unless home has more than the
        margin in flight beyond the least loaded upstream; any other request goes to the
        better of two with a free slot."""
        home = None
        if key is not None:
            last = self._table.get(key)
            if last >= 0:
                home = self.members[last]
                least = min(m.in_flight for m in routable)
                if home in routable and home.in_flight <= least + self.margin:
                    if not home.has_room():
                        return None  # its slot frees soon; a cold prefill elsewhere costs more
                    home.affinity_hits += 1
                    return self._take(home)
        candidates = [m for m in routable if m.has_room()]
        if not candidates:
            return None
        chosen = choose(candidates)
        if key is not None:
            if home is not None:
                chosen.affinity_misses += 1
            self._table.served(key, chosen.index)
        return self._take(chosen)

    def _dispatch(self, now: float) -> None:
        """Free slots to the oldest waiters that can use them."""
        for waiter in list(self._waiters):
            if waiter.future.done():
                continue
            routable = self._routable(waiter.model, waiter.exclude, now)
            placed = self._place(routable, waiter.key) if routable else None
            if placed is not None:
                self._waiters.remove(waiter)
                waiter.future.set_result(placed)
            elif not any(m.has_room() for m in self.members):
                return  # nothing free for anyone

    def _retry_after(self, model: str, now: float) -> float:
        """Until the first ejection of an upstream serving the model ends, or 5 s."""
        ends = [m.outlier.until - now for m in self.members
                if m.ready and model in m.models and m.outlier.state(now) == EJECTED]
        return max(1.0, min(ends)) if ends else 5.0

    # -- state from serve's probes ---------------------------------------------------
    def apply(self, serve_state: dict[str, Any]) -> None:
        """Each upstream's probe as serve published it (same order as the members)."""
        published = serve_state.get("upstreams")
        if not isinstance(published, list) or len(published) != len(self.members):
            return
        now = self.clock()
        for member, entry in zip(self.members, published, strict=True):
            if not isinstance(entry, dict):
                continue
            member.ready = ready = entry.get("ready") is True
            if member.outlier.probation:
                member.outlier.probed(ready, now)
            member.state = str(entry.get("state", "unknown"))
            models = entry.get("models")
            member.models = frozenset(models) if isinstance(models, list) else frozenset()
            slots, busy = entry.get("slots"), entry.get("busy")
            member.slots = self.limit or (slots if isinstance(slots, int) and slots > 0
                                          else self.fallback_slots)
            member.busy = busy if isinstance(busy, int) else 0
        if self._waiters:
            self._dispatch(now)

    def upstream_of(self, ex: Exchange) -> Upstream:
        """The upstream a request goes to: its slot's, or, for one that takes no slot (a read,
        tokenizing), the first ready upstream serving its model."""
        if ex.member >= 0:
            return self.members[ex.member].upstream
        now = self.clock()
        for member in self.members:
            if member.routable(ex.model, now) or (ex.model == "-" and member.ready):
                return member.upstream
        return self.members[0].upstream

    def report(self) -> list[dict[str, Any]]:
        """Each upstream as /health shows it."""
        now = self.clock()
        return [{"name": m.name, "state": m.shown_state(now), "in_flight": m.in_flight,
                 "slots": m.slots, "free_slots": max(0, m.free), "models": sorted(m.models),
                 "ejection_reason": m.outlier.reason if m.outlier.probation else None}
                for m in self.members]


def failure_of(ex: Exchange) -> str | None:
    """What a request's end says against its upstream, if anything."""
    if ex.upstream_failure is not None:
        return ex.upstream_failure
    status = ex.upstream_status
    if status == 503:
        return "loading"
    if status >= 500:
        return "status_5xx"
    if status == 0 and ex.timed_out:
        return "timeout"  # nothing answered within the request's timeout
    return None


def _expire(fut: asyncio.Future[Member]) -> None:
    if not fut.done():
        fut.set_exception(QueueTimeout())
