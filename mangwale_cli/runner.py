"""The job runner: a queue with bounded concurrency that drives trainers and reports every change.

Every status or progress change is one store write carrying its ``training_update`` (the store
logs both as one unit). Progress never goes backwards within an attempt.

Leases: starting an attempt grants this runner (``holder``) the job's lease, whose fencing token
is the attempt number; every later write of the attempt names that lease and the store refuses
it once the lease is someone else's or has expired. The runner renews it every ``lease / 3``
seconds. A trainer's reports go through an ordered outbox: the trainer never waits on the
store, and a store that is away (Redis restarting, a full disk) has the reports held, in order,
until it is back, or until the lease runs out, when this runner stops the trainer as a stale
holder (another instance may take the job over).

Restarts: a job found ``running`` when the embedded server starts was interrupted by a crash. It
is put back in the queue as a new attempt while ``attempt < max_attempts``, otherwise it fails
with "abandoned after N attempts". A graceful shutdown puts running jobs back in the queue the
same way. Execution is therefore at-least-once; each re-run is a new ``attempt``.

With a shared store (Redis) several instances run jobs from one queue (``redisqueue.RedisQueue``).
A job whose instance died is found ``running`` by the instance whose worker takes over its queue
entry; ``begin_attempt`` starts the next attempt only once the dead instance's lease has run
out. A cancel for a job running elsewhere is sent to its instance.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from . import routing, wire
from .errors import StaleWrite, Unavailable
from .events import EventBus
from .jobqueue import JobQueue, Lease, LocalQueue
from .store.base import Expect, Store
from .trainers import Registry
from .trainers.base import TrainingContext
from .wire import Job, JobStatus, now_ms

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

MAX_LINE = 4000  # characters kept of one log line
MAX_HELD = 10_000  # reports an outbox holds while the store is away; progress beyond is dropped
RETRY = 0.5  # seconds between attempts while the store is away


class LeaseLost(Exception):
    """This runner's lease on a job is gone (expired while the store was away, or taken over)."""


class _Outbox:
    """One attempt's writes, in order, written by one task; the trainer never waits on them."""

    def __init__(self, runner: Runner, job: Job, on_lost: Callable[[str], None]) -> None:
        self.runner = runner
        self.job_id = job.id
        self.items: deque[tuple[Callable[[], Awaitable[Any]], bool]] = deque()  # (write, droppable)
        self.on_lost = on_lost
        self.lost: str | None = None
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None
        self._empty = asyncio.Event()
        self._empty.set()

    def put(self, write: Callable[[], Awaitable[Any]], *, droppable: bool = True) -> None:
        if self.lost is not None:
            return
        if droppable and len(self.items) >= MAX_HELD:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("job %s: %d progress reports dropped while the store is away", self.job_id, self.dropped)
            return
        self.items.append((write, droppable))
        self._empty.clear()
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name=f"outbox-{self.job_id}")

    async def _drain(self) -> None:
        try:
            while self.items:
                write, _ = self.items[0]
                try:
                    await self.runner.persist(self.job_id, write)
                except (StaleWrite, LeaseLost) as exc:
                    self._lose(str(exc))
                    return
                self.items.popleft()
        finally:
            self._task = None
            if not self.items:
                self._empty.set()

    def _lose(self, why: str) -> None:
        self.lost = why
        self.items.clear()
        self._empty.set()
        self.on_lost(why)

    async def flush(self) -> None:
        """Wait until every report put so far is written (or the lease is lost)."""
        await self._empty.wait()
        if self.lost is not None:
            raise LeaseLost(self.lost)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.items.clear()
        self._empty.set()


