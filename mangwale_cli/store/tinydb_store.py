"""The embedded store: TinyDB documents over one write-ahead log, with snapshots and an archive.

The record (docs/storage.md): every change is one line of the log (``wal.py``) holding the
state change and the event that announces it. The state is the log's fold over the last
snapshot; the event log clients replay is read from the same lines. A write goes through one
writer task (group commit):

1. each pending change is *staged* against the state as of the changes before it: its guard
   is checked (``base.refusal``), its event numbered (``seq``, ``jobSeq``);
2. the batch is appended with one ``write``, and fsynced when one of its changes is durable
   (creates, status changes, cancels, datasets, deletions);
3. only then is it applied to the documents TinyDB serves, handed to the event bus, and answered.

So nothing is shown (a REST body, an event) before it is in the log, and a kill -9 at any
instant leaves a log whose fold is a state some client may have seen, with its events.

TinyDB is the document layer: its ``Table`` is extended (``RecordTable``) to change one document
in place of copying the whole table per write, and its storage (``LiveStorage``) holds the live
tables instead of a file. The jobs table is ``JobTable``: finished jobs are archived to disk by
the snapshot and read back on demand, so memory holds the active jobs and an index, whatever the
history. Snapshots (``snapshot.json`` naming the record it reflects, plus a new archive segment
and changed datasets) are written by a background task whose file work runs in a thread; the
log segments they cover are then deleted, once the replay ring no longer keeps their events.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tinydb import TinyDB
from tinydb.storages import Storage
from tinydb.table import Table

from .. import faults, wire
from ..errors import Conflict, InsufficientStorage, MangwaleError, StoreError, Unavailable
from ..eventlog import EventRing, Record, new_epoch
from ..wire import Dataset, Job, JobStatus, now_ms
from . import archive, snapshot
from .base import (
    IDEMPOTENCY_TTL,
    Cursor,
    Expect,
    Store,
    can_begin,
    refusal,
    stale_write,
)
from .datadir import DataDir, atomic_write
from .jobtable import JobTable
from .wal import RecordLog, encode

log = logging.getLogger(__name__)

JOBS, DATASETS, IDEM, META = "jobs", "datasets", "idem", "meta"
RUN_NAME = "run.json"
SNAPSHOT_RECORDS = 20_000  # a snapshot is due after this many records...
SNAPSHOT_BYTES = 32 * 1024 * 1024  # ...or this many bytes of log since the last one
SEQ_BLOCK = 10_000  # seqs reserved ahead in run.json (a power loss never reuses a seq)
HOT_EVENTS = 4096  # newest events whose text stays in memory; older ones are read from the log
_TERMINAL = frozenset(s.value for s in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED))


def boot_id() -> str:
    """This boot of the machine: a power loss or crash of the OS changes it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


# --- TinyDB extension points -------------------------------------------------------------------


class LiveStorage(Storage):
    """TinyDB storage holding the live tables; the log, not this, makes them durable."""

    def __init__(self, tables: dict[str, MutableMapping[str, Any]]) -> None:
        self.tables = tables

    def read(self) -> dict[str, Any]:
        return self.tables

    def write(self, data: dict[str, Any]) -> None:
        raise RuntimeError("the embedded store writes through its log, not through TinyDB's storage")


class RecordTable(Table):
    """A TinyDB table that changes one document in place: the stock ``Table`` copies the whole
    table on every write, which is what made writes cost more as history grew."""

    document_id_class = str  # type: ignore[assignment]  # TinyDB's hints say int; ids here are job/dataset ids

    def _live(self) -> MutableMapping[str, Any]:
        tables = self._storage.read()
        assert tables is not None  # LiveStorage always holds the tables
        return tables[self.name]

    def _read_table(self) -> Any:
        return self._live()

    def _update_table(self, updater: Callable[[Any], None]) -> None:
        updater(self._live())
        self.clear_cache()

    def put(self, doc_id: str, doc: dict[str, Any]) -> None:
        def set_doc(table: Any) -> None:
            table[doc_id] = doc

        self._update_table(set_doc)

    def drop(self, doc_id: str) -> None:
        def del_doc(table: Any) -> None:
            if doc_id in table:
                del table[doc_id]

        self._update_table(del_doc)

    def raw(self, doc_id: str) -> dict[str, Any] | None:
        """The stored document itself (not a copy): callers must not change it."""
        table = self._read_table()
        try:
            doc: dict[str, Any] = table[doc_id]
            return doc
        except KeyError:
            return None


class _DB(TinyDB):
    table_class = RecordTable


# --- staging ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Staged:
    """A change ready to be logged: its state ops, its event (numbered by the writer)."""

    ops: list[list[Any]]
    event: dict[str, Any] | None = None
    job_id: str | None = None  # the job the event is about (gets a jobSeq)
    job_seq: int | None = None
    result: Any = None


@dataclass(slots=True)
class _Pending:
    stage: Callable[[_View], Staged | None]
    durable: bool
    future: asyncio.Future[Any]
    noop: Any = None  # the result when stage returns None (nothing to log)


