"""The upstream pool against three real llama-servers (tiny model; two serve model A, one
serves A and B through --alias A,B) and one `llamagate serve` in front of them (BACKEND_URLS
for two, with BACKEND_API_KEY; BACKENDS_FILE for the third, with a key of its own).

Load spreads over the upstreams serving a model and a model goes only where it is served;
an upstream SIGKILLed under load is ejected within a second and only streams already on
it fail, each with an error event; a SIGSTOPped one's requests time out, it is ejected and
avoided; with prefix affinity, multi-turn conversations reuse far more of llama-server's
prompt cache than with least-request routing alone."""

from __future__ import annotations

import json
import random
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.support.llama import LlamaProcess
from tests.support.metrics import Samples
from tests.support.service import Service
from tests.support.wait import wait_for

pytestmark = pytest.mark.llama_server  # every test here runs the real binary

REQUEST_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
              ) -> Iterator[list[LlamaProcess]]:
    tmp = tmp_path_factory.mktemp("upstreams")
    shared, own = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    servers = [LlamaProcess(tmp, tiny_model, "A", shared), LlamaProcess(tmp, tiny_model, "A", shared),
               LlamaProcess(tmp, tiny_model, "A,B", own)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def pool_service(tmp: Path, servers: list[LlamaProcess], **env: str) -> Service:
    backends = tmp / "backends.yaml"
    backends.write_text(yaml.safe_dump({"backends": [{"url": servers[2].url,
                                                      "key": servers[2].key}]}))
    return Service(tmp, {"BACKEND_URLS": f"{servers[0].url},{servers[1].url}",
                         "BACKEND_API_KEY": servers[0].key, "BACKENDS_FILE": str(backends),
                         "AUTH_ENABLED": "false", "LOG_LEVEL": "warning", **env})


def states(svc: Service) -> dict[str, str]:
    """Each upstream's state as the gateway worker routes by it (its own /health)."""
    body = requests.get(f"{svc.url}/health", timeout=5).json()
    return {u["name"]: u["state"] for u in body["upstreams"]}


def all_ready(svc: Service) -> bool:
    return set(states(svc).values()) == {"ready"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstreams: list[LlamaProcess]
            ) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("pool")
    svc = pool_service(tmp, upstreams, REQUEST_TIMEOUT=f"{REQUEST_TIMEOUT:g}")
    with svc.running():
        wait_for(lambda: all_ready(svc), "every upstream ready", within=30)
        yield svc


def sent(svc: Service) -> dict[str, float]:
    samples = Samples.parse(requests.get(f"{svc.url}/metrics", timeout=5).text)
    return {dict(labels)["upstream"]: value for (name, labels), value in samples.items()
            if name == "llamagate_upstream_requests_total"}


def chat(svc: Service, model: str, text: str, max_tokens: int = 8,
         timeout: float = 60) -> requests.Response:
    return requests.post(f"{svc.url}/v1/chat/completions", timeout=timeout, json={
        "model": model, "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens})


def test_load_spreads_over_the_upstreams_of_a_model_and_b_goes_only_to_its_own(
        gateway: Service, upstreams: list[LlamaProcess]) -> None:
    names = [u.name for u in upstreams]
    assert requests.get(f"{gateway.url}/v1/models", timeout=5).json()["data"] == [
        {"id": "A", "object": "model", "created": 0, "owned_by": "llamagate"},
        {"id": "B", "object": "model", "created": 0, "owned_by": "llamagate"}]
    before = sent(gateway)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: chat(gateway, "A", f"question number {i}"), range(48)))
    assert [r.status_code for r in answers] == [200] * 48
    after = sent(gateway)
    share = {n: after[n] - before.get(n, 0) for n in names}
    assert sum(share.values()) == 48
    assert all(count >= 48 * 0.15 for count in share.values()), share

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: chat(gateway, "B", f"other {i}"), range(12)))
    assert [r.status_code for r in answers] == [200] * 12
    final = sent(gateway)
    assert {n: final[n] - after[n] for n in names} == {names[0]: 0, names[1]: 0, names[2]: 12}

    # the health tier: /ping 200, /health lists each upstream (once the worker's heartbeat
    # and serve's next /slots read say they are idle again)
    assert gateway.ping() == 200

    def idle() -> dict[str, dict[str, Any]] | None:
        shown = {u["name"]: u for u in gateway.health()["upstreams"]}
        return shown if all(u["in_flight"] == 0 and u["free_slots"] == 2
                            for u in shown.values()) else None

    shown = wait_for(idle, "the upstreams idle in /health", within=10)
    assert set(shown) == set(names)
    assert shown[names[2]]["models"] == ["A", "B"]
    for entry in shown.values():
        assert entry["state"] == "ready" and entry["slots"] == 2 and entry["busy_slots"] == 0
        assert entry["ejection_reason"] is None


