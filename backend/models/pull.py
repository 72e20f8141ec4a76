"""PullManager: the server's queue of Hugging Face downloads.

Owns its worker tasks and the thread pool the blocking transfers run in
(``start()`` / ``close()``, meant for an aiohttp ``cleanup_ctx``). Jobs live in the
``JobStore``; the partial bytes live under MODELS_DIR/.partial. So a job interrupted
by a shutdown, a crash or kill -9 is found ``queued``/``running`` at the next
``start()`` and continues from the bytes already on disk.

Progress (bytes, rate, ETA) is sampled from the transfer thread every
``progress_interval_s`` and written to the store from the event loop thread, which
is the only thread that touches the store.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from backend.models import plan
from backend.models.download import CancelToken
from backend.models.errors import BadPullRequest, PullCancelled, PullError
from backend.models.hub import HubClient
from backend.models.jobs import Job, JobState, JobStore
from backend.models.progress import RateMeter
from backend.models.puller import FreeSpace, PullProgress, PullResult, disk_free, run_pull

log = logging.getLogger(__name__)

OnSuccess = Callable[[Path], Awaitable[None]]


@dataclass(frozen=True)
class PullSettings:
    concurrency: int = 1  # transfers at a time
    resume: bool = True  # continue interrupted jobs at start(); False marks them failed
    progress_interval_s: float = 1.0  # how often bytes/rate/ETA reach the store
    cancel_grace_s: float = 5.0  # how long cancel() waits for the transfer to stop
    retries: int = 5  # transient network failures in a row before a job fails
    backoff_s: float = 1.0  # first wait between those retries (doubles, capped at 30 s)


class PullManager:
    def __init__(
        self,
        store: JobStore,
        models_dir: Path,
        hub: HubClient,
        settings: PullSettings | None = None,
        *,
        free_space: FreeSpace = disk_free,
        on_success: OnSuccess | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._models_dir = models_dir
        self._hub = hub
        self._settings = settings or PullSettings()
        self._free_space = free_space
        self._on_success = on_success
        self._clock = clock
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()  # ids in the queue, so none is queued twice
        self._workers: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._running: dict[str, tuple[CancelToken, asyncio.Future[PullResult]]] = {}
        self._changed = asyncio.Event()
        self._closing = False

    async def start(self) -> None:
        """Pick up jobs a previous process left unfinished, then start the workers."""
        for job in self._store.active():
            if job.state is JobState.RUNNING:
                self._store.transition(job.id, JobState.QUEUED)
            if self._settings.resume:
                log.info("resuming pull %s (%s/%s)", job.id, job.repo, job.file)
                self._enqueue(job.id)
            else:
                self._store.transition(
                    job.id,
                    JobState.FAILED,
                    error="interrupted by a restart and resuming is off;"
                    " pull again to continue from the partial file",
                    error_code="interrupted",
                )
        concurrency = self._settings.concurrency
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="pull")
        self._workers = [
            asyncio.create_task(self._worker(), name=f"pull-worker-{i}") for i in range(concurrency)
        ]

    async def close(self) -> None:
        """Stop the workers; running transfers stop and go back to the queue, bytes kept."""
        self._closing = True
        for token, _ in self._running.values():
            token.cancel(discard_partial=False)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def submit(self, repo: str, file: str, revision: str | None = None) -> Job:
        """Queue a pull, or return the active job already pulling the same thing.

        Raises ``BadPullRequest`` / ``UnsafePath`` for requests that can never work.
        """
        if self._closing:
            raise PullError("the pull manager is shutting down")
        plan.check_repo_id(repo)
        plan.check_relpath(file)
        revision = revision or "main"
        if len(revision) > 255 or not revision.isprintable() or " " in revision:
            raise BadPullRequest(f"revision {revision!r} is not a branch, tag or commit")
        job, created = self._store.submit(repo, file, revision)
        if created:
            self._enqueue(job.id)
            self._notify()
        return job

    def get(self, job_id: str) -> Job:
        return self._store.get(job_id)

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job and delete its partial bytes; idempotent."""
        job = self._store.get(job_id)
        if not job.active:
            return job
        self._store.transition(job_id, JobState.CANCELLED, rate=None, eta=None, error="cancelled by request")
        self._notify()
        running = self._running.get(job_id)
        if running is not None:
            token, future = running
            token.cancel(discard_partial=True)
            # Wait for the thread to let go of the partial file, so an immediate
            # re-submit of the same pull does not collide with it.
            await asyncio.wait({future}, timeout=self._settings.cancel_grace_s)
        return self._store.get(job_id)

    async def wait(self, job_id: str) -> Job:
        """Return the job once it is no longer queued or running."""
        while True:
            changed = self._changed
            job = self._store.get(job_id)
            if not job.active:
                return job
            await changed.wait()

    def _enqueue(self, job_id: str) -> None:
        if job_id not in self._queued:
            self._queued.add(job_id)
            self._queue.put_nowait(job_id)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            self._queued.discard(job_id)
            await self._run(job_id)

    async def _run(self, job_id: str) -> None:
        job = self._store.transition(job_id, JobState.RUNNING, error=None, error_code=None)
        if job is None:
            return  # cancelled (or failed) while it waited in the queue
        self._notify()
        token, progress = CancelToken(), PullProgress()
        call = functools.partial(
            run_pull,
            self._hub,
            self._models_dir,
            job.repo,
            job.file,
            job.revision,
            token=token,
            progress=progress,
            free_space=self._free_space,
            retries=self._settings.retries,
            backoff_s=self._settings.backoff_s,
        )
        future = asyncio.get_running_loop().run_in_executor(self._executor, call)
        self._running[job_id] = (token, future)
        meter = RateMeter(self._clock)
        try:
            while not future.done():
                await asyncio.wait({future}, timeout=self._settings.progress_interval_s)
                self._record_progress(job_id, progress, meter)
        except asyncio.CancelledError:
            # Shutdown: stop the transfer, keep its bytes, leave the job to the next start.
            token.cancel(discard_partial=False)
            await asyncio.wait({future})
            self._finish(job_id, future, token)
            raise
        finally:
            del self._running[job_id]
        result = self._finish(job_id, future, token)
        if result is not None and self._on_success is not None and not self._closing:
            await _call_hook(self._on_success, result.paths[0])

    def _record_progress(self, job_id: str, progress: PullProgress, meter: RateMeter) -> None:
        done, total, files = progress.snapshot()
        if total is None:
            return
        rate = meter.sample(done, total)
        self._store.progress(
            job_id,
            bytes_done=done,
            bytes_total=total,
            rate=rate.bytes_per_s,
            eta=rate.eta_s,
            files=files,
        )

    def _finish(
        self, job_id: str, future: asyncio.Future[PullResult], token: CancelToken
    ) -> PullResult | None:
        try:
            result = future.result()
        except PullCancelled:
            state = JobState.CANCELLED if token.discard_partial else JobState.QUEUED
            self._store.transition(job_id, state, rate=None, eta=None)
            self._notify()
            return None
        except PullError as exc:
            log.warning("pull %s failed: %s", job_id, exc)
            self._fail(job_id, str(exc), exc.code)
            return None
        except Exception as exc:
            # A bug in one pull must not kill the worker that serves all the others.
            log.exception("pull %s crashed", job_id)
            self._fail(job_id, f"internal error: {type(exc).__name__}: {exc}", "internal_error")
            return None
        total = sum(f.size for f in result.files)
        self._store.transition(
            job_id,
            JobState.DONE,
            bytes_done=total,
            bytes_total=total,
            rate=None,
            eta=0.0,
            files=[f.filename for f in result.files],
            paths=[str(p) for p in result.paths],
        )
        self._notify()
        return result

    def _fail(self, job_id: str, error: str, code: str) -> None:
        self._store.transition(job_id, JobState.FAILED, error=error, error_code=code, rate=None, eta=None)
        self._notify()

    def list(self, limit: int = 100) -> list[Job]:
        """Most recent jobs first. (Defined last: the name shadows the builtin in the class.)"""
        return self._store.recent(limit)


async def _call_hook(hook: OnSuccess, path: Path) -> None:
    try:
        await hook(path)
    except Exception:
        # The file is in place and the job is done; a failing hook (a rescan) is the
        # hook owner's problem to report, not a reason to fail the pull.
        log.exception("on_success hook failed for %s", path)