class _View:
    """The state as of the changes staged so far in a batch (they are not applied yet)."""

    def __init__(self, store: TinyDBStore) -> None:
        self.store = store
        self.over: dict[tuple[str, str], dict[str, Any] | None] = {}
        self.granted: dict[str, bool] = {}  # job id -> lease granted (True) or released in the batch

    def get(self, table: str, key: str) -> dict[str, Any] | None:
        k = (table, key)
        if k in self.over:
            return self.over[k]
        return self.store._tables[table].raw(key)

    def lease_live(self, job_id: str) -> bool:
        if job_id in self.granted:
            return self.granted[job_id]
        return self.store._lease_live(job_id)

    def stage(self, ops: list[list[Any]]) -> None:
        for op in ops:
            if op[0] in ("put", "set"):
                old = self.get(op[1], op[2])
                doc = op[3] if op[0] == "put" else {**(old or {}), **op[3]}
                if op[1] == JOBS and doc.get("lease") != (old or {}).get("lease"):
                    self.granted[op[2]] = doc.get("lease") is not None
                self.over[(op[1], op[2])] = doc
            elif op[0] == "del":
                self.over[(op[1], op[2])] = None


# --- the store ---------------------------------------------------------------------------------


class TinyDBStore(Store):
    shared: ClassVar[bool] = False

    def __init__(
        self,
        datadir: DataDir,
        *,
        retention: int = 100_000,
        log_retention: int = 10_000,
        fsync_interval: float = 1.0,
        lease: float = 30.0,
        idempotency_ttl: float = IDEMPOTENCY_TTL,
        snapshot_records: int = SNAPSHOT_RECORDS,
        snapshot_bytes: int = SNAPSHOT_BYTES,
        segment_bytes: int | None = None,
    ) -> None:
        self.datadir = datadir
        self.root = datadir.path
        self.artifacts_dir = datadir.artifacts
        self.archive_dir = self.root / "jobs"
        self.datasets_dir = self.root / "datasets"
        self.fsync_interval = fsync_interval
        self.lease = lease
        self.idempotency_ttl = idempotency_ttl
        self.snapshot_records = snapshot_records
        self.snapshot_bytes = snapshot_bytes
        self.segment_bytes = segment_bytes
        self.retention, self.log_retention = retention, log_retention
        self._reset()

    def _reset(self) -> None:
        """Fresh in-memory state: ``open`` rebuilds it from disk (the store may be reopened)."""
        self.ring = EventRing(retention=self.retention, log_retention=self.log_retention, hot=HOT_EVENTS)
        self.log = RecordLog(self.root / "log", **({"segment_bytes": self.segment_bytes} if self.segment_bytes else {}))
        self.reader = archive.Reader(self.archive_dir)
        self.jobs = JobTable(self.reader)
        self._raw: dict[str, Any] = {JOBS: self.jobs, DATASETS: {}, IDEM: {}, META: {}}
        self._db: _DB | None = None
        self._tables: dict[str, RecordTable] = {}
        self._record = 0  # last record applied
        self._seq = 0  # last seq issued
        self._ceiling = 0  # seqs below it are reserved in run.json
        self.epoch = ""
        self._leases: dict[str, float] = {}  # job id -> monotonic expiry of its lease
        self._pending: list[_Pending] = []
        self._kick = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._syncer: asyncio.Task[None] | None = None
        self._unsynced = False
        self._closed = False
        self._failing: OSError | None = None
        self._broken: str | None = None  # a failed batch could not be cut off: no more writes
        # snapshots
        self._snap_record = 0
        self._snap_size = 0  # log bytes written when the last snapshot was taken
        self._written = 0  # log bytes written since open
        self.fsyncs = 0  # fsyncs of the log since open (GET /metrics: a group commit's batching)
        self.durable_records = 0  # records written in a batch that was fsynced before its answer
        self._snapshot_task: asyncio.Task[None] | None = None
        self._segments: list[int] = []  # archive segments the snapshot lists
        self._dataset_files: dict[str, str] = {}  # dataset id -> file the snapshot lists
        self._dirty_datasets: set[str] = set()
        self._lines_touched: set[tuple[str, str]] = set()
        self.snapshots = 0  # taken since open (tests, metrics)
        self._read_only = False

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        from .migrate import migrate_if_needed

        self._reset()
        await asyncio.to_thread(migrate_if_needed, self.root)
        self._db = _DB(storage=LiveStorage, tables=self._raw)
        self._tables = {name: self._db.table(name) for name in (JOBS, DATASETS, IDEM, META)}  # type: ignore[misc]  # RecordTable is tinydb's Table; _DB's table_class makes every table one
        await asyncio.to_thread(self._load)
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")
        if self.fsync_interval > 0:
            self._syncer = asyncio.create_task(self._sync_loop(), name="store-fsync")

    async def close(self) -> None:
        if self._closed:
            return
        deadline = time.monotonic() + 5.0
        while self._pending and time.monotonic() < deadline:  # what was asked for before close is written
            await asyncio.sleep(0.005)
        self._closed = True
        for task in (self._writer, self._syncer):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if self._snapshot_task is not None:
            try:
                await self._snapshot_task
            except Exception:  # noqa: BLE001, S110 - logged by the task; closing goes on
                pass
        self.log.close()
        self.reader.close()
        self._write_run(clean=True)

    # --- loading ----------------------------------------------------------------------------

    def _load(self, *, read_only: bool = False) -> None:
        """Snapshot, archive index, then the log's records after the snapshot (thread). With
        ``read_only`` (``inspect``) nothing on disk is touched, torn tails included."""
        snap = snapshot.read(self.root)
        self._snap_record = snap.get("record", 0)
        meta = self._raw[META]
        meta.update(snap.get("meta") or {})
        self._raw[IDEM].update(snap.get("idem") or {})
        for ds_id, name in (snap.get("datasets") or {}).items():
            self._raw[DATASETS][ds_id] = snapshot.read_json(self.datasets_dir / name, "dataset file")
            self._dataset_files[ds_id] = name
        dead = snap.get("dead") or {}
        self._segments = list(snap.get("jobSegments") or [])
        for n in self._segments:
            self.jobs.load_segment(n, archive.read_index(self.archive_dir, n), dead.get(str(n), ()))
        self.jobs.sort()
        for doc in snap.get("active") or []:
            self.jobs[doc["id"]] = doc
        self._record = self._snap_record
        self._seq = snap.get("seq", 0)
        self.epoch = snap.get("epoch") or ""
        self._replay_log(repair=not read_only)
        if read_only:
            return
        self._check_run()
        self._clean_orphans()
        now = time.monotonic()
        for job_id in self.jobs.page([JobStatus.RUNNING.value], None, None):
            # Runners hold leases in memory; whoever held one gets a full lease from now to
            # come back (a remote worker) before anyone may take the job over.
            self._leases[job_id] = now + self.lease
        self.log.open_for_append(self.epoch)
        self._write_run(clean=False)

    def _replay_log(self, *, repair: bool = True) -> None:
        self.log.discover()
        if self.log.segments and self.log.segments[0].first > self._snap_record + 1:
            raise StoreError(
                f"the store's log in {self.log.dir} starts at record {self.log.segments[0].first}, but the snapshot "
                f"covers only up to {self._snap_record}; restore the data dir from a backup",
                code="corrupt",
            )
        ring = self.ring
        epoch: str | None = None  # of the events in the ring
        batch: list[Record] = []  # handed to the ring a thousand at a time
        last = 0
        for line in self.log.read(repair=repair):
            seq = line.seq
            if seq is not None:
                if epoch != self.log.epoch:  # the first event, or the first of a new epoch
                    ring.keep(batch)
                    batch = []
                    epoch = self.log.epoch
                    ring.reset(epoch, seq - 1)
                    last = seq - 1
                if seq != last + 1:
                    raise StoreError(
                        f"the store's log {line.segment.path} is corrupt: seq {seq} where {last + 1} "
                        "was expected; restore the data dir from a backup",
                        code="corrupt",
                    )
                last = seq
                rec = _ring_record(line)
                rec.place(line.segment, line.event_offset, line.event_size)
                rec.spill()
                batch.append(rec)
                if len(batch) >= 1024:
                    ring.keep(batch)
                    batch = []
            if line.record > self._record:
                if line.ops:
                    self._apply(wire.loads(line.ops), replay=True)
                self._record = line.record
        ring.keep(batch)
        self._seq = max(self._seq, last)
        if self.log.epoch:
            self.epoch = self.log.epoch
        if epoch != self.epoch:  # no event of the current epoch in the log
            ring.reset(self.epoch, self._seq)
        self.log.next_record = self._record + 1
        self._snap_size = 0

    def _check_run(self) -> None:
        """After a power loss (the machine booted since, and we did not stop cleanly), what
        was not fsynced may be gone, including events clients saw: start a new epoch with seq
        above every seq that may have been issued (clients resync)."""
        run = snapshot.read_json(self.root / RUN_NAME, "run file", missing={})
        self._ceiling = max(int(run.get("seqCeiling") or 0), self._seq)
        unclean = run and not run.get("clean") and run.get("bootId") not in (None, boot_id())
        if not self.epoch or unclean:
            if unclean:
                log.warning("the machine restarted while mangwale ran: starting a new event epoch (clients resync)")
            self.epoch = new_epoch()
            self._seq = self._ceiling
            self.ring.reset(self.epoch, self._seq)

    def _write_run(self, *, clean: bool, upto: int | None = None) -> None:
        if not clean:
            self._ceiling = max(self._ceiling, (upto or self._seq) + SEQ_BLOCK)
        atomic_write(
            self.root / RUN_NAME,
            wire.dumps({"bootId": boot_id(), "clean": clean, "seqCeiling": self._ceiling, "pid": os.getpid()}).encode(),
        )

    def _clean_orphans(self) -> None:
        """Files a crash left between writing them and the snapshot that lists them."""
        listed = set(self._segments)
        for n in archive.existing(self.archive_dir) - listed:
            archive.remove_segment(self.archive_dir, n)
        if self.datasets_dir.is_dir():
            keep = set(self._dataset_files.values())
            for p in self.datasets_dir.iterdir():
                if p.name not in keep:
                    p.unlink(missing_ok=True)

    # --- applying the record ------------------------------------------------------------------

    def _apply(self, ops: list[list[Any]], *, replay: bool = False) -> None:
        """Fold one record's ops into the live state (after it is in the log)."""
        for op in ops:
            kind = op[0]
            if kind in ("put", "set"):
                old = self._tables[op[1]].raw(op[2])
                # "set": the fields a job write changed (most are progress: a few fields of ~20)
                doc = op[3] if kind == "put" else {**(old or {}), **op[3]}
                if op[1] == JOBS and not replay:
                    lease = doc.get("lease")
                    if lease is None:
                        self._leases.pop(op[2], None)
                    elif lease != (old or {}).get("lease"):  # granted: it runs from now
                        self._leases[op[2]] = time.monotonic() + self.lease
                self._tables[op[1]].put(op[2], doc)
                if op[1] == DATASETS:
                    self._dirty_datasets.add(op[2])
            elif kind == "del":
                self._tables[op[1]].drop(op[2])
                if op[1] == DATASETS:
                    self._dirty_datasets.add(op[2])
                elif op[1] == JOBS:
                    self._leases.pop(op[2], None)
            elif kind == "lines" and not self._read_only:
                self._append_lines(op[1], op[2], op[3], replay=replay)

    def _append_lines(self, job_id: str, name: str, items: list[dict[str, Any]], *, replay: bool) -> None:
        path = self.artifact_dir(job_id) / f"{name}.jsonl"
        if replay:  # the line may be in the file already (written before the crash)
            last = _last_number(path)
            items = [i for i in items if int(i.get(_NUMBER[name], 0)) > last]
            if not items:
                return
        data = "".join(wire.dumps(i) + "\n" for i in items).encode()
        try:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:  # the lines are in the log: the next start writes them here
            log.error("cannot write %s (%s); it is completed from the log at the next start", path, exc.strerror)
            return
        self._lines_touched.add((job_id, name))

    # --- the writer -------------------------------------------------------------------------

    async def _submit(self, stage: Callable[[_View], Staged | None], *, durable: bool, noop: Any = None) -> Any:
        if self._closed:
            raise Unavailable("the store is closed")
        if self._broken is not None:
            raise Unavailable(self._broken)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(stage, durable, fut, noop))
        self._kick.set()
        return await fut

    async def _write_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._commit(batch)
                except asyncio.CancelledError:
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(Unavailable("the store is closing"))
                    raise
                except Exception:  # a bug: say so loudly, answer the batch, keep writing
                    log.exception("the store's writer failed on a batch of %d; they are answered with an error", len(batch))
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(MangwaleError("internal error in the store's writer (see the server log)"))

    async def _commit(self, batch: list[_Pending]) -> None:
        view = _View(self)
        staged: list[tuple[_Pending, Staged, Record | None]] = []
        chunks: list[bytes] = []
        events: list[tuple[Record, int, int]] = []  # record, its line's end in the batch, its size
        total = 0
        record, seq = self._record, self._seq
        max_seq = max_log_seq = 0
        durable = False
        for p in batch:
            try:
                st = p.stage(view)
            except MangwaleError as exc:
                p.future.set_exception(exc)
                continue
            if st is None or (not st.ops and st.event is None):  # nothing to log
                p.future.set_result(p.noop if st is None else st.result)
                continue
            record += 1
            rec = None
            text = ""
            kind = "-"
            if st.event is not None:
                seq += 1
                ev = st.event
                ev["seq"] = seq
                ev["epoch"] = self.epoch
                is_log = ev["type"] == wire.MsgType.JOB_LOG
                job_ids = None
                if st.job_seq is not None:
                    ev["jobSeq"] = st.job_seq
                if is_log:
                    kind, max_log_seq = "l", seq
                elif ev["type"] == wire.MsgType.JOB_DELETED:
                    kind, max_seq = "d", seq
                    job_ids = frozenset(ev["jobIds"])
                else:
                    kind, max_seq = "e", seq
                text = wire.dumps(ev)
                rec = Record(seq, st.job_id, st.job_seq, text, is_log, job_ids)
            line = encode(record, rec.seq if rec else None, st.job_seq, kind, st.job_id,
                          wire.dumps(st.ops) if st.ops else "", text)  # fmt: skip
            chunks.append(line)
            total += len(line)
            if rec is not None:
                events.append((rec, total - 1, len(line) - 1 - line.rindex(b"\t") - 1))
            view.stage(st.ops)
            staged.append((p, st, rec))
            durable = durable or p.durable
        if not staged:
            return
        if seq >= self._ceiling:  # reserve more seqs first (a power loss must not reuse one)
            await asyncio.to_thread(self._write_run, clean=False, upto=seq)
        written = None
        try:
            written = self.log.write(b"".join(chunks), record, max_seq, max_log_seq)
            self._unsynced = True
            if durable:
                await asyncio.to_thread(self.log.sync)
                self._unsynced = False
                self.fsyncs += 1
                self.durable_records += len(staged)
        except OSError as exc:
            # write() cut off what it let through. A failed fsync: the batch is complete in the
            # log but will not be acknowledged, so it is cut off too, or the next batch would
            # reuse its record numbers and the log would not read back.
            if written is not None and not self.log.unwrite(written):
                self._broken = (
                    f"the store's log {written.segment.path} could not be cut back after a failed write; "
                    "restart the server"
                )
                log.error("%s", self._broken)
            err = self._write_failed(exc)
            for p, _, _ in staged:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        if self._failing is not None:
            log.info("store log %s can be written again", self.log.dir)
            self._failing = None
        self._written += total
        faults.point("wal-synced")
        for rec, end, size in events:  # where each event's text is, once it leaves memory
            rec.place(written.segment, written.start + end - size, size)
        self._record, self._seq = record, seq
        records: list[Record] = []
        for p, st, rec in staged:
            self._apply(st.ops)
            if rec is not None:
                records.append(rec)
        if records:
            self.ring.keep(records)
            if self.on_events is not None:
                try:
                    self.on_events(records)
                except Exception:  # a subscriber's bug must not stop the store's writer
                    log.exception("delivering events %d..%d failed", records[0].seq, records[-1].seq)
        for p, st, _ in staged:
            if not p.future.done():
                p.future.set_result(st.result)
        self._maybe_snapshot()

    def _write_failed(self, exc: OSError) -> Unavailable:
        if self._failing is None or self._failing.errno != exc.errno:  # once per outage
            log.error("store log write to %s failed: %s", self.log.dir, exc.strerror)
        self._failing = exc
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return InsufficientStorage(f"the disk of {self.root} is full ({exc.strerror}); nothing was saved")
        return Unavailable(f"the store cannot be written ({exc.strerror}); nothing was saved")

    async def _sync_loop(self) -> None:
        """``events.fsync_interval``: how much progress (not durable on its own) a power loss
        can cost at most."""
        while True:
            await asyncio.sleep(self.fsync_interval)
            if self._unsynced:
                self._unsynced = False
                self.fsyncs += 1
                try:
                    await asyncio.to_thread(self.log.sync)
                except OSError as exc:
                    self._unsynced = True  # still owed: the next round tries again
                    log.error("store log fsync failed: %s", exc.strerror)

    async def head(self) -> str:
        # Every change is a log record, applied before its writer is answered.
        return f"{self.epoch}.{self._record}"

    # --- jobs -------------------------------------------------------------------------------

    async def create_job(self, job: Job, idempotency: tuple[str, str] | None = None) -> tuple[Job, bool]:
        job.job_seq = 1
        doc = job.to_dict()
        now = now_ms()

        def stage(view: _View) -> Staged | None:
            ops: list[list[Any]] = []
            if idempotency is not None:
                key, fingerprint = idempotency
                seen = view.get(IDEM, key)
                if seen is not None and seen.get("expiresAt", 0) > now:
                    if seen["fingerprint"] != fingerprint:
                        raise Conflict(
                            "Idempotency-Key was already used with a different request",
                            field="Idempotency-Key",
                            code="idempotency_mismatch",
                        )
                    existing = view.get(JOBS, seen["jobId"])
                    if existing is not None:
                        return Staged([], result=(Job.from_dict(existing), False))
                ops.append(["put", IDEM, key, {"jobId": job.id, "fingerprint": fingerprint,
                                               "expiresAt": now + int(self.idempotency_ttl * 1000)}])  # fmt: skip
            if view.get(JOBS, job.id) is not None:
                raise Conflict(f"job {job.id} already exists", field="jobId", code="exists")
            ops.insert(0, ["put", JOBS, job.id, doc])
            return Staged(ops, wire.job_created(job), job.id, 1, (job, True))

        result: tuple[Job, bool] = await self._submit(stage, durable=True)
        return result

    def _job_stage(
        self, job: Job, event: dict[str, Any] | None, expect: Expect | None, extra: list[list[Any]], begin: int | None = None
    ) -> Callable[[_View], Staged | None]:
        def stage(view: _View) -> Staged | None:
            stored = view.get(JOBS, job.id)
            live = view.lease_live(job.id)
            if begin is not None:
                if not can_begin(stored, begin, live):
                    return None
            else:
                reason = refusal(stored, job.status.value, job.attempt, expect, live)
                if reason is not None:
                    raise stale_write(job.id, job.status.value, job.attempt, reason, stored)
            assert stored is not None
            job.job_seq = int(stored.get("jobSeq") or 0) + (1 if event is not None else 0)
            doc = job.to_dict()
            if any(k not in doc for k in stored):  # a field went away (waitingFor): the whole document
                op = ["put", JOBS, job.id, doc]
            else:  # the fields that changed: a progress report logs a few bytes, not the record
                op = ["set", JOBS, job.id, {k: v for k, v in doc.items() if k not in stored or stored[k] != v}]
            return Staged([op, *extra], event, job.id if event is not None else None,
                          job.job_seq if event is not None else None, Job.from_dict(doc))  # fmt: skip

        return stage

    async def write_job(
        self,
        job: Job,
        event: dict[str, Any] | None,
        *,
        expect: Expect | None = None,
        lines: tuple[str, list[dict[str, Any]]] | None = None,
        durable: bool = False,
    ) -> Job:
        extra = [["lines", job.id, lines[0], lines[1]]] if lines and lines[1] else []
        stored: Job = await self._submit(self._job_stage(job, event, expect, extra), durable=durable)
        return stored

    async def begin_attempt(self, job: Job, previous: int, event: dict[str, Any]) -> bool:
        stored = await self._submit(self._job_stage(job, event, None, [], begin=previous), durable=True, noop=None)
        return stored is not None

    async def lease_live(self, job_id: str) -> bool:
        return self._lease_live(job_id)

    def _lease_live(self, job_id: str) -> bool:
        return self._leases.get(job_id, 0.0) > time.monotonic()

    async def append_log(self, job_id: str, entry: dict[str, Any], event: dict[str, Any], expect: Expect | None) -> None:
        def stage(view: _View) -> Staged | None:
            stored = view.get(JOBS, job_id)
            if expect is not None:
                reason = refusal(stored, stored["status"] if stored else "running",
                                 int(stored.get("attempt") or 0) if stored else 0, expect, view.lease_live(job_id))  # fmt: skip
                if reason is not None:
                    raise stale_write(job_id, "running", expect.token or 0, reason, stored)
            return Staged([["lines", job_id, "logs", [entry]]], event, job_id)

        await self._submit(stage, durable=False)

    async def renew_lease(self, job_id: str, holder: str, token: int) -> bool:
        doc = self._tables[JOBS].raw(job_id)
        lease = (doc or {}).get("lease") or {}
        if lease.get("holder") != holder or lease.get("token") != token or not self._lease_live(job_id):
            return False
        self._leases[job_id] = time.monotonic() + self.lease
        return True

    async def delete_jobs(self, job_ids: list[str], reason: str = "deleted") -> list[str]:
        def stage(view: _View) -> Staged | None:
            gone = []
            bases = self._bases_in_use(view)
            for job_id in dict.fromkeys(job_ids):
                if job_id not in bases and self._status(view, job_id) in _TERMINAL:
                    gone.append(job_id)
            if not gone:
                return None
            ops: list[list[Any]] = [["del", JOBS, j] for j in gone]
            return Staged(ops, wire.job_deleted(gone, reason), None, None, gone)

        gone: list[str] = await self._submit(stage, durable=True, noop=[])
        return gone

    def _status(self, view: _View, job_id: str) -> str | None:
        """A job's status as of the batch, from the index (an archived document is not read)."""
        if (JOBS, job_id) in view.over:
            doc = view.over[(JOBS, job_id)]
            return None if doc is None else str(doc["status"])
        e = self.jobs.entries.get(job_id)
        return None if e is None else e.status

    def _bases_in_use(self, view: _View) -> set[str]:
        """``params.baseJobId`` of every queued or running job as of the batch: never deleted."""
        docs = {job_id: doc for job_id, doc in self.jobs.active_docs() if (JOBS, job_id) not in view.over}
        docs.update((key, doc) for (table, key), doc in view.over.items() if table == JOBS and doc is not None)
        out = set()
        for doc in docs.values():
            base = (doc.get("params") or {}).get("baseJobId")
            if isinstance(base, str) and doc["status"] not in _TERMINAL:
                out.add(base)
        return out

    async def get_job(self, job_id: str) -> Job | None:
        doc = self._tables[JOBS].raw(job_id)
        return Job.from_dict(doc) if doc is not None else None

    async def list_jobs(
        self,
        *,
        statuses: Iterable[JobStatus] | None = None,
        limit: int | None = None,
        after: Cursor | None = None,
    ) -> list[Job]:
        if limit is not None and limit <= 0:
            return []
        wanted = [s.value for s in statuses] if statuses else None
        ids = self.jobs.page(wanted, after.key() if after else None, limit)
        return [Job.from_dict(self.jobs[i]) for i in ids]

    async def count_jobs(self) -> dict[str, int]:
        return self.jobs.counts()

    async def finished_jobs_by_finish_time(self, statuses: Iterable[JobStatus]) -> list[tuple[int, str]]:
        return self.jobs.finished_by_time([s.value for s in statuses])

    # --- datasets ---------------------------------------------------------------------------

    async def create_dataset(self, dataset: Dataset) -> None:
        doc = dataset.to_dict()

        def stage(view: _View) -> Staged | None:
            if view.get(DATASETS, dataset.id) is not None:
                raise Conflict(f"dataset {dataset.id} already exists", field="datasetId", code="exists")
            return Staged([["put", DATASETS, dataset.id, doc]], wire.dataset_update(dataset.id, "created"))

        await self._submit(stage, durable=True)

    async def save_dataset(self, dataset: Dataset) -> None:
        doc = dataset.to_dict()

        def stage(view: _View) -> Staged | None:
            return Staged([["put", DATASETS, dataset.id, doc]], wire.dataset_update(dataset.id, "updated"))

        await self._submit(stage, durable=True)

    async def delete_dataset(self, dataset_id: str) -> None:
        def stage(view: _View) -> Staged | None:
            if view.get(DATASETS, dataset_id) is None:
                return None
            return Staged([["del", DATASETS, dataset_id]], wire.dataset_update(dataset_id, "deleted"))

        await self._submit(stage, durable=True)

    async def get_dataset(self, dataset_id: str) -> Dataset | None:
        doc = self._tables[DATASETS].raw(dataset_id)
        return Dataset.from_dict(doc) if doc is not None else None

    async def list_datasets(self) -> list[Dataset]:
        docs = self._raw[DATASETS].values()
        return sorted((Dataset.from_dict(d) for d in docs), key=lambda d: (d.created_at, d.id))

    # --- metadata ---------------------------------------------------------------------------

    async def get_meta(self, key: str) -> object | None:
        doc = self._tables[META].raw(key)
        return doc.get("value") if doc is not None else None

    async def set_meta(self, key: str, value: object) -> None:
        await self._submit(lambda view: Staged([["put", META, key, {"value": value}]]), durable=True)

    async def claim_meta(self, key: str, value: object) -> bool:
        def stage(view: _View) -> Staged | None:
            if view.get(META, key) is not None:
                return None
            return Staged([["put", META, key, {"value": value}]], result=True)

        claimed: bool = await self._submit(stage, durable=True, noop=False)
        return claimed

    # --- the event log ------------------------------------------------------------------------

    async def events_after(self, since: int) -> list[dict[str, Any]]:
        return [wire.loads(r.text) for r in self.ring.after(since)]

    # --- job lines ----------------------------------------------------------------------------

    async def read_job_lines(self, job_id: str, name: str) -> list[dict[str, Any]]:
        path = self.artifact_dir(job_id) / f"{name}.jsonl"

        def read() -> list[dict[str, Any]]:
            try:
                raw = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return []
            out = []
            for ln in raw.splitlines():
                try:
                    out.append(wire.loads(ln))
                except ValueError:
                    continue  # a torn last line after a crash
            return out

        return await asyncio.to_thread(read)

    # --- snapshots ----------------------------------------------------------------------------

    def _maybe_snapshot(self) -> None:
        if self._snapshot_task is not None or self._closed:
            return
        if (
            self._record - self._snap_record >= self.snapshot_records
            or self._written - self._snap_size >= self.snapshot_bytes
        ):
            self._snapshot_task = asyncio.create_task(self._snapshot(), name="store-snapshot")
            self._snapshot_task.add_done_callback(self._snapshot_done)

    def _snapshot_done(self, task: asyncio.Task[None]) -> None:
        self._snapshot_task = None
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("store snapshot failed (%s); the log keeps everything, will retry", exc)
            self._snap_size = self._written  # wait for as much log again before retrying

    async def snapshot(self) -> None:
        """Take a snapshot now (tests; ``close`` does not need one)."""
        if self._snapshot_task is not None:
            await asyncio.shield(self._snapshot_task)
        self._snapshot_task = asyncio.create_task(self._snapshot(), name="store-snapshot")
        self._snapshot_task.add_done_callback(self._snapshot_done)
        await asyncio.shield(self._snapshot_task)

    async def _snapshot(self) -> None:
        # On the loop: what the snapshot covers. Documents are never changed in place (a write
        # puts a new dict), so holding references is a consistent picture of this record.
        now = now_ms()
        merge = self.jobs.sparse(self._segments, min_size=1024)
        expired = [k for k, v in self._raw[IDEM].items() if v.get("expiresAt", 0) <= now]
        plan = snapshot.Plan(
            record=self._record,
            seq=self._seq,
            epoch=self.epoch,
            meta=dict(self._raw[META]),
            idem={k: v for k, v in self._raw[IDEM].items() if v.get("expiresAt", 0) > now},
            active=[self.jobs.entries[j].doc for j in self.jobs.page(["queued", "running"], None, None)],  # type: ignore[misc]  # active jobs live in memory
            to_archive=self.jobs.to_archive(),
            merge={n: self.jobs.archived_in(n) for n in merge},
            dead={n: sorted(ids) for n, ids in self.jobs.dead.items() if n not in merge and ids},
            segments=list(self._segments),
            segment=max([*self._segments, *archive.existing(self.archive_dir), 0]) + 1,
            datasets={d: self._raw[DATASETS].get(d) for d in self._dirty_datasets},
            dataset_files=dict(self._dataset_files),
            lines=self._lines_touched,
        )
        self._dirty_datasets, self._lines_touched = set(), set()
        try:
            done = await asyncio.to_thread(snapshot.write, plan, self.root, self.artifacts_dir)
        except BaseException:
            self._dirty_datasets |= set(plan.datasets)  # the next snapshot writes them
            self._lines_touched |= plan.lines
            raise
        # On the loop again: the new segment holds these documents; forget what it replaced.
        if done.docs:
            self.jobs.archived(plan.segment, done.written, done.docs)
        for n in merge:
            self.jobs.forget_segment(n)
        self._segments = done.segments
        old_files = set(self._dataset_files.values()) - set(done.dataset_files.values())
        self._dataset_files = done.dataset_files
        self._snap_record, self._snap_size = plan.record, self._written
        self.snapshots += 1
        # Expired Idempotency-Keys leave memory too (the snapshot left them out of its file):
        # a key per request would otherwise grow the table forever. One re-used meanwhile
        # (a new expiry) stays.
        idem = self._tables[IDEM]
        for key in expired:
            v = idem.raw(key)
            if v is not None and v.get("expiresAt", 0) <= now:
                idem.drop(key)
        await asyncio.to_thread(snapshot.cleanup, self.root, merge, old_files)
        self._drop_log()

    def _drop_log(self) -> None:
        """Delete log segments the snapshot covers whose state events the ring no longer keeps
        (their job_log lines leave the ring with them)."""
        try:
            dropped = self.log.drop_through(self._snap_record, self.ring.lost_through)
        except OSError as exc:
            log.warning("could not delete old log segments: %s", exc.strerror)
            return
        if dropped:
            self.ring.drop_logs_through(max(seg.max_log_seq for seg in dropped))


