"""Metrics read at scrape time from the serve process's published state and from /proc: the
backend (up, restarts, its model's cold start), the build, and the CPU and memory of every
process of the service, llama-server included (its prompt cache is what grows: issue 22).

Every gateway worker reads the same files, so whichever worker a scrape reaches reports the
whole service, as the multiprocess counters do.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core import runtime

_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")


def llamagate_version() -> str:
    try:
        return importlib.metadata.version("llamagate")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cuda_version() -> str:
    """The CUDA the image was built on (NVIDIA's base images set CUDA_VERSION), or none."""
    return os.environ.get("CUDA_VERSION") or "none"


class BackendCollector(Collector):
    """llamagate_backend_up, _restarts_total, _load_seconds and llamagate_build_info, from the
    state the serve process publishes (``serve_state``: None without one, BACKEND_URL)."""

    def __init__(self, ready: Callable[[], bool], serve_state: Callable[[], dict[str, Any] | None]
                 ) -> None:
        self._ready = ready
        self._serve_state = serve_state
        self._version = llamagate_version()
        self._cuda = cuda_version()

    def collect(self) -> Iterable[Metric]:
        state = self._serve_state() or {}
        backend = state.get("backend") or {}
        yield GaugeMetricFamily("llamagate_backend_up", "1 when the backend is ready",
                                value=int(self._ready()))
        yield CounterMetricFamily("llamagate_backend_restarts",
                                  "Restarts of the supervised backend since the service started",
                                  value=int(backend.get("restarts") or 0))
        loaded = backend.get("load_seconds")
        if isinstance(loaded, (int, float)):
            yield GaugeMetricFamily(
                "llamagate_backend_load_seconds",
                "Seconds the supervised llama-server last took from start to ready: its "
                "model's cold start", value=float(loaded))
        info = GaugeMetricFamily("llamagate_build_info",
                                 "1, labelled with llamagate's version, llama-server's build "
                                 "(external: BACKEND_URL) and the CUDA the image was built on",
                                 labels=["version", "llama_cpp", "cuda"])
        info.add_metric([self._version, str(state.get("llama_cpp") or "external"), self._cuda], 1)
        yield info


class ProcessCollector(Collector):
    """llamagate_process_cpu_seconds_total and llamagate_process_resident_memory_bytes, by
    process (serve, gateway, llama-server) and pid."""

    def __init__(self, processes: Callable[[], list[tuple[str, int]]]) -> None:
        self._processes = processes

    def collect(self) -> Iterable[Metric]:
        cpu = CounterMetricFamily("llamagate_process_cpu_seconds",
                                  "CPU time (user and system) of each of the service's processes",
                                  labels=["process", "pid"])
        rss = GaugeMetricFamily("llamagate_process_resident_memory_bytes",
                                "Resident memory of each of the service's processes",
                                labels=["process", "pid"])
        for role, pid in self._processes():
            read = _read_proc(pid)
            if read is not None:
                cpu.add_metric([role, str(pid)], read[0])
                rss.add_metric([role, str(pid)], read[1])
        yield cpu
        yield rss


def _read_proc(pid: int) -> tuple[float, float] | None:
    """(CPU seconds, resident bytes) of a live process, None for one that is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        statm = Path(f"/proc/{pid}/statm").read_bytes()
    except OSError:
        return None
    # the command may hold spaces and parentheses: the fields after the last ')'
    fields = stat.rsplit(b")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _TICKS, int(statm.split()[1]) * _PAGE


def service_processes(runtime_dir: Path | None, serve_state: Callable[[], dict[str, Any] | None]
                      ) -> Callable[[], list[tuple[str, int]]]:
    """The service's processes as the runtime directory knows them: serve, each gateway
    worker, the supervised llama-server; without one (a lone gateway), this process."""
    def processes() -> list[tuple[str, int]]:
        if runtime_dir is None:
            return [("gateway", os.getpid())]
        state = serve_state() or {}
        found: list[tuple[str, int]] = []
        if isinstance(state.get("pid"), int):
            found.append(("serve", state["pid"]))
        found += [("gateway", w["pid"]) for w in runtime.read_workers(runtime_dir)
                  if isinstance(w.get("pid"), int)]
        backend = state.get("backend") or {}
        if isinstance(backend.get("pid"), int):
            found.append(("llama-server", backend["pid"]))
        return found
    return processes