class Load:
    """8 clients sending chats for A, every other one streamed, until stopped; each
    request's outcome kept."""

    def __init__(self, svc: Service, clients: int = 8) -> None:
        self.svc = svc
        self.stop = threading.Event()
        self.outcomes: list[dict[str, Any]] = []
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _client(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            stream = (i + n) % 2 == 0
            body = {"model": "A", "messages": [{"role": "user", "content": f"client {i} turn {n}"}],
                    "max_tokens": 200 if stream else 16, "stream": stream}
            try:
                with requests.post(f"{self.svc.url}/v1/chat/completions", json=body,
                                   stream=stream, timeout=60) as r:
                    text = b"".join(r.iter_content(None)).decode()
            except requests.RequestException as exc:
                self.outcomes.append({"stream": stream, "status": None, "text": repr(exc),
                                      "at": time.monotonic()})
                continue
            self.outcomes.append({"stream": stream, "status": r.status_code, "text": text,
                                  "at": time.monotonic()})


def test_a_killed_upstream_is_ejected_within_a_second_and_only_its_streams_fail(
        gateway: Service, upstreams: list[LlamaProcess]) -> None:
    victim = upstreams[0]
    with Load(gateway) as load:
        start = sent(gateway).get(victim.name, 0)
        wait_for(lambda: sent(gateway)[victim.name] >= start + 6, "requests on the victim",
                 within=30)
        victim.kill()
        killed = time.monotonic()
        ejected = wait_for(lambda: states(gateway)[victim.name] != "ready" and time.monotonic(),
                           "the killed upstream out of routing", within=5)
        wait_for(lambda: sum(o["at"] > killed for o in load.outcomes) >= 40,
                 "requests after the kill", within=60)
    assert ejected - killed <= 1.0, f"taken out after {ejected - killed:.2f}s"
    assert states(gateway)[victim.name] in ("ejected", "unreachable")
    assert gateway.ping() == 200  # two upstreams still serve

    failed = [o for o in load.outcomes if o["status"] != 200 or '"error"' in o["text"]]
    for outcome in failed:
        # only a stream already on the killed upstream: its head was sent, and it ends with
        # an error event saying why
        assert outcome["stream"] and outcome["status"] == 200, outcome
        last = [line for line in outcome["text"].splitlines() if line.startswith("data: ")][-1]
        error = json.loads(last.removeprefix("data: "))["error"]
        assert error["code"] == "backend_disconnected", outcome
    print(f"\nSIGKILL under load: {len(load.outcomes)} requests, {len(failed)} streams cut "
          f"with an error event, out of routing after {ejected - killed:.3f}s")

    # back on the same port: probed ready, then ready at once if the probe saw it down, else
    # on probation until it answers one request
    victim.start()
    wait_for(lambda: states(gateway)[victim.name] in ("ready", "probation"),
             "the restarted upstream back", within=20)
    before = sent(gateway)[victim.name]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: chat(gateway, "A", f"after restart {i}"), range(24)))
    assert [r.status_code for r in answers] == [200] * 24
    assert sent(gateway)[victim.name] > before
    assert states(gateway)[victim.name] == "ready"


def test_a_stopped_upstream_times_out_is_ejected_and_then_avoided(
        gateway: Service, upstreams: list[LlamaProcess]) -> None:
    victim = upstreams[1]
    victim.signal(signal.SIGSTOP)
    try:
        def timed(i: int) -> tuple[int, float]:
            t = time.monotonic()
            r = chat(gateway, "A", f"while stopped {i}")
            return r.status_code, time.monotonic() - t

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(timed, range(24)))
        timeouts = [elapsed for status, elapsed in results if status == 504]
        assert timeouts, "no request reached the stopped upstream"
        assert {status for status, _ in results} <= {200, 504}, results
        for elapsed in timeouts:  # REQUEST_TIMEOUT, end to end
            assert REQUEST_TIMEOUT <= elapsed <= REQUEST_TIMEOUT + 1.5, results
        wait_for(lambda: states(gateway)[victim.name] in ("ejected", "unreachable"),
                 "the stopped upstream ejected", within=15)
        before = sent(gateway)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: chat(gateway, "A", f"avoided {i}"), range(12)))
        assert [r.status_code for r in answers] == [200] * 12
        assert sent(gateway)[victim.name] == before[victim.name]
    finally:
        victim.signal(signal.SIGCONT)
    wait_for(lambda: states(gateway)[victim.name] == "ready", "the resumed upstream back",
             within=20)


