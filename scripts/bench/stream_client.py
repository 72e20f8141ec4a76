"""Streams chat completions for a fixed time: time to first event, events/s."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import aiohttp


async def run(url: str, headers: dict[str, str], model: str, conc: int, seconds: float,
              max_tokens: int, keep_alive: bool = False) -> dict[str, float]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "go"}],
                       "stream": True, "max_tokens": max_tokens}).encode()
    ttfts: list[float] = []
    events = 0
    streams = 0
    deadline = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal events, streams
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            first = True
            async with session.post(url, data=body, headers=headers) as resp:
                assert resp.status == 200, resp.status
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    n = buf.count(b"\n\n")
                    if n:
                        if first:
                            ttfts.append(time.perf_counter() - start)
                            first = False
                        events += n
                        buf = buf[buf.rfind(b"\n\n") + 2:]
            streams += 1

    started = time.perf_counter()
    # keep_alive False: a fresh connection per stream (llama-server may close idle
    # keep-alive connections), so the time to first event includes connecting
    conn = aiohttp.TCPConnector(limit=0, force_close=not keep_alive)
    async with aiohttp.ClientSession(connector=conn, headers={"Content-Type": "application/json"}) as s:
        await asyncio.gather(*(worker(s) for _ in range(conc)))
    wall = time.perf_counter() - started
    ttfts.sort()
    return {"streams": streams, "events": events, "events_per_s": events / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))]}
