"""The embedded store: TinyDB documents in ``db.json``, written atomically with group commit.

TinyDB's stock ``JSONStorage`` rewrites its file in place, so kill -9 mid-write can leave it
unreadable. Here TinyDB works on an in-memory copy (``MemoryStorage`` below) and a flusher task
writes the whole file with temp file + fsync + rename. Durable writes (job creation, status
changes, datasets) wait for the next flush, and every write that arrives while a flush runs is
carried by the one after it; progress writes are marked dirty and ride along at most
``flush_interval`` later. A file that does not parse stops start-up; it is never overwritten.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, cast

from tinydb import TinyDB
from tinydb.storages import Storage
from tinydb.table import Document as TinyDocument
from tinydb.table import Table

from ..errors import Conflict, InsufficientStorage, StoreError, Unavailable
from ..wire import Dataset, Job, JobStatus
from .base import SCHEMA_VERSION, Store, stale_reason, stale_write
from .datadir import DataDir, atomic_write

log = logging.getLogger(__name__)

WRITE_RETRY = 0.5  # seconds between attempts while the disk refuses writes
JOBS = "jobs"
DATASETS = "datasets"
IDEMPOTENCY = "idempotency"
META = "meta"


# Every table here is keyed by str ids (job, dataset and idempotency ids). TinyDB allows any
# ``document_id_class``, but its type hints say int throughout; ``Document`` and ``_Keyed`` state
# the str ids, and the ignores below are where TinyDB's hints meet them.


class Document(TinyDocument):
    """A TinyDB document with a str id."""

    doc_id: str  # type: ignore[assignment]  # TinyDB's hints: int ids only

    def __init__(self, value: Mapping[str, Any], doc_id: str) -> None:
        super().__init__(value, doc_id)  # type: ignore[arg-type]  # TinyDB's hints: int ids only


class _StrTable(Table):
    document_class = Document  # type: ignore[assignment]  # TinyDB's hints: int ids only
    document_id_class = str  # type: ignore[assignment]  # TinyDB's hints: int ids only


class _Keyed(Protocol):
    """What this module calls on a ``_StrTable``, with its ids as the str they are."""

    def get(self, *, doc_id: str) -> Document | None: ...
    def insert(self, document: Mapping[str, Any]) -> str: ...
    def upsert(self, document: Mapping[str, Any]) -> list[str]: ...
    def remove(self, *, doc_ids: Iterable[str]) -> list[str]: ...
    def all(self) -> list[Document]: ...
    def _read_table(self) -> dict[str, Mapping[str, Any]]: ...


class _DB(TinyDB):
    table_class = _StrTable


class MemoryStorage(Storage):
    """Holds the whole database in memory; the store decides when it reaches the disk."""

    def __init__(self, data: dict[str, dict[str, Any]] | None, on_write: Any) -> None:
        self.data = data
        self._on_write = on_write

    def read(self) -> dict[str, dict[str, Any]] | None:
        return self.data

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        self.data = data
        self._on_write()


def load_db_file(path: Path) -> dict[str, dict[str, Any]] | None:
    """Parse and check ``db.json``; None when it does not exist. Never modifies the file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read store {path}: {exc.strerror}", field="data_dir") from None
    hint = "restore it from a backup or move it away to start empty"
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"store {path} is corrupt ({exc}); {hint}", code="corrupt") from None
    if not isinstance(data, dict) or not all(
        isinstance(t, dict) and all(isinstance(d, dict) for d in t.values()) for t in data.values()
    ):
        raise StoreError(f"store {path} is not a mangwale store (unexpected structure); {hint}", code="corrupt")
    version = data.get(META, {}).get("schema", {}).get("version")
    if version is None and data:
        raise StoreError(f"store {path} has no schema version; {hint}", code="corrupt")
    if version is not None and (not isinstance(version, int) or version > SCHEMA_VERSION):
        raise StoreError(
            f"store {path} has schema version {version}, newer than this mangwale ({SCHEMA_VERSION}); "
            "upgrade mangwale",
            code="too_new",
        )
    return data


