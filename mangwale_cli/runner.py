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
from typing import Any

from . import wire
from .events import EventBus
from .store.base import Store
from .trainers import Registry
from .trainers.base import TrainingContext
from .wire import Job, JobStatus, now_ms

log = logging.getLogger(__name__)


class _Reporter:
    """What a trainer calls to report progress for one attempt of one job."""

    def __init__(self, runner: Runner, job: Job) -> None:
        self.runner = runner
        self.job = job

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
        await self.runner.store.save_job(job)
        self.runner.bus.publish(wire.training_update(job, metrics=metrics, eta=eta))


class Runner:
    def __init__(
        self,
        store: Store,
        bus: EventBus,
        trainers: Registry,
        *,
        concurrency: int = 2,
        max_attempts: int = 3,
    ) -> None:
        self.store = store
        self.bus = bus
        self.trainers = trainers
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._running: dict[str, asyncio.Task[dict[str, Any] | None]] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._cancel_requested: set[str] = set()
        self._stopping = False

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self._recover()
        self._workers = [
            asyncio.create_task(self._worker(i), name=f"runner-{i}") for i in range(self.concurrency)
        ]

    async def _recover(self) -> None:
        for job in reversed(await self.store.list_jobs(statuses=[JobStatus.RUNNING, JobStatus.QUEUED])):
            if job.status is JobStatus.RUNNING:
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

    async def stop(self) -> None:
        """Stop taking jobs; put running ones back in the queue for the next start."""
        self._stopping = True
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

    async def cancel(self, job: Job) -> Job:
        """Cancel a queued or running job and return it in its final state."""
        if job.status is JobStatus.QUEUED and job.id not in self._running:
            return await self._finish(job, JobStatus.CANCELLED, "Cancelled before it started")
        task = self._running.get(job.id)
        if task is not None:
            self._cancel_requested.add(job.id)
            done = self._done.setdefault(job.id, asyncio.Event())
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
        await self.store.save_job(job, durable=True)
        self.bus.publish(wire.training_update(job))
        log.info("job %s (%s) started, attempt %d", job.id, job.kind, job.attempt)

        artifacts = self.store.artifacts_dir / job.id
        ctx = TrainingContext(job, dataset, params, _Reporter(self, job), artifacts)
        task = asyncio.create_task(trainer.run(ctx), name=f"train-{job.id}")
        self._running[job.id] = task
        try:
            metrics = await task
        except asyncio.CancelledError:
            if job.id in self._cancel_requested:
                await self._finish(job, JobStatus.CANCELLED, "Cancelled")
            elif not self._stopping:
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
            self._running.pop(job.id, None)
            self._cancel_requested.discard(job.id)
            done = self._done.pop(job.id, None)
            if done is not None:
                done.set()

    async def _finish(self, job: Job, status: JobStatus, message: str, *, error: str | None = None) -> Job:
        job.status = status
        job.message = message
        job.error = error
        job.finished_at = job.updated_at = now_ms()
        await self.store.save_job(job, durable=True)
        self.bus.publish(wire.training_update(job))
        return job

    def remove_artifacts(self, job_id: str) -> None:
        shutil.rmtree(self.store.artifacts_dir / job_id, ignore_errors=True)
