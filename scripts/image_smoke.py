"""Run the built CPU image as a user would and check it; scripts/image_smoke.sh builds the image
and then runs this.

    .venv/bin/python scripts/image_smoke.py --image localhost/llamagate-smoke:cpu

One container, started with podman on a bind-mounted DATA_DIR that is root's and 0700 (as a
platform's volume often is), with no model, so the image generates and serves its demo model.
Checked, in order:

1. /ping on the health port answers 204 while the model loads, then 200, and nothing else.
2. llama-server has one of its CPU backend modules mapped (GGML_BACKEND_DL), and on a host
   with AVX-512 not one that stops at AVX2.
3. Every process in the container runs as uid/gid 10001, PID 1 being tini.
4. DATA_DIR is now uid 10001's, and `llamagate keys generate`, run by `podman exec` (as root,
   exec's default), writes a key file that is uid 10001's too.
5. A chat completion through the openai SDK with that key; a wrong key gets 401.
6. The image's HEALTHCHECK reports healthy.
7. `podman stop` while a streamed completion is in flight: the gateway's drain finds it in
   flight and lets it end whole, and the container exits 0 before the stop grace would have
   killed it.

Every wait has a deadline; on a failure the container's last log lines are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import httpx2
import openai

PODMAN: Final = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
SERVICE_UID: Final = 10001
BACKEND_DIR: Final = "/usr/local/lib/llama-server"
# ggml's x86 CPU variants that stop short of AVX-512 (ggml/src/CMakeLists.txt)
BELOW_AVX512: Final = {"x64", "sse42", "sandybridge", "ivybridge", "piledriver", "haswell", "alderlake"}
START_WITHIN: Final = 180.0  # the demo model is generated first
CALIBRATION_TOKENS: Final = 512
# The stream in flight at the stop must end within SHUTDOWN_GRACE_SECONDS' 30 s: about 3 s of
# tokens by the estimate, which is low by a factor that grows with the length (each token
# attends to all before it), 2 to 4 here at a few thousand tokens; at least 2048 tokens, more
# than the socket buffers hold (see check_stop_drains).
STREAM_SECONDS: Final = 3.0
STREAM_MIN_TOKENS: Final = 2048
STREAM_MAX_TOKENS: Final = 8192
STOP_GRACE: Final = 60  # docker-compose.yml's stop_grace_period


class SmokeFailure(Exception):
    pass


def check(condition: object, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def say(message: str) -> None:
    print(f">> {message}", file=sys.stderr, flush=True)


def podman(*args: str, timeout: float = 60, check_rc: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check_rc and done.returncode != 0:
        raise SmokeFailure(f"podman {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(what: str, probe: Callable[[], bool], within: float, every: float = 0.1) -> None:
    deadline = time.monotonic() + within
    while not probe():
        if time.monotonic() > deadline:
            raise SmokeFailure(f"{what}: not within {within:.0f} s")
        time.sleep(every)


def ping(port: int) -> int | None:
    """The health port's /ping status, None while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


class Container:
    def __init__(self, image: str, data_dir: Path) -> None:
        self.image = image
        self.data_dir = data_dir
        self.name = f"llamagate-smoke-{os.getpid()}"
        self.port = free_port()
        self.health_port = free_port()

    def start(self) -> None:
        podman("run", "--detach", "--name", self.name, "--network", "host", "--ulimit", "host",
               "--volume", f"{self.data_dir}:/data",
               "--env", f"PORT={self.port}", "--env", f"PORT_HEALTH={self.health_port}",
               # one slot with room for the long stream of the stop check
               "--env", "PARALLEL=1", "--env", f"CTX={STREAM_MAX_TOKENS + 1024}",
               self.image)

    def state(self) -> dict[str, Any]:
        data = json.loads(podman("inspect", self.name).stdout)
        state: dict[str, Any] = data[0]["State"]
        return state

    def running(self) -> bool:
        return bool(self.state()["Running"])

    def exec(self, *argv: str, user: str | None = None) -> str:
        as_user = ["--user", user] if user else []
        return podman("exec", *as_user, self.name, *argv, timeout=60).stdout

    def logs(self) -> str:
        done = podman("logs", self.name, check_rc=False)
        return done.stdout + done.stderr

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check_rc=False)


