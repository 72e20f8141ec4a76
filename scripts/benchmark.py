#!/usr/bin/env python3
"""Gateway overhead, measured against direct llama-server in the same run.

Two upstreams: (a) llama-server with the tiny model; (b) a minimal static
upstream, which isolates the gateway's own cost: a fixed JSON reply from nginx
when it is installed (apt-get install nginx-light; else from the aiohttp server
below), and an aiohttp SSE stream of 200 events sent as fast as it can. Each is
measured directly and through `llamagate serve` (BACKEND_URL mode, auth on), the
gateway pinned to one CPU, the upstreams and the load on another. Non-streaming
load uses wrk when installed (apt-get install wrk), else a Python client; streams
use an aiohttp client. Prints tables with ratios to direct.

The pool row (--only pool) puts the gateway in front of three static upstreams (BACKEND_URLS)
and in front of one (BACKEND_URL), both pinned to the same CPU, alternating, and prints the
pool's requests/s as a share of the single upstream's: what routing costs the gateway.

The fleet row (--only fleet, scripts/bench/fleet_row.py) runs two gateways before the static
upstream, both with a key that has limits: one keeps them in memory (the embedded store),
one in a redis-server (REDIS_URL) pinned to the load's CPU; alternating, the same loads.

Wall-clock figures move with whatever else the machine runs. The gateway worker's
own CPU time per request (or per SSE event), read from /proc before and after each
load, moves less, but still with the machine's speed (on a shared virtual machine,
the same build measured 145 and 235 µs/request an hour apart): compare builds
within one run, alternating them, never across runs.

    scripts/benchmark.py [--seconds 5] [--reps 1] [--conc 1,16,64] [--stream-conc 1,16]
                         [--gateway-cpu 1] [--load-cpu 0]
                         [--only static|llama|cold|pool|fleet]
                         [--pool-conc 16]
                         [--log-level warning|info] [--no-auth]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from backend.binary import find_llama_server  # noqa: E402
from scripts.bench.stream_client import run as stream_run  # noqa: E402
from tests.support.service import free_port  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402

LUA = """wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth ~= nil and auth ~= "" then wrk.headers["Authorization"] = auth end
function done(summary, latency, requests)
  io.write(string.format('BENCH_JSON {"requests":%d,"duration_us":%d,"errors":%d,'
    .. '"p50_us":%d,"p99_us":%d}\\n', summary.requests, summary.duration,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def pinned(cpu: str | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if cpu and shutil.which("taskset") else argv


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            cwd=ROOT)


def worker_pid(serve_pid: int) -> int | None:
    """The gateway worker started by the serve process `serve_pid` (None off Linux)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == serve_pid and b"gateway.worker" in cmdline:
            return int(stat.parent.name)
    return None


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of `pid` so far (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15 of stat(5); index 11 and 12 after the name
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def up(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def wrk(url: str, body: str, auth: str, conc: int, seconds: float, cpu: str | None,
        lua: Path) -> dict[str, float]:
    env = {**os.environ, "BENCH_BODY": body, "BENCH_AUTH": auth}
    argv = ["wrk", "-t", str(min(2, conc)), "-c", str(conc), "-d", f"{max(1, round(seconds))}s",
            "--timeout", "10s", "-s", str(lua), url]
    out = subprocess.run(pinned(cpu, argv),
                         env=env, capture_output=True, text=True, timeout=seconds + 30)
    lines = [x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON")]
    if not lines:
        raise RuntimeError(f"wrk failed: {out.stdout}{out.stderr}")
    line = lines[0]
    data = json.loads(line.removeprefix("BENCH_JSON "))
    return {"rps": data["requests"] / (data["duration_us"] / 1e6), "p50_ms": data["p50_us"] / 1000,
            "p99_ms": data["p99_us"] / 1000, "errors": data["errors"], "count": data["requests"]}


async def py_load(url: str, body: str, auth: str, conc: int, seconds: float) -> dict[str, float]:
    import aiohttp
    lat: list[float] = []
    deadline = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}

    async def worker(s: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            async with s.post(url, data=body, headers=headers) as r:
                await r.read()
            lat.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(*(worker(s) for _ in range(conc)))
    lat.sort()
    return {"rps": len(lat) / (time.perf_counter() - t0), "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[int(len(lat) * 0.99)], "errors": 0, "count": len(lat)}


def gateway(backend_url: str, tmp: Path, cpu: str | None, auth: bool,
            log_level: str, pool: tuple[str, ...] = (), extra: dict[str, str] | None = None,
            key_args: tuple[str, ...] = ()
            ) -> tuple[subprocess.Popen[bytes], str, str, int | None]:
    """`llamagate serve` in front of `backend_url`, or of the upstreams of `pool`; ``extra``
    settings, and ``key_args`` for the key it is loaded with (its limits)."""
    port, health = free_port(), free_port()
    backend = {"BACKEND_URLS": ",".join(pool)} if pool else {"BACKEND_URL": backend_url}
    env = {**os.environ, **backend, "PORT": str(port), "PORT_HEALTH": str(health),
           "HOST": "127.0.0.1", "DATA_DIR": str(tmp / f"data-{port}"), "LOG_LEVEL": log_level,
           "AUTH_ENABLED": "true" if auth else "false", "MAX_CONCURRENT_REQUESTS": "256",
           "MAX_QUEUE_SIZE": "1024", **(extra or {})}
    key = ""
    if auth:
        data = tmp / f"data-{port}"
        out = subprocess.run([sys.executable, "scripts/key_mgmt.py", "--keys-file",
                              str(data / "keys.json"), "--usage-db", str(data / "usage.db"),
                              "generate", "--name", "bench", *key_args], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        key = next(w for w in out.split() if w.startswith("lg-"))
    proc = start(pinned(cpu, [sys.executable, "-m", "llamagate.cli", "serve"]), env,
                 tmp / f"gateway-{port}.log")
    wait_for(lambda: up(f"http://127.0.0.1:{health}/ping"), "the gateway", within=60)
    if pool:  # every upstream probed ready and its models read, not just the first
        wait_for(lambda: pool_ready(f"http://127.0.0.1:{port}/health"), "the pool", within=60)
    return proc, f"http://127.0.0.1:{port}", f"Bearer {key}" if key else "", worker_pid(proc.pid)


def pool_ready(health_url: str) -> bool:
    try:
        upstreams = requests.get(health_url, timeout=2).json().get("upstreams") or []
    except (requests.RequestException, ValueError):
        return False
    return bool(upstreams) and all(u["state"] == "ready" for u in upstreams)


NGINX_CONF = """daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  keepalive_requests 10000000;
  server {{
    {listen}
    default_type application/json;
    location = /v1/chat/completions {{ return 200 '{reply}'; }}
    location = /v1/models {{ return 200 '{models}'; }}
    location = /health {{ return 200 '{{"status":"ok"}}'; }}
  }}
}}
"""


def nginx_upstream(tmp: Path, cpu: str | None, ports: int = 1
                   ) -> tuple[subprocess.Popen[bytes], list[str]] | None:
    """The fixed JSON reply from nginx (its cost next to the load generator is a fraction of
    an aiohttp server's, so the load measures the gateway), on `ports` ports (a pool's
    upstreams: one nginx answering on each); None when nginx is not installed."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                       else None)
    if binary is None:
        return None
    from scripts.bench.fake_upstream import MODELS, REPLY
    numbers = [free_port() for _ in range(ports)]
    conf = tmp / f"nginx-{numbers[0]}.conf"
    listen = " ".join(f"listen 127.0.0.1:{p};" for p in numbers)
    conf.write_text(NGINX_CONF.format(tmp=tmp, listen=listen, reply=REPLY.decode(),
                                      models=MODELS.decode()))
    proc = start(pinned(cpu, [binary, "-p", str(tmp), "-c", str(conf)]), dict(os.environ),
                 tmp / f"nginx-{numbers[0]}.log")
    urls = [f"http://127.0.0.1:{p}" for p in numbers]
    for url in urls:
        wait_for(lambda: up(f"{url}/health"), "the nginx upstream", within=30)  # noqa: B023
    return proc, urls


