"""The fleet row of scripts/benchmark.py: the gateway with a key's limits in memory (the
embedded store) and in Redis (REDIS_URL), before the same static upstream, alternating.

Both gateways are pinned to the gateway CPU; redis-server, the upstream and the load to
the other. The key has limits far above the load (so every request is admitted, and
counted: one round trip to Redis each with REDIS_URL, plus the settlement that follows).
Prints p50 at each concurrency, requests/s, the gateway's CPU per request, and the Redis
store's figures as ratios of the embedded store's.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.service import free_port
from tests.support.wait import wait_for

# limits no load here reaches: admitted and counted, never refused
KEY_LIMITS = ("--rpm", "100000000", "--tpm", "1000000000000", "--max-concurrent", "100000")


def redis_server(tmp: Path, cpu: str | None, procs: list[subprocess.Popen[bytes]]) -> str:
    from scripts.benchmark import pinned, start
    binary = shutil.which("redis-server") or "/usr/sbin/redis-server"
    port = free_port()
    procs.append(start(pinned(cpu, [binary, "--bind", "127.0.0.1", "--port", str(port),
                                    "--save", "", "--appendonly", "no", "--dir", str(tmp)]),
                       {}, tmp / "redis.log"))
    import redis
    client = redis.Redis(port=port)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
    wait_for(answers, "redis-server", within=30)
    return f"redis://127.0.0.1:{port}/0"


def fleet_row(args: argparse.Namespace, tmp: Path, lua: Path,
              procs: list[subprocess.Popen[bytes]]) -> None:
    from scripts.benchmark import gateway, measure, medians, nginx_upstream, start, up
    nginx = nginx_upstream(tmp, args.load_cpu)
    if nginx is not None:
        procs.append(nginx[0])
        upstream, kind = nginx[1][0], "nginx, fixed JSON"
    else:
        port = free_port()
        procs.append(start([sys.executable, "scripts/bench/fake_upstream.py", "--port", str(port)],
                           {}, tmp / f"fake-{port}.log"))
        upstream, kind = f"http://127.0.0.1:{port}", "aiohttp, fixed JSON"
        wait_for(lambda: up(f"{upstream}/health"), "the static upstream", within=30)
    url = redis_server(tmp, args.load_cpu, procs)
    embedded = gateway(upstream, tmp, args.gateway_cpu, True, args.log_level, key_args=KEY_LIMITS)
    fleet = gateway(upstream, tmp, args.gateway_cpu, True, args.log_level,
                    extra={"REDIS_URL": url}, key_args=KEY_LIMITS)
    procs += [embedded[0], fleet[0]]
    targets = [("embedded", embedded), ("redis", fleet)]
    runs: list[dict[str, Any]] = []
    for conc in args.conc:
        for rep in range(max(args.reps, 1)):
            for name, (_, url_of, auth, pid) in targets[::-1] if rep % 2 else targets:
                runs += measure(name, url_of, auth, "fake", args, lua, 0, "json", conc, pid)
    rows = medians(runs)
    print(f"\n## fleet: a key's limits in memory vs in Redis (gateway pinned to CPU "
          f"{args.gateway_cpu}, redis-server and load on {args.load_cpu}; {kind}; medians of "
          f"{max(args.reps, 1)} alternating runs)")
    print("| store | conc | req/s | p50 ms | p99 ms | gateway CPU µs/req | req/s vs embedded "
          "| added p50 ms | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    embedded_at = {r["conc"]: r for r in rows if r["target"] == "embedded"}
    for r in rows:
        cpu = f"{r['cpu_us']:.1f}" if "cpu_us" in r else ""
        b = embedded_at[r["conc"]]
        print(f"| {r['target']} | {r['conc']} | {r['rps']:.0f} | {r['p50_ms']:.3f} | "
              f"{r['p99_ms']:.2f} | {cpu} | {r['rps'] / b['rps']:.3f} | "
              f"{r['p50_ms'] - b['p50_ms']:+.3f} | {r['errors']:.0f} |")
    for proc in (embedded[0], fleet[0]):
        proc.terminate()
        proc.wait(30)