def check_ping_sequence(c: Container) -> None:
    seen: list[int] = []
    deadline = time.monotonic() + START_WITHIN
    while not seen or seen[-1] != 200:
        check(time.monotonic() < deadline, f"/ping never answered 200 within {START_WITHIN:.0f} s: {seen}")
        status = ping(c.health_port)
        if status is None:
            check(c.running(), "the container exited while starting")
        elif not seen or seen[-1] != status:
            seen.append(status)
        time.sleep(0.02)
    check(seen == [204, 200], f"/ping went {seen}, expected 204 (loading) then 200")
    say("/ping: 204 while loading, then 200")


# Run in the container as the service user (so it may read the service's /proc entries):
# each process's ids, argv and the files it has mapped.
PROCESSES: Final = """
import json, os
out = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        status = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status").read().splitlines())
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
        maps = {l.split()[-1] for l in open(f"/proc/{pid}/maps") if "/" in l}
    except OSError:
        continue
    out.append({"pid": int(pid), "uid": status["Uid"].split(), "gid": status["Gid"].split(),
                "argv": [a.decode() for a in argv if a], "maps": sorted(maps)})
print(json.dumps(out))
"""


def processes(c: Container) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(c.exec("python", "-c", PROCESSES, user=str(SERVICE_UID)))
    return found


def check_backend_module(procs: list[dict[str, Any]]) -> None:
    [server] = [p for p in procs if p["argv"] and p["argv"][0].endswith("/llama-server")]
    module = re.compile(rf"{re.escape(BACKEND_DIR)}/libggml-cpu-([\w.]+)\.so")
    found = [m.group(1) for path in server["maps"] if (m := module.fullmatch(path))]
    check(len(found) == 1, f"llama-server has mapped {found or 'no'} CPU backend module from {BACKEND_DIR}")
    flags = set(re.findall(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)[0].split())
    if "avx512f" in flags:
        check(found[0] not in BELOW_AVX512, f"this host has AVX-512, yet llama-server chose {found[0]}")
    say(f"llama-server loaded ggml's CPU backend variant {found[0]} ({BACKEND_DIR})")


def check_users(procs: list[dict[str, Any]]) -> None:
    wrong = [p for p in procs
             if set(p["uid"]) != {str(SERVICE_UID)} or set(p["gid"]) != {str(SERVICE_UID)}]
    check(not wrong, f"processes not running as {SERVICE_UID}: {wrong}")
    [init] = [p for p in procs if p["pid"] == 1]
    check(os.path.basename(init["argv"][0]) == "tini", f"PID 1 is {init['argv']}, not tini")
    names = sorted({os.path.basename(p["argv"][0]) for p in procs if p["argv"]})
    say(f"{len(procs)} processes, all uid/gid {SERVICE_UID}: {', '.join(names)}")


def make_key(c: Container) -> str:
    data = c.data_dir.stat()
    check(data.st_uid == SERVICE_UID, f"DATA_DIR is still owned by uid {data.st_uid}")
    out = json.loads(c.exec("llamagate", "keys", "generate", "--name", "image-smoke", "--json"))
    keys = c.data_dir / "keys.json"
    check(keys.stat().st_uid == SERVICE_UID, f"keys.json written by exec is uid {keys.stat().st_uid}'s")
    secret: str = out["secret"]
    # the gateway reads the key file again every KEYS_RELOAD_INTERVAL (2 s)
    wait_for("the gateway to accept the new key", lambda: models_status(c, secret) == 200, within=15)
    say(f"root-owned DATA_DIR now uid {SERVICE_UID}'s; `podman exec … llamagate keys generate` "
        f"made key {out['id']} as uid {SERVICE_UID}, and the gateway accepts it")
    return secret