def measure(name: str, base: str, auth: str, model: str, args: argparse.Namespace, lua: Path,
            stream_tokens: int, kind: str, conc: int, pid: int | None = None,
            keep_alive: bool = False) -> list[dict[str, Any]]:
    """Load `base` with one `kind` of load at `conc`; with `pid`, also that process's CPU µs
    per request (per event for SSE)."""
    rows = []
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello."}],
                       "max_tokens": 8})
    if kind == "json":
        cpu = cpu_seconds(pid)
        if shutil.which("wrk"):
            r = wrk(f"{base}/v1/chat/completions", body, auth, conc, args.seconds, args.load_cpu, lua)
        else:
            r = asyncio.run(py_load(f"{base}/v1/chat/completions", body, auth, conc, args.seconds))
        if pid is not None and r["count"]:
            r["cpu_us"] = (cpu_seconds(pid) - cpu) * 1e6 / r["count"]
        rows.append({"target": name, "kind": "json", "conc": conc, **r})
    else:
        headers = {"Authorization": auth} if auth else {}
        cpu = cpu_seconds(pid)
        s = asyncio.run(stream_run(f"{base}/v1/chat/completions", headers, model, conc,
                                   args.seconds, stream_tokens, keep_alive))
        if pid is not None and s["events"]:
            s["cpu_us"] = (cpu_seconds(pid) - cpu) * 1e6 / s["events"]
        rows.append({"target": name, "kind": "sse", "conc": conc, **s})
    return rows


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target, load, concurrency): the median of each figure over the runs."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["target"], r["kind"], r["conc"]), []).append(r)
    out = []
    for (target, kind, conc), rs in groups.items():
        row: dict[str, Any] = {"target": target, "kind": kind, "conc": conc}
        for field in rs[0]:
            if field not in row and isinstance(rs[0][field], (int, float)):
                row[field] = statistics.median(r[field] for r in rs if field in r)
        out.append(row)
    return out


