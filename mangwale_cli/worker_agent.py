"""``mangwale worker``: a process on another machine that takes jobs from a server by URL.

It dials out (HTTP(S) and one WebSocket, ``/ws/workers``; no store access), registers, and runs
the jobs the server offers it with the same trainers ``serve`` runs (a child process per job
for the CPU-heavy kinds and command trainers, whose process group is killed on cancel). Every
report of a trainer goes to the server as a numbered message, kept in order until the server
acknowledges it: a dropped connection loses nothing, the reports go again after the reconnect.
The protocol is docs/protocol.md, "Workers"; the server side is ``workers.py``.

Stopping: a refused report (409: the lease is someone else's, or expired), a refused renewal, a
cancel, or a lease it could not renew for a whole lease stops that job's trainer. SIGTERM kills
every trainer and hands the jobs back at once. After kill -9 of this process, each trainer's
child sees its lifeline pipe close and ends its process group (``trainers.process``), so no
training process is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__, wire
from .client import AsyncClient
from .errors import InvalidInput, MangwaleError, Unauthorized
from .reconnect import FollowSettings, foreign_server, never_reached
from .reconnect import describe_failure as describe_drop
from .trainers import Registry
from .trainers.base import TrainingContext
from .trainers.command import INPUT_DIR
from .trainers.nlu import FineTuneTrainer, NluTrainer
from .trainers.process import describe_failure
from .trainers.simulate import SimulateTrainer
from .wire import Dataset, Job

log = logging.getLogger(__name__)

RELEASE_WAIT = 2.0  # seconds SIGTERM waits for hand-backs to leave


def local_trainers(config: Path | None) -> Registry:
    """What this worker runs: the built-ins (fine-tune fetches its base model over REST, for
    a job it holds), plus the ``[trainers.*]`` commands of its own config file."""
    from .settings import load
    from .trainers.command import command_trainers

    builtins = [SimulateTrainer(), NluTrainer(), FineTuneTrainer()]
    commands = command_trainers(load({"config_file": config})) if config is not None else []
    return Registry([*builtins, *commands])


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "mangwale": __version__}
    with contextlib.suppress(metadata.PackageNotFoundError):
        out["scikit-learn"] = metadata.version("scikit-learn")
    return out


@dataclass(eq=False)
class _Attempt:
    """One job this worker runs: its trainer task and its reports not yet acknowledged."""

    job: Job
    token: int
    pending: list[dict[str, Any]] = field(default_factory=list)
    sent: int = 0  # how many of ``pending`` went out on the current connection
    n: int = 0
    task: asyncio.Task[None] | None = None
    renewed: float = field(default_factory=time.monotonic)
    stopped: str | None = None  # why its trainer was stopped (cancelled, lost, released)
    drained: asyncio.Event = field(default_factory=asyncio.Event)


class _Reporter:
    """What a trainer calls on this worker: each call becomes a numbered report."""

    def __init__(self, agent: WorkerAgent, attempt: _Attempt) -> None:
        self.agent = agent
        self.attempt = attempt

    async def progress(self, progress: float, message: str | None = None, *,
                       metrics: dict[str, Any] | None = None, eta: float | None = None) -> None:  # fmt: skip
        self.agent.report(self.attempt, "progress", progress=progress, message=message, metrics=metrics, eta=eta)

    async def log(self, stream: str, line: str) -> None:
        self.agent.report(self.attempt, "log", stream=stream, line=line)


class WorkerAgent:
    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        labels: list[str] | None = None,
        concurrency: int = 1,
        name: str | None = None,
        trainers: Registry | None = None,
        work_dir: Path | None = None,
        kill_grace: float = 3.0,
        follow: FollowSettings | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        self.rest = AsyncClient(url, token=token)
        self.url = self.rest.url
        self.token = token
        self.labels = wire.check_labels(labels or [])
        self.concurrency = concurrency
        self.name = name or socket.gethostname()
        self.trainers = trainers or local_trainers(None)
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="mangwale-worker-"))
        self.kill_grace = kill_grace
        self.follow = follow or FollowSettings.from_env()
        self.connect_timeout = self.follow.connect_timeout if connect_timeout is None else connect_timeout
        self.reached = False  # the server has answered once: from then on, reconnect for ever
        self._connected = False  # registered on the current connection
        self.id: str | None = None
        self.secret: str | None = None
        self.lease = 30.0
        self.heartbeat = 6.0
        self.jobs: dict[str, _Attempt] = {}
        self._ws: Any = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._stop = asyncio.Event()
        self.registered = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, reconnect with backoff, until ``stop`` (SIGTERM). A server that never
        answers within ``connect_timeout`` is ``Unreachable`` (exit 8); a refused token is
        ``Unauthorized`` (exit 5); one that answered once is waited for as long as it takes."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        watchdog = asyncio.create_task(self._watch_leases(), name="worker-leases")
        sender = asyncio.create_task(self._sender(), name="worker-sender")
        delays = self.follow.backoff()
        deadline = time.monotonic() + self.connect_timeout
        last: str | None = None
        try:
            while not self._stop.is_set():
                if not self.reached and time.monotonic() >= deadline:
                    raise never_reached(self.url, self.connect_timeout, last)
                session = asyncio.create_task(self._session())
                stop = asyncio.create_task(self._stop.wait())
                while not (session.done() or stop.done()):
                    wait = None if self.reached else max(0.0, deadline - time.monotonic())
                    done, _ = await asyncio.wait([session, stop], timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                    if not done and not self.reached:  # still connecting when the time ran out
                        stop.cancel()
                        session.cancel()
                        with contextlib.suppress(BaseException):
                            await session
                        raise never_reached(self.url, self.connect_timeout, last or "no answer in time")
                if self._stop.is_set():
                    await self._hand_back()
                    session.cancel()
                    with contextlib.suppress(BaseException):
                        await session
                    break
                stop.cancel()
                exc = session.exception()
                if isinstance(exc, Unauthorized):
                    raise exc
                if exc is not None and not self.reached and (foreign := await foreign_server(exc, self.rest)):
                    raise foreign  # a wrong --url: no point in retrying it
                if exc is None:
                    delays = self.follow.backoff()
                    last = "closed by the server"
                else:
                    last = (describe_drop(exc).splitlines() or ["?"])[0][:200]
                delay = next(delays)
                if not self.reached:
                    # Silent until --connect-timeout: then one line says what the last try met.
                    log.debug("worker: cannot reach %s yet (%s); trying again in %.1f s", self.url, last, delay)
                    delay = min(delay, max(0.0, deadline - time.monotonic()))
                elif self._connected:
                    self._connected = False  # the first failure after a good session says so
                    why = "" if last == "connection lost" else f" ({last})"
                    log.warning("worker: connection lost%s; reconnecting in %.1f s", why, delay)
                else:
                    log.info("worker: reconnect failed (%s); trying again in %.1f s", last, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            watchdog.cancel()
            sender.cancel()
            for a in list(self.jobs.values()):
                self._stop_trainer(a, "the worker stopped")
            await asyncio.gather(*(a.task for a in self.jobs.values() if a.task is not None), return_exceptions=True)
            await self.rest.aclose()
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def stop(self) -> None:
        self._stop.set()

    async def _hand_back(self) -> None:
        """SIGTERM: kill every trainer and hand its job back to the server at once."""
        self._stopping = True
        for a in list(self.jobs.values()):
            self._stop_trainer(a, "released")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._send({"type": wire.WorkerMsg.RELEASE, "jobId": a.job.id, "token": a.token,
                                                   "reason": f"worker {self.name} stopped"}), RELEASE_WAIT)  # fmt: skip
            log.info("worker: job %s handed back", a.job.id)
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), RELEASE_WAIT)

    # --- the connection -------------------------------------------------------------------

    async def _session(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus
        from websockets.typing import Subprotocol

        ws_url = self.rest.ws_url.rsplit("/ws/", 1)[0] + "/ws/workers"
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            conn = connect(ws_url, additional_headers=headers, user_agent_header=f"mangwale-worker/{__version__}",
                           subprotocols=[Subprotocol(wire.WORKER_SUBPROTOCOL)], compression=None, open_timeout=10,
                           ping_interval=self.follow.ping_interval, ping_timeout=self.follow.ping_timeout,
                           close_timeout=2, max_size=2**24)  # fmt: skip
            async with conn as ws:
                self.reached = True
                await ws.send(wire.dumps(self._register()))
                reply = wire.loads(await asyncio.wait_for(ws.recv(), 10))
                if reply.get("type") != wire.WorkerMsg.REGISTERED:
                    message = str(reply.get("message") or reply)
                    raise Unauthorized(message) if reply.get("code") == "invalid_worker" else MangwaleError(message)
                self._registered(reply)
                self._ws = ws
                for a in self.jobs.values():
                    a.sent = 0  # everything not acknowledged goes again, in order
                self._wake.set()
                beat = asyncio.create_task(self._heartbeats(ws), name="worker-heartbeat")
                try:
                    async for raw in ws:
                        await self._on_message(wire.loads(raw))
                finally:
                    self._ws = None
                    beat.cancel()
        except InvalidStatus as exc:
            if exc.response.status_code in (401, 403):
                raise Unauthorized(f"the server refused this worker's token (HTTP {exc.response.status_code}); "
                                   "it needs the worker scope") from None  # fmt: skip
            raise

    def _register(self) -> dict[str, Any]:
        kinds = [{"kind": t.kind, "description": t.description, "requiresDataset": t.requires_dataset}
                 for t in self.trainers.kinds()]  # fmt: skip
        return {"type": wire.WorkerMsg.REGISTER, "id": self.id, "secret": self.secret, "name": self.name,
                "labels": self.labels, "kinds": kinds, "versions": versions(), "concurrency": self.concurrency,
                "running": {a.job.id: a.token for a in self.jobs.values() if a.stopped is None}}  # fmt: skip

    def _registered(self, reply: dict[str, Any]) -> None:
        first = self.id is None
        self.id, self.secret = reply["id"], reply["secret"]
        self.lease, self.heartbeat = float(reply["lease"]), float(reply["heartbeat"])
        now = time.monotonic()
        for job_id, kept in (reply.get("running") or {}).items():
            a = self.jobs.get(job_id)
            if a is None:
                continue
            if kept:
                a.renewed = now
            else:
                self._lose(a, "the server says its lease is no longer this worker's")
        if first:
            log.info("worker %s registered with %s as %s (labels: %s)", self.name, self.url, self.id,
                     ", ".join(self.labels) or "none")  # fmt: skip
        else:
            log.info("worker %s connected again to %s", self.id, self.url)
        self._connected = True
        self.registered.set()

    async def _send(self, msg: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected")
        await ws.send(wire.dumps(msg))

    async def _sender(self) -> None:
        """Send each job's reports in order, as they come and again after a reconnect."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            ws = self._ws
            if ws is None:
                continue
            try:
                for a in list(self.jobs.values()):
                    while a.sent < len(a.pending) and self._ws is ws:
                        msg = a.pending[a.sent]
                        a.sent += 1
                        await ws.send(wire.dumps(msg))
            except Exception as exc:  # noqa: BLE001 - the session notices and reconnects; reports wait
                log.debug("worker: send failed: %s", exc)

    async def _heartbeats(self, ws: Any) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            jobs = {a.job.id: a.token for a in self.jobs.values() if a.stopped is None}
            self._beat_sent = time.monotonic()
            await ws.send(wire.dumps({"type": wire.WorkerMsg.HEARTBEAT, "jobs": jobs}))

    async def _watch_leases(self) -> None:
        """A job whose lease this worker could not renew for a whole lease is lost: stop it."""
        while True:
            await asyncio.sleep(max(0.05, min(self.heartbeat, self.lease / 4)))
            now = time.monotonic()
            for a in list(self.jobs.values()):
                if a.stopped is None and now - a.renewed > self.lease:
                    self._lose(a, f"its lease could not be renewed for {self.lease:g} s")

    async def _on_message(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        a = self.jobs.get(str(msg.get("jobId")))
        if kind == wire.WorkerMsg.OFFER:
            self._start(Job.from_dict(msg["job"]))
        elif kind == wire.WorkerMsg.ACK and a is not None:
            n = int(msg["n"])
            done = 0
            while done < len(a.pending) and a.pending[done]["n"] <= n:
                done += 1
            del a.pending[:done]
            a.sent = max(0, a.sent - done)
            if not a.pending and a.task is not None and a.task.done():
                a.drained.set()
        elif kind == wire.WorkerMsg.REFUSED and a is not None:
            self._lose(a, f"report refused (409): {msg.get('message')}")
        elif kind == wire.WorkerMsg.CANCEL and a is not None:
            log.info("worker: job %s cancelled", a.job.id)
            self._stop_trainer(a, "cancelled")
            self._drop(a)
        elif kind == wire.WorkerMsg.RENEWED:
            sent = getattr(self, "_beat_sent", time.monotonic())
            for job_id, ok in (msg.get("jobs") or {}).items():
                b = self.jobs.get(job_id)
                if b is None:
                    continue
                if ok:
                    b.renewed = sent
                elif b.stopped is None:
                    self._lose(b, "its lease renewal was refused")
        elif kind == wire.WorkerMsg.ERROR:
            log.warning("worker: the server says: %s", msg.get("message"))

    # --- jobs -----------------------------------------------------------------------------

    def report(self, a: _Attempt, what: str, **fields: Any) -> None:
        if a.stopped is not None:
            return
        a.n += 1
        msg = {"type": wire.WorkerMsg.REPORT, "jobId": a.job.id, "token": a.token, "n": a.n, "what": what}
        msg.update({k: v for k, v in fields.items() if v is not None})
        a.pending.append(msg)
        self._wake.set()

    def _start(self, job: Job) -> None:
        token = int((job.lease or {}).get("token") or job.attempt)
        if self._stopping or job.id in self.jobs:
            return
        a = _Attempt(job, token)
        self.jobs[job.id] = a
        a.task = asyncio.create_task(self._run(a), name=f"job-{job.id}")
        log.info("worker: job %s (%s) started, attempt %d", job.id, job.kind, job.attempt)

    async def _run(self, a: _Attempt) -> None:
        job = a.job
        workdir = self.work_dir / f"{job.id}.{a.token}"
        try:
            try:
                trainer = self.trainers.get(job.kind)
                dataset = None
                if job.dataset_id:
                    assert self.id is not None and self.secret is not None
                    dataset = Dataset.from_dict(await self.rest.worker_dataset(self.id, self.secret, job.id))
                params = trainer.validate_params(job.params)
                workdir.mkdir(parents=True, exist_ok=True)
                if isinstance(trainer, FineTuneTrainer):
                    await self._fetch_base_model(job, str(params["baseJobId"]))
                ctx = TrainingContext(job, dataset, params, _Reporter(self, a), workdir, self.kill_grace)
                metrics = await trainer.run(ctx)
                await self._upload(a, workdir)
            except asyncio.CancelledError:
                return  # cancelled, lost or handed back: the server knows, or will refuse what follows
            except Exception as exc:  # noqa: BLE001 - every failure is the job's, reported as such
                log.info("worker: job %s failed: %s", job.id, exc)
                self.report(a, "finish", status="failed", error=describe_failure(exc) if not isinstance(exc, MangwaleError) else str(exc))
            else:
                self.report(a, "finish", status="succeeded", metrics=metrics)
                log.info("worker: job %s succeeded", job.id)
            if a.pending:
                await a.drained.wait()  # every report acknowledged (or the lease lost)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            if self.jobs.get(job.id) is a:
                del self.jobs[job.id]

    async def _fetch_base_model(self, job: Job, base_id: str) -> None:
        """Put the base model of a fine-tune where the trainer reads it (beside the job's
        directory, as on a server), fetched over REST: the server hands it only to the worker
        that holds the job. A base model fetched for an earlier job is used again (a finished
        job's model never changes)."""
        assert self.id is not None and self.secret is not None
        if "/" in base_id or "\\" in base_id or base_id.startswith("."):  # a directory name, never a path
            raise InvalidInput(f"params.baseJobId {base_id[:80]!r} is not a job id", field="params.baseJobId")
        base_dir = self.work_dir / base_id
        if (base_dir / wire.MODEL_ARTIFACT).is_file():
            return
        base_dir.mkdir(parents=True, exist_ok=True)
        size = await self.rest.worker_base_model(self.id, self.secret, job.id, base_dir / wire.MODEL_ARTIFACT)
        log.info("worker: job %s: base model of %s fetched (%d bytes)", job.id, base_id, size)

    async def _upload(self, a: _Attempt, workdir: Path) -> None:
        """Upload what the trainer left in its directory, before the job is reported finished."""
        assert self.id is not None
        for path in sorted(workdir.rglob("*")):
            rel = path.relative_to(workdir)
            if path.is_file() and rel.parts[0] != INPUT_DIR:
                await self.rest.upload_artifact(a.job.id, rel.as_posix(), path, holder=f"worker:{self.id}", token=a.token)

    def _stop_trainer(self, a: _Attempt, why: str) -> None:
        if a.stopped is None:
            a.stopped = why
        if a.task is not None and not a.task.done():
            a.task.cancel()  # a child trainer's process group gets SIGTERM, then SIGKILL

    def _lose(self, a: _Attempt, why: str) -> None:
        if a.stopped is None:
            log.warning("worker: job %s: %s; stopping its trainer", a.job.id, why)
        self._stop_trainer(a, why)
        self._drop(a)

    def _drop(self, a: _Attempt) -> None:
        a.pending.clear()
        a.drained.set()
        if self.jobs.get(a.job.id) is a:
            del self.jobs[a.job.id]

