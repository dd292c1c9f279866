"""The shared store: the record of a Redis deployment (``redis.asyncio``).

Several ``mangwale serve`` instances use one Redis at once. Every change is one Lua script
(``redis_scripts``) that checks it, appends its event to the shared stream and changes the state,
atomically on the server: a job and its ``job_created`` (and its queue entry), a status and its
``training_update``, a log line and its ``job_log``, a deletion and its ``job_deleted``, a
dataset and its ``dataset_update``. Key names live in ``redis_keys``.

Each write carries a write id (``<boot>:<n>``): redis-py retries a script once on a fresh
connection when the reply was lost, and the runner retries a write while Redis is away; either
retry finds the first run's reply under that id and changes nothing. A retried write keeps its
id as long as the caller passes the same event object again (``_write_id``).

Leases: the job document names the holder and fencing token of its current attempt; the key
``lease:{job}`` (``holder|token``, expiring after ``lease`` seconds on Redis's clock) says whether
it is still live. Every guarded write checks both inside its script.

A Redis that is down, hung, loading or busy surfaces as ``Unavailable`` (HTTP 503, code
``store_unavailable``) naming the URL without its password; sockets time out after a few
seconds so requests fail fast instead of piling up. A Redis that restarted empty is an empty
store with a new event epoch (``ensure_epoch``); the schema version is stamped again.

Durability is Redis's: ``durable=True`` is accepted and ignored; what survives kill -9 of Redis
is what its ``appendonly``/``appendfsync`` settings say (docs/storage.md). Nothing here takes
the data-dir lock: artifact files are only a local cache of what Redis holds (``cache_dir /
job_id``), filled with temp file + rename.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import secrets
import shutil
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.typing import EncodableT

from .. import faults, wire
from ..errors import Conflict, MangwaleError, StoreError, Unavailable
from ..eventlog import EventRing, new_epoch
from ..wire import Dataset, Job, JobStatus
from .base import IDEMPOTENCY_TTL, SCHEMA_VERSION, Cursor, Expect, Store, _fsync_tree, stale_write
from .datadir import TMP_MARK
from .redis_keys import (
    ARTIFACT_DIGEST_FIELD,
    DEFAULT_PREFIX,
    LINE_NAMES,
    MANIFEST_FIELD,
    WRITE_TTL,
    RedisKeys,
)
from .redis_scripts import (
    APPEND_LOG,
    CLAIM_META,
    CREATE_JOB,
    DATASET,
    DELETE_JOBS,
    ENSURE_EPOCH,
    FINISH_TIMES,
    LIST_JOBS,
    MIGRATE_1_TO_2,
    RENEW_LEASE,
    SAVE_JOB,
    STATUSES,
)

log = logging.getLogger(__name__)

SCHEMA_FIELD = "schema"
MARKER_NAME = ".mangwale-artifacts"  # in a cached artifact dir: the digest it holds
NOT_PUBLISHED = frozenset({"logs.jsonl", "metrics.jsonl", MARKER_NAME})  # lines: lists / ours
# Redis error replies that mean "not now" rather than "wrong command": worth a 503.
UNAVAILABLE_REPLIES = ("BUSY", "LOADING", "MISCONF", "READONLY", "MASTERDOWN", "TRYAGAIN", "OOM")


def redact(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=user + host))


def _why_unavailable(exc: BaseException) -> str | None:
    """How a Redis failure reads in a 503, or None when it is not an availability problem."""
    if isinstance(exc, rexc.BusyLoadingError):
        return "is loading its data set"
    if isinstance(exc, rexc.TimeoutError | TimeoutError):
        return "did not answer in time"
    if isinstance(exc, rexc.ConnectionError | OSError):
        return f"is unreachable: {_root_cause(exc)}"
    if isinstance(exc, rexc.ResponseError) and str(exc).split(" ", 1)[0] in UNAVAILABLE_REPLIES:
        return f"refused the command: {exc}"
    return None


def _root_cause(exc: BaseException) -> str:
    seen: BaseException | None = exc
    while seen is not None:  # redis-py wraps the OSError that names the reason
        if isinstance(seen, OSError) and seen.errno and seen.errno > 0:
            return os.strerror(seen.errno)  # "Connection refused", not asyncio's wording
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = str(exc).strip().rstrip(".")
    return text or type(exc).__name__


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    """Replace ``path`` so that a reader (another instance on this machine) sees old or new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


