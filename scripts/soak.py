"""Soak: run `llamagate serve` on the tiny model under steady mixed traffic and sample the
memory of every process it runs, to find a leak.

    .venv/bin/python scripts/soak.py --minutes 60 --out soak.csv

Traffic, `--rate` requests/s from `--clients` concurrent loops (auth on, one key): streamed and plain chat
completions, text completions, and streams the client hangs up on after a few events.
Every `--every` seconds one CSV row: elapsed seconds, requests so far, errors so far, and the
RSS (MiB) of serve, each gateway worker, health and llama-server. The summary at the end
gives each process's first and last RSS and the growth per 10,000 requests after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llamagate.tiny_model import write_model  # noqa: E402
from tests.support.keytool import KeyTool  # noqa: E402
from tests.support.service import Service  # noqa: E402


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command may hold spaces and parentheses: the fields after the last ')'
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def role(pid: int) -> str:
    try:
        cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = b" ".join(cmd).decode(errors="replace")
    if "gateway.worker" in text:
        return "worker"
    if "health.server" in text:
        return "health"
    if "llama-server" in text:
        return "llama"
    return "other"


class Counts:
    requests = 0
    errors = 0


async def client(session: aiohttp.ClientSession, base: str, key: str, stop: float,
                 counts: Counts, rng: random.Random, interval: float) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    due = time.monotonic()
    while time.monotonic() < stop:
        due += interval
        if interval and due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())  # pacing: the offered rate
        kind = rng.random()
        try:
            if kind < 0.4:
                body = {"model": "tiny", "stream": True, "max_tokens": rng.randint(8, 64),
                        "messages": [{"role": "user", "content": f"hello {rng.random()}"}]}
                async with session.post(f"{base}/v1/chat/completions", json=body,
                                        headers=headers) as resp:
                    ok = resp.status == 200
                    async for _ in resp.content:
                        pass
            elif kind < 0.7:
                body = {"model": "tiny", "max_tokens": rng.randint(8, 64),
                        "messages": [{"role": "user", "content": f"hi {rng.random()}"}]}
                async with session.post(f"{base}/v1/chat/completions", json=body,
                                        headers=headers) as resp:
                    ok = resp.status == 200
                    await resp.read()
            elif kind < 0.9:
                body = {"model": "tiny", "prompt": f"once {rng.random()}",
                        "max_tokens": rng.randint(8, 64)}
                async with session.post(f"{base}/v1/completions", json=body,
                                        headers=headers) as resp:
                    ok = resp.status == 200
                    await resp.read()
            else:  # a client that hangs up after a few events
                body = {"model": "tiny", "stream": True, "max_tokens": 256,
                        "messages": [{"role": "user", "content": "long"}]}
                resp = await session.post(f"{base}/v1/chat/completions", json=body,
                                          headers=headers)
                ok = resp.status == 200
                seen = 0
                async for _ in resp.content:
                    seen += 1
                    if seen > 5:
                        break
                resp.close()  # drops the connection mid-stream
        except aiohttp.ClientError:
            ok = False
        counts.requests += 1
        counts.errors += not ok


async def drive(base: str, key: str, seconds: float, clients: int, rate: float, every: float,
                serve_pid: int, out: Path) -> None:
    counts = Counts()
    stop = time.monotonic() + seconds
    started = time.monotonic()
    rows: list[dict[str, float | int | str]] = []
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = [asyncio.create_task(client(session, base, key, stop, counts, random.Random(i),
                                                 clients / rate if rate else 0.0))
                 for i in range(clients)]
        with out.open("w", newline="") as f:
            writer: csv.DictWriter[str] | None = None
            while not all(t.done() for t in tasks):
                pids = children(serve_pid)
                row: dict[str, float | int | str] = {
                    "elapsed_s": round(time.monotonic() - started), "requests": counts.requests,
                    "errors": counts.errors, "serve": round(rss_mib(serve_pid), 1)}
                for pid in sorted(pids):
                    row[f"{role(pid)}-{pid}"] = round(rss_mib(pid), 1)
                if writer is None:
                    writer = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
                    writer.writeheader()
                writer.writerow(row)
                f.flush()
                rows.append(row)
                print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                await asyncio.wait(tasks, timeout=every)
        await asyncio.gather(*tasks)
    summarize(rows)


def summarize(rows: list[dict[str, float | int | str]]) -> None:
    if len(rows) < 3:
        return
    warm = rows[len(rows) // 10 or 1]  # after the first tenth: caches and pools filled
    last = rows[-1]
    print(f"requests {last['requests']}, errors {last['errors']}")
    for name in last:
        if name in ("elapsed_s", "requests", "errors") or name not in warm:
            continue
        first, end = float(rows[0][name]), float(last[name])
        grown = end - float(warm[name])
        per = grown / max(1, int(last["requests"]) - int(warm["requests"])) * 10_000
        print(f"{name}: {first:.1f} -> {float(warm[name]):.1f} (warm) -> {end:.1f} MiB; "
              f"{per:+.2f} MiB per 10k requests after warm-up")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=float, default=20,
                        help="requests/s offered in all (0: as fast as the clients go)")
    parser.add_argument("--every", type=float, default=30, help="seconds between samples")
    parser.add_argument("--workers", type=int, default=1, help="GATEWAY_WORKERS")
    parser.add_argument("--out", type=Path, default=Path("soak.csv"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llamagate-soak-") as tmp_name:
        tmp = Path(tmp_name)
        model = write_model(tmp / "tiny.gguf", seed=0)
        keys = KeyTool(tmp / "data" / "keys.json", tmp / "data" / "usage.db")
        _, key = keys.generate("soak")
        service = Service(tmp, {"MODEL_PATH": str(model), "MODEL_NAME": "tiny",
                                "GATEWAY_WORKERS": str(args.workers),
                                "LOG_LEVEL": "warning"})
        with service.running():
            assert service.proc is not None
            asyncio.run(drive(f"http://127.0.0.1:{service.port}", key, args.minutes * 60,
                              args.clients, args.rate, args.every, service.proc.pid, args.out))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