class TinyDBStore(Store):
    def __init__(self, datadir: DataDir, *, flush_interval: float = 0.5) -> None:
        self.datadir = datadir
        self.path = datadir.db
        self.artifacts_dir = datadir.artifacts
        self.flush_interval = flush_interval
        self._db: _DB | None = None
        self._dirty = False
        self._urgent = asyncio.Event()
        self._kick = asyncio.Event()
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._write_error: OSError | None = None

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        data = load_db_file(self.path)
        storage_holder: dict[str, MemoryStorage] = {}

        def factory() -> MemoryStorage:
            storage_holder["s"] = MemoryStorage(data, self._mark_dirty)
            return storage_holder["s"]

        self._db = _DB(storage=factory)
        self._storage = storage_holder["s"]
        if not data:  # a new store, or "{}": stamp the version, or the next open refuses it
            self._db.table(META).insert(Document({"version": SCHEMA_VERSION}, doc_id="schema"))
            await self._flush_now()
        self._flusher = asyncio.create_task(self._flush_loop(), name="store-flusher")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            try:
                await self._flusher
            except asyncio.CancelledError:
                pass
        if self._dirty:
            await self._flush_now()

    # --- flushing -------------------------------------------------------------------------

    def _mark_dirty(self) -> None:
        self._dirty = True
        self._kick.set()

    async def _commit(self) -> None:
        """Wait until everything written so far is on disk."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._urgent.set()
        self._kick.set()
        await fut

    async def _flush_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            if not self._urgent.is_set():
                try:
                    await asyncio.wait_for(self._urgent.wait(), self.flush_interval)
                except TimeoutError:
                    pass
            self._urgent.clear()
            if self._dirty or self._waiters:
                await self._flush_now()

    async def _flush_now(self) -> None:
        waiters, self._waiters = self._waiters, []
        self._dirty = False
        text = json.dumps(self._storage.data, separators=(",", ":"), ensure_ascii=False)
        try:
            await asyncio.to_thread(atomic_write, self.path, text.encode())
        except OSError as exc:
            self._dirty = True
            if self._write_error is None or self._write_error.errno != exc.errno:  # once per outage
                log.error("store write to %s failed: %s", self.path, exc.strerror)
            self._write_error = exc
            err: Unavailable
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                err = InsufficientStorage(f"the disk of {self.datadir.path} is full ({exc.strerror}); nothing was saved")
            else:
                err = Unavailable(f"the store cannot be written ({exc.strerror}); nothing was saved")
            for w in waiters:
                if not w.done():
                    w.set_exception(err)
            if not self._closed:  # retry on its own: the next write may be a long time coming
                asyncio.get_running_loop().call_later(max(self.flush_interval, WRITE_RETRY), self._kick.set)
            return
        if self._write_error is not None:
            log.info("store write to %s works again", self.path)
        self._write_error = None
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _table(self, name: str) -> _Keyed:
        assert self._db is not None, "store is not open"
        return cast(_Keyed, self._db.table(name))  # a _StrTable (see _Keyed)

    # --- jobs -----------------------------------------------------------------------------

    async def create_job(self, job: Job, idempotency: tuple[str, str] | None = None) -> tuple[Job, bool]:
        idem = self._table(IDEMPOTENCY)
        if idempotency is not None:
            key, fingerprint = idempotency
            seen = idem.get(doc_id=key)
            if seen is not None:
                if seen["fingerprint"] != fingerprint:
                    raise Conflict(
                        "Idempotency-Key was already used with a different request",
                        field="Idempotency-Key",
                        code="idempotency_mismatch",
                    )
                existing = await self.get_job(seen["jobId"])
                if existing is not None:
                    return existing, False
                idem.remove(doc_ids=[key])
        jobs = self._table(JOBS)
        jobs.insert(Document(job.to_dict(), doc_id=job.id))
        if idempotency is not None:
            idem.insert(Document({"jobId": job.id, "fingerprint": idempotency[1]}, doc_id=idempotency[0]))
        try:
            await self._commit()
        except Unavailable:
            jobs.remove(doc_ids=[job.id])
            if idempotency is not None:
                idem.remove(doc_ids=[idempotency[0]])
            raise
        return job, True

    async def get_job(self, job_id: str) -> Job | None:
        doc = self._table(JOBS).get(doc_id=job_id)
        return Job.from_dict(dict(doc)) if doc is not None else None

    async def save_job(self, job: Job, *, durable: bool = False) -> None:
        jobs = self._table(JOBS)
        stored = jobs.get(doc_id=job.id)
        if stored is not None:  # the rule shared stores enforce; here it catches runner bugs
            status, attempt = stored["status"], int(stored.get("attempt", 0))
            reason = stale_reason(status, attempt, job.status.value, job.attempt)
            if reason is not None:
                raise stale_write(job, reason, status, attempt)
        jobs.upsert(Document(job.to_dict(), doc_id=job.id))
        if durable:
            await self._commit()

    async def delete_job(self, job_id: str) -> None:
        jobs = self._table(JOBS)
        before = jobs.get(doc_id=job_id)
        if before is not None:
            jobs.remove(doc_ids=[job_id])
        idem = self._table(IDEMPOTENCY)
        stale = [d for d in idem.all() if d.get("jobId") == job_id]
        if stale:
            idem.remove(doc_ids=[d.doc_id for d in stale])
        try:
            await self._commit()
        except Unavailable:  # not deleted after all: the next flush must not delete it either
            if before is not None:
                jobs.insert(Document(dict(before), doc_id=job_id))
            for d in stale:
                idem.insert(Document(dict(d), doc_id=d.doc_id))
            raise

    async def list_jobs(
        self,
        *,
        statuses: Iterable[JobStatus] | None = None,
        limit: int | None = None,
        before: str | None = None,
    ) -> list[Job]:
        wanted = {s.value for s in statuses} if statuses else None
        docs = self._table(JOBS)._read_table()
        rows = sorted(docs.values(), key=lambda d: (d["createdAt"], d["id"]), reverse=True)
        if before is not None:
            anchor = docs.get(before)
            if anchor is None:
                return []
            key = (anchor["createdAt"], anchor["id"])
            rows = [d for d in rows if (d["createdAt"], d["id"]) < key]
        if wanted is not None:
            rows = [d for d in rows if d["status"] in wanted]
        if limit is not None:
            rows = rows[:limit]
        return [Job.from_dict(dict(d)) for d in rows]

    async def count_jobs(self) -> dict[str, int]:
        counts = {s.value: 0 for s in JobStatus}
        for d in self._table(JOBS)._read_table().values():
            counts[d["status"]] = counts.get(d["status"], 0) + 1
        return counts

    # --- datasets -------------------------------------------------------------------------

    async def create_dataset(self, dataset: Dataset) -> None:
        table = self._table(DATASETS)
        table.insert(Document(dataset.to_dict(), doc_id=dataset.id))
        try:
            await self._commit()
        except Unavailable:
            table.remove(doc_ids=[dataset.id])
            raise

    async def get_dataset(self, dataset_id: str) -> Dataset | None:
        doc = self._table(DATASETS).get(doc_id=dataset_id)
        return Dataset.from_dict(dict(doc)) if doc is not None else None

    async def save_dataset(self, dataset: Dataset) -> None:
        table = self._table(DATASETS)
        before = table.get(doc_id=dataset.id)
        table.upsert(Document(dataset.to_dict(), doc_id=dataset.id))
        try:
            await self._commit()
        except Unavailable:
            if before is not None:
                table.upsert(Document(dict(before), doc_id=dataset.id))
            raise

    async def delete_dataset(self, dataset_id: str) -> None:
        table = self._table(DATASETS)
        before = table.get(doc_id=dataset_id)
        if before is not None:
            table.remove(doc_ids=[dataset_id])
        try:
            await self._commit()
        except Unavailable:
            if before is not None:
                table.insert(Document(dict(before), doc_id=dataset_id))
            raise

    async def list_datasets(self) -> list[Dataset]:
        docs = self._table(DATASETS)._read_table().values()
        return sorted((Dataset.from_dict(dict(d)) for d in docs), key=lambda d: (d.created_at, d.id))

    # --- metadata -------------------------------------------------------------------------

    async def get_meta(self, key: str) -> object | None:
        doc = self._table(META).get(doc_id=key)
        return doc.get("value") if doc is not None else None

    async def set_meta(self, key: str, value: object) -> None:
        self._table(META).upsert(Document({"value": value}, doc_id=key))
        await self._commit()