class _Held:
    """A running job whose writes wait for the store (a cancel answers with the store's error
    at once; the job's end is written once the store is back)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.error: Unavailable | None = None


class _Reporter:
    """What a trainer calls to report progress for one attempt of one job."""

    def __init__(self, runner: Runner, job: Job, outbox: _Outbox, first_line: int = 0, first_point: int = 0) -> None:
        self.runner = runner
        self.job = job
        self.outbox = outbox
        self.expect = Expect.lease_of(job)
        self.last_report = time.monotonic()
        self.lines = first_line  # log lines of this job so far (all attempts)
        self.points = first_point  # metrics points of this job so far
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
        if math.isnan(pct):
            pct = job.progress
        job.progress = max(job.progress, min(100.0, pct))
        if message is not None:
            job.message = str(message)
        job.updated_at = now_ms()
        job.stalled = False
        self.last_report = time.monotonic()
        lines = None
        if metrics:
            self.points += 1
            point = {**metrics, "progress": job.progress, "attempt": job.attempt, "timestamp": job.updated_at,
                     "pointNo": self.points}  # fmt: skip
            lines = ("metrics", [point])
        self.runner.write(self.outbox, job, wire.training_update(job, metrics=metrics, eta=eta), self.expect, lines=lines)

    async def log(self, stream: str, line: str, report: int | None = None) -> None:
        """A log line from the trainer: a line in the job's logs and its ``job_log`` event
        (``report``: the remote worker's report number, kept with the line)."""
        self.last_report = time.monotonic()
        limit = self.runner.log_lines_per_job
        if self.lines >= limit:
            self.dropped += 1
            return
        self.lines += 1
        text = line[:MAX_LINE]
        event = wire.job_log(self.job.id, stream, text, self.lines, self.job.attempt)
        entry = {"lineNo": self.lines, "stream": stream, "line": text, "attempt": self.job.attempt, "timestamp": event["timestamp"]}
        if report is not None:
            entry["report"] = report
        if self.lines == limit:
            entry["note"] = f"log limit of {limit} lines reached; later lines are dropped"
        store, job_id, expect = self.runner.store, self.job.id, self.expect
        self.outbox.put(lambda: store.append_log(job_id, entry, event, expect), droppable=False)


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
        holder: str = "local",
        labels: frozenset[str] = frozenset(),
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
        self.holder = holder
        self.labels = labels  # a job runs here only if all its labels are among these
        self.on_remote_cancel: Callable[[str], None] | None = None  # the worker hub's
        self._reporters: dict[str, _Reporter] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._running: dict[str, asyncio.Task[dict[str, Any] | None]] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._cancel_requested: set[str] = set()
        self._starting: set[str] = set()  # marked running, trainer task not created yet
        self._leases: dict[str, Lease] = {}  # job id -> the queue entry this instance holds
        self._renewed: dict[str, float] = {}  # job id -> when its job lease was last renewed
        self._lost: set[str] = set()  # running here, but the lease is gone
        self._waiters: dict[str, asyncio.Event] = {}  # job id -> set when an event shows it ended
        self._cancels: set[asyncio.Task[None]] = set()  # cancels asked for by other instances
        self._held: dict[str, _Held] = {}  # job id -> its writes wait for the store to come back
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
        self._workers = [asyncio.create_task(self._worker(i), name=f"runner-{i}") for i in range(self.concurrency)]
        self._workers.append(asyncio.create_task(self._renew_leases(), name="runner-leases"))
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
                    self.write(rep.outbox, job, wire.training_update(job), rep.expect)
                    log.warning("job %s reported nothing for %.0f s", job.id, silent)

    async def _renew_leases(self) -> None:
        """Renew the lease of every job running here every ``lease / 3`` s; a lease that could
        not be renewed for a whole lease (the store was away) is gone: stop that copy."""
        period = max(0.05, self.store.lease / 3)
        while True:
            await asyncio.sleep(period)
            for job_id, rep in list(self._reporters.items()):
                if rep.outbox.lost is not None:
                    continue
                try:
                    ok = await self.store.renew_lease(job_id, self.holder, rep.expect.token or 0)
                except Unavailable:
                    if time.monotonic() - self._renewed.get(job_id, 0.0) > self.store.lease:
                        rep.outbox._lose(f"the lease could not be renewed for {self.store.lease:g} s (the store is away)")
                    continue
                if ok:
                    self._renewed[job_id] = time.monotonic()
                elif job_id in self._reporters:
                    rep.outbox._lose("the lease is gone (another runner took the job over)")

    def can_take(self, job: Job) -> bool:
        """Whether this runner may run ``job``: it runs jobs at all, has every one of the job's
        labels, and knows its kind (a kind only workers provide is theirs)."""
        return self.concurrency > 0 and routing.can_run(job, self.labels, self.trainers.names())

    async def _recover(self) -> None:
        """Embedded store: jobs running when the server stopped have no runner any more, except
        those a remote worker holds: they got a full lease at start-up, time for their worker to
        come back (the worker hub re-queues them if it does not)."""
        from .workers import is_remote

        for job in reversed(await self.store.list_jobs(statuses=[JobStatus.RUNNING, JobStatus.QUEUED])):
            if job.status is JobStatus.RUNNING and is_remote(job):
                continue
            if job.status is JobStatus.RUNNING:
                job.progress = max(job.progress, await self._logged_progress(job))
                if job.attempt >= self.max_attempts:
                    job.status = JobStatus.FAILED
                    job.error = job.message = f"abandoned after {job.attempt} attempts: the server stopped while it ran"
                    job.finished_at = now_ms()
                else:
                    job.status = JobStatus.QUEUED
                    job.message = f"re-queued: the server stopped during attempt {job.attempt}"
                job.updated_at = now_ms()
                job.lease = None
                expect = Expect(attempt=job.attempt, statuses=frozenset({"running"}))
                try:
                    job = await self.store.write_job(job, wire.training_update(job), expect=expect, durable=True)
                except StaleWrite:
                    continue
            if job.status is JobStatus.QUEUED and self.can_take(job):
                await self.queue.put(job.id)

    async def _logged_progress(self, job: Job) -> float:
        """The highest progress the event log still holds for the job's current attempt."""
        best = 0.0
        for text in await self.bus.texts(self.bus.history(0, {job.id})):
            event = wire.loads(text)
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
            except BaseException:  # noqa: BLE001, S110 - the job's own outcome is handled in _run
                pass
            lease = self._leases.pop(job_id, None)
            job = await self.store.get_job(job_id)
            if job is not None and job.status is JobStatus.RUNNING and job_id not in self._lost:
                expect = Expect.lease_of(job)
                if expect.holder != self.holder:
                    continue  # another instance has taken it over already
                job.status = JobStatus.QUEUED
                job.message = f"re-queued: the server shut down during attempt {job.attempt}"
                job.updated_at = now_ms()
                job.lease = None
                try:
                    await self.store.write_job(job, wire.training_update(job), expect=expect, durable=True)
                except (StaleWrite, Unavailable):
                    continue  # taken over, or the store is away: the lease runs out and it is retried
                if lease is not None:
                    await self.queue.requeue(lease)
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self.queue.stop()

    # --- writing ----------------------------------------------------------------------------

    def write(
        self,
        outbox: _Outbox,
        job: Job,
        event: dict[str, Any],
        expect: Expect,
        *,
        lines: tuple[str, list[dict[str, Any]]] | None = None,
    ) -> None:
        """Queue a write of ``job`` as it is now (a copy) with ``event``, in order."""
        snapshot = Job.from_dict(job.to_dict())
        store = self.store
        outbox.put(lambda: store.write_job(snapshot, event, expect=expect, lines=lines))

    async def persist(self, job_id: str, write: Callable[[], Awaitable[Any]]) -> Any:
        """Run one write of a running job; while the store is away, retry until it is back or
        this runner's lease has run out (``LeaseLost``)."""
        warned = False
        while True:
            try:
                result = await write()
            except Unavailable as exc:
                since = self._renewed.get(job_id)
                if since is not None and time.monotonic() - since > self.store.lease:
                    raise LeaseLost(f"the store was away longer than the lease ({exc})") from None
                if not warned:
                    log.warning("job %s: the store is away (%s); its reports wait, in order", job_id, exc)
                    warned = True
                    held = self._held.setdefault(job_id, _Held())
                    held.error = exc
                    held.event.set()
                await asyncio.sleep(RETRY)
                continue
            if warned:
                log.info("job %s: the store is back; held reports written", job_id)
                self._held.pop(job_id, None)
            return result

    # --- API ------------------------------------------------------------------------------

    async def submit(self, job: Job) -> None:
        """Queue a job the store has just created. A shared store queued it already, in the
        transaction that created it: an acknowledged job is never missing from the queue."""
        if not self.store.shared and self.can_take(job):
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
            held = self._held.setdefault(job.id, _Held())
            waits = [asyncio.ensure_future(done.wait()), asyncio.ensure_future(held.event.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if not done.is_set() and held.error is not None:
                raise held.error  # not acknowledged: the cancellation is written once the store is back
        elif job.status is JobStatus.QUEUED:
            try:
                return await self._cancel_queued(job)
            except StaleWrite:  # it started after the caller read it: cancel it as running
                latest = await self.store.get_job(job.id)
                return await self.cancel(latest) if latest is not None and not latest.status.terminal else latest or job
        latest = await self.store.get_job(job.id)
        if latest is not None and self.queue.shared and not latest.status.terminal:
            return await self._cancel_shared(latest)  # another instance started it after all
        return latest or job

    async def _cancel_queued(self, job: Job) -> Job:
        expect = Expect(attempt=job.attempt, statuses=frozenset({"queued"}))
        done = await self._finish(job, JobStatus.CANCELLED, "Cancelled before it started", expect=expect)
        await self.queue.forget(job.id)  # its entry, if nobody read it (a reader would skip it)
        return done

    async def _cancel_shared(self, job: Job) -> Job:
        """Cancel a job this instance does not run: it may be queued, or running elsewhere."""
        await self.queue.request_cancel(job.id)  # whoever takes it next, or runs it now, sees this
        if job.status is JobStatus.QUEUED:
            try:
                return await self._cancel_queued(job)
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
        if self.on_remote_cancel is not None:
            self.on_remote_cancel(job_id)  # a worker connected here may run it
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
                finished = await self._run(lease)
            except asyncio.CancelledError:
                raise
            except (StaleWrite, LeaseLost) as exc:  # another instance owns the job now
                log.warning("runner: job %s: %s; this instance stops it", lease.job_id, exc)
            except Unavailable as exc:  # the store is away: the queue entry stays for a retry
                log.error("runner: job %s: %s", lease.job_id, exc)
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
        job.progress = max(job.progress, await self._logged_progress(job))
        if job.attempt >= self.max_attempts:
            job.error = f"abandoned after {job.attempt} attempts: the instance running it stopped"
            expect = Expect(attempt=job.attempt, statuses=frozenset({"running"}))
            await self._finish(job, JobStatus.FAILED, job.error, error=job.error, expect=expect)
            return False
        log.warning("job %s: its instance stopped during attempt %d; taking it over", job.id, job.attempt)
        return True

    async def _run(self, lease: Lease) -> bool:
        """Run the job a queue entry names; False when the entry must stay (retried later)."""
        job_id = lease.job_id
        job = await self.store.get_job(job_id)
        if job is None or job.status.terminal or job_id in self._running or job_id in self._starting:
            return True
        if not self.can_take(job):
            return True  # a worker's job: the worker hub hands it out; the entry is not ours to keep
        if job.status is JobStatus.RUNNING:
            if not self.queue.shared:
                return True
            if job.lease and await self.store.lease_live(job.id):
                return False  # its runner is alive after all: leave the entry for later
            if not await self._takeover(job):
                return True
        if self.queue.shared and await self.queue.cancel_requested(job_id):
            await self._finish(job, JobStatus.CANCELLED, "Cancelled before it started",
                               expect=Expect(attempt=job.attempt, statuses=frozenset({job.status.value})))  # fmt: skip
            return True
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
            expect = Expect(attempt=job.attempt, statuses=frozenset({job.status.value}))
            await self._finish(job, JobStatus.FAILED, f"cannot start: {exc}", error=str(exc), expect=expect)
            return True

        previous = job.attempt
        job.status = JobStatus.RUNNING
        job.attempt += 1
        job.progress = 0
        job.message = "Starting..."
        job.error = None
        job.started_at = job.updated_at = now_ms()
        job.lease = {"holder": self.holder, "token": job.attempt}
        job.worker = None
        # Starting from here, a cancel waits for this task to finish the job (see cancel()).
        self._starting.add(job.id)
        watcher = asyncio.create_task(self._watch_lease(job.id, lease), name=f"lease-{job.id}")
        outbox: _Outbox | None = None
        try:
            if job.id in self._cancel_requested:
                job.status, job.attempt, job.started_at, job.lease = JobStatus.QUEUED, previous, None, None
                await self._cancel_queued(job)
                return True
            if not await self.store.begin_attempt(job, previous, wire.training_update(job)):
                log.info("job %s: another instance started it first, or it was cancelled", job.id)
                return True
            self._leases[job.id] = lease
            self._renewed[job.id] = time.monotonic()
            log.info("job %s (%s) started, attempt %d", job.id, job.kind, job.attempt)

            artifacts = self.store.artifact_dir(job.id)
            outbox = _Outbox(self, job, lambda why: self._lose(job.id, why))
            reporter = _Reporter(self, job, outbox, await self._count(job.id, "logs", "lineNo"),
                                 await self._count(job.id, "metrics", "pointNo"))  # fmt: skip
            self._reporters[job.id] = reporter
            ctx = TrainingContext(job, dataset, params, reporter, artifacts, self.kill_grace)
            task = asyncio.create_task(trainer.run(ctx), name=f"train-{job.id}")
            self._running[job.id] = task
            self._starting.discard(job.id)
            if job.id in self._cancel_requested:
                task.cancel()
            metrics = await task
            if job.id in self._lost:
                return True
        except asyncio.CancelledError:
            if job.id in self._lost:
                return True  # another instance runs it now: nothing of this copy is saved
            if job.id in self._cancel_requested:
                await self._finish(job, JobStatus.CANCELLED, "Cancelled", outbox=outbox)
            current = asyncio.current_task()
            if job.id not in self._cancel_requested or (current is not None and current.cancelling()):
                # This worker is being stopped (stop() re-queues the job): swallowing the
                # cancellation would leave the worker waiting on the queue and stop() on it.
                raise
        except (StaleWrite, LeaseLost):
            raise
        except Exception as exc:
            if job.id in self._lost:
                return True
            if self.queue.shared and isinstance(exc, Unavailable):
                raise
            log.info("job %s failed: %s", job.id, exc)
            await self._finish(job, JobStatus.FAILED, f"Training failed: {exc}", error=str(exc), outbox=outbox)
        else:
            job.progress = 100
            job.metrics = metrics
            # The model is complete (and published) before anyone is told the job succeeded.
            await self.persist(job.id, lambda: self.store.save_artifacts(job.id))
            await self._finish(job, JobStatus.SUCCEEDED, "Training completed", outbox=outbox)
            log.info("job %s succeeded", job.id)
        finally:
            watcher.cancel()
            if outbox is not None and job.id in self._lost:
                outbox.cancel()
            self._lost.discard(job.id)
            self._starting.discard(job.id)
            self._running.pop(job.id, None)
            self._reporters.pop(job.id, None)
            self._renewed.pop(job.id, None)
            self._held.pop(job.id, None)
            self._cancel_requested.discard(job.id)
            done = self._done.pop(job.id, None)
            if done is not None:
                done.set()
        return True

    def _lose(self, job_id: str, why: str) -> None:
        """The lease on a job running here is gone: stop this copy, write nothing more."""
        log.warning("job %s: %s; stopping this copy", job_id, why)
        self._lost.add(job_id)
        task = self._running.get(job_id)
        if task is not None:
            task.cancel()

    async def _watch_lease(self, job_id: str, lease: Lease) -> None:
        """Stop this copy of the job if another instance took its queue entry over."""
        await lease.lost.wait()
        self._lose(job_id, "another instance took its queue entry over")

    async def _count(self, job_id: str, name: str, key: str) -> int:
        lines = await self.store.read_job_lines(job_id, name)
        return max((int(entry.get(key, 0)) for entry in lines), default=0)

    async def _finish(
        self,
        job: Job,
        status: JobStatus,
        message: str,
        *,
        error: str | None = None,
        outbox: _Outbox | None = None,
        expect: Expect | None = None,
    ) -> Job:
        """Write the job's final state (after every report of the attempt), durably."""
        if outbox is not None:
            await outbox.flush()
        if expect is None:
            expect = Expect.lease_of(job)
        job.status = status
        job.message = message
        job.error = error
        job.stalled = False
        job.finished_at = job.updated_at = now_ms()
        job.lease = None
        event = wire.training_update(job, metrics=job.metrics if status is JobStatus.SUCCEEDED else None)
        write = lambda: self.store.write_job(job, event, expect=expect, durable=True)
        # A running attempt holds its end until the store takes it; anything else (a queued
        # job cancelled, a job that cannot start) answers the store's error to its caller.
        stored: Job = await (self.persist(job.id, write) if outbox is not None else write())
        if self.metrics is not None:  # instrumentation
            self.metrics.job_finished(stored)
        return stored
