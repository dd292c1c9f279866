"""The job runner: a queue with bounded concurrency that drives trainers and reports every change.

Every status or progress change is saved (status changes durably, progress batched) and then
published as a ``training_update``. Progress never goes backwards within an attempt.

Restarts: a job found ``running`` when the server starts was interrupted by a crash. It is put
back in the queue as a new attempt while ``attempt < max_attempts``, otherwise it fails with
"abandoned after N attempts". A graceful shutdown puts running jobs back in the queue the same
way. Execution is therefore at-least-once; each re-run is a new ``attempt``.

With a shared store (Redis) several instances run jobs from one queue (``jobqueue.RedisQueue``).
There is no start-up scan: a job whose instance died is found ``running`` by the instance whose
worker takes over its lease, and that is the new attempt (``takeovers`` counts them). Starting
an attempt is a compare-and-set on the stored attempt, so two instances never both start one;
an instance that lost its lease (it hung past it) stops its copy, and the store refuses its
writes (``StaleWrite``). A cancel for a job running elsewhere is sent to its instance.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from . import wire
from .errors import StaleWrite, Unavailable
from .events import EventBus
from .jobqueue import JobQueue, Lease, LocalQueue
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
        self.skipped = 0  # progress updates a shared store could not take

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
        if math.isnan(pct):
            pct = job.progress
        job.progress = max(job.progress, min(100.0, pct))
        if message is not None:
            job.message = str(message)
        job.updated_at = now_ms()
        job.stalled = False
        self.last_report = time.monotonic()
        point = None
        if metrics:
            point = {**metrics, "progress": job.progress, "attempt": job.attempt, "timestamp": job.updated_at}
        if await self._store(self.runner.store.save_job(job)):
            self.runner.bus.publish(wire.training_update(job, metrics=metrics, eta=eta))
            if point is not None:
                await self._store(self.runner.store.append_job_lines(job.id, "metrics", [point]))

    async def _store(self, write: Any) -> bool:
        """Await a progress write. A shared store that is away (Redis restarting) costs the
        update, not the training: it goes on, and the next report or the final state is
        saved. An embedded store's error (a full disk) is the job's, as before."""
        try:
            await write
        except Unavailable as exc:
            if not self.runner.queue.shared:
                raise
            self.skipped += 1
            if self.skipped == 1 or self.skipped % 100 == 0:
                log.warning("job %s: progress not saved (%s); %d updates skipped", self.job.id, exc, self.skipped)
            return False
        return True

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
        if not await self._store(self.runner.store.append_job_lines(self.job.id, "logs", [entry])):
            return
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
        queue: JobQueue | None = None,
    ) -> None:
        self.store = store
        self.queue: JobQueue = queue or LocalQueue()
        self.bus = bus
        self.trainers = trainers
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.stall_after = stall_after
        self.kill_grace = kill_grace
        self.log_lines_per_job = log_lines_per_job
        self._reporters: dict[str, _Reporter] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._running: dict[str, asyncio.Task[dict[str, Any] | None]] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._cancel_requested: set[str] = set()
        self._starting: set[str] = set()  # marked running, trainer task not created yet
        self._leases: dict[str, Lease] = {}  # job id -> the lease this instance holds on it
        self._lost: set[str] = set()  # running here, but another instance took the lease
        self._waiters: dict[str, asyncio.Event] = {}  # job id -> set when an event shows it ended
        self._cancels: set[asyncio.Task[None]] = set()  # cancels asked for by other instances
        self._stopping = False
        self.takeovers = 0  # jobs this instance took over from an instance that stopped
        self.metrics: Metrics | None = None  # instrumentation: set by Metrics.attach

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.queue.start(self._remote_cancel)
        if self.queue.shared:
            self.bus.add_listener(self._on_events)
        else:
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
                await self.queue.put(job.id)

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
            except BaseException:  # noqa: BLE001, S110 - cancelled or failed, the task has ended; stop goes on
                pass
            lease = self._leases.pop(job_id, None)
            job = await self.store.get_job(job_id)
            if job is not None and job.status is JobStatus.RUNNING and job_id not in self._lost:
                job.status = JobStatus.QUEUED
                job.message = f"re-queued: the server shut down during attempt {job.attempt}"
                job.updated_at = now_ms()
                try:
                    await self.store.save_job(job, durable=True)
                except StaleWrite:
                    continue  # another instance has taken it over already
                self.bus.publish(wire.training_update(job))
                if lease is not None:
                    await self.queue.requeue(lease)
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self.queue.stop()

    # --- API ------------------------------------------------------------------------------

    async def submit(self, job: Job) -> None:
        """Queue a job the store has just created. A shared store queued it already, in the
        transaction that created it: an acknowledged job is never missing from the queue."""
        if not self.store.shared:
            await self.queue.put(job.id)

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Job ids in the queue (cancelled ones too, until a worker skips them; for a shared
        queue: entries no instance has taken yet, as of the last heartbeat)."""
        return self.queue.depth

    async def cancel(self, job: Job) -> Job:
        """Cancel a queued or running job and return it in its final state."""
        local = job.id in self._running or job.id in self._starting
        if self.queue.shared and not local:
            return await self._cancel_shared(job)
        task = self._running.get(job.id)
        if task is not None or job.id in self._starting:
            # A starting job has no task yet; _run cancels it as soon as it can.
            self._cancel_requested.add(job.id)
            done = self._done.setdefault(job.id, asyncio.Event())
            if task is not None:
                task.cancel()
            await done.wait()
        elif job.status is JobStatus.QUEUED:
            try:
                return await self._finish(job, JobStatus.CANCELLED, "Cancelled before it started")
            except StaleWrite:  # it started after the caller read it: cancel it as running
                latest = await self.store.get_job(job.id)
                return await self.cancel(latest) if latest is not None and not latest.status.terminal else latest or job
        latest = await self.store.get_job(job.id)
        if latest is not None and self.queue.shared and not latest.status.terminal:
            return await self._cancel_shared(latest)  # another instance started it after all
        return latest or job

    async def _cancel_shared(self, job: Job) -> Job:
        """Cancel a job this instance does not run: it may be queued, or running elsewhere."""
        await self.queue.request_cancel(job.id)  # whoever takes it next, or runs it now, sees this
        if job.status is JobStatus.QUEUED:
            try:
                return await self._finish(job, JobStatus.CANCELLED, "Cancelled before it started")
            except StaleWrite:
                pass  # an instance started it meanwhile: it got the request too
        ended = self._waiters.setdefault(job.id, asyncio.Event())
        try:
            latest = await self.store.get_job(job.id)
            if latest is not None and not latest.status.terminal:
                # The instance running it cancels it within its kill grace; if it died, the
                # instance that takes the lease over finds the request and cancels instead.
                timeout = self.kill_grace + getattr(self.queue, "lease", 0.0) + 5.0
                try:
                    await asyncio.wait_for(ended.wait(), timeout)
                except TimeoutError:
                    log.warning("job %s did not stop within %.0f s of the cancel request", job.id, timeout)
        finally:
            self._waiters.pop(job.id, None)
        return await self.store.get_job(job.id) or job

    def _on_events(self, batch: list[Any]) -> None:
        """Wake cancel requests waiting for a job (run elsewhere) to end."""
        if not self._waiters:
            return
        for rec in batch:
            ended = self._waiters.get(rec.job_id) if rec.job_id else None
            if ended is not None and not rec.is_log:
                status = wire.loads(rec.text).get("status")
                if status in wire.TERMINAL:
                    ended.set()

    def _remote_cancel(self, job_id: str) -> None:
        """Another instance asked to cancel a job: act if it runs here."""
        if job_id in self._running or job_id in self._starting:
            # The loop keeps only a weak reference to a task: hold it until it is done.
            task = asyncio.get_running_loop().create_task(self._cancel_local(job_id))
            self._cancels.add(task)
            task.add_done_callback(self._cancels.discard)

    async def _cancel_local(self, job_id: str) -> None:
        job = await self.store.get_job(job_id)
        if job is not None and not job.status.terminal:
            try:
                await self.cancel(job)
            except Exception:
                log.exception("runner: cancelling %s for another instance failed", job_id)

    # --- execution ------------------------------------------------------------------------

    async def _worker(self, n: int) -> None:
        while True:
            lease = await self.queue.take()
            finished = True
            try:
                await self._run(lease)
            except asyncio.CancelledError:
                raise
            except StaleWrite as exc:  # another instance owns the job now
                log.warning("runner: job %s: %s; this instance stops it", lease.job_id, exc)
            except Unavailable as exc:  # a full or failing disk: the store retries, no traceback
                log.error("runner: job %s: %s", lease.job_id, exc)
                # Shared store away: keep the entry; once its lease runs out an instance retries.
                finished = not self.queue.shared
            except Exception:
                log.exception("runner: unexpected error while running %s", lease.job_id)
            finally:
                if not self._stopping and self._leases.get(lease.job_id) is lease:
                    self._leases.pop(lease.job_id, None)
            try:
                if finished:
                    await self.queue.done(lease)
                else:
                    self.queue.release(lease)
            except Exception as exc:  # noqa: BLE001 - the entry stays; whoever takes it finds the job ended
                log.warning("runner: could not remove %s from the queue: %s", lease.job_id, exc)

    async def _takeover(self, job: Job) -> bool:
        """A shared queue handed us a job still marked running: its instance stopped. Fail it
        when its attempts are used up, else go on with a new attempt. False: nothing to run."""
        self.takeovers += 1
        job.progress = max(job.progress, self._logged_progress(job))
        if job.attempt >= self.max_attempts:
            job.error = f"abandoned after {job.attempt} attempts: the instance running it stopped"
            await self._finish(job, JobStatus.FAILED, job.error, error=job.error)
            return False
        log.warning("job %s: its instance stopped during attempt %d; taking it over", job.id, job.attempt)
        return True

    async def _run(self, lease: Lease) -> None:
        job_id = lease.job_id
        job = await self.store.get_job(job_id)
        if job is None or job.status.terminal or job_id in self._running or job_id in self._starting:
            return
        if job.status is JobStatus.RUNNING and not (self.queue.shared and await self._takeover(job)):
            return
        if self.queue.shared and await self.queue.cancel_requested(job_id):
            await self._finish(job, JobStatus.CANCELLED, "Cancelled before it started")
            return
        try:
            trainer = self.trainers.get(job.kind)
            dataset = await self.store.get_dataset(job.dataset_id) if job.dataset_id else None
            if trainer.requires_dataset and dataset is None:
                raise RuntimeError(f"dataset {job.dataset_id} no longer exists")
            params = trainer.validate_params(job.params)
            if self.queue.shared:
                await trainer.check(params, self.store)  # fetches a base model into this instance
        except Exception as exc:
            if self.queue.shared and isinstance(exc, (Unavailable, StaleWrite)):
                raise  # Redis is away: the lease runs out and the job is taken again
            await self._finish(job, JobStatus.FAILED, f"cannot start: {exc}", error=str(exc))
            return

        previous = job.attempt
        job.status = JobStatus.RUNNING
        job.attempt += 1
        job.progress = 0
        job.message = "Starting..."
        job.error = None
        job.started_at = job.updated_at = now_ms()
        # Starting from here, a cancel waits for this task to finish the job (see cancel()).
        self._starting.add(job.id)
        watcher = asyncio.create_task(self._watch_lease(job.id, lease), name=f"lease-{job.id}")
        try:
            if job.id in self._cancel_requested:
                job.status, job.attempt, job.started_at = JobStatus.QUEUED, previous, None
                await self._finish(job, JobStatus.CANCELLED, "Cancelled before it started")
                return
            if not await self.store.begin_attempt(job, previous):
                log.info("job %s: another instance started it first, or it was cancelled", job.id)
                return
            self._leases[job.id] = lease
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
            if job.id in self._lost:
                return
        except asyncio.CancelledError:
            if job.id in self._lost:
                return  # another instance runs it now: nothing of this copy is saved
            if job.id in self._cancel_requested:
                await self._finish(job, JobStatus.CANCELLED, "Cancelled")
            current = asyncio.current_task()
            if job.id not in self._cancel_requested or (current is not None and current.cancelling()):
                # This worker is being stopped (stop() re-queues the job): swallowing the
                # cancellation would leave the worker waiting on the queue and stop() on it.
                raise
        except StaleWrite:
            raise
        except Exception as exc:
            if job.id in self._lost:
                return
            if self.queue.shared and isinstance(exc, Unavailable):
                raise
            log.info("job %s failed: %s", job.id, exc)
            await self._finish(job, JobStatus.FAILED, f"Training failed: {exc}", error=str(exc))
        else:
            job.progress = 100
            job.metrics = metrics
            # Models go where every instance can serve them before anyone is told it succeeded.
            await self.store.save_artifacts(job.id)
            await self._finish(job, JobStatus.SUCCEEDED, "Training completed")
            log.info("job %s succeeded", job.id)
        finally:
            watcher.cancel()
            self._lost.discard(job.id)
            self._starting.discard(job.id)
            self._running.pop(job.id, None)
            self._reporters.pop(job.id, None)
            self._cancel_requested.discard(job.id)
            done = self._done.pop(job.id, None)
            if done is not None:
                done.set()

    async def _watch_lease(self, job_id: str, lease: Lease) -> None:
        """Stop this copy of the job if another instance took its lease over."""
        await lease.lost.wait()
        self._lost.add(job_id)
        task = self._running.get(job_id)
        if task is not None:
            task.cancel()

    async def _log_count(self, job_id: str) -> int:
        lines = await self.store.read_job_lines(job_id, "logs")
        return max((int(entry.get("lineNo", 0)) for entry in lines), default=0)  # type: ignore[call-overload]  # lineNo: an int in every stored line

    async def _finish(self, job: Job, status: JobStatus, message: str, *, error: str | None = None) -> Job:
        job.status = status
        job.message = message
        job.error = error
        job.stalled = False
        job.finished_at = job.updated_at = now_ms()
        try:
            await self.store.save_job(job, durable=True)
        except StaleWrite:
            raise  # another instance owns the job: this outcome is not the job's
        except BaseException:
            # The disk refused the save (it is retried): the event reaches clients only once the
            # event log can be written too, and a follower must not wait forever.
            self._publish_final(job, status)
            raise
        self._publish_final(job, status)
        if self.metrics is not None:  # instrumentation
            self.metrics.job_finished(job)
        return job

    def _publish_final(self, job: Job, status: JobStatus) -> None:
        self.bus.publish(wire.training_update(job, metrics=job.metrics if status is JobStatus.SUCCEEDED else None))