_NUMBER = {"logs": "lineNo", "metrics": "pointNo"}


def _last_number(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            tail = f.read()
    except FileNotFoundError:
        return 0
    key = _NUMBER.get(path.stem, "lineNo")
    for ln in reversed(tail.split(b"\n")):
        try:
            doc = wire.loads(ln)
        except ValueError:
            continue
        if isinstance(doc, dict):
            return int(doc.get(key) or 0)
    return 0


def _ring_record(line: Any) -> Record:
    """A ring record of a line read back: its text stays in the log until replayed."""
    job_ids = None
    if line.kind == "d":
        job_ids = frozenset(wire.loads(line.event).get("jobIds") or ())
    return Record(line.seq, line.job_id, line.job_seq, None, line.kind == "l", job_ids)


@dataclass
class Inspection:
    """What a data dir's record holds, read without changing anything (tests, diagnostics)."""

    jobs: dict[str, dict[str, Any]]
    datasets: dict[str, dict[str, Any]]
    meta: dict[str, Any]
    events: list[dict[str, Any]]  # the kept events, oldest first
    epoch: str
    head: int


def inspect(root: Path) -> Inspection:
    """Fold a data dir's snapshot and log as start-up would, read-only. The server may be
    running (or dead): this takes no lock and writes nothing.

    A running server replaces ``snapshot.json`` and only then deletes the files the new one no
    longer needs (merged job segments, then the oldest log segments it covers). So a read is
    consistent when ``snapshot.json`` is the same file and the log starts at the same segment
    before and after it; a read that a snapshot overtook (a file it needed vanished, or the
    snapshot or the log's first segment changed under it) starts again. Once a log segment is
    open, its events are read back through that descriptor, so a later delete cannot touch them."""
    for _ in range(_INSPECT_TRIES):
        before = _read_identity(root)
        try:
            seen = _inspect_once(root)
        except (StoreError, FileNotFoundError):
            if _read_identity(root) != before:
                continue
            raise
        if _read_identity(root) == before:
            return seen
    raise StoreError(f"the store in {root} took {_INSPECT_TRIES} snapshots while it was being read; try again",
                     code="busy")  # fmt: skip


_INSPECT_TRIES = 20


def _read_identity(root: Path) -> tuple[tuple[int, int, int] | None, str | None]:
    """What changes whenever a running server deletes a file a read may need: the snapshot
    file, and the log's first segment (segments are only ever dropped from the front)."""
    try:
        st = os.stat(root / snapshot.NAME)
        snap = (st.st_ino, st.st_mtime_ns, st.st_size)
    except FileNotFoundError:
        snap = None
    try:
        names = [p.name for p in (root / "log").iterdir() if p.suffix == ".log" and p.stem.isdigit()]
    except FileNotFoundError:
        names = []
    return snap, min(names, default=None)


def _inspect_once(root: Path) -> Inspection:
    store = TinyDBStore(DataDir(root))
    store._read_only = True
    store._db = _DB(storage=LiveStorage, tables=store._raw)
    store._tables = {name: store._db.table(name) for name in (JOBS, DATASETS, IDEM, META)}  # type: ignore[misc]  # as in TinyDBStore.open
    store._load(read_only=True)
    try:
        jobs = {job_id: dict(store.jobs[job_id]) for job_id in list(store.jobs)}
    finally:
        store.reader.close()
    events = [wire.loads(r.text) for r in _kept(store.ring)]
    return Inspection(jobs, dict(store._raw[DATASETS]), {k: v.get("value") for k, v in store._raw[META].items()},
                      events, store.epoch, store.ring.head)  # fmt: skip


def _kept(ring: EventRing) -> list[Record]:
    return sorted([*ring.ring, *ring.logs], key=lambda r: r.seq)
