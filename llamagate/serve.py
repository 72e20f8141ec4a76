"""`llamagate serve`: starts and stops the three tiers.

This process owns the backend (a supervised llama-server, or a BACKEND_URL it
watches), the health process and the gateway worker processes, and publishes
the backend's state to the runtime directory for them. SIGTERM/SIGINT drain
everything in order: gateway workers first, then the backend, then health.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import multiprocess

from backend.argv import ServerSpec, common_options
from backend.binary import BinaryNotFound, find_llama_server, version_of
from backend.external import ExternalBackend
from backend.models.errors import ModelsError
from backend.models.hub import HubClient
from backend.models.jobs import JobStore
from backend.models.overrides import OverrideStore
from backend.models.pull import PullManager, PullSettings
from backend.models.registry import ModelRegistry
from backend.router import RouterClient, args_to_options
from backend.settings import cache_ram, make_supervisor
from backend.supervisor import StartupError, Supervisor
from backend.upstreams import UpstreamSpec
from core import runtime
from core.config import Config
from core.entry import loop_factory
from gateway.policy import shared_limits
from gateway.policy.admission import Admission
from gateway.policy.admission_hub import AdmissionHub
from llamagate.banner import banner, diagnostics
from llamagate.children import Child, child_env
from llamagate.control import create_control_app
from llamagate.fleet import Fleet, FleetError, merge_last_used, read_profile
from llamagate.models import ModelChoice, choose_model
from llamagate.pool_watch import PoolWatch, prepare_pool

log = logging.getLogger("llamagate.serve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.runtime_dir = runtime.make_runtime_dir()
        self.phase = "starting"
        self.backend_state: dict[str, Any] = {"state": "starting", "restarts": 0}
        self.models: tuple[str, ...] = ()
        self.models_known = True  # False: BACKEND_URL's list not read yet
        self.llama_cpp: str | None = None  # the supervised llama-server's build (build_info)
        self.supervisor: Supervisor | None = None
        self.external: ExternalBackend | None = None
        self.pool: PoolWatch | None = None  # BACKEND_URLS, BACKENDS_FILE
        self.children: list[Child] = []
        self.stop_event = asyncio.Event()
        self.exit_code = 0
        # single | router (several models) | external (BACKEND_URL) | pool (BACKEND_URLS…)
        self.mode = "single"
        self.fleet: Fleet | None = None
        self.registry = ModelRegistry(config.models_dir,
                                      OverrideStore(config.data_dir / "model_overrides.json"))
        self.pulls = PullManager(
            JobStore(config.data_dir / "pulls.sqlite3", clock=time.time), config.models_dir,
            HubClient(config.hf_endpoint, config.hf_token),
            PullSettings(concurrency=config.pull_concurrency, resume=config.pull_resume,
                         retries=config.pull_retries),
            on_success=self._pulled)
        self.control_socket = self.runtime_dir / "control.sock"
        self.one_listener = config.port == config.port_health != 0
        self._preload: asyncio.Future[None] | None = None
        self.started = time.time()

    def publish(self) -> None:
        fleet = self.fleet
        if fleet is not None:
            self.models = tuple(fleet.models)
        pool = self.pool
        backend = self.backend_state if pool is None else pool.backend_state(self.backend_state)
        runtime.write_state(self.runtime_dir / runtime.SERVE_FILE, {
            "phase": self.phase, "backend": backend, "models": list(self.models),
            "upstreams": pool.published() if pool is not None else None,
            "models_known": self.models_known,
            "mode": self.mode, "profile": fleet.profile.name if fleet and fleet.profile else None,
            "model_states": fleet.published() if fleet else {},
            "auth": self.config.auth_enabled, "platform": self.config.platform.value,
            "started": self.started, "llama_cpp": self.llama_cpp})

    async def models_changed(self) -> None:
        """A rescan or an override edit: the served set follows when it is every model."""
        if self.fleet is not None and self.fleet.profile is None:
            try:
                await self.fleet.refresh()
            except FleetError as exc:
                log.warning("served models unchanged: %s", exc)
        self.publish()

    async def _pulled(self, path: Any) -> None:
        log.info("pull finished: %s; rescanning MODELS_DIR", path)
        await asyncio.to_thread(self.registry.scan)
        await self.models_changed()

    def _router_error(self, name: str) -> str | None:
        """The llama-server log line that best explains why `name` failed to load: the first
        error its child logged (the router prefixes a child's lines with `[port]`)."""
        port = self.fleet.ports.get(name) if self.fleet else None
        if self.supervisor is None or port is None:
            return None
        prefix = f"[{port}] "
        lines = [line[len(prefix):] for line in self.supervisor.log_tail if line.startswith(prefix)]
        for line in lines:
            if " E " in line and "error" in line.lower():
                return line.strip()[-300:]
        errors = [line for line in lines if " E " in line]
        return errors[0].strip()[-300:] if errors else None

    def _on_backend(self, snap: Any) -> None:
        # ready after a start, not after a hang that ended (unresponsive → ready)
        started = snap.state.value == "ready" and self.backend_state.get("state") == "starting"
        self.backend_state = {"state": snap.state.value, "restarts": snap.restarts, "pid": snap.pid,
                              "last_error": snap.last_error, "retry_at": snap.retry_at,
                              "load_seconds": snap.load_seconds}
        self.publish()
        if self.fleet is not None and started and snap.restarts > 0:
            # a restarted router starts with nothing loaded: preload the profile's models again
            self._preload = asyncio.ensure_future(self.fleet.preload())

    async def run(self) -> int:
        log.info("runtime directory %s", self.runtime_dir,
                 extra={"runtime_dir": str(self.runtime_dir)})
        self.publish()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        env = child_env(self.runtime_dir, self.config.gateway_workers)
        await asyncio.to_thread(self.registry.scan)
        control = web.AppRunner(create_control_app(self), access_log=None)
        await control.setup()
        await web.UnixSite(control, str(self.control_socket)).start()
        await self.pulls.start()
        # PORT == PORT_HEALTH (RunPod's default): one listener, the gateway's; the health
        # process answers the probes it forwards over a socket (gateway/observe/health_link.py)
        health_socket = self.runtime_dir / "health.sock" if self.one_listener else None
        health = Child("health", [sys.executable, "-m", "health.server",
                                  "--runtime-dir", str(self.runtime_dir),
                                  *(["--unix", str(health_socket)] if health_socket else [])], env)
        await health.start()
        health.supervise()
        self.children.append(health)
        try:
            wiring = await self._prepare_backend()
        except (StartupError, BinaryNotFound, OSError, ValueError, ModelsError, FleetError) as exc:
            log.error("startup failed: %s", exc)
            print(f"llamagate: startup failed: {exc}", file=sys.stderr)
            self.phase = "stopped"
            self.publish()
            await health.stop(5)
            await self.pulls.close()
            await control.cleanup()
            return 1
        wiring["control_socket"] = str(self.control_socket)
        if health_socket is not None:
            wiring["health_socket"] = str(health_socket)
        hub = None
        if self.config.gateway_workers > 1:  # one admission queue for all of them
            c = self.config
            hub = AdmissionHub(Admission(c.concurrency_limit, c.max_queue_size, c.queue_timeout),
                               self.runtime_dir / "admission.sock")
            await hub.start()
            wiring["admission_socket"] = str(hub.path)
            wiring["limits_file"] = str(self.runtime_dir / "limits.bin")  # per-key rate limits
            shared_limits.create(self.runtime_dir / "limits.bin", self.config.gateway_workers)
        workers = [Child(f"gateway-{i}", [sys.executable, "-m", "gateway.worker", "--wiring",
                                          json.dumps({**wiring, "worker_index": i})],
                         env, on_crash=functools.partial(self._worker_died, i))
                   for i in range(self.config.gateway_workers)]
        for w in workers:
            await w.start()
            w.supervise()
        self.children.extend(workers)
        tasks = [asyncio.create_task(self._heartbeat(), name="serve-heartbeat")]
        if self.supervisor is not None:
            tasks.append(asyncio.create_task(self._start_backend(), name="backend"))
        if self.external is not None:
            tasks.append(asyncio.create_task(self.external.follow(self._set_external),
                                             name="external-backend"))
        if self.pool is not None:
            tasks.append(asyncio.create_task(self.pool.run(self._pool_changed), name="pool"))
        if self.config.idle_shutdown_seconds:
            tasks.append(asyncio.create_task(self._idle_watch(), name="idle-watch"))
        await self.stop_event.wait()
        await self._shutdown(workers, health, tasks)
        if hub is not None:
            await hub.close()
        await self.pulls.close()
        await control.cleanup()
        return self.exit_code

    def _worker_died(self, index: int, pid: int) -> None:
        """What a crashed gateway worker held, given back before its restart: its heartbeat
        (it would read as a hung worker), its live gauges (several workers: its requests in
        flight and queued would be counted for good) and its requests against keys' limits."""
        runtime.forget_worker(self.runtime_dir, pid)
        if self.config.gateway_workers > 1:
            multiprocess.mark_process_dead(pid, str(self.runtime_dir / "metrics"))  # type: ignore[no-untyped-call]
            shared_limits.release_worker(self.runtime_dir / "limits.bin",
                                         self.config.gateway_workers, index)

    async def _prepare_backend(self) -> dict[str, Any]:
        config = self.config
        if config.pool:
            return await self._prepare_pool()
        if config.backend_url is not None:
            self.mode = "external"
            self.external = ExternalBackend(config.backend_url, config.backend_api_key)
            self.external.warn_if_keyless()
            # None: not up yet; read once it is, and until then the workers refuse inference
            listed = await self.external.model_names()
            self.models, self.models_known = listed or (), listed is not None
            names = "(read once it is up)" if listed is None else ", ".join(listed) or "(none)"
            self._announce(names, f"external {config.backend_url}", False)
            key_file = self.runtime_dir / "backend.key"  # `ps` shows the workers' command lines
            if config.backend_api_key:
                runtime.write_secret(key_file, config.backend_api_key)
            return {"backend_url": config.backend_url, "runtime_dir": str(self.runtime_dir),
                    "backend_key_file": str(key_file) if config.backend_api_key else None,
                    "models": list(self.models), "models_known": self.models_known}
        return await self._prepare_supervised(self._single_model())

    async def _prepare_supervised(self, choice: ModelChoice | None) -> dict[str, Any]:
        """The llama-server we start: one model, or the router for several (choice None)."""
        config = self.config
        binary = find_llama_server(config.llama_server_path)
        self.llama_cpp = await asyncio.to_thread(version_of, binary)
        key_file = self.runtime_dir / "backend.key"
        runtime.write_secret(key_file, secrets.token_urlsafe(32))
        port = config.port_backend or free_port()
        spec = ServerSpec(binary=binary, model_path=choice.path if choice else None,
                          alias=choice.name if choice else None, port=port,
                          api_key_file=key_file, ctx=config.ctx, parallel=config.parallel,
                          ngl=config.ngl, threads=config.threads,
                          sleep_idle_seconds=config.backend_sleep_seconds,
                          extra_args=config.extra_args,
                          cache_ram=cache_ram(config, choice.path if choice else None),
                          in_flight=config.concurrency_limit)
        if choice is None:
            return await self._prepare_router(spec, key_file)
        self.supervisor = make_supervisor(spec, config, self._on_backend)
        self.models = (choice.name,)
        self._announce(f"{choice.name} ({choice.path})",
                       f"{binary} on 127.0.0.1:{port} (build {binary.parent.name})", choice.demo)
        if not choice.path.is_file():
            raise FileNotFoundError(f"model file not found: {choice.path} (MODEL_PATH)")
        return {"backend_url": self.supervisor.url, "backend_key_file": str(key_file),
                "runtime_dir": str(self.runtime_dir), "models": list(self.models)}

    async def _prepare_pool(self) -> dict[str, Any]:
        """Several llama-servers (BACKEND_URLS, BACKENDS_FILE), with BACKEND_URL's or a local
        one started from MODEL_PATH; the gateway routes among them (gateway/upstream/pool.py)."""
        config = self.config
        first: UpstreamSpec | None = None
        if config.model_path is not None:
            local = await self._prepare_supervised(choose_model(config))
            key = await asyncio.to_thread(Path(local["backend_key_file"]).read_text)
            first = UpstreamSpec(local["backend_url"], key.strip())
        elif config.backend_url is not None:
            first = UpstreamSpec(config.backend_url, config.backend_api_key)
        self.pool, upstreams_file = await prepare_pool(config, first, self.runtime_dir)
        self.mode, self.models, self.models_known = "pool", (), False
        specs = self.pool.specs
        if config.model_path is None:
            self._announce("(read from each upstream once it is up)",
                           f"pool of {len(specs)}: " + ", ".join(s.name for s in specs), False)
        return {"backend_url": specs[0].url, "runtime_dir": str(self.runtime_dir),
                "upstreams_file": str(upstreams_file), "models": [], "models_known": False}

    def _pool_changed(self) -> None:
        assert self.pool is not None
        models = self.pool.models()
        if models is not None and (models != self.models or not self.models_known):
            log.info("pool models: %s", ", ".join(models) or "(none listed)")
            self.models, self.models_known = models, True
        if self.pool.ready and self.phase == "starting":
            self.phase = "running"
        self.publish()

    def _single_model(self) -> ModelChoice | None:
        """MODEL_PATH, the one servable model in MODELS_DIR, or the demo; None: several."""
        config = self.config
        if config.model_path is not None or config.profile is not None:
            return choose_model(config) if config.profile is None else None
        servable = [e for e in self.registry.entries() if e.servable and e.path is not None]
        if len(servable) > 1:
            return None
        if len(servable) == 1 and servable[0].path is not None:
            return ModelChoice(config.model_name or servable[0].name, servable[0].path)
        return choose_model(config)

    async def _prepare_router(self, spec: ServerSpec, key_file: Any) -> dict[str, Any]:
        """Several models: llama-server's router mode, fed a preset we write (docs/models.md)."""
        config = self.config
        self.mode = "router"
        preset = self.runtime_dir / "models.ini"
        spec = replace(spec, models_preset=preset, models_max=config.max_loaded_models)
        fleet = Fleet(config, self.registry, preset,
                      common_options(spec) + args_to_options(config.extra_args))
        profile = None if config.profile is None else await asyncio.to_thread(
            read_profile, config, self.registry, config.profile)
        fleet.configure(profile)
        fleet.on_change = self.publish
        fleet.last_used = lambda: merge_last_used(runtime.read_workers(self.runtime_dir))
        self.fleet = fleet
        self.supervisor = make_supervisor(spec, config, self._on_backend)
        names = ", ".join(fleet.models)
        self._announce(f"{len(fleet.models)} models ({names}); profile "
                       f"{profile.name if profile else '(all in MODELS_DIR)'}, at most "
                       f"{config.max_loaded_models} loaded",
                       f"{spec.binary} router on 127.0.0.1:{spec.port}", False)
        return {"backend_url": self.supervisor.url, "backend_key_file": str(key_file),
                "runtime_dir": str(self.runtime_dir), "models": list(fleet.models)}

    def _announce(self, model: str, backend: str, demo: bool) -> None:
        info = diagnostics(self.config, model, backend)
        print(banner(info, self.config, demo), file=sys.stderr)
        log.info("boot diagnostics", extra=info)

    async def _start_backend(self) -> None:
        assert self.supervisor is not None
        try:
            await self.supervisor.start()
        except StartupError as exc:
            log.error("backend failed to start: %s", exc)
            print(f"llamagate: backend failed to start: {exc}", file=sys.stderr)
            self.exit_code = 1
            self.stop_event.set()
            return
        self.phase = "running"
        self.publish()
        if self.fleet is None:
            await self.supervisor.watch()
            return
        key = self.supervisor.spec.api_key_file.read_text().strip()
        async with aiohttp.ClientSession() as session:
            client = RouterClient(self.supervisor.url, key, session)
            watch = asyncio.create_task(self.fleet.watch(client, self._router_error))
            try:
                await self.supervisor.watch()
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch

    def _set_external(self, state: str, ready: bool, models: tuple[str, ...] | None) -> None:
        if models is not None and (models != self.models or not self.models_known):
            log.info("backend models: %s", ", ".join(models) or "(none listed)")
            self.models, self.models_known = models, True
        self.backend_state = {"state": state, "restarts": 0}
        if ready and self.phase == "starting":
            self.phase = "running"
        self.publish()

    async def _heartbeat(self) -> None:
        while True:
            self.publish()
            await asyncio.sleep(runtime.HEARTBEAT)  # heartbeat period

    async def _idle_watch(self) -> None:
        limit = self.config.idle_shutdown_seconds
        while not self.stop_event.is_set():
            workers = runtime.read_workers(self.runtime_dir)
            last = max([w.get("last_activity", 0.0) for w in workers] + [self.started])
            busy = any(w.get("in_flight") or w.get("queued") for w in workers)
            if not busy and time.time() - last >= limit:
                log.info("idle for %ss: shutting down (IDLE_SHUTDOWN_SECONDS)", limit)
                self.stop_event.set()
                return
            await asyncio.sleep(min(1.0, limit / 4))  # idle check period

    def _on_sighup(self) -> None:
        # Each gateway worker owns its keyring; SIGHUP to `llamagate serve` reloads them all.
        # A SIGHUP to the process group reaches the workers twice: a reload is idempotent.
        if not self.config.auth_enabled:
            log.info("SIGHUP ignored: AUTH_ENABLED=false, no keys to reload")
            return
        log.info("SIGHUP: the gateway workers reload the keys file")
        for child in self.children:
            if child.name.startswith("gateway-"):
                child.signal(signal.SIGHUP)

    def _on_signal(self) -> None:
        if self.stop_event.is_set():
            # A second signal shortens the drain. SIGUSR1, which no terminal sends: a
            # Ctrl-C (SIGINT to the process group) reaches the workers as well as serve.
            for child in self.children:
                if child.name.startswith("gateway-"):
                    child.signal(signal.SIGUSR1)
        self.stop_event.set()

    async def _shutdown(self, workers: list[Child], health: Child,
                        tasks: list[asyncio.Task[None]]) -> None:
        self.phase = "draining"
        self.publish()
        log.info("shutting down")
        grace = self.config.shutdown_grace_seconds
        await asyncio.gather(*(w.stop(grace + 10) for w in workers))
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.supervisor is not None:
            await self.supervisor.stop()
        self.phase = "stopped"
        self.publish()
        await health.stop(5)
        with contextlib.suppress(OSError):
            for path in sorted(self.runtime_dir.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            self.runtime_dir.rmdir()


def serve(config: Config) -> int:
    # until run() installs its handler, a SIGHUP (a terminal hangup) must not end serve
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(Service(config).run())

