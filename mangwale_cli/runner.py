"""The job runner: a queue with bounded concurrency that drives trainers and reports every change.

Every status or progress change is saved (status changes durably, progress batched) and then
published as a ``training_update``. Progress never goes backwards within an attempt.

Restarts: a job found ``running`` when the server starts was interrupted by a crash. It is put
back in the queue as a new attempt while ``attempt < max_attempts``, otherwise it fails with
"abandoned after N attempts". A graceful shutdown puts running jobs back in the queue the same
way. Execution is therefore at-least-once; each re-run is a new ``attempt``.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from typing import TYPE_CHECKING, Any

from . import wire
from .errors import Unavailable
from .events import EventBus
from .store.base import Store
from .trainers import Registry
from .trainers.base import TrainingContext
from .wire import Job, JobStatus, now_ms

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

MAX_LINE = 4000  # characters kept of one log line


class _Reporter:
    """What a trainer calls to report progress for one attempt of one job."""

    def __init__(self, runner: Runner, job: Job, first_line: int = 0) -> None:
        self.runner = runner
        self.job = job
        self.last_report = time.monotonic()
        self.lines = first_line  # log lines of this job so far (all attempts)
        self.dropped = 0

    async def progress(
        self,
        progress: float,
        message: str | None = None,
        *,
        metrics: dict[str, Any] | None = None,
        eta: float | None = None,
    ) -> None:
        job = self.job
        try:
            pct = float(progress)
        except (TypeError, ValueError):
            pct = job.progress
        if pct != pct:  # NaN
            pct = job.progress
        job.progress = max(job.progress, min(100.0, pct))
        if message is not None:
            job.message = str(message)
        job.updated_at = now_ms()
        job.stalled = False
        self.last_report = time.monotonic()
        await self.runner.store.save_job(job)
        self.runner.bus.publish(wire.training_update(job, metrics=metrics, eta=eta))
        if metrics:
            point = {**metrics, "progress": job.progress, "attempt": job.attempt, "timestamp": job.updated_at}
            await self.runner.store.append_job_lines(job.id, "metrics", [point])

    async def log(self, stream: str, line: str) -> None:
        """A log line from the trainer: a ``job_log`` event and a line in the job's log file."""
        self.last_report = time.monotonic()
        limit = self.runner.log_lines_per_job
        if self.lines >= limit:
            self.dropped += 1
            return
        self.lines += 1
        text = line[:MAX_LINE]
        event = wire.job_log(self.job.id, stream, text, self.lines, self.job.attempt)
        entry = {"lineNo": self.lines, "stream": stream, "line": text, "attempt": self.job.attempt, "timestamp": event["timestamp"]}
        if self.lines == limit:
            entry["note"] = f"log limit of {limit} lines reached; later lines are dropped"
        await self.runner.store.append_job_lines(self.job.id, "logs", [entry])
        # Stored before published: a client that reads the head seq, then GET /logs, then
        # follows from that seq sees every line (``logs.follow_logs``).
        self.runner.bus.publish(event)