def table(rows: list[dict[str, Any]], upstream: str) -> None:
    direct = {(r["kind"], r["conc"]): r for r in rows if r["target"] == "direct"}
    print(f"\n## upstream: {upstream}")
    print("| target | load | conc | req/s | p50 ms | p99 ms | events/s | TTFE p50 ms | ratio vs direct "
          "| gateway CPU µs/req (SSE: /event) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        d = direct[(r["kind"], r["conc"])]
        cpu = f"{r['cpu_us']:.1f}" if "cpu_us" in r else ""
        if r["kind"] == "json":
            ratio = r["rps"] / d["rps"]
            print(f"| {r['target']} | json | {r['conc']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
                  f"{r['p99_ms']:.2f} | | | {ratio:.3f} | {cpu} |")
        else:
            ratio = r["events_per_s"] / d["events_per_s"]
            print(f"| {r['target']} | sse | {r['conc']} | | | | {r['events_per_s']:.0f} | "
                  f"{r['ttft_p50_ms']:.2f} | {ratio:.3f} | {cpu} |")
    for r in rows:
        if r["target"] != "direct" and r["kind"] == "json" and r["conc"] == 1:
            added = r["p50_ms"] - direct[("json", 1)]["p50_ms"]
            print(f"\nadded p50 latency at concurrency 1: {added:.3f} ms")
        if r["target"] != "direct" and r["kind"] == "sse" and r["conc"] == 1:
            added = r["ttft_p50_ms"] - direct[("sse", 1)]["ttft_p50_ms"]
            print(f"added time to first event (p50): {added:.3f} ms")


def pool_row(args: argparse.Namespace, tmp: Path, lua: Path,
             procs: list[subprocess.Popen[bytes]]) -> None:
    """The gateway before three static upstreams (BACKEND_URLS) against one (BACKEND_URL),
    alternating; the pool's requests/s as a share of the single upstream's."""
    nginx = nginx_upstream(tmp, args.load_cpu, ports=3)
    if nginx is not None:
        procs.append(nginx[0])
        urls, kind = nginx[1], "nginx, fixed JSON"
    else:
        urls, kind = [], "aiohttp, fixed JSON"
        for _ in range(3):
            port = free_port()
            procs.append(start(pinned(args.load_cpu, [sys.executable, "scripts/bench/fake_upstream.py",
                                                      "--port", str(port)]), dict(os.environ),
                               tmp / f"fake-{port}.log"))
            urls.append(f"http://127.0.0.1:{port}")
            wait_for(lambda: up(f"{urls[-1]}/health"), "the static upstream", within=30)
    one = gateway(urls[0], tmp, args.gateway_cpu, not args.no_auth, args.log_level)
    three = gateway("", tmp, args.gateway_cpu, not args.no_auth, args.log_level, tuple(urls))
    procs += [one[0], three[0]]
    targets = [("one upstream", one), ("pool of 3", three)]
    runs: list[dict[str, Any]] = []
    for conc in args.pool_conc:
        for rep in range(max(args.reps, 1)):
            for name, (_, url, auth, pid) in targets[::-1] if rep % 2 else targets:
                runs += measure(name, url, auth, "fake", args, lua, 0, "json", conc, pid)
    rows = medians(runs)
    print(f"\n## pool: the gateway (pinned to CPU {args.gateway_cpu}) before 3 static upstreams "
          f"vs 1 ({kind}; medians of {max(args.reps, 1)} alternating runs)")
    print("| target | conc | req/s | p50 ms | p99 ms | gateway CPU µs/req | ratio vs one |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = {r["conc"]: r for r in rows if r["target"] == "one upstream"}
    for r in rows:
        cpu = f"{r['cpu_us']:.1f}" if "cpu_us" in r else ""
        print(f"| {r['target']} | {r['conc']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {cpu} | {r['rps'] / base[r['conc']]['rps']:.3f} |")
    for proc in (one[0], three[0]):
        proc.terminate()
        proc.wait(30)


def cold_start(tmp: Path) -> None:
    """Process start → first /ping 204 → first 200 → first streamed token (supervised backend)."""
    from llamagate.tiny_model import write_model
    model = write_model(tmp / "cold.gguf")
    port, health = free_port(), free_port()
    env = {**os.environ, "MODEL_PATH": str(model), "PORT": str(port), "PORT_HEALTH": str(health),
           "HOST": "127.0.0.1", "PORT_BACKEND": "0", "DATA_DIR": str(tmp / "cold"),
           "AUTH_ENABLED": "false", "LOG_LEVEL": "warning"}
    marks: dict[str, float] = {}
    t0 = time.perf_counter()
    proc = start([sys.executable, "-m", "llamagate.cli", "serve"], env, tmp / "cold.log")

    def probe() -> bool:
        try:
            code = requests.get(f"http://127.0.0.1:{health}/ping", timeout=1).status_code
        except requests.RequestException:
            return False
        marks.setdefault("first", time.perf_counter() - t0)
        marks.setdefault("first_code", code)
        if code in (200, 204):
            marks.setdefault(str(code), time.perf_counter() - t0)
        return code == 200
    try:
        wait_for(probe, "the cold-started service", within=120)
        with requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", stream=True, timeout=30,
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                 "stream": True}) as r:
            next(line for line in r.iter_lines() if b'"content"' in line)
            marks["token"] = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
    print("\n## cold start (llamagate serve, tiny model, from process start)")
    print("| health port answers | first /ping 204 | first /ping 200 | first streamed token |")
    print("| ---: | ---: | ---: | ---: |")
    first_204 = f"{marks['204'] * 1000:.0f} ms" if "204" in marks else "not seen (backend was faster)"
    print(f"| {marks['first'] * 1000:.0f} ms ({marks['first_code']:.0f}) | {first_204} | "
          f"{marks['200'] * 1000:.0f} ms | {marks['token'] * 1000:.0f} ms |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--conc", type=lambda v: [int(x) for x in v.split(",")], default=[1, 16, 64])
    parser.add_argument("--stream-conc", type=lambda v: [int(x) for x in v.split(",")],
                        default=[1, 16], help="concurrent streams (default 1,16)")
    parser.add_argument("--reps", type=int, default=1,
                        help="alternating direct/gateway runs per level; medians are shown")
    parser.add_argument("--gateway-cpu", default="1")
    parser.add_argument("--load-cpu", default="0")
    parser.add_argument("--no-auth", action="store_true", help="measure with auth off")
    parser.add_argument("--log-level", default="warning",
                        help="the gateway's LOG_LEVEL: warning (default) leaves the access log "
                             "off, like the reference nginx; info measures it too")
    parser.add_argument("--only", choices=["static", "llama", "cold", "pool", "fleet"],
                        default=None)
    parser.add_argument("--pool-conc", type=lambda v: [int(x) for x in v.split(",")],
                        default=[16], help="concurrency of the pool row (default 16)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="llamagate-bench-"))
    lua = tmp / "post.lua"
    lua.write_text(LUA)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        def pair(direct: str, model: str, stream_tokens: int, title: str,
                 kinds: tuple[str, ...] = ("json", "sse"), keep_alive: bool = False) -> None:
            """The same load direct and through a gateway in front of `direct`."""
            gw, url, auth, pid = gateway(direct, tmp, args.gateway_cpu, not args.no_auth,
                                         args.log_level)
            procs.append(gw)
            runs: list[dict[str, Any]] = []
            levels = [("json", c) for c in args.conc if "json" in kinds] \
                + [("sse", c) for c in args.stream_conc if "sse" in kinds]
            # direct and gateway alternate at each level, back to back, so a backend that
            # drifts (llama-server slows as it runs) moves both figures of a ratio alike;
            # which goes first swaps every run, so a steady drift favours neither
            pairs = [("direct", direct, "", None), ("llamagate", url, auth, pid)]
            for kind, conc in levels:
                for rep in range(args.reps):
                    for name, base, key, cpu_of in pairs[::-1] if rep % 2 else pairs:
                        runs += measure(name, base, key, model, args, lua, stream_tokens, kind,
                                        conc, cpu_of, keep_alive=keep_alive)
            gw.terminate()
            gw.wait(30)
            table(medians(runs), title + (f"; medians of {args.reps} alternating runs"
                                          if args.reps > 1 else ""))

        if args.only in (None, "static"):
            port = free_port()
            procs.append(start(pinned(args.load_cpu, [sys.executable, "scripts/bench/fake_upstream.py",
                                                      "--port", str(port)]), dict(os.environ),
                               tmp / "fake.log"))
            static = f"http://127.0.0.1:{port}"
            wait_for(lambda: up(f"{static}/health"), "the static upstream", within=30)
            nginx = nginx_upstream(tmp, args.load_cpu)
            if nginx is not None:
                procs.append(nginx[0])
                pair(nginx[1][0], "fake", 200, "static (nginx, fixed JSON)", ("json",))
                # streams on kept-alive connections, as the OpenAI SDK's are
                pair(static, "fake", 200, "static (aiohttp, SSE 200 events)", ("sse",), True)
            else:
                pair(static, "fake", 200, "static (aiohttp: fixed JSON; SSE 200 events)",
                     keep_alive=True)
        if args.only in (None, "llama"):
            from llamagate.tiny_model import write_model
            model = write_model(tmp / "tiny.gguf")
            port = free_port()
            procs.append(start(pinned(args.load_cpu, [str(find_llama_server(None)), "-m", str(model),
                                                      "--port", str(port), "-np", "16", "-c", "16384",
                                                      "-t", "1", "--alias", "tiny",
                                                      # its host-memory prompt cache grows with every
                                                      # request and slows the later ones: direct runs
                                                      # first, so it would flatter the ratio
                                                      "--cache-ram", "0"]),
                               dict(os.environ), tmp / "llama.log"))
            llama = f"http://127.0.0.1:{port}"
            wait_for(lambda: up(f"{llama}/health"), "llama-server", within=60)
            pair(llama, "tiny", 256, "llama-server, tiny model (max_tokens 8; streams of 256 tokens)")
        if args.only in (None, "pool"):
            pool_row(args, tmp, lua, procs)
        if args.only in (None, "fleet"):
            from scripts.bench.fleet_row import fleet_row
            fleet_row(args, tmp, lua, procs)
        if args.only in (None, "cold"):
            cold_start(tmp)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