FINISH_BATCH = 256  # documents per round trip when reading finish times (pruning)
IN_DOUBT = 1000  # writes whose reply was lost, remembered so their retry keeps its write id


class _SendKeepsCancellation:
    """redis-py sends a command under ``asyncio.wait_for(..., socket_timeout)``. Before Python
    3.12, ``wait_for`` returns the result when its task is cancelled just as the inner send
    completes (CPython gh-86296; 3.12 rebuilt it on ``asyncio.timeout``): the cancellation is
    lost, and a task told to stop goes on. That is what kept a SIGTERM'd instance waiting in
    ``RedisQueue.take()`` or in the stream reader's next ``XREAD``. This send uses
    ``asyncio.timeout``, which hands the cancellation on."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        conn: Any = self
        if not conn.socket_timeout:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]  # a mixin ahead of redis-py's Connection, which mypy does not see here
            return
        if not conn.is_connected:
            connect = getattr(conn, "connect_check_health", None)  # redis-py 6+: no health check yet
            await (connect(check_health=False) if connect is not None else conn.connect())
        elif check_health:
            await conn.check_health()
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            async with asyncio.timeout(conn.socket_timeout):
                conn._writer.writelines(command)
                await conn._writer.drain()
        except TimeoutError:
            await conn.disconnect(nowait=True)
            raise rexc.TimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await conn.disconnect(nowait=True)
            raise rexc.ConnectionError(f"Error while writing to socket: {exc}") from exc
        except BaseException:
            await conn.disconnect(nowait=True)  # a half-sent command leaves the socket unusable
            raise


_SAFE_CLASSES: dict[type, type] = {}


POOL_SIZE = 64  # connections per client to Redis (commands in flight at once)


def _keep_cancellation(client: aioredis.Redis) -> aioredis.Redis:
    """Give the client's pool connections whose send keeps a cancellation (Python < 3.12)."""
    if sys.version_info >= (3, 12):
        return client
    pool = client.connection_pool
    base = pool.connection_class
    if not issubclass(base, _SendKeepsCancellation):
        safe = _SAFE_CLASSES.get(base)
        if safe is None:
            safe = _SAFE_CLASSES[base] = type(f"CancelSafe{base.__name__}", (_SendKeepsCancellation, base), {})
        pool.connection_class = safe
    return client


def _parse_version(raw: bytes | str) -> int | None:
    try:
        version = wire.loads(raw)
    except ValueError:
        return None
    return version if isinstance(version, int) else None