class Runner:
    def __init__(
        self,
        store: Store,
        bus: EventBus,
        trainers: Registry,
        *,
        concurrency: int = 2,
        max_attempts: int = 3,
        stall_after: float = 120.0,
        kill_grace: float = 3.0,
        log_lines_per_job: int = 10_000,
    ) -> None:
        self.store = store
        self.bus = bus
        self.trainers = trainers
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.stall_after = stall_after
        self.kill_grace = kill_grace
        self.log_lines_per_job = log_lines_per_job
        self._reporters: dict[str, _Reporter] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._running: dict[str, asyncio.Task[dict[str, Any] | None]] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._cancel_requested: set[str] = set()
        self._starting: set[str] = set()  # marked running, trainer task not created yet
        self._stopping = False
        self.metrics: Metrics | None = None  # instrumentation: set by Metrics.attach

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self._recover()
        self._workers = [
            asyncio.create_task(self._worker(i), name=f"runner-{i}") for i in range(self.concurrency)
        ]
        if self.stall_after > 0:
            self._watchdog = asyncio.create_task(self._watch_stalls(), name="runner-stall-watchdog")

    async def _watch_stalls(self) -> None:
        """Flag running jobs that have reported nothing for ``stall_after`` seconds."""
        while True:
            await asyncio.sleep(min(1.0, self.stall_after / 4))
            now = time.monotonic()
            for rep in list(self._reporters.values()):
                job = rep.job
                silent = now - rep.last_report
                if job.status is JobStatus.RUNNING and not job.stalled and silent >= self.stall_after:
                    job.stalled = True
                    job.message = f"stalled: no progress reported for {silent:.2g} s" if silent < 10 else (
                        f"stalled: no progress reported for {silent:.0f} s"
                    )
                    job.updated_at = now_ms()
                    await self.store.save_job(job)
                    self.bus.publish(wire.training_update(job))
                    log.warning("job %s reported nothing for %.0f s", job.id, silent)

    async def _recover(self) -> None:
        for job in reversed(await self.store.list_jobs(statuses=[JobStatus.RUNNING, JobStatus.QUEUED])):
            if job.status is JobStatus.RUNNING:
                # After kill -9 the store can lag the event log by a flush interval; clients
                # saw the logged progress, so this attempt's last update must not go below it.
                job.progress = max(job.progress, self._logged_progress(job))
                if job.attempt >= self.max_attempts:
                    job.status = JobStatus.FAILED
                    job.error = job.message = (
                        f"abandoned after {job.attempt} attempts: the server stopped while it ran"
                    )
                    job.finished_at = now_ms()
                else:
                    job.status = JobStatus.QUEUED
                    job.message = f"re-queued: the server stopped during attempt {job.attempt}"
                job.updated_at = now_ms()
                await self.store.save_job(job, durable=True)
                self.bus.publish(wire.training_update(job))
            if job.status is JobStatus.QUEUED:
                self._queue.put_nowait(job.id)

    def _logged_progress(self, job: Job) -> float:
        """The highest progress the event log still holds for the job's current attempt."""
        best = 0.0
        for rec in self.bus.history(0, {job.id}):
            event = wire.loads(rec.text)
            if event.get("type") == wire.MsgType.TRAINING_UPDATE and event.get("attempt") == job.attempt:
                best = max(best, float(event.get("progress") or 0))
        return best

    async def stop(self) -> None:
        """Stop taking jobs; put running ones back in the queue for the next start."""
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for w in self._workers:
            w.cancel()
        running = list(self._running.items())
        for _, task in running:
            task.cancel()
        for job_id, task in running:
            try:
                await task
            except BaseException:
                pass
            job = await self.store.get_job(job_id)
            if job is not None and job.status is JobStatus.RUNNING:
                job.status = JobStatus.QUEUED
                job.message = f"re-queued: the server shut down during attempt {job.attempt}"
                job.updated_at = now_ms()
                await self.store.save_job(job, durable=True)
                self.bus.publish(wire.training_update(job))
        await asyncio.gather(*self._workers, return_exceptions=True)

    # --- API ------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self._queue.put_nowait(job.id)

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Job ids in the queue (cancelled ones too, until a worker skips them)."""
        return self._queue.qsize()

    async def cancel(self, job: Job) -> Job:
        """Cancel a queued or running job and return it in its final state."""
        if job.status is JobStatus.QUEUED and job.id not in self._running:
            return await self._finish(job, JobStatus.CANCELLED, "Cancelled before it started")
        task = self._running.get(job.id)
        if task is not None or job.id in self._starting:
            # A starting job has no task yet; _run cancels it as soon as it creates one.
            self._cancel_requested.add(job.id)
            done = self._done.setdefault(job.id, asyncio.Event())
            if task is not None:
                task.cancel()
            await done.wait()
        latest = await self.store.get_job(job.id)
        return latest or job

    # --- execution ------------------------------------------------------------------------

    async def _worker(self, n: int) -> None:
        while True:
            job_id = await self._queue.get()
            try:
                await self._run(job_id)
            except asyncio.CancelledError:
                raise
            except Unavailable as exc:  # a full or failing disk: the store retries, no traceback
                log.error("runner: job %s: %s", job_id, exc)
            except Exception:
                log.exception("runner: unexpected error while running %s", job_id)

    async def _run(self, job_id: str) -> None:
        job = await self.store.get_job(job_id)
        if job is None or job.status is not JobStatus.QUEUED:
            return
        try:
            trainer = self.trainers.get(job.kind)
            dataset = await self.store.get_dataset(job.dataset_id) if job.dataset_id else None
            if trainer.requires_dataset and dataset is None:
                raise RuntimeError(f"dataset {job.dataset_id} no longer exists")
            params = trainer.validate_params(job.params)
        except Exception as exc:
            await self._finish(job, JobStatus.FAILED, f"cannot start: {exc}", error=str(exc))
            return

        job.status = JobStatus.RUNNING
        job.attempt += 1
        job.progress = 0
        job.message = "Starting..."
        job.error = None
        job.started_at = job.updated_at = now_ms()
        self._starting.add(job.id)
        try:
            await self.store.save_job(job, durable=True)
            self.bus.publish(wire.training_update(job))
            log.info("job %s (%s) started, attempt %d", job.id, job.kind, job.attempt)

            artifacts = self.store.artifact_dir(job.id)
            reporter = _Reporter(self, job, await self._log_count(job.id))
            self._reporters[job.id] = reporter
            ctx = TrainingContext(job, dataset, params, reporter, artifacts, self.kill_grace)
            task = asyncio.create_task(trainer.run(ctx), name=f"train-{job.id}")
            self._running[job.id] = task
            self._starting.discard(job.id)
            if job.id in self._cancel_requested:
                task.cancel()
            metrics = await task
        except asyncio.CancelledError:
            if job.id in self._cancel_requested:
                await self._finish(job, JobStatus.CANCELLED, "Cancelled")
            current = asyncio.current_task()
            if job.id not in self._cancel_requested or (current is not None and current.cancelling()):
                # This worker is being stopped (stop() re-queues the job): swallowing the
                # cancellation would leave the worker waiting on the queue and stop() on it.
                raise
        except Exception as exc:
            log.info("job %s failed: %s", job.id, exc)
            await self._finish(job, JobStatus.FAILED, f"Training failed: {exc}", error=str(exc))
        else:
            job.progress = 100
            job.metrics = metrics
            await self._finish(job, JobStatus.SUCCEEDED, "Training completed")
            log.info("job %s succeeded", job.id)
        finally:
            self._starting.discard(job.id)
            self._running.pop(job.id, None)
            self._reporters.pop(job.id, None)
            self._cancel_requested.discard(job.id)
            done = self._done.pop(job.id, None)
            if done is not None:
                done.set()

    async def _log_count(self, job_id: str) -> int:
        lines = await self.store.read_job_lines(job_id, "logs")
        return max((int(entry.get("lineNo", 0)) for entry in lines), default=0)  # type: ignore[call-overload]

    async def _finish(self, job: Job, status: JobStatus, message: str, *, error: str | None = None) -> Job:
        job.status = status
        job.message = message
        job.error = error
        job.stalled = False
        job.finished_at = job.updated_at = now_ms()
        try:
            await self.store.save_job(job, durable=True)
        finally:
            # Even when the disk refuses the save (it is retried): the event reaches clients only
            # once the event log can be written too, and a follower must not wait forever.
            self.bus.publish(wire.training_update(job, metrics=job.metrics if status is JobStatus.SUCCEEDED else None))
        if self.metrics is not None:  # instrumentation
            self.metrics.job_finished(job)
        return job

    def remove_artifacts(self, job_id: str) -> None:
        shutil.rmtree(self.store.artifact_dir(job_id), ignore_errors=True)
