"""The worker hub: remote workers that dial in, take jobs, and report on them (server side).

A worker (``mangwale worker``, ``worker_agent.py``) keeps one WebSocket to an instance. The hub
of that instance registers it (a server-assigned id, and a secret derived from it with a key
kept in the store, so any instance of a shared store recognises it when it reconnects), hands
it jobs it can run (``routing.can_run``) by starting their next attempt in the store under a
lease held by ``worker:<id>`` (``begin_attempt``, the same compare-and-set the runners use),
and writes its reports through the same reporter and ordered outbox a local runner uses. Every
report names the lease's fencing token; the store refuses it when the lease is someone else's
or has expired (``StaleWrite``), and the worker is told so (409) and stops that trainer.

A sweeper re-queues the jobs whose worker stopped renewing (kill -9, power loss, a network cut
longer than the lease), as the next attempt up to ``runner.max_attempts``. Jobs a worker holds
under a live lease are never touched by a server's start-up recovery or shutdown.

This module never imports the web framework: the server module gives each connection a
``Session`` (``send``) and translates messages to calls here.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import faults, routing, wire
from .errors import MangwaleError, NotFound, StaleWrite, Unauthorized
from .store.base import Expect, Store
from .waiting import Waiting
from .wire import Job, JobStatus, now_ms
from .workerboard import Board, LocalBoard

if TYPE_CHECKING:
    from .events import EventBus
    from .runner import Runner, _Outbox, _Reporter

log = logging.getLogger(__name__)

HOLDER_PREFIX = "worker:"
KEY_META = "workerKey"
KINDS_META = "workerKinds"  # shared store: kind -> {description, requiresDataset, seen}


def holder_of(worker_id: str) -> str:
    return HOLDER_PREFIX + worker_id


def is_remote(job: Job) -> bool:
    """Whether the job's current lease is held by a remote worker."""
    return str((job.lease or {}).get("holder") or "").startswith(HOLDER_PREFIX)


class Session(Protocol):
    """One worker connection, as the server module gives it."""

    async def send(self, msg: dict[str, Any]) -> None: ...


@dataclass(eq=False)
class Worker:
    id: str
    name: str
    labels: frozenset[str]
    kinds: dict[str, wire.WorkerKind]
    versions: dict[str, str]
    concurrency: int
    session: Session | None = None
    running: dict[str, int] = field(default_factory=dict)  # job id -> fencing token
    last_heartbeat: int = 0  # ms, server clock
    lost_at: float | None = None  # monotonic, when its connection went away
    stopping: bool = False  # it handed a job back (SIGTERM): it takes no new job on this connection

    @property
    def holder(self) -> str:
        return holder_of(self.id)

    silent_after: float = 15.0  # seconds without a message (half a lease) after which it counts as lost

    @property
    def state(self) -> str:
        if self.session is None or now_ms() - self.last_heartbeat > self.silent_after * 1000:
            return "lost"  # gone, or silent for half a lease (a dead link keeps a socket open)
        return "busy" if len(self.running) >= self.concurrency else "up"

    def free(self) -> int:
        return 0 if self.stopping or self.state == "lost" else self.concurrency - len(self.running)

    def to_dict(self, instance: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "labels": sorted(self.labels),
            "kinds": sorted(self.kinds),
            "versions": self.versions,
            "concurrency": self.concurrency,
            "running": sorted(self.running),
            "lastHeartbeat": self.last_heartbeat,
            "state": self.state,
            "instance": instance,
        }


@dataclass(eq=False)
class _Remote:
    """A remote attempt as this instance writes it: the reporter and outbox of a local run."""

    job: Job
    holder: str
    token: int
    reporter: _Reporter
    outbox: _Outbox
    applied: int = 0  # the last report number written (a resent report is acknowledged again)