class RedisStore(Store):
    """A ``Store`` on Redis, shared by every instance pointed at the same URL and prefix."""

    shared: ClassVar[bool] = True

    def __init__(
        self,
        url: str,
        *,
        cache_dir: Path,
        prefix: str = DEFAULT_PREFIX,
        socket_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        health_check_interval: float = 5.0,
        lease: float = 30.0,
        retention: int = 100_000,
        log_retention: int = 10_000,
        idempotency_ttl: float = IDEMPOTENCY_TTL,
        shared_dir: Path | None = None,
    ) -> None:
        self.url = url
        self.safe_url = redact(url)
        self.keys = RedisKeys(prefix)
        # ``artifacts.dir``: a directory every instance mounts. Files stay there and Redis keeps
        # only a manifest; without it, files are published into Redis (small built-in models).
        self.shared_dir = Path(shared_dir) if shared_dir is not None else None
        self.artifacts_dir = self.shared_dir if self.shared_dir is not None else Path(cache_dir)
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self.health_check_interval = health_check_interval
        self.lease = lease
        self.retention, self.log_retention = retention, log_retention
        self.maxlen = retention + log_retention  # the stream keeps what replay can use
        self.idempotency_ttl = idempotency_ttl
        self.write_ttl = max(WRITE_TTL, int(2 * lease) + 1)
        # The event bus replaces this with its mirror of the stream (redisbus.MirrorRing).
        self.ring = EventRing(retention=retention, log_retention=log_retention)
        self._client: aioredis.Redis | None = None
        self._boot = secrets.token_hex(6)
        self._writes = itertools.count(1)
        self._in_doubt: dict[int, tuple[object, str]] = {}

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {self.artifacts_dir}: {exc.strerror}", field="data_dir") from None
        try:
            client = self.connect()
        except ValueError as exc:
            raise StoreError(f"bad redis URL {self.safe_url}: {exc}", field="redis_url") from None
        self._client = client
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(text)
            for name, text in (
                ("create", CREATE_JOB), ("save", SAVE_JOB), ("log", APPEND_LOG), ("delete", DELETE_JOBS),
                ("dataset", DATASET), ("claim", CLAIM_META), ("renew", RENEW_LEASE),
                ("epoch", ENSURE_EPOCH), ("list", LIST_JOBS), ("migrate", MIGRATE_1_TO_2),
                ("finish_times", FINISH_TIMES),
            )
        }  # fmt: skip
        try:
            async with self._redis() as r:
                raw = await r.hget(self.keys.meta, SCHEMA_FIELD)
                if raw is None:  # a new store, or a Redis that lost its data
                    log.info("redis at %s has no mangwale store under %r: starting one", self.safe_url, self.keys.prefix)
                    await r.hsetnx(self.keys.meta, SCHEMA_FIELD, wire.dumps(SCHEMA_VERSION))
            if raw is not None:
                await self._upgrade(raw)
            await self.ensure_epoch()
        except MangwaleError as exc:
            await self.close()
            if isinstance(exc, Unavailable):  # start-up reports a StoreError as one clear line
                raise StoreError(f"cannot open the store: {exc.message}", code="store_unavailable") from None
            raise

    def connect(self, extra_timeout: float = 0.0) -> aioredis.Redis:
        """A new client (its own pool) to this store's Redis, configured as the store's own.
        The event stream and the job queue use one with ``extra_timeout`` added to the socket
        timeout for their blocking reads (``XREAD BLOCK``)."""
        # A blocking pool: past POOL_SIZE commands in flight a request waits for a connection
        # (up to the socket timeout) instead of failing: redis-py's default pool refuses the
        # 101st with "Too many connections", a 503 for a burst of requests Redis would serve.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=POOL_SIZE,
            timeout=self.socket_timeout,
            decode_responses=False,  # artifacts are bytes
            socket_timeout=self.socket_timeout + extra_timeout,
            socket_connect_timeout=self.connect_timeout,
            health_check_interval=self.health_check_interval,
            # One quick retry on a fresh connection covers pooled sockets a Redis restart
            # closed, and a reply lost with its connection (write scripts carry a write id, so
            # the retry changes nothing twice); a timeout is not retried, so a hung Redis costs
            # one socket_timeout.
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1, (rexc.ConnectionError,)),
            client_name="mangwale",
        )
        return _keep_cancellation(aioredis.Redis.from_pool(pool))

    @property
    def client(self) -> aioredis.Redis:
        """The store's client (open): other parts of a Redis deployment share its pool."""
        assert self._client is not None, "store is not open"
        return self._client

    def _where(self) -> str:
        return f"redis at {self.safe_url} (prefix {self.keys.prefix!r})"

    async def _upgrade(self, raw: bytes | str) -> None:
        """Refuse a schema this mangwale does not know; migrate schema 1 (one script, so every
        instance sees the old layout or the new one, and only one instance migrates)."""
        version = _parse_version(raw)
        if version is None:
            raise StoreError(f"{self._where()} has a bad schema version {raw!r}", code="corrupt")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self._where()} has schema version {version}, newer than this mangwale ({SCHEMA_VERSION}); "
                "upgrade mangwale",
                code="too_new",
            )
        if version == SCHEMA_VERSION:
            return
        if version != 1:
            raise StoreError(f"{self._where()} has schema version {version}, which this mangwale cannot migrate; "
                             "restore it from a backup or use another store.prefix", code="too_old")  # fmt: skip
        k = self.keys
        try:
            async with self._redis():
                n = await self._scripts["migrate"](
                    keys=[k.meta, k.jobs, k.jobseq, *self._status_keys()],
                    args=[k.prefix, int(self.idempotency_ttl * 1000), wire.dumps(SCHEMA_VERSION)],
                )
        except StoreError as exc:
            raise StoreError(
                f"{self._where()} is at schema 1 and could not be migrated to {SCHEMA_VERSION} ({exc.message}); "
                "stop every mangwale instance on it, then start one of this version again",
                code="migration_failed",
            ) from None
        if int(n) >= 0:
            log.warning("%s: migrated %d jobs from schema 1 to %d (jobSeq and lease in every job, status "
                        "indexes by createdAt, idempotency keys with a TTL)", self._where(), int(n), SCHEMA_VERSION)  # fmt: skip

    async def ensure_epoch(self) -> str:
        """The event log's epoch, starting a new one if Redis lost it (or lost seqs this
        instance saw: the new epoch continues above them)."""
        async with self._redis():
            epoch = await self._scripts["epoch"](keys=[self.keys.epoch, self.keys.seq], args=[new_epoch(), self.ring.head])
        return _text(epoch)

    async def head(self) -> str:
        # Every change script bumps ``seq`` (its event) in the same atomic unit; ``epoch`` tells a
        # Redis that lost its data (seqs start over above the old ones, in a new epoch).
        async with self._redis() as r:
            epoch, seq = await r.mget([self.keys.epoch, self.keys.seq])
        return f"{_text(epoch) if epoch else ''}.{int(seq or 0)}"

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    @asynccontextmanager
    async def _redis(self) -> AsyncIterator[aioredis.Redis]:
        """The client; Redis failures inside the block become ``Unavailable`` or ``StoreError``."""
        if self._client is None:
            raise Unavailable(f"the store at {self.safe_url} is closed", code="store_unavailable")
        try:
            yield self._client
        except (rexc.RedisError, OSError) as exc:
            why = _why_unavailable(exc)
            if why is None:
                raise StoreError(f"redis at {self.safe_url} answered an error: {exc}") from exc
            raise Unavailable(f"redis at {self.safe_url} {why}", code="store_unavailable") from None

    def _status_keys(self) -> list[str]:
        return [self.keys.status(s) for s in STATUSES]

    # --- the write path -------------------------------------------------------------------

    def _write_id(self, token: object | None) -> str:
        """The id of a write: a new one, unless ``token`` (the event of the write) is that of
        a write whose reply was lost, which is being retried."""
        if token is not None:
            held = self._in_doubt.get(id(token))
            if held is not None and held[0] is token:
                return held[1]
        return f"{self._boot}:{next(self._writes)}"

    async def _write(self, script: str, keys: list[str], args: list[EncodableT], token: object | None = None) -> Any:
        """Run a write script with its write id; a store that lost its epoch gets a new one
        and the script runs again (it checks the epoch before writing anything)."""
        wid = self._write_id(token)
        k = self.keys
        full_keys = [k.write(wid), k.events, k.seq, k.epoch, *keys]
        full_args: list[EncodableT] = [self.write_ttl, self.maxlen, *args]
        try:
            reply = await self._eval(self._scripts[script], full_keys, full_args)
        except Unavailable:
            if token is not None:  # it may have run: a retry of this write must keep its id
                self._in_doubt[id(token)] = (token, wid)
                while len(self._in_doubt) > IN_DOUBT:
                    self._in_doubt.pop(next(iter(self._in_doubt)))
            raise
        except BaseException:
            self._settled(token)
            raise
        faults.point("redis-committed")  # in Redis, state and event; not yet answered or shown
        self._settled(token)
        return reply

    def _settled(self, token: object | None) -> None:
        held = self._in_doubt.get(id(token)) if token is not None else None
        if held is not None and held[0] is token:
            del self._in_doubt[id(token)]

    async def _eval(self, run: AsyncScript, keys: list[str], args: list[EncodableT]) -> Any:
        async with self._redis():
            try:
                return await run(keys=keys, args=args)
            except rexc.ResponseError as exc:
                if not str(exc).startswith("NOEPOCH"):
                    raise
            log.warning("%s lost its event epoch (Redis lost its data): starting a new one", self._where())
            await self.ensure_epoch()
            return await run(keys=keys, args=args)

    # --- jobs -----------------------------------------------------------------------------

    @staticmethod
    def _doc_text(job: Job) -> str:
        """The job's document without ``jobSeq``: the script appends it (``,"jobSeq":N}``)."""
        doc = job.to_dict()
        del doc["jobSeq"]
        return wire.dumps(doc)

    async def create_job(self, job: Job, idempotency: tuple[str, str] | None = None) -> tuple[Job, bool]:
        job.job_seq = 1
        k = self.keys
        keys = [k.job(job.id), k.jobs, k.status(job.status), k.meta, k.queue]
        args: list[EncodableT] = [job.id, self._doc_text(job), job.created_at, wire.dumps(SCHEMA_VERSION),
                                  wire.dumps(wire.job_created(job)), "1" if job.status is JobStatus.QUEUED else ""]  # fmt: skip
        if idempotency is not None:
            keys.append(k.idem(idempotency[0]))
            args += [idempotency[1], k.job(""), max(1, int(self.idempotency_ttl * 1000))]
        reply = await self._write("create", keys, args, job)
        outcome = _text(reply[0])
        if outcome == "conflict":
            raise Conflict(
                "Idempotency-Key was already used with a different request",
                field="Idempotency-Key",
                code="idempotency_mismatch",
            )
        if outcome == "existing":
            return Job.from_dict(wire.loads(reply[1])), False
        if outcome == "exists":
            raise Conflict(f"job {job.id} already exists", field="jobId", code="exists")
        return Job.from_dict(job.to_dict()), True

    async def write_job(
        self,
        job: Job,
        event: dict[str, Any] | None,
        *,
        expect: Expect | None = None,
        lines: tuple[str, list[dict[str, Any]]] | None = None,
        durable: bool = False,
    ) -> Job:
        stored = await self._save(job, event, expect, lines)
        assert stored is not None
        return stored

    async def begin_attempt(self, job: Job, previous: int, event: dict[str, Any]) -> bool:
        return await self._save(job, event, None, None, previous) is not None

    async def _save(
        self,
        job: Job,
        event: dict[str, Any] | None,
        expect: Expect | None,
        lines: tuple[str, list[dict[str, Any]]] | None,
        previous: int | None = None,
    ) -> Job | None:
        k = self.keys
        items = lines[1] if lines else []
        if lines and lines[0] not in LINE_NAMES:
            raise ValueError(f"no job lines named {lines[0]!r}")
        lease = job.lease or {}
        keys = [k.job(job.id), k.lease(job.id), k.lines(job.id, lines[0]) if lines and items else k.job(job.id),
                *self._status_keys()]  # fmt: skip
        args: list[EncodableT] = [
            job.id,
            self._doc_text(job),
            job.status.value,
            job.attempt,
            job.created_at,
            *(expect or Expect()).to_args(),
            wire.dumps(event) if event is not None else "",
            f"{lease['holder']}|{lease['token']}" if job.lease else "",
            max(1, int(self.lease * 1000)),
            "" if previous is None else previous,
            *(wire.dumps(i) for i in items),
        ]
        reply = await self._write("save", keys, args, event if event is not None else job)
        outcome = _text(reply[0])
        if outcome == "lost":
            return None
        if outcome == "stale":
            status, attempt = _text(reply[2]), int(reply[3])
            stored = None if status == "deleted" else {"status": status, "attempt": attempt}
            raise stale_write(job.id, job.status.value, job.attempt, _text(reply[1]), stored)
        job.job_seq = int(reply[1])
        return Job.from_dict(job.to_dict())

    async def append_log(self, job_id: str, entry: dict[str, Any], event: dict[str, Any], expect: Expect | None) -> None:
        k = self.keys
        keys = [k.job(job_id), k.lease(job_id), k.lines(job_id, "logs")]
        args: list[EncodableT] = [job_id, wire.dumps(entry), wire.dumps(event), "" if expect is None else "1",
                                  *(expect or Expect()).to_args()]  # fmt: skip
        reply = await self._write("log", keys, args, event)
        if _text(reply[0]) == "stale":
            status, attempt = _text(reply[2]), int(reply[3])
            stored = None if status == "deleted" else {"status": status, "attempt": attempt}
            raise stale_write(job_id, "running", (expect.token if expect else None) or 0, _text(reply[1]), stored)

    async def lease_live(self, job_id: str) -> bool:
        async with self._redis() as r:
            return bool(await r.exists(self.keys.lease(job_id)))

    async def renew_lease(self, job_id: str, holder: str, token: int) -> bool:
        async with self._redis():
            ok = await self._scripts["renew"](keys=[self.keys.lease(job_id)],
                                              args=[f"{holder}|{token}", max(1, int(self.lease * 1000))])  # fmt: skip
        return bool(ok)

    async def delete_jobs(self, job_ids: list[str], reason: str = "deleted") -> list[str]:
        if not job_ids:
            return []
        text = wire.dumps(wire.job_deleted([], reason))
        before, after = text.split('"jobIds":[]', 1)
        args: list[EncodableT] = [self.keys.prefix, before + '"jobIds":[', "]" + after]
        for job_id in dict.fromkeys(job_ids):
            args += [job_id, wire.dumps(job_id)]
        reply = await self._write("delete", [self.keys.jobs, *self._status_keys()], args)
        return [_text(i) for i in reply]

    async def get_job(self, job_id: str) -> Job | None:
        async with self._redis() as r:
            raw = await r.get(self.keys.job(job_id))
        return Job.from_dict(wire.loads(raw)) if raw is not None else None

    async def list_jobs(
        self,
        *,
        statuses: Iterable[JobStatus] | None = None,
        limit: int | None = None,
        after: Cursor | None = None,
    ) -> list[Job]:
        if limit is not None and limit <= 0:
            return []
        wanted = sorted({self.keys.status(s) for s in statuses or ()})
        keys = wanted or [self.keys.jobs]  # no statuses: every job, as the embedded store does
        args: list[EncodableT] = [self.keys.job(""), after.created_at if after else "", after.job_id if after else "",
                                  limit or 0]  # fmt: skip
        async with self._redis():
            docs = await self._scripts["list"](keys=keys, args=args)
        return [Job.from_dict(wire.loads(d)) for d in docs]

    async def finished_jobs_by_finish_time(self, statuses: Iterable[JobStatus]) -> list[tuple[int, str]]:
        # The status indexes give the ids; finish times are in the documents, read by a script
        # FINISH_BATCH at a time: Redis and the event loop each get a turn between round trips.
        wanted = sorted({s for s in statuses if s.terminal}, key=lambda s: s.value)
        out: list[tuple[int, str]] = []
        async with self._redis() as r:
            for status in wanted:
                ids: list[bytes] = await r.zrange(self.keys.status(status), 0, -1)  # type: ignore[assignment]  # redis-py: sync and async in one hint
                for i in range(0, len(ids), FINISH_BATCH):
                    reply = await self._scripts["finish_times"](keys=[], args=[self.keys.job(""), *ids[i : i + FINISH_BATCH]])
                    out += [(int(reply[j + 1]), _text(reply[j])) for j in range(0, len(reply), 2)]
        out.sort()
        return out

    async def count_jobs(self) -> dict[str, int]:
        async with self._redis() as r, r.pipeline(transaction=True) as pipe:
            for s in STATUSES:
                pipe.zcard(self.keys.status(s))
            counts = await pipe.execute()
        return {s.value: int(n) for s, n in zip(STATUSES, counts, strict=True)}

    # --- datasets -------------------------------------------------------------------------

    async def _dataset(self, dataset_id: str, action: str, doc: str = "", created_at: int = 0) -> str:
        k = self.keys
        keys = [k.dataset(dataset_id), k.datasets, k.meta]
        args: list[EncodableT] = [dataset_id, action, doc, created_at,
                                  wire.dumps(wire.dataset_update(dataset_id, action)), wire.dumps(SCHEMA_VERSION)]  # fmt: skip
        reply = await self._write("dataset", keys, args)
        return _text(reply[0])

    async def create_dataset(self, dataset: Dataset) -> None:
        outcome = await self._dataset(dataset.id, "created", wire.dumps(dataset.to_dict()), dataset.created_at)
        if outcome == "exists":
            raise Conflict(f"dataset {dataset.id} already exists", field="datasetId", code="exists")

    async def save_dataset(self, dataset: Dataset) -> None:
        await self._dataset(dataset.id, "updated", wire.dumps(dataset.to_dict()), dataset.created_at)

    async def delete_dataset(self, dataset_id: str) -> None:
        await self._dataset(dataset_id, "deleted")

    async def get_dataset(self, dataset_id: str) -> Dataset | None:
        async with self._redis() as r:
            raw = await r.get(self.keys.dataset(dataset_id))
        return Dataset.from_dict(wire.loads(raw)) if raw is not None else None

    async def list_datasets(self) -> list[Dataset]:
        """Oldest first (createdAt, then id)."""
        async with self._redis() as r:
            ids: list[bytes] = await r.zrange(self.keys.datasets, 0, -1)  # type: ignore[assignment]  # redis-py: sync and async in one hint
            if not ids:
                return []
            docs = await r.mget([self.keys.dataset(_text(i)) for i in ids])
        return [Dataset.from_dict(wire.loads(d)) for d in docs if d is not None]  # None: just deleted

    # --- metadata -------------------------------------------------------------------------

    async def get_meta(self, key: str) -> object | None:
        async with self._redis() as r:
            raw = await r.hget(self.keys.meta, key)
        return wire.loads(raw) if raw is not None else None

    async def set_meta(self, key: str, value: object) -> None:
        async with self._redis() as r:
            await r.hset(self.keys.meta, key, wire.dumps(value))

    async def claim_meta(self, key: str, value: object) -> bool:
        keys = [self.keys.write(self._write_id(None)), self.keys.meta]
        async with self._redis():
            won = await self._scripts["claim"](keys=keys, args=[self.write_ttl, key, wire.dumps(value)])
        return bool(won)

    # --- the event log, read side -----------------------------------------------------------

    async def events_after(self, since: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        start = f"{since + 1}-0"
        async with self._redis() as r:
            while True:
                entries: Any = await r.xrange(self.keys.events, min=start, max="+", count=1000)
                out += [wire.loads(fields[b"d"]) for _id, fields in entries]
                if len(entries) < 1000:
                    return out
                start = "(" + _text(entries[-1][0])

    # --- job lines --------------------------------------------------------------------------

    async def read_job_lines(self, job_id: str, name: str) -> list[dict[str, Any]]:
        async with self._redis() as r:
            raw = await r.lrange(self.keys.lines(job_id, name), 0, -1)
        return [wire.loads(x) for x in raw]

    # --- artifacts ------------------------------------------------------------------------

    def _read_local(self, job_id: str) -> dict[str, bytes]:
        root = self.artifact_dir(job_id)
        if not root.is_dir():
            return {}
        files = {}
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and rel not in NOT_PUBLISHED and TMP_MARK not in path.name:
                files[rel] = path.read_bytes()
        return files

    def _manifest(self, job_id: str) -> dict[str, str]:
        """``artifacts.dir``: each published file's ``{"size", "sha256"}`` (JSON), by name."""
        root = self.artifact_dir(job_id)
        out: dict[str, str] = {}
        if not root.is_dir():
            return out
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and rel not in NOT_PUBLISHED and TMP_MARK not in path.name and not path.name.startswith("."):
                out[rel] = json.dumps({"size": path.stat().st_size, "sha256": _file_sha256(path)})
        return out

    async def save_artifacts(self, job_id: str) -> None:
        if self.shared_dir is not None:
            # The files are on the shared disk already: make them durable, publish the manifest.
            await asyncio.to_thread(_fsync_tree, self.artifact_dir(job_id))
            manifest = await asyncio.to_thread(self._manifest, job_id)
            mapping: dict[EncodableT, EncodableT] = {MANIFEST_FIELD: "1"}
            mapping.update(manifest)
            async with self._redis() as r, r.pipeline(transaction=True) as pipe:
                pipe.delete(self.keys.artifact(job_id))
                pipe.hset(self.keys.artifact(job_id), mapping=mapping)
                await pipe.execute()
            return
        files = await asyncio.to_thread(self._read_local, job_id)
        digest = _digest(files)
        mapping = {ARTIFACT_DIGEST_FIELD: digest}
        mapping.update(files)
        # One transaction: readers see the old set or the new one, never a mix.
        async with self._redis() as r, r.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.artifact(job_id))
            if files:
                pipe.hset(self.keys.artifact(job_id), mapping=mapping)
            await pipe.execute()
        if files:  # this cache already holds exactly what was published
            await asyncio.to_thread(_write_file, self.artifact_dir(job_id) / MARKER_NAME, digest.encode())

    async def load_artifacts(self, job_id: str) -> Path:
        root = self.artifact_dir(job_id)
        if self.shared_dir is not None:
            return root  # every instance mounts the same files
        key = self.keys.artifact(job_id)
        async with self._redis() as r:
            digest = await r.hget(key, ARTIFACT_DIGEST_FIELD)
            if digest is None:
                return root  # nothing published: whatever is local is all there is
            if await asyncio.to_thread(self._cached_digest, root) == digest:
                return root
            stored: dict[bytes, bytes] = await r.hgetall(key)  # type: ignore[assignment]  # redis-py: sync and async in one hint
        digest = stored.pop(ARTIFACT_DIGEST_FIELD.encode(), None)
        if digest is None:  # deleted between the two reads
            return root

        def fill() -> None:
            for name, data in stored.items():
                rel = Path(name.decode())
                if rel.is_absolute() or ".." in rel.parts:  # never write outside the cache
                    raise StoreError(f"job {job_id} has an artifact with a bad name {rel}")
                _write_file(root / rel, data)
            _write_file(root / MARKER_NAME, digest)  # last: a crash mid-way downloads again

        await asyncio.to_thread(fill)
        return root

    def uploads_refused(self) -> str | None:
        if self.shared_dir is None:
            return (
                "this server keeps job files in Redis, which is no place for large uploaded files: "
                "set artifacts.dir (MANGWALE_ARTIFACTS_DIR) to a directory every instance mounts"
            )
        return None

    async def put_artifact(self, job_id: str, name: str, src: Path, size: int, sha256: str) -> Path:
        if self.shared_dir is None:
            raise Conflict(self.uploads_refused() or "", code="no_shared_artifacts_dir")
        dest = await super().put_artifact(job_id, name, src, size, sha256)
        async with self._redis() as r:
            await r.hset(self.keys.artifact(job_id), mapping={MANIFEST_FIELD: "1", name: json.dumps({"size": size, "sha256": sha256})})
        return dest

    @staticmethod
    def _cached_digest(root: Path) -> bytes | None:
        try:
            return (root / MARKER_NAME).read_bytes()
        except OSError:
            return None

    async def delete_artifacts(self, job_id: str) -> None:
        k = self.keys
        async with self._redis() as r:
            await r.delete(k.artifact(job_id), *(k.lines(job_id, n) for n in LINE_NAMES))
        await asyncio.to_thread(shutil.rmtree, self.artifact_dir(job_id), True)
