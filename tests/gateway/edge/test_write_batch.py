"""gateway/edge/write_batch.py on real loopback connections, on both loop kinds: what the peer
can read at once (a non-blocking recv) shows whether a write was sent or is waiting."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from gateway.edge.write_batch import BYPASS, WriteBatch

Pairs = list[tuple[asyncio.WriteTransport, socket.socket]]


def run(kind: str, scenario: Callable[[WriteBatch, Pairs], Awaitable[None]], n: int = 2) -> None:
    factory = uvloop.new_event_loop if kind == "uvloop" else asyncio.new_event_loop

    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        pairs: Pairs = []
        try:
            for _ in range(n):
                transport, _ = await asyncio.get_running_loop().create_connection(
                    asyncio.Protocol, *listener.getsockname())
                peer, _ = listener.accept()
                pairs.append((transport, peer))
            await scenario(WriteBatch(), pairs)
        finally:
            for sent, received in pairs:
                sent.abort()
                received.close()
            listener.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


def ready(peer: socket.socket) -> bytes:
    """What the peer can read without waiting."""
    got = b""
    peer.setblocking(False)
    while True:
        try:
            data = peer.recv(1 << 20)
        except BlockingIOError:
            return got
        if not data:
            return got
        got += data


def read(peer: socket.socket, size: int) -> bytes:
    peer.settimeout(5)
    got = b""
    while len(got) < size:
        data = peer.recv(1 << 20)
        assert data, "the connection closed early"
        got += data
    return got


async def next_pass() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


kinds = pytest.mark.parametrize("kind", ["asyncio", "uvloop"])


@kinds
def test_a_quiet_loop_sends_the_first_write_at_once_and_holds_the_rest_for_a_pass(
        kind: str) -> None:
    async def scenario(batch: WriteBatch, pairs: Pairs) -> None:
        (a, pa), (b, pb) = pairs
        batch.write(a, b"first")
        assert read(pa, 5) == b"first"  # no loop pass in between
        batch.write(b, b"second")
        batch.write(a, b"third")
        assert ready(pb) == b"" and ready(pa) == b""  # waiting for the next pass
        await next_pass()
        assert read(pb, 6) == b"second"
        assert read(pa, 5) == b"third"
    run(kind, scenario)


@kinds
def test_writes_keep_their_order_through_the_batch_and_around_it(kind: str) -> None:
    async def scenario(batch: WriteBatch, pairs: Pairs) -> None:
        (a, pa), = pairs
        pieces = [b"a" * 10, b"b" * 20, b"c" * BYPASS, b"d" * 30, b"e" * 40]
        for piece in pieces:  # the third is big enough to be sent at once
            batch.write(a, piece)
        await next_pass()
        expected = b"".join(pieces)
        assert read(pa, len(expected)) == expected
    run(kind, scenario, n=1)


@kinds
def test_a_writer_that_never_yields_waits_for_no_more_than_the_bypass_size(kind: str) -> None:
    async def scenario(batch: WriteBatch, pairs: Pairs) -> None:
        (a, pa), = pairs
        batch.write(a, b"x")  # opens the window: later writes of this pass wait
        assert read(pa, 1) == b"x"
        piece = b"y" * 1000
        for _ in range(BYPASS // len(piece) + 1):
            batch.write(a, piece)
        # the backlog went out as it reached BYPASS: the transport sees it (and its flow
        # control, pause_writing, can act) without the writer yielding; the last piece waits
        sent = -(-BYPASS // len(piece)) * len(piece)
        assert read(pa, sent) == b"y" * sent
        assert ready(pa) == b""
    run(kind, scenario, n=1)


@kinds
def test_a_dropped_write_is_never_sent_and_a_flushed_one_precedes_the_close(kind: str) -> None:
    async def scenario(batch: WriteBatch, pairs: Pairs) -> None:
        (a, pa), (b, pb) = pairs
        batch.write(a, b"opens")
        batch.write(a, b"never")
        batch.drop(a)
        batch.write(b, b"last words")
        batch.flush(b)
        b.close()
        await next_pass()  # a pass with nothing left for `a` closes the window
        batch.write(a, b"end")  # sent at once: a dropped write sent late would precede it
        assert read(pa, 8) == b"opensend"
        pb.settimeout(5)
        assert pb.recv(100) == b"last words"
        assert pb.recv(100) == b""  # then the end of the connection
    run(kind, scenario)


@kinds
def test_after_a_pass_without_writes_the_next_write_goes_at_once_again(kind: str) -> None:
    async def scenario(batch: WriteBatch, pairs: Pairs) -> None:
        (a, pa), = pairs
        batch.write(a, b"1")
        batch.write(a, b"2")  # waits
        await next_pass()  # sent; the window stays open for one more pass
        assert read(pa, 2) == b"12"
        await next_pass()  # a pass without writes closes it
        batch.write(a, b"3")
        assert read(pa, 1) == b"3"
    run(kind, scenario, n=1)


@kinds
def test_a_transport_closed_while_its_bytes_wait_does_not_stop_the_others(kind: str) -> None:
    async def scenario(batch: WriteBatch, pairs: Pairs) -> None:
        (a, pa), (b, pb) = pairs
        batch.write(a, b"open")
        batch.write(a, b"lost")
        batch.write(b, b"kept")
        a.abort()
        await next_pass()
        assert read(pb, 4) == b"kept"
        batch.write(b, b"more")  # the window is still open: it waits, then goes
        await next_pass()
        assert read(pb, 4) == b"more"
    run(kind, scenario)
