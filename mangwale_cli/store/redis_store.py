"""The shared store: jobs, datasets, metadata, logs and artifacts in Redis (``redis.asyncio``).

Several ``mangwale serve`` instances use one Redis at once, so every change that spans keys (a
job and its indexes, a guarded save, a delete) is one Lua script, atomic on the server. Key
names live in ``redis_keys``. Nothing here takes the data-dir lock: instances on one machine
share the data dir, and artifact files are only a local cache of what Redis holds
(``cache_dir / job_id``), filled with temp file + rename.

A Redis that is down, hung, loading or busy surfaces as ``Unavailable`` (HTTP 503, code
``store_unavailable``) naming the URL without its password; sockets time out after a few
seconds so requests fail fast instead of piling up. A Redis that restarted empty is just an
emptier store: the schema version is stamped again by the next write.

Durability is Redis's: ``durable=True`` is accepted and ignored, and what survives kill -9 of
Redis depends on its ``appendonly``/``appendfsync`` settings (docs/storage.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.typing import EncodableT

from .. import wire
from ..errors import Conflict, MangwaleError, StoreError, Unavailable
from ..wire import Dataset, Job, JobStatus
from .base import SCHEMA_VERSION, Store, stale_reason, stale_write
from .datadir import TMP_MARK
from .redis_keys import ARTIFACT_DIGEST_FIELD, DEFAULT_PREFIX, LINE_NAMES, RedisKeys
from .redis_scripts import CREATE_JOB, DELETE_JOB, LIST_JOBS, SAVE_JOB, STATUSES

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
    ) -> None:
        self.url = url
        self.safe_url = redact(url)
        self.keys = RedisKeys(prefix)
        self.artifacts_dir = Path(cache_dir)
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self.health_check_interval = health_check_interval
        self._client: aioredis.Redis | None = None

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
        self._create_job = client.register_script(CREATE_JOB)
        self._save_job = client.register_script(SAVE_JOB)
        self._delete_job = client.register_script(DELETE_JOB)
        self._list_jobs = client.register_script(LIST_JOBS)
        try:
            async with self._redis() as r:
                raw = await r.hget(self.keys.meta, SCHEMA_FIELD)
                if raw is None:  # a new store, or a Redis that lost its data
                    log.info("redis at %s has no mangwale store under %r: starting one", self.safe_url, self.keys.prefix)
                    await r.hsetnx(self.keys.meta, SCHEMA_FIELD, wire.dumps(SCHEMA_VERSION))
            if raw is not None:
                self._check_version(raw)
        except MangwaleError as exc:
            await self.close()
            if isinstance(exc, Unavailable):  # start-up reports a StoreError as one clear line
                raise StoreError(f"cannot open the store: {exc.message}", code="store_unavailable") from None
            raise

    def connect(self, extra_timeout: float = 0.0) -> aioredis.Redis:
        """A new client (its own pool) to this store's Redis, configured as the store's own.
        The event stream and the job queue use one with ``extra_timeout`` added to the socket
        timeout for their blocking reads (``XREAD BLOCK``)."""
        return aioredis.Redis.from_url(
            self.url,
            decode_responses=False,  # artifacts are bytes
            socket_timeout=self.socket_timeout + extra_timeout,
            socket_connect_timeout=self.connect_timeout,
            health_check_interval=self.health_check_interval,
            # One quick retry on a fresh connection covers pooled sockets a Redis restart
            # closed; a timeout is not retried, so a hung Redis costs one socket_timeout.
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1, (rexc.ConnectionError,)),
            client_name="mangwale",
        )

    @property
    def client(self) -> aioredis.Redis:
        """The store's client (open): other parts of a Redis deployment share its pool."""
        assert self._client is not None, "store is not open"
        return self._client

    def _check_version(self, raw: bytes | str) -> None:
        where = f"redis at {self.safe_url} (prefix {self.keys.prefix!r})"
        try:
            version = wire.loads(raw)
        except ValueError:
            version = None
        if not isinstance(version, int):
            raise StoreError(f"{where} has a bad schema version {raw!r}", code="corrupt")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{where} has schema version {version}, newer than this mangwale ({SCHEMA_VERSION}); "
                "upgrade mangwale",
                code="too_new",
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    @asynccontextmanager
    async def _redis(self) -> AsyncIterator[aioredis.Redis]:
        """The client; Redis failures inside the block become ``Unavailable`` or ``StoreError``."""
        assert self._client is not None, "store is not open"
        try:
            yield self._client
        except (rexc.RedisError, OSError) as exc:
            why = _why_unavailable(exc)
            if why is None:
                raise StoreError(f"redis at {self.safe_url} answered an error: {exc}") from exc
            raise Unavailable(f"redis at {self.safe_url} {why}", code="store_unavailable") from None

    def _status_keys(self) -> list[str]:
        return [self.keys.status(s) for s in STATUSES]

    # --- jobs -----------------------------------------------------------------------------

    async def create_job(self, job: Job, idempotency: tuple[str, str] | None = None) -> tuple[Job, bool]:
        k = self.keys
        keys = [k.job(job.id), k.jobs, k.status(job.status), k.meta, k.queue]
        args: list[str | int] = [job.id, wire.dumps(job.to_dict()), job.created_at, wire.dumps(SCHEMA_VERSION)]
        if idempotency is not None:
            keys += [k.idem(idempotency[0]), k.job_idem(job.id)]
            args += [idempotency[1], k.idem(idempotency[0]), k.job("")]
        async with self._redis():
            result = await self._create_job(keys=keys, args=args)
        outcome = result[0].decode()
        if outcome == "conflict":
            raise Conflict(
                "Idempotency-Key was already used with a different request",
                field="Idempotency-Key",
                code="idempotency_mismatch",
            )
        if outcome == "existing":
            return Job.from_dict(wire.loads(result[1])), False
        if outcome == "exists":
            raise Conflict(f"job {job.id} already exists", field="jobId", code="exists")
        return job, True

    async def get_job(self, job_id: str) -> Job | None:
        async with self._redis() as r:
            raw = await r.get(self.keys.job(job_id))
        return Job.from_dict(wire.loads(raw)) if raw is not None else None

    async def save_job(self, job: Job, *, durable: bool = False) -> None:
        await self._save(job)

    async def begin_attempt(self, job: Job, previous: int) -> bool:
        return await self._save(job, previous)

    async def _save(self, job: Job, previous: int | None = None) -> bool:
        k = self.keys
        keys = [k.job(job.id), k.jobs, k.meta, *self._status_keys()]
        args: list[str | int] = [
            job.id,
            wire.dumps(job.to_dict()),
            job.created_at,
            job.status.value,
            job.attempt,
            wire.dumps(SCHEMA_VERSION),
            STATUSES.index(job.status) + 1,
        ]
        if previous is not None:
            args.append(previous)
        async with self._redis():
            result = await self._save_job(keys=keys, args=args)
        if result[0] == b"lost":
            return False
        if result[0] == b"stale":
            status, attempt = result[1].decode(), int(result[2])
            reason = stale_reason(status, attempt, job.status.value, job.attempt) or "refused"
            raise stale_write(job, reason, status, attempt)
        return True

    async def delete_job(self, job_id: str) -> None:
        k = self.keys
        lines = [k.lines(job_id, n) for n in LINE_NAMES]
        keys = [k.job(job_id), k.jobs, k.job_idem(job_id), k.artifact(job_id), *lines, *self._status_keys()]
        async with self._redis():
            await self._delete_job(keys=keys, args=[job_id, len(lines)])

    async def list_jobs(
        self,
        *,
        statuses: Iterable[JobStatus] | None = None,
        limit: int | None = None,
        before: str | None = None,
    ) -> list[Job]:
        if limit is not None and limit <= 0:
            return []
        keys = [self.keys.jobs]
        if statuses:
            keys += sorted({self.keys.status(s) for s in statuses})
        args: list[str | int] = [self.keys.job(""), before or "", limit or 0]
        async with self._redis():
            docs = await self._list_jobs(keys=keys, args=args)
        return [Job.from_dict(wire.loads(d)) for d in docs]

    async def count_jobs(self) -> dict[str, int]:
        async with self._redis() as r, r.pipeline(transaction=True) as pipe:
            for s in STATUSES:
                pipe.scard(self.keys.status(s))
            counts = await pipe.execute()
        return {s.value: int(n) for s, n in zip(STATUSES, counts, strict=True)}

    # --- datasets -------------------------------------------------------------------------

    async def create_dataset(self, dataset: Dataset) -> None:
        await self.save_dataset(dataset)

    async def get_dataset(self, dataset_id: str) -> Dataset | None:
        async with self._redis() as r:
            raw = await r.get(self.keys.dataset(dataset_id))
        return Dataset.from_dict(wire.loads(raw)) if raw is not None else None

    async def save_dataset(self, dataset: Dataset) -> None:
        async with self._redis() as r, r.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.dataset(dataset.id), wire.dumps(dataset.to_dict()))
            pipe.zadd(self.keys.datasets, {dataset.id: dataset.created_at})
            pipe.hsetnx(self.keys.meta, SCHEMA_FIELD, wire.dumps(SCHEMA_VERSION))
            await pipe.execute()

    async def delete_dataset(self, dataset_id: str) -> None:
        async with self._redis() as r, r.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.dataset(dataset_id))
            pipe.zrem(self.keys.datasets, dataset_id)
            await pipe.execute()

    async def list_datasets(self) -> list[Dataset]:
        """Oldest first (createdAt, then id)."""
        async with self._redis() as r:
            ids: list[bytes] = await r.zrange(self.keys.datasets, 0, -1)  # type: ignore[assignment]  # redis-py: sync and async in one hint
            if not ids:
                return []
            docs = await r.mget([self.keys.dataset(_text(i)) for i in ids])
        return [Dataset.from_dict(wire.loads(d)) for d in docs if d is not None]  # None: just deleted

    # --- logs and metrics -----------------------------------------------------------------

    async def append_job_lines(self, job_id: str, name: str, items: list[dict[str, object]]) -> None:
        if not items:
            return
        async with self._redis() as r:
            await r.rpush(self.keys.lines(job_id, name), *(wire.dumps(i) for i in items))

    async def read_job_lines(self, job_id: str, name: str) -> list[dict[str, object]]:
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

    async def save_artifacts(self, job_id: str) -> None:
        files = await asyncio.to_thread(self._read_local, job_id)
        digest = _digest(files)
        mapping: dict[EncodableT, EncodableT] = {ARTIFACT_DIGEST_FIELD: digest}
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

    # --- metadata -------------------------------------------------------------------------

    async def get_meta(self, key: str) -> object | None:
        async with self._redis() as r:
            raw = await r.hget(self.keys.meta, key)
        return wire.loads(raw) if raw is not None else None

    async def set_meta(self, key: str, value: object) -> None:
        async with self._redis() as r:
            await r.hset(self.keys.meta, key, wire.dumps(value))

    async def claim_meta(self, key: str, value: object) -> bool:
        async with self._redis() as r:
            return bool(await r.hsetnx(self.keys.meta, key, wire.dumps(value)))
