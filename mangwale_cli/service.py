"""The application core: what every REST route and CLI operation does, without HTTP.

``Service`` owns the data dir, the store, the event log and bus, the trainer registry and the
runner. The server module translates HTTP and WebSocket to calls on it; tests can drive it
directly. It never imports the web framework.

Two deployments, chosen by ``store.backend``: the embedded one (TinyDB and a JSONL event log
in a locked data dir, one process), and the shared one (Redis: store, event stream and job
queue), where any number of instances serve the same jobs and events; the data dir is then only
a cache of model files, and is not locked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from . import __version__, artifacts, wire
from .errors import ConfigError, Conflict, InvalidInput, MangwaleError, NotFound, StoreError
from .events import EventBus
from .nlu import modelfile
from .nlu.predictor import Predictor
from .runner import Runner
from .settings import Settings
from .store.base import Cursor, Store
from .store.datadir import DataDir
from .store.tinydb_store import TinyDBStore
from .trainers import Registry, builtin
from .trainers.command import command_trainers
from .uploads import Uploads
from .wire import ACTIVE, Dataset, DatasetCreate, DatasetPatch, Job, JobCreate, JobStatus, now_ms
from .workerboard import Board
from .workers import WorkerHub, call_soon, is_remote

log = logging.getLogger(__name__)

SAMPLE_DATASET_NAME = "food-delivery-sample"
MODEL_FILE = modelfile.MODEL_FILE
PRUNE_BATCH = 1000  # jobs per job_deleted event (and per store write) when pruning


class Service:
    def __init__(self, settings: Settings, trainers: Registry | None = None) -> None:
        self.settings = settings
        # The operator's [trainers.<kind>] commands join the built-ins (ConfigError when bad).
        self.trainers = trainers or Registry([*builtin(), *command_trainers(settings)])
        self.datadir = DataDir(settings.data_dir)
        self.shared = settings.shared_store
        self.instance = f"{socket.gethostname()}:{settings.port or os.getpid()}"
        if settings.process_index:
            self.instance += f"/{settings.process_index}"
        self._redis: list[Any] = []
        self._queue: Any = None
        self.store: Store
        if self.shared:
            from .store.redis_store import RedisStore

            self.store = RedisStore(
                settings.store_backend,
                cache_dir=settings.data_dir / "cache",
                prefix=settings.store_prefix,
                socket_timeout=settings.store_timeout,
                connect_timeout=settings.store_timeout,
                lease=settings.runner_lease,
                retention=settings.events_retention,
                log_retention=settings.events_log_retention,
                shared_dir=Path(settings.artifacts_dir).expanduser() if settings.artifacts_dir else None,
            )
        else:
            if settings.artifacts_dir:
                raise ConfigError(
                    "artifacts.dir is for a Redis store (a directory every instance mounts); "
                    "the embedded store keeps job files in its data dir",
                    field="artifacts.dir",
                )
            self.store = TinyDBStore(
                self.datadir,
                retention=settings.events_retention,
                log_retention=settings.events_log_retention,
                fsync_interval=settings.events_fsync_interval,
                lease=settings.runner_lease,
                idempotency_ttl=settings.store_idempotency_ttl,
                snapshot_records=settings.store_snapshot_records,
                segment_bytes=settings.store_segment_bytes,
            )
        self.bus: EventBus | None = None
        self.runner: Runner | None = None
        self._last_created = 0
        # Models are loaded and run in a child process, never here (see nlu/predictor.py).
        self.predictor = Predictor()
        self.uploads = Uploads(self.store, self.predictor, self.get_job, settings.artifacts_max_size)
        self._started = False
        self._retention: asyncio.Task[None] | None = None
        self.hub: WorkerHub
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self.shared:
            await self._start_shared()
        else:
            await self._start_embedded()
        if self.settings.runner_sample_dataset:
            await self.ensure_sample_dataset()
        assert self.bus is not None
        self.runner = Runner(
            self.store,
            self.bus,
            self.trainers,
            concurrency=self.settings.runner_concurrency,
            max_attempts=self.settings.runner_max_attempts,
            stall_after=self.settings.runner_stall_after,
            kill_grace=self.settings.runner_kill_grace,
            log_lines_per_job=self.settings.runner_log_lines,
            queue=self._queue,
            holder=self.instance,
            labels=frozenset(self.settings.runner_labels),
        )
        await self.runner.start()
        runner = self.runner
        self.hub = WorkerHub(self.store, self.bus, runner, max_attempts=self.settings.runner_max_attempts,
                             forget_after=self.settings.workers_forget_after, instance=self.instance,
                             local_takes=runner.can_take, board=self._board())  # fmt: skip
        await self.hub.start()
        runner.on_remote_cancel = lambda job_id: call_soon(lambda: self.hub.notify_cancel(job_id), self._tasks)
        if self.settings.retention_max_age_days or self.settings.retention_max_finished:
            self._retention = asyncio.create_task(self.retention_loop(), name="retention")
        self._started = True

    async def _start_shared(self) -> None:
        from redis.exceptions import RedisError

        from .redisbus import RedisEventBus
        from .redisqueue import RedisQueue
        from .store.redis_store import RedisStore

        s = self.settings
        store = self.store
        assert isinstance(store, RedisStore)
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await store.open()  # StoreError (start-up fails with one line) if Redis is away
        block = 1.0
        # The store's client serves the stream's and the queue's ordinary commands; their
        # blocking reads (XREAD / XREADGROUP BLOCK) hold connections of their own.
        client = store.client
        reader = store.connect(extra_timeout=block)
        self._redis = [reader]
        shown = store.safe_url
        bus = RedisEventBus(store, reader, queue_size=s.ws_client_queue, block=block)
        self._queue = RedisQueue(
            client, reader, url=str(shown), prefix=s.store_prefix, consumer=self.instance, lease=s.runner_lease, block=block
        )
        try:
            await bus.open()
        except (RedisError, OSError, MangwaleError) as exc:
            await self._close_redis()
            await store.close()
            raise StoreError(f"cannot read the event stream at {shown}: {exc}", field="store.backend") from None
        self.bus = bus

    def _board(self) -> Board | None:
        """Where worker changes go: with Redis, every instance's board (``workerboard``)."""
        if not self.shared:
            return None  # the hub's LocalBoard: this instance's subscribers
        from .workerboard import RedisBoard

        s = self.settings
        assert self.bus is not None and self._redis
        ttl = s.runner_lease / 2 + s.workers_forget_after
        return RedisBoard(self.store.client, self._redis[0], self.store.keys, self.bus,  # type: ignore[attr-defined]  # shared: a RedisStore
                          ttl=ttl, retention=s.workers_update_retention)  # fmt: skip

    def describe_store(self) -> str:
        if self.shared:
            return f"{self.store.safe_url} (instance {self.instance})"  # type: ignore[attr-defined]  # shared: a RedisStore
        return f"tinydb in {self.settings.data_dir}"

    async def _close_redis(self) -> None:
        from redis.exceptions import RedisError

        for r in self._redis:
            try:
                await r.aclose()
            except (RedisError, OSError) as exc:  # already broken: nothing left to close cleanly
                log.debug("closing a redis client: %s", exc)
        self._redis = []

    async def _start_embedded(self) -> None:
        self.datadir.prepare()
        try:
            await self.store.open()
        except BaseException:
            self.datadir.unlock()
            raise
        self.bus = EventBus(self.store.ring, queue_size=self.settings.ws_client_queue)
        self.store.on_events = self.bus.deliver

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        assert self.runner is not None and self.bus is not None
        if self._retention is not None:
            self._retention.cancel()
        await self.predictor.close()
        await self.hub.stop()
        await self.runner.stop()
        await self.bus.stop()
        await self.store.close()
        if self.shared:
            await self._close_redis()
        else:
            self.datadir.unlock()

    async def ensure_sample_dataset(self) -> Dataset | None:
        """Load the shipped sample data set into a store that has never had one (once, even
        when several instances start together on one shared store)."""
        if not await self.store.claim_meta("sampleLoaded", "loading"):
            return None
        from .datafile import load_sample_examples

        ds = await self.create_dataset(
            DatasetCreate(
                name=SAMPLE_DATASET_NAME,
                description="Sample food-delivery intents shipped with mangwale (20 intents, 917 utterances)",
                examples=[wire.Example.model_validate(e) for e in load_sample_examples()],
            )
        )
        await self.store.set_meta("sampleLoaded", ds.id)
        return ds

    # --- ids ------------------------------------------------------------------------------

    def _stamp(self) -> int:
        """Creation time in ms, strictly increasing so newest-first order is total."""
        t = max(now_ms(), self._last_created + 1)
        self._last_created = t
        return t

    @staticmethod
    def _new_id(prefix: str, t: int) -> str:
        return f"{prefix}-{t}-{secrets.token_hex(3)}"

    # --- datasets -------------------------------------------------------------------------

    async def list_datasets(self) -> list[Dataset]:
        return await self.store.list_datasets()

    async def get_dataset(self, dataset_id: str) -> Dataset:
        ds = await self.store.get_dataset(dataset_id)
        if ds is None:
            raise NotFound(f"dataset {dataset_id} not found", field="datasetId")
        return ds

    async def create_dataset(self, body: DatasetCreate) -> Dataset:
        t = self._stamp()
        ds = Dataset(
            id=self._new_id("ds", t),
            name=body.name,
            description=body.description,
            examples=[e.to_dict() for e in body.examples],
            created_at=t,
            updated_at=t,
        )
        await self.store.create_dataset(ds)
        return ds

    async def update_dataset(self, dataset_id: str, body: DatasetPatch) -> Dataset:
        ds = await self.get_dataset(dataset_id)
        if body.name is not None:
            ds.name = body.name
        if body.description is not None:
            ds.description = body.description
        if body.examples is not None:
            ds.examples = [e.to_dict() for e in body.examples]
        ds.updated_at = now_ms()
        await self.store.save_dataset(ds)
        return ds

    async def delete_dataset(self, dataset_id: str) -> None:
        await self.get_dataset(dataset_id)
        users = [
            j.id
            for j in await self.store.list_jobs(statuses=ACTIVE)
            if j.dataset_id == dataset_id
        ]
        if users:
            raise Conflict(
                f"dataset {dataset_id} is used by {len(users)} queued or running job(s): {', '.join(users[:5])}",
                field="datasetId",
                code="in_use",
            )
        await self.store.delete_dataset(dataset_id)

    # --- jobs -----------------------------------------------------------------------------

    async def create_job(self, body: JobCreate, idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Validate and queue a job. Returns (job, created); a replayed key returns False.
        A kind only workers provide is accepted while a live worker advertises it; its params
        are the worker's to check."""
        hub = getattr(self, "hub", None)  # None until start()
        remote = (await hub.all_kinds()).get(body.kind) if hub is not None and not self.trainers.has(body.kind) else None
        if remote is not None:
            return await self._create_remote_job(body, remote, idempotency_key)
        trainer = self.trainers.get(body.kind)
        bad = wire.find_non_finite(body.params)
        if bad:
            raise InvalidInput(f"params.{bad} must be a finite number", field=f"params.{bad}")
        if body.dataset_id is None:
            if trainer.requires_dataset:
                raise InvalidInput(f"kind {body.kind!r} needs a datasetId", field="datasetId")
        else:
            ds = await self.store.get_dataset(body.dataset_id)
            if ds is None:
                # 404, like GET /training/datasets/{id}: scripts (and the CLI's exit 4) see one answer
                raise NotFound(f"dataset {body.dataset_id} does not exist", field="datasetId", code="unknown_dataset")
            if trainer.requires_examples and ds.size == 0:
                raise InvalidInput(
                    f"dataset {ds.name!r} ({ds.id}) has no examples; {body.kind} trains on labelled examples",
                    field="datasetId",
                    code="empty_dataset",
                )
            trainer.check_dataset(ds)
        await trainer.check(trainer.validate_params(body.params), self.store)
        return await self._store_job(body, idempotency_key)

    async def _create_remote_job(self, body: JobCreate, kind: wire.WorkerKind, idempotency_key: str | None) -> tuple[Job, bool]:
        bad = wire.find_non_finite(body.params)
        if bad:
            raise InvalidInput(f"params.{bad} must be a finite number", field=f"params.{bad}")
        if body.dataset_id is None and kind.requiresDataset:
            raise InvalidInput(f"kind {body.kind!r} needs a datasetId", field="datasetId")
        if body.dataset_id is not None and await self.store.get_dataset(body.dataset_id) is None:
            raise NotFound(f"dataset {body.dataset_id} does not exist", field="datasetId", code="unknown_dataset")
        return await self._store_job(body, idempotency_key)

    async def waiting_for(self, job: Job) -> str | None:
        """What a queued job waits for when no live taker (a runner, a worker) can run it."""
        hub = getattr(self, "hub", None)  # None until start()
        return await hub.waiting.waiting_for(job) if hub is not None else None

    async def _store_job(self, body: JobCreate, idempotency_key: str | None) -> tuple[Job, bool]:
        t = self._stamp()
        job = Job(
            id=self._new_id("job", t),
            kind=body.kind,
            dataset_id=body.dataset_id,
            agent_id=body.agent_id,
            params=body.params,
            created_at=t,
            updated_at=t,
            labels=list(body.labels),
        )
        job.waiting_for = job.message = await self.waiting_for(job)
        idem = (idempotency_key, body.fingerprint()) if idempotency_key else None
        job, created = await self.store.create_job(job, idem)
        if created:
            assert self.runner is not None
            await self.runner.submit(job)
            log.info("job %s (%s) queued", job.id, job.kind)
        return job, created

    async def get_job(self, job_id: str) -> Job:
        job = await self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found", field="jobId")
        return job

    async def list_jobs(
        self, *, statuses: list[JobStatus] | None = None, limit: int | None = None, cursor: str | None = None
    ) -> list[Job]:
        """Newest first. ``cursor``: a position from ``X-Next-Cursor`` (``createdAt.id``: paging
        goes on when jobs are deleted meanwhile), or, as older servers gave, a job id."""
        after = None
        if cursor is not None:
            after = Cursor.decode(cursor)
            if after is None:
                anchor = await self.store.get_job(cursor)
                if anchor is None:
                    raise InvalidInput(f"cursor {cursor[:60]!r} is not a cursor this server gave", field="cursor")
                after = Cursor(anchor.created_at, anchor.id)
        return await self.store.list_jobs(statuses=statuses, limit=limit, after=after)

    async def cancel_job(self, job_id: str) -> Job:
        job = await self.get_job(job_id)
        if job.status.terminal:
            raise Conflict(f"job {job_id} already {job.status.value}", field="jobId", code="finished")
        assert self.runner is not None
        if job.status is JobStatus.RUNNING and is_remote(job):
            return await self.hub.cancel(job)
        # The runner writes the final state, durably, before this returns; a store that refused
        # it answers 507/503 (not acknowledged), and the runner writes it once the store is back.
        return await self.runner.cancel(job)

    async def delete_job(self, job_id: str) -> None:
        job = await self.get_job(job_id)
        if not job.status.terminal:
            raise Conflict(f"job {job_id} is {job.status.value}; cancel it first", field="jobId", code="active")
        await self.store.delete_jobs([job_id])
        await self.predictor.forget(job_id)
        await self.store.delete_artifacts(job_id)

    async def prune(
        self,
        *,
        older_than: float | None = None,
        keep: int | None = None,
        statuses: list[JobStatus] | None = None,
        dry_run: bool = False,
        reason: str = "pruned",
    ) -> dict[str, Any]:
        """Delete finished jobs, with their logs and files: those that finished more than
        ``older_than`` seconds ago, and/or all but the newest ``keep``. Never a queued or running
        job, nor the base model of a queued or running fine-tune; Idempotency-Keys keep their own
        TTL. One ``job_deleted`` event per batch of deleted jobs."""
        if older_than is None and keep is None:
            raise InvalidInput("say which jobs to prune: olderThan and/or keep", field="olderThan")
        wanted = [s for s in (statuses or list(wire.TERMINAL)) if s.terminal]
        if statuses and len(wanted) != len(statuses):
            active = ", ".join(s.value for s in statuses if not s.terminal)
            raise InvalidInput(f"only finished jobs are pruned; not {active}", field="status")
        # (finishedAt, id) from the store's index: no finished job's document is decoded.
        finished = await self.store.finished_jobs_by_finish_time(wanted)
        candidates: set[str] = set()
        if older_than is not None:
            before = now_ms() - int(older_than * 1000)
            candidates = {job_id for at, job_id in finished if at < before}
        if keep is not None:
            beyond = {job_id for _, job_id in finished[: max(0, len(finished) - keep)]}
            candidates = candidates & beyond if older_than is not None else beyond
        protected = {
            str(j.params["baseJobId"])
            for j in await self.store.list_jobs(statuses=ACTIVE)
            if isinstance(j.params.get("baseJobId"), str)
        }
        kept = candidates & protected
        chosen = sorted(candidates - protected)
        deleted: list[str] = []
        if not dry_run:
            for i in range(0, len(chosen), PRUNE_BATCH):
                batch = chosen[i : i + PRUNE_BATCH]
                gone = await self.store.delete_jobs(batch, reason)
                deleted += gone
                if len(gone) < len(batch):  # spared in the deletion: a fine-tune's base since
                    left = set(batch).difference(gone)
                    kept |= {j for j in left if await self.store.get_job(j) is not None}
                for job_id in gone:
                    await self.predictor.forget(job_id)
                    await self.store.delete_artifacts(job_id)
        if deleted:
            log.info("pruned %d finished jobs (%s)", len(deleted), reason)
        return {
            "deleted": deleted if not dry_run else chosen,
            "count": len(deleted) if not dry_run else len(chosen),
            "dryRun": dry_run,
            "kept": sorted(kept),
        }

    async def retention_loop(self) -> None:
        """``[retention]``: prune by age and/or count every ``retention.interval`` seconds."""
        s = self.settings
        while True:
            try:
                await self.prune(
                    older_than=s.retention_max_age_days * 86400 if s.retention_max_age_days else None,
                    keep=s.retention_max_finished or None,
                    reason="pruned",
                )
            except MangwaleError as exc:
                log.warning("retention pass failed: %s", exc)
            await asyncio.sleep(s.retention_interval)

    # --- models ---------------------------------------------------------------------------

    async def model_path(self, job_id: str) -> Path:
        """The saved model of a succeeded nlu-train / fine-tune job. A model this server would
        refuse to load (an old pickle, another format or scikit-learn version) is 409
        ``incompatible_model`` / ``legacy_model`` here already, naming the problem."""
        job = await self.get_job(job_id)
        path = self.store.artifact_dir(job_id) / MODEL_FILE
        if job.status is JobStatus.SUCCEEDED and not path.is_file():
            path = await self.store.load_artifacts(job_id) / MODEL_FILE  # from the shared store
        if job.status is JobStatus.SUCCEEDED and not path.is_file():
            modelfile.model_file(path.parent)  # an old model.joblib: say so, and how to get out
        if job.status is not JobStatus.SUCCEEDED or not path.is_file():
            raise NotFound(
                f"job {job_id} has no model ({job.kind}, {job.status.value}); "
                "models come from succeeded nlu-train and fine-tune jobs",
                field="jobId",
                code="no_model",
            )
        return path

    async def predict(self, job_id: str, text: str) -> dict[str, Any]:
        """Classify ``text`` with a job's model. The model runs in the predictor's child process,
        which keeps recent models loaded while predictions come and exits when they stop, so
        scikit-learn never stays in the server's memory."""
        path = await self.model_path(job_id)
        await asyncio.to_thread(modelfile.check_file, path)
        result = await self.predictor.predict(job_id, path.parent, text)
        result["jobId"] = job_id
        return result

    # --- uploaded artifacts -------------------------------------------------------------

    async def upload_artifact(
        self,
        job_id: str,
        name: str,
        body: AsyncIterator[bytes],
        *,
        lease: str | None,
        sha256: str | None,
        length: str | None,
    ) -> dict[str, Any]:
        """Store a file of a running job, uploaded by the holder of its lease (``uploads``)."""
        return await self.uploads.receive(job_id, name, body, lease=lease, sha256=sha256, length=length)

    async def job_artifacts(self, job_id: str) -> list[dict[str, Any]]:
        """The files the job left (its model, a worker's uploads), by name (``artifacts``)."""
        root = await self._artifact_root(await self.get_job(job_id))
        return [f.to_dict() for f in await asyncio.to_thread(artifacts.list_files, root)]

    async def artifact_file(self, job_id: str, name: str) -> artifacts.ArtifactFile:
        """One file of the job, to serve: 400 for a name no artifact can have, 404 ``jobId`` for
        an unknown job and 404 ``name`` for a file it does not have."""
        problem = wire.artifact_name_problem(name)
        if problem is not None:
            raise InvalidInput(problem, field="name", code="bad_name", status=400)
        root = await self._artifact_root(await self.get_job(job_id))
        found = await asyncio.to_thread(artifacts.find, root, name)
        if found is None:
            raise NotFound(f"job {job_id} has no artifact {name!r} (mangwale jobs artifacts {job_id} lists them)",
                           field="name", code="unknown_artifact")  # fmt: skip
        return found

    async def _artifact_root(self, job: Job) -> Path:
        if job.status.terminal:
            return await self.store.load_artifacts(job.id)  # a shared store's published files, here
        return self.store.artifact_dir(job.id)

    # --- events ---------------------------------------------------------------------------

    async def job_events(self, job_id: str, since: int = 0) -> list[str]:
        """The texts of the job's kept events with ``seq > since``, oldest first."""
        await self.get_job(job_id)
        assert self.bus is not None
        await self.bus.catch_up(since)  # a shared stream: this instance's copy holds what the job has
        return await self.bus.texts(self.bus.history(since, {job_id}))

    async def job_logs(self, job_id: str, since: int = 0) -> list[dict[str, Any]]:
        """The job's stored log lines with ``lineNo > since``."""
        await self.get_job(job_id)
        lines = await self.store.read_job_lines(job_id, "logs")
        return [entry for entry in lines if int(entry.get("lineNo", 0)) > since]

    async def job_metrics(self, job_id: str) -> list[dict[str, Any]]:
        """Every metrics report of the job, oldest first: its training curve."""
        await self.get_job(job_id)
        return await self.store.read_job_lines(job_id, "metrics")

    async def health(self) -> dict[str, Any]:
        assert self.bus is not None
        out = {
            "status": "ok",
            "version": __version__,
            "epoch": self.bus.epoch,
            "headSeq": self.bus.head,
            "jobs": await self.store.count_jobs(),
            "streams": len(self.bus.subscribers),
            "store": "redis" if self.shared else "tinydb",
        }
        if self.shared:
            assert self.runner is not None
            out["instance"] = self.instance
            out["takeovers"] = self.runner.takeovers
            out["running"] = self.runner.active
        return out