WORDS = ("river", "mountain", "lantern", "copper", "violet", "harbor", "meadow", "signal",
         "orbit", "canyon", "ember", "glacier", "willow", "thunder", "marble", "falcon",
         "prairie", "cobalt", "harvest", "beacon")
ASK = ("what", "when", "where", "why", "how", "is", "the", "a", "of", "this", "that", "about",
       "more", "tell", "me")


def conversation_text(run: str, conversation: int, turn: int) -> str:
    """A chat about a document: the first turn brings it (150 words, about 750 tokens), the
    later ones ask short questions; each different for every run, conversation and turn."""
    rng = random.Random(f"{run}-{conversation}-{turn}")
    return " ".join(rng.choice(WORDS) for _ in range(150)) if turn == 0 \
        else " ".join(rng.choice(ASK) for _ in range(8))


def cache_ratio(svc: Service, run: str, conversations: int = 20, turns: int = 5) -> float:
    """Multi-turn chats taking turns, as many users do: every conversation's first turn, then
    every one's second, and so on, four requests at a time. The share of the prompt tokens
    llama-server took from its cache (timings.cache_n) over all turns."""
    cached, processed = 0, 0
    lock = threading.Lock()
    chats: list[list[dict[str, str]]] = [[] for _ in range(conversations)]

    def turn(c: int, n: int) -> None:
        nonlocal cached, processed
        messages = chats[c]
        messages.append({"role": "user", "content": conversation_text(run, c, n)})
        r = requests.post(f"{svc.url}/v1/chat/completions", timeout=60, json={
            "model": "A", "messages": messages, "max_tokens": 8})
        assert r.status_code == 200, r.text
        answer = r.json()
        with lock:
            cached += answer["timings"]["cache_n"]
            processed += answer["timings"]["prompt_n"]
        messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})

    with ThreadPoolExecutor(4) as pool:
        for n in range(turns):
            list(pool.map(lambda c: turn(c, n), range(conversations)))  # noqa: B023
    return cached / (cached + processed)


def test_affinity_keeps_conversations_on_their_prompt_cache(
        tmp_path: Path, upstreams: list[LlamaProcess]) -> None:
    ratios = {}
    for affinity in ("true", "false"):
        (tmp_path / affinity).mkdir()
        svc = pool_service(tmp_path / affinity, upstreams, POOL_AFFINITY=affinity)
        with svc.running():
            wait_for(lambda: all_ready(svc), "every upstream ready", within=30)  # noqa: B023
            ratios[affinity] = cache_ratio(svc, f"run-{affinity}")
    print(f"\nprompt tokens from llama-server's cache: affinity {ratios['true']:.3f}, "
          f"least-request {ratios['false']:.3f}")
    assert ratios["true"] >= ratios["false"] + 0.15, ratios


def test_a_local_llama_server_joins_the_pool(tmp_path: Path, tiny_model: Path,
                                             upstreams: list[LlamaProcess]) -> None:
    """MODEL_PATH with BACKEND_URLS: serve starts its own llama-server, as the pool's first
    upstream, beside the remote one, and both take requests for the model they serve."""
    remote = upstreams[0]
    svc = Service(tmp_path, {"MODEL_PATH": str(tiny_model), "MODEL_NAME": "A",
                             "BACKEND_URLS": remote.url, "BACKEND_API_KEY": remote.key,
                             "AUTH_ENABLED": "false", "LOG_LEVEL": "warning", "PARALLEL": "2"})
    with svc.running():
        wait_for(lambda: len(states(svc)) == 2 and all_ready(svc), "both upstreams ready",
                 within=30)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: chat(svc, "A", f"local or remote {i}"), range(24)))
        assert [r.status_code for r in answers] == [200] * 24
        counts = sent(svc)
        local = next(name for name in counts if name != remote.name)
        assert counts[local] > 0 and counts[remote.name] > 0, counts