def models_status(c: Container, key: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{c.port}/v1/models",
                                     headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code


def client(c: Container, key: str, http_client: httpx2.Client | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{c.port}/v1", api_key=key, max_retries=0, timeout=30,
                         http_client=http_client)


def check_completion(c: Container, key: str) -> str:
    sdk = client(c, key)
    model = sdk.models.list().data[0].id
    reply = sdk.chat.completions.create(model=model, max_tokens=8,
                                        messages=[{"role": "user", "content": "Say hello."}])
    check(reply.choices[0].finish_reason == "length", f"finish_reason {reply.choices[0].finish_reason}")
    check(reply.usage is not None and reply.usage.completion_tokens == 8, f"usage {reply.usage}")
    try:
        client(c, "sk-not-a-key").models.list()
    except openai.AuthenticationError:
        pass
    else:
        raise SmokeFailure("a wrong key was accepted")
    say(f"chat completion through the openai SDK on {model}; a wrong key gets 401")
    return model


def check_healthcheck(c: Container) -> None:
    done = podman("healthcheck", "run", c.name, check_rc=False)
    check(done.returncode == 0, f"HEALTHCHECK failed: {done.stdout.strip()} {done.stderr.strip()}")
    state = c.state()
    health = state.get("Health") or state.get("Healthcheck") or {}
    check(health.get("Status") == "healthy", f"health status {health.get('Status')!r}")
    say("HEALTHCHECK: healthy")


def stream_tokens(c: Container, key: str, model: str) -> int:
    """Tokens that take the tiny model about STREAM_SECONDS here, by the rate of a short stream:
    long enough to be in flight when the stop lands, short enough to finish within the drain's
    grace, however busy the machine (thousands of tokens a second idle, hundreds when loaded)."""
    began = time.monotonic()
    # streamed, as the measured one will be: the SDK's reading of each event is part of the rate
    for _ in client(c, key).chat.completions.create(
            model=model, max_tokens=CALIBRATION_TOKENS, stream=True,
            messages=[{"role": "user", "content": "Count."}]):
        pass
    rate = CALIBRATION_TOKENS / (time.monotonic() - began)
    return max(STREAM_MIN_TOKENS, min(STREAM_MAX_TOKENS, int(rate * STREAM_SECONDS)))


def check_stop_drains(c: Container, key: str, model: str) -> None:
    tokens = stream_tokens(c, key, model)
    # A receive buffer of a few KB, and the stream is not read on until the drain has begun:
    # its events (about 200 bytes a token) cannot all be sent before, so the request is in
    # flight at the stop however fast the machine generates.
    small_window = httpx2.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    stream = client(c, key, httpx2.Client(transport=small_window)).chat.completions.create(
        model=model, max_tokens=tokens, stream=True,
        messages=[{"role": "user", "content": "Tell a long story."}])
    chunks = iter(stream)
    next(chunks)
    stopped: dict[str, Any] = {}

    def stop() -> None:
        began = time.monotonic()
        stopped["done"] = podman("stop", "--time", str(STOP_GRACE), c.name, timeout=STOP_GRACE + 30,
                                 check_rc=False)
        stopped["seconds"] = time.monotonic() - began

    stopper = threading.Thread(target=stop)
    stopper.start()
    # the health tier says 503 once serve drains
    wait_for("/ping 503 after the stop", lambda: ping(c.health_port) == 503, within=15, every=0.02)
    finish = None
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    check(finish == "length", f"the stream in flight at the stop ended with finish_reason {finish!r}")
    stopper.join(STOP_GRACE + 40)
    check("done" in stopped, "podman stop did not return")
    check(stopped["done"].returncode == 0, f"podman stop: {stopped['done'].stderr.strip()}")
    code = c.state()["ExitCode"]
    check(code == 0, f"the container exited {code} (137: killed when the grace ran out)")
    check(stopped["seconds"] < STOP_GRACE, f"stop took {stopped['seconds']:.1f} s")
    # the gateway's own account: the drain began with the stream in flight, which then completed
    events = [json.loads(line) for line in c.logs().splitlines() if line.startswith("{")]
    drains = [e for e in events if e.get("msg") == "draining"]
    check(drains and drains[0]["in_flight"] >= 1, f"the drain did not find the stream in flight: {drains}")
    access = [e for e in events if e.get("msg") == "request" and e.get("stream")][-1]
    check(access["ended"] == "completed" and access["tokens_out"] == tokens,
          f"the stream's access line: {access}")
    say(f"podman stop while a {tokens}-token stream was in flight: the gateway drained it whole, and "
        f"the container exited 0 after {stopped['seconds']:.1f} s (grace {STOP_GRACE} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="llamagate-smoke-data-"))
    os.chown(data_dir, 0, 0)
    data_dir.chmod(0o700)
    c = Container(args.image, data_dir)
    try:
        c.start()
        check_ping_sequence(c)
        procs = processes(c)
        check_backend_module(procs)
        check_users(procs)
        key = make_key(c)
        model = check_completion(c, key)
        check_healthcheck(c)
        check_stop_drains(c, key, model)
    except (SmokeFailure, openai.OpenAIError, subprocess.TimeoutExpired) as failure:
        print(f"image smoke FAILED: {failure}", file=sys.stderr)
        print("--- container log (last 60 lines) ---", file=sys.stderr)
        print("\n".join(c.logs().splitlines()[-60:]), file=sys.stderr)
        return 1
    finally:
        c.remove()
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