class WorkerHub:
    def __init__(
        self,
        store: Store,
        bus: EventBus,
        runner: Runner,
        *,
        max_attempts: int,
        forget_after: float,
        instance: str,
        local_takes: Callable[[Job], bool],
        board: Board | None = None,
    ) -> None:
        self.store = store
        self.bus = bus
        self.runner = runner
        self.max_attempts = max_attempts
        self.forget_after = forget_after
        self.instance = instance
        self.local_takes = local_takes  # whether this instance's own runner can run a job
        self.workers: dict[str, Worker] = {}
        self._remotes: dict[str, _Remote] = {}
        self._key = b""
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()  # one dispatch pass at a time
        # worker_update: each worker's row as last announced (its heartbeat aside), so only a
        # change is announced; one announcement at a time, so they go out in the order made.
        self.board: Board = board or LocalBoard(bus)
        self._announced: dict[str, str] = {}
        self._announce_lock = asyncio.Lock()
        self._pending: set[asyncio.Task[Any]] = set()
        self.waiting = Waiting(store, instance, self._own_takers, stale_after=max(1.0, self.lease * 1.5))
        self._keep: set[asyncio.Task[Any]] = set()

    @property
    def lease(self) -> float:
        return self.store.lease

    @property
    def heartbeat(self) -> float:
        return max(0.05, self.lease / 5)

    async def start(self) -> None:
        await self.board.start()
        self.bus.add_listener(self._on_events)
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name="workers-dispatch"),
            asyncio.create_task(self._sweep_loop(), name="workers-sweep"),
        ]

    async def stop(self) -> None:
        """Stop handing out jobs. Jobs workers hold keep running: their leases are theirs."""
        for t in [*self._tasks, *self._keep]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._keep, return_exceptions=True)
        for rem in self._remotes.values():
            rem.outbox.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        await self.board.stop()

    # --- identity -------------------------------------------------------------------------

    async def _load_key(self) -> None:
        """The key worker secrets are derived from: made (once, in the store, so every instance
        of a shared store has it) when the first worker registers; a server no worker ever
        joined writes nothing."""
        if self._key:
            return
        known = await self.store.get_meta(KEY_META)
        if known is None:
            await self.store.claim_meta(KEY_META, secrets.token_hex(32))
            known = await self.store.get_meta(KEY_META)
        self._key = str(known).encode()

    def _secret(self, worker_id: str) -> str:
        return hmac.new(self._key, worker_id.encode(), hashlib.sha256).hexdigest()

    def verify(self, worker_id: str, secret: str) -> bool:
        return bool(worker_id and self._key) and hmac.compare_digest(self._secret(worker_id), secret or "")

    async def register(self, session: Session, msg: wire.WorkerRegister) -> tuple[Worker, dict[str, Any]]:
        """A worker connected: the ``registered`` reply names its id (kept from an earlier
        registration when ``id``/``secret`` match) and which of its running jobs are still its own."""
        await self._load_key()
        if msg.id and msg.secret:
            if not msg.id.startswith("wk-") or not self.verify(msg.id, msg.secret):
                raise Unauthorized("this worker id was not issued by this server", code="invalid_worker")
            worker_id = msg.id
        else:
            worker_id = f"wk-{now_ms()}-{secrets.token_hex(3)}"
        old = self.workers.get(worker_id)
        worker = Worker(worker_id, msg.name, frozenset(msg.labels), {k.kind: k for k in msg.kinds}, dict(msg.versions),
                        msg.concurrency, session, last_heartbeat=now_ms(), silent_after=self.lease / 2)  # fmt: skip
        if old is not None and old.session is not None and old.session is not session:
            log.info("worker %s (%s) connected again; the older connection is dropped", worker_id, msg.name)
        kept = await self._renew_leases(worker, msg.running)
        self.workers[worker_id] = worker
        if self.store.shared:
            await self._advertise(worker)
        await self.announce(worker)
        log.info("worker %s (%s) registered: labels %s, kinds %s, concurrency %d, %d running",
                 worker_id, worker.name, sorted(worker.labels) or "-", ", ".join(sorted(worker.kinds)),
                 worker.concurrency, len(worker.running))  # fmt: skip
        self._wake.set()
        self._takers_changed()
        return worker, wire.worker_registered(worker_id, self._secret(worker_id), self.lease, self.heartbeat, kept)

    def disconnect(self, worker: Worker, session: Session) -> None:
        current = self.workers.get(worker.id)
        if current is worker and worker.session is session:
            worker.session = None
            worker.lost_at = time.monotonic()
            call_soon(lambda: self.announce(worker), self._pending)
            log.info("worker %s (%s) disconnected; its %d jobs keep their leases until they expire",
                     worker.id, worker.name, len(worker.running))  # fmt: skip
            self._takers_changed()

    async def describe_all(self) -> list[dict[str, Any]]:
        """Every instance's workers (shared store): this instance's own rows, and the rows the
        others keep on the board, with ``state`` lost once a row's heartbeat is half a lease old.
        A worker lost here but connected again elsewhere is shown as the other instance has it."""
        rows: dict[str, dict[str, Any]] = {}
        silent = self.lease / 2 * 1000
        now = now_ms()
        for row in await self.board.rows():
            if row.get("state") != "lost" and now - int(row.get("lastHeartbeat") or 0) > silent:
                row["state"] = "lost"  # its instance died, or lost Redis: nobody renews it
            rows[row["id"]] = row
        for w in self.workers.values():
            other = rows.get(w.id)
            if w.session is not None or other is None or other["lastHeartbeat"] < w.last_heartbeat:
                rows[w.id] = w.to_dict(self.instance)
        return sorted(rows.values(), key=lambda r: (r["name"], r["id"]))

    async def announce(self, worker: Worker, *, heartbeat: bool = False) -> None:
        """Announce the worker's row (``worker_update``) if it changed since it was last
        announced; a heartbeat that changes nothing only keeps a shared row fresh. Never
        raises: a board that cannot be reached costs the announcement, not the worker."""
        try:
            async with self._announce_lock:
                if self.workers.get(worker.id) is not worker:
                    return  # replaced by a newer registration, or forgotten
                row = worker.to_dict(self.instance)
                key = wire.dumps({**row, "lastHeartbeat": 0})
                if self._announced.get(worker.id) == key:
                    if heartbeat:
                        await self.board.refresh(row)
                    return
                if worker.session is None and self.store.shared:
                    elsewhere = await self.board.instance_of(worker.id)
                    if elsewhere is not None and elsewhere != self.instance:
                        self._announced[worker.id] = key  # it is connected to another instance now
                        return
                await self.board.publish(row)
                self._announced[worker.id] = key  # only once it is out: a failed one is tried again
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis away: the next change announces the state
            log.warning("worker %s: could not announce its state (%s)", worker.id, exc)

    async def announce_all(self) -> None:
        for w in list(self.workers.values()):
            await self.announce(w)

    async def worker(self, worker_id: str, secret: str) -> Worker:
        """The registered worker a REST call names (its id and secret), or 401/404."""
        await self._load_key()
        if not self.verify(worker_id, secret):
            raise Unauthorized("unknown worker or wrong worker secret", code="invalid_worker")
        w = self.workers.get(worker_id)
        if w is None:
            raise NotFound(f"worker {worker_id} is not registered here", field="workerId")
        return w

    # --- what workers offer ---------------------------------------------------------------

    def live(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.state != "lost"]

    def kinds(self) -> dict[str, wire.WorkerKind]:
        """Kinds the live workers advertise."""
        out: dict[str, wire.WorkerKind] = {}
        for w in self.live():
            for kind, spec in w.kinds.items():
                out.setdefault(kind, spec)
        return out

    async def _advertise(self, worker: Worker) -> None:
        """Shared store: note the worker's kinds where every instance sees them, so a job of a
        kind only workers provide is accepted through any instance."""
        known = await self.store.get_meta(KINDS_META)
        kinds = dict(known) if isinstance(known, dict) else {}
        for kind, spec in worker.kinds.items():
            kinds[kind] = {"description": spec.description, "requiresDataset": spec.requiresDataset, "seen": now_ms()}
        await self.store.set_meta(KINDS_META, kinds)

    async def all_kinds(self) -> dict[str, wire.WorkerKind]:
        """Kinds the live workers advertise: here, and (shared store) through any instance
        within ``workers.forget_after``."""
        out = self.kinds()
        if self.store.shared:
            known = await self.store.get_meta(KINDS_META)
            cutoff = now_ms() - self.forget_after * 1000
            for kind, spec in (known if isinstance(known, dict) else {}).items():
                if kind not in out and isinstance(spec, dict) and spec.get("seen", 0) >= cutoff:
                    out[kind] = wire.WorkerKind(kind=kind, description=str(spec.get("description") or ""),
                                                requiresDataset=bool(spec.get("requiresDataset", True)))  # fmt: skip
        return out

    def takers(self) -> list[tuple[frozenset[str], frozenset[str]]]:
        return [(w.labels, frozenset(w.kinds)) for w in self.live()]

    def _own_takers(self) -> list[tuple[frozenset[str], frozenset[str]]]:
        """This instance's takers: its runner, when it runs jobs, and its live workers."""
        runner = self.runner
        local = [(frozenset(runner.labels), frozenset(runner.trainers.names()))] if runner.concurrency > 0 else []
        return [*local, *self.takers()]

    def _takers_changed(self) -> None:
        """A worker came or went: tell the queued jobs what they wait for now."""
        call_soon(self._refresh_waiting, self._keep)

    async def _refresh_waiting(self) -> None:
        try:
            await self.waiting.refresh(publish=True)
        except MangwaleError as exc:  # the store is away: the next sweep tries again
            log.warning("workers: could not update what queued jobs wait for: %s", exc)

    # --- dispatch -------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def _on_events(self, batch: list[Any]) -> None:
        """Wake the dispatcher for an event that may make a job runnable or a worker free: a
        create, a re-queue, an end. Not for a running job's progress, which changes neither
        (each pass reads the whole queue; progress comes many times a second). A wake missed
        here is only a pass later: the dispatcher also runs every ``lease / 3`` s."""
        for rec in batch:
            if not rec.is_log and rec.job_id and _RUNNING not in rec.text:
                self._wake.set()
                return

    async def _dispatch_loop(self) -> None:
        while True:
            try:
                # asyncio.timeout, not wait_for: before Python 3.12 wait_for can lose a
                # cancellation that arrives as the event is set (CPython gh-86296), and stop()
                # would wait for this loop forever.
                async with asyncio.timeout(max(0.2, self.lease / 3)):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if not any(w.free() > 0 for w in self.workers.values()):
                continue
            try:
                await self.dispatch()
            except asyncio.CancelledError:
                raise
            except MangwaleError as exc:
                log.warning("workers: dispatch failed: %s", exc)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("workers: dispatch failed")
                await asyncio.sleep(0.5)

    async def dispatch(self) -> None:
        """Offer each queued job, oldest first, to a free worker that can run it. A job no
        free worker can run is skipped, so it never holds up the jobs behind it."""
        async with self._lock:
            queued = await self.store.list_jobs(statuses=[JobStatus.QUEUED])
            for job in reversed(queued):
                free = [w for w in self.workers.values() if w.free() > 0 and routing.can_run(job, w.labels, w.kinds)]
                if not free:
                    if not any(w.free() > 0 for w in self.workers.values()):
                        return
                    continue
                await self._offer(min(free, key=lambda w: len(w.running) / w.concurrency), job)

    async def _offer(self, worker: Worker, job: Job) -> None:
        previous = job.attempt
        job.status = JobStatus.RUNNING
        job.attempt += 1
        job.progress = 0
        job.message = f"Starting on worker {worker.name}"
        job.error = None
        job.stalled = False
        job.started_at = job.updated_at = now_ms()
        job.lease = {"holder": worker.holder, "token": job.attempt}
        job.worker = worker.name
        if not await self.store.begin_attempt(job, previous, wire.training_update(job)):
            return  # another taker started it first, or it was cancelled
        # A shared queue's entry for the job, unless a runner read it (that runner finds the job
        # taken and removes it): with every instance at --concurrency 0, nobody else would.
        await self.runner.queue.forget(job.id)
        stored = await self.store.get_job(job.id) or job
        worker.running[job.id] = job.attempt
        log.info("job %s (%s) offered to worker %s (%s), attempt %d", job.id, job.kind, worker.id, worker.name, job.attempt)
        session = worker.session
        try:
            if session is None:
                raise ConnectionError("the worker disconnected")
            await session.send(wire.worker_offer(stored, self.lease))
        except Exception as exc:  # noqa: BLE001 - never delivered: hand it back now, not after the lease
            log.warning("job %s: the offer to worker %s was not delivered (%s); re-queued", job.id, worker.id, exc)
            await self._requeue(stored, f"re-queued: worker {worker.name} went away before it started", Expect.lease_of(stored))
        await self.announce(worker)

    # --- reports --------------------------------------------------------------------------

    async def _remote(self, job_id: str, holder: str, token: int) -> _Remote | None:
        rem = self._remotes.get(job_id)
        if rem is not None and rem.holder == holder and rem.token == token:
            return rem
        job = await self.store.get_job(job_id)
        lease = (job.lease if job is not None else None) or {}
        if job is None or job.status is not JobStatus.RUNNING or lease.get("holder") != holder or lease.get("token") != token:
            return None
        from .runner import _Outbox, _Reporter

        outbox = _Outbox(self.runner, job, lambda why: None)
        logged = await self.store.read_job_lines(job.id, "logs")
        lines = max((int(e.get("lineNo", 0)) for e in logged), default=0)
        points = await self.runner._count(job.id, "metrics", "pointNo")
        rem = _Remote(job, holder, token, _Reporter(self.runner, job, outbox, lines, points), outbox)
        # The newest report any instance wrote for this attempt: a report resent after a move or
        # a restart (its ack never arrived) is acknowledged again, not written twice.
        done = [int(e.get("report", 0)) for e in logged if e.get("attempt") == job.attempt]
        if job.report is not None and job.report[0] == job.attempt:
            done.append(job.report[1])
        rem.applied = max(done, default=0)
        self._remotes[job_id] = rem
        return rem

    def _not_held(self, worker: Worker, job_id: str, token: int, n: int, why: str) -> dict[str, Any]:
        worker.running.pop(job_id, None)
        self._remotes.pop(job_id, None)
        self._wake.set()
        return wire.worker_refused(job_id, n, f"job {job_id} (token {token}) is not held by worker {worker.id}: {why}")

    async def report(self, worker: Worker, msg: wire.WorkerReport) -> dict[str, Any]:
        """Write one report of a job the worker holds; ``ack`` or ``refused`` (409)."""
        try:
            return await self._report(worker, msg)
        finally:
            if msg.what == "finish" or msg.jobId not in worker.running:
                await self.announce(worker)

    async def _report(self, worker: Worker, msg: wire.WorkerReport) -> dict[str, Any]:
        from .runner import LeaseLost

        worker.last_heartbeat = now_ms()
        rem = await self._remote(msg.jobId, worker.holder, msg.token)
        if rem is None:
            return self._not_held(worker, msg.jobId, msg.token, msg.n, "its lease is someone else's, or it ended")
        if msg.n <= rem.applied:
            return wire.worker_ack(msg.jobId, msg.n)  # delivered again after a reconnect
        try:
            rem.job.report = [rem.job.attempt, msg.n]  # written with the report, in the same record
            if msg.what == "progress":
                await rem.reporter.progress(rem.job.progress if msg.progress is None else msg.progress, msg.message,
                                            metrics=msg.metrics, eta=msg.eta)  # fmt: skip
                await rem.outbox.flush()
            elif msg.what == "log":
                await rem.reporter.log(msg.stream or "stdout", msg.line or "", report=msg.n)
                await rem.outbox.flush()
            else:
                await rem.outbox.flush()
                await self._finish(rem, msg)
        except (LeaseLost, StaleWrite) as exc:
            return self._not_held(worker, msg.jobId, msg.token, msg.n, str(exc))
        faults.point("worker-report-written")  # written, not yet acknowledged
        rem.applied = msg.n
        if msg.what == "finish":
            worker.running.pop(msg.jobId, None)
            self._remotes.pop(msg.jobId, None)
            self._wake.set()
        return wire.worker_ack(msg.jobId, msg.n)

    async def _finish(self, rem: _Remote, msg: wire.WorkerReport) -> None:
        job = rem.job
        status = JobStatus(msg.status or "failed")
        job.status = status
        job.stalled = False
        if status is JobStatus.SUCCEEDED:
            job.progress = 100
            job.metrics = msg.metrics
            job.message = msg.message or "Training completed"
            job.error = None
        elif status is JobStatus.FAILED:
            job.error = msg.error or "the worker reported a failure"
            job.message = msg.message or f"Training failed: {job.error}"
        else:
            job.message = msg.message or "Cancelled"
        job.finished_at = job.updated_at = now_ms()
        job.lease = None
        event = wire.training_update(job, metrics=job.metrics if status is JobStatus.SUCCEEDED else None)
        await self.store.write_job(job, event, expect=Expect(holder=rem.holder, token=rem.token), durable=True)
        log.info("job %s %s on worker %s", job.id, status.value, job.worker)

    async def heartbeat_from(self, worker: Worker, msg: wire.WorkerHeartbeat) -> dict[str, Any]:
        """Renew the leases of the jobs the worker runs; say which are no longer its own."""
        worker.last_heartbeat = now_ms()
        out = await self._renew_leases(worker, msg.jobs)
        await self.announce(worker, heartbeat=True)
        return wire.worker_renewed(out)

    async def _renew_leases(self, worker: Worker, jobs: dict[str, int]) -> dict[str, bool]:
        """Renew the worker's lease on each job it names (job id -> fencing token). A job whose
        lease is no longer its own leaves it, and this instance's copy of the attempt goes."""
        out: dict[str, bool] = {}
        for job_id, token in jobs.items():
            ok = await self.store.renew_lease(job_id, worker.holder, token)
            out[job_id] = ok
            if ok:
                worker.running[job_id] = token
                continue
            self._remotes.pop(job_id, None)
            if worker.running.pop(job_id, None) is not None:
                self._wake.set()  # a slot came free
        return out

    async def release(self, worker: Worker, msg: wire.WorkerRelease) -> None:
        """The worker hands a job back (it is stopping): re-queue it now, not after the lease,
        and offer it nothing more (the job would come straight back to it and burn an attempt)."""
        worker.stopping = True
        job = await self.store.get_job(msg.jobId)
        if job is None or job.status is not JobStatus.RUNNING:
            return
        expect = Expect(holder=worker.holder, token=msg.token)
        await self._requeue(job, f"re-queued: worker {worker.name} handed it back during attempt {job.attempt}", expect)
        worker.running.pop(msg.jobId, None)
        await self.announce(worker)

    # --- cancel ---------------------------------------------------------------------------

    async def cancel(self, job: Job) -> Job:
        """Cancel a job a worker runs: recorded at once, and the worker told to kill its trainer."""
        worker_id = str((job.lease or {}).get("holder") or "").removeprefix(HOLDER_PREFIX)
        job.status = JobStatus.CANCELLED
        job.message = "Cancelled"
        job.error = None
        job.stalled = False
        job.finished_at = job.updated_at = now_ms()
        job.lease = None
        expect = Expect(attempt=job.attempt, statuses=frozenset({"running"}))
        stored = await self.store.write_job(job, wire.training_update(job), expect=expect, durable=True)
        self._remotes.pop(job.id, None)
        if not await self.notify_cancel(job.id, worker_id):
            await self.runner.queue.request_cancel(job.id)  # the instance it is connected to tells it
        return stored

    async def notify_cancel(self, job_id: str, worker_id: str | None = None) -> bool:
        """Tell the worker running ``job_id`` (if it is connected here) to stop it."""
        named = self.workers.get(worker_id) if worker_id else None
        for w in [named] if named is not None else list(self.workers.values()):
            if (named is not None or job_id in w.running) and w.session is not None:
                w.running.pop(job_id, None)
                self._wake.set()
                try:
                    await w.session.send(wire.worker_cancel(job_id, "cancelled"))
                except Exception as exc:  # noqa: BLE001 - its heartbeat hears the lease is gone
                    log.info("job %s: could not tell worker %s to cancel (%s)", job_id, w.id, exc)
                await self.announce(w)
                return True
        return False

    # --- lost workers ---------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.1, self.lease / 3))
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except MangwaleError as exc:
                log.warning("workers: sweep failed: %s", exc)
            except Exception:
                log.exception("workers: sweep failed")

    async def sweep(self) -> None:
        """Re-queue the jobs whose worker stopped renewing its lease; forget long-lost workers."""
        for job in await self.store.list_jobs(statuses=[JobStatus.RUNNING]):
            if not is_remote(job) or await self.store.lease_live(job.id):
                continue
            why = f"worker {job.worker} stopped renewing its lease during attempt {job.attempt}"
            await self._requeue(job, f"re-queued: {why}", Expect(attempt=job.attempt, statuses=frozenset({"running"})),
                                lost=why)  # fmt: skip
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.session is None and w.lost_at is not None and now - w.lost_at > self.forget_after:
                await self.forget(w)
        await self.announce_all()  # a worker silent for half a lease is lost; one heard again is back
        try:
            await self.board.sweep(self.lease / 2 * 1000)  # the workers of instances that died
        except Exception as exc:  # noqa: BLE001 - Redis away: the next sweep does it
            log.warning("workers: could not sweep the shared worker rows (%s)", exc)
        await self.waiting.refresh(publish=True)  # a worker fell silent; another instance's came or went

    async def forget(self, worker: Worker) -> None:
        """Drop a long-lost worker, and announce it ``gone`` (unless another instance has it now)."""
        async with self._announce_lock:
            if self.workers.get(worker.id) is not worker:
                return
            del self.workers[worker.id]
            self._announced.pop(worker.id, None)
            try:
                elsewhere = await self.board.instance_of(worker.id) if self.store.shared else None
                if elsewhere is None or elsewhere == self.instance:
                    await self.board.remove(worker.to_dict(self.instance))
            except Exception as exc:  # noqa: BLE001 - its shared row expires by itself
                log.warning("worker %s: could not announce it is forgotten (%s)", worker.id, exc)

    async def _requeue(self, job: Job, message: str, expect: Expect, lost: str | None = None) -> None:
        if lost is not None and job.attempt >= self.max_attempts:
            job.status = JobStatus.FAILED
            job.error = job.message = f"abandoned after {job.attempt} attempts: {lost}"
            job.finished_at = now_ms()
        else:
            job.status = JobStatus.QUEUED
            job.message = message
            job.waiting_for = await self.waiting.answer(job)  # the sweep's pass skips it while the takers stay
        job.updated_at = now_ms()
        job.lease = None
        job.stalled = False
        try:
            await self.store.write_job(job, wire.training_update(job), expect=expect, durable=True)
        except StaleWrite:
            return  # another instance re-queued it, or it ended
        self._remotes.pop(job.id, None)
        for w in list(self.workers.values()):
            if w.running.pop(job.id, None) is not None:
                await self.announce(w)
        log.warning("job %s: %s", job.id, job.message)
        if job.status is JobStatus.QUEUED:
            if self.runner.queue.shared or self.local_takes(job):
                await self.runner.queue.put(job.id)  # for a runner that can take it
            self._wake.set()


_RUNNING = '"status":"running"'  # in a training_update's compact JSON (wire.dumps): a job that runs


def call_soon(fn: Callable[[], Coroutine[Any, Any, Any]], keep: set[asyncio.Task[Any]]) -> None:
    """Run ``fn()`` as a task held in ``keep`` until it is done (the loop holds only weak refs)."""
    task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(fn())
    keep.add(task)
    task.add_done_callback(keep.discard)
