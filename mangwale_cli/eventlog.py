"""The persisted, bounded event log: an append-only JSON-lines file with an epoch.

Layout of ``events.jsonl``::

    {"mangwaleEventLog": 1, "epoch": "...", "baseSeq": N, "jobSeqs": {...}, "jobLost": {...}}
    {"type": "job_created", "seq": N+1, "epoch": "...", ...}
    ...

The first line is a header. ``baseSeq`` is the seq before the first line kept, ``jobSeqs`` the
last ``jobSeq`` of jobs whose events were compacted away (so numbering continues), ``jobLost``
the highest compacted seq per job (so replay knows what it can no longer offer). Events are
appended in batches with one ``write``; when the file holds twice what is kept it is rewritten
(atomically) with the kept events only.

Compaction either runs inline in ``append`` (a bare log), or, once ``background_compaction`` is
set (the event bus does), in three steps so the event loop never writes the whole file:
``begin_compaction`` snapshots the header and the kept records on the loop;
``Compaction.write`` writes and fsyncs them to a temp file in a worker thread while ``append``
keeps writing to the old file and remembers what it appended; ``finish_compaction``, on the
loop, appends those records to the temp file, fsyncs it and renames it over the log. Until the
rename the old file is complete; after it the new one is, so kill -9 at any moment is safe.

Two bounds: state events (``job_created``, ``training_update``, ``dataset_update``) keep the
newest ``retention``; ``job_log`` lines keep the newest ``log_retention``, so a chatty training
script cannot evict a job's progress from the replay window. Because log lines are trimmed on
their own, a compacted file has gaps in seq up to ``compactedHead``; after it, seqs are +1.

On open, a torn last line (a crash mid-append) is cut off; anything else that does not parse,
or a seq that does not increase by one, means the log cannot be trusted: it is moved aside and a
new epoch starts, with seq continuing above every seq seen, so a seq is never reused.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import wire
from .store.datadir import TMP_MARK, atomic_write, fsync_dir

log = logging.getLogger(__name__)

HEADER_KEY = "mangwaleEventLog"


def new_epoch() -> str:
    return secrets.token_hex(6)


def _highest_seq(raw: bytes) -> int:
    """The highest ``seq`` (or header ``baseSeq``) on any readable line of a log file."""
    best = 0
    for line in raw.split(b"\n"):
        try:
            doc = wire.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            for key in ("seq", "baseSeq"):
                value = doc.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    best = max(best, value)
    return best


@dataclass(slots=True)
class Compaction:
    """A snapshot of the kept log, to be written to ``tmp`` off the event loop."""

    tmp: Path
    header: dict[str, Any]
    ring: list[Record]
    logs: list[Record]
    head: int

    def write(self) -> None:
        """Write and fsync the snapshot to the temp file (no rename). Runs in a worker thread."""
        lines = [wire.dumps(self.header)] + [r.text for r in heapq.merge(self.ring, self.logs, key=_seq)]
        data = ("\n".join(lines) + "\n").encode()
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(slots=True)
class Record:
    """One logged event: its seq, the job it concerns, and its JSON text (serialized once)."""

    seq: int
    job_id: str | None
    job_seq: int | None
    text: str
    is_log: bool = False


class EventRing:
    """The kept events in memory, in seq order, with the two retention bounds; what replay reads.

    ``FileEventLog`` persists it to a file; with the Redis backend each instance holds one as a
    mirror of the shared stream (``redisbus.RedisEventBus``)."""

    def __init__(self, *, retention: int, log_retention: int = 10_000) -> None:
        self.retention = retention
        self.log_retention = log_retention
        self.logs: deque[Record] = deque()  # job_log lines, bounded by log_retention
        self.logs_lost_through = 0
        self.epoch = ""
        self.head = 0  # seq of the newest event logged
        self.ring: deque[Record] = deque()
        self.job_seqs: dict[str, int] = {}  # last jobSeq per job
        self.job_lost: dict[str, int] = {}  # highest seq per job no longer kept
        self.lost_through = 0  # highest seq no longer kept

    def reset(self, epoch: str, head: int) -> None:
        """Forget everything: an empty ring of ``epoch`` whose history ends at ``head``."""
        self.epoch = epoch
        self.head = head
        self.lost_through = head
        self.ring.clear()
        self.logs.clear()
        self.logs_lost_through = head
        self.job_seqs.clear()
        self.job_lost.clear()

    def keep(self, records: list[Record]) -> None:
        """Add records (seq order, above the head) to the rings and trim them."""
        for r in records:
            (self.logs if r.is_log else self.ring).append(r)
        if records:
            self.head = records[-1].seq
        self._trim()

    def _trim(self) -> None:
        while len(self.ring) > self.retention:
            r = self.ring.popleft()
            self.lost_through = r.seq
            if r.job_id is not None:
                self.job_lost[r.job_id] = r.seq
        while len(self.logs) > self.log_retention:
            self.logs_lost_through = self.logs.popleft().seq

    # --- read -----------------------------------------------------------------------------

    def after(self, since: int, jobs: set[str] | None = None, *, logs: bool = True) -> Iterator[Record]:
        """Kept records with seq > since in seq order, optionally only those of ``jobs``."""
        if since >= self.head:
            return iter(())
        it: Iterable[Record] = _tail(self.ring, since)
        if logs and self.logs:
            it = heapq.merge(it, _tail(self.logs, since), key=_seq)
        if jobs is not None:
            it = (r for r in it if r.job_id in jobs)
        return iter(it)

    def missing_since(self, since: int, jobs: set[str] | None = None) -> bool:
        """True if events after ``since`` (of ``jobs``, if given) are no longer kept."""
        if since >= self.lost_through:
            return False
        if jobs is None:
            return True
        return any(self.job_lost.get(j, 0) > since for j in jobs)

    def job_logs(self, job_id: str, since: int = 0) -> list[Record]:
        return [r for r in _tail(self.logs, since) if r.job_id == job_id]

    def describe(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "headSeq": self.head, "firstSeq": self.lost_through + 1}


class FileEventLog(EventRing):
    def __init__(self, path: Path, *, retention: int, log_retention: int = 10_000, fallback_head: int = 0) -> None:
        super().__init__(retention=retention, log_retention=log_retention)
        self.path = Path(path)
        self._compacted_head = 0
        self.fallback_head = fallback_head
        self._fd: int | None = None
        self._lines_in_file = 0
        self._unsynced = False
        # Set by the event bus: ``append`` then leaves compaction to begin/finish_compaction.
        self.background_compaction = False
        self._compaction: Compaction | None = None
        self._tail: list[Record] = []  # appended since the running compaction's snapshot
        self._compact_retry_at = 0.0

    # --- open -----------------------------------------------------------------------------

    def open(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raw = None
        if raw is None:
            self._start_new(self.fallback_head, reason=None)
        else:
            reason = self._load(raw)
            if reason is not None:
                # _load stops at the first bad line; later lines may hold seqs clients saw.
                seen = max(self.head, self.fallback_head, _highest_seq(raw))
                aside = self.path.with_name(f"{self.path.name}.untrusted-{time.time_ns()}")
                os.replace(self.path, aside)
                log.warning("event log %s cannot be trusted (%s); moved to %s, new epoch", self.path, reason, aside)
                self._start_new(seen, reason=reason)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def _start_new(self, base_seq: int, reason: str | None) -> None:
        self.reset(new_epoch(), base_seq)
        self._rewrite()

    def _load(self, raw: bytes) -> str | None:
        """Fill the ring from file bytes; return why the log is untrusted, or None."""
        lines = raw.split(b"\n")
        torn = lines[-1] != b""
        if torn:
            cut = len(raw) - len(lines[-1])
            log.warning("event log %s: dropping a torn last line (%d bytes)", self.path, len(lines[-1]))
            with open(self.path, "r+b") as f:
                f.truncate(cut)
        body = [ln for ln in lines[:-1]]
        if not body:
            return "empty file"
        try:
            header = wire.loads(body[0])
        except ValueError:
            return "unreadable header"
        if not isinstance(header, dict) or header.get(HEADER_KEY) != 1 or not isinstance(header.get("epoch"), str):
            return "bad header"
        self.epoch = header["epoch"]
        base: int = header.get("baseSeq", 0)
        self.job_seqs = dict(header.get("jobSeqs") or {})
        self.job_lost = dict(header.get("jobLost") or {})
        self.head = self.lost_through = base
        self.logs_lost_through = header.get("logsBaseSeq", base)
        compacted = header.get("compactedHead", base)
        self._compacted_head = compacted if isinstance(compacted, int) else base
        for ln in body[1:]:
            try:
                ev = wire.loads(ln)
                seq = ev["seq"]
                if not isinstance(seq, int):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                return f"unreadable event after seq {self.head}"
            # Gaps are legal only where compaction trimmed log lines on their own.
            ok = seq == self.head + 1 or (self.head < seq <= self._compacted_head)
            if not ok or ev.get("epoch") != self.epoch:
                self.head = max(self.head, seq)
                return f"seq {seq} where {self.head + 1} was expected"
            self._add(ev, seq, ln.decode())
            self.head = seq
        self._lines_in_file = len(self.ring) + len(self.logs)
        self._trim()
        return None

    def _add(self, ev: dict[str, Any], seq: int, text: str) -> None:
        job_id = wire.event_job_id(ev)
        if ev.get("type") == wire.MsgType.JOB_LOG:
            self.logs.append(Record(seq, job_id, None, text, True))
            return
        job_seq = ev.get("jobSeq")
        if job_id is not None and isinstance(job_seq, int):
            self.job_seqs[job_id] = job_seq
        self.ring.append(Record(seq, job_id, job_seq, text))

    # --- append ---------------------------------------------------------------------------

    def next_job_seq(self, job_id: str) -> int:
        n = self.job_seqs.get(job_id, 0) + 1
        self.job_seqs[job_id] = n
        return n

    def append(self, records: list[Record]) -> None:
        """Write a batch in one call. Raises OSError if the disk refuses it."""
        if not records:
            return
        assert self._fd is not None
        data = ("\n".join(r.text for r in records) + "\n").encode()
        view = memoryview(data)
        size = os.fstat(self._fd).st_size
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError:
            # A full disk can take half a batch: cut it off, so the retry does not follow a torn line.
            try:
                os.ftruncate(self._fd, size)
            except OSError:
                pass  # then the next open finds a torn line and starts a new epoch
            raise
        self._unsynced = True
        if self._compaction is not None:
            self._tail.extend(records)
        self._lines_in_file += len(records)
        self.keep(records)
        if not self.background_compaction and self._compaction_needed():
            try:
                self._rewrite()
            except OSError as exc:  # the batch is logged; compaction waits for the next append
                log.warning("event log compaction failed (%s); will retry", exc.strerror)

    def _compaction_needed(self) -> bool:
        kept = len(self.ring) + len(self.logs)
        return self._lines_in_file >= 2 * max(kept, 1) and self._lines_in_file > kept  # half is trimmed

    def compaction_due(self) -> bool:
        """True if the file should be compacted and no compaction is running or backing off."""
        return (
            self._fd is not None
            and self._compaction is None
            and self._compaction_needed()
            and time.monotonic() >= self._compact_retry_at
        )

    def begin_compaction(self) -> Compaction:
        """Snapshot the header and kept records (cheap; on the loop). Appends from now on are
        remembered until ``finish_compaction`` or ``abandon_compaction``."""
        assert self._compaction is None
        self._compaction = Compaction(
            # Unique per compaction: an abandoned thread may still be writing an earlier one.
            tmp=self.path.with_name(f"{self.path.name}{TMP_MARK}{os.getpid()}-compact-{time.time_ns()}"),
            header=self._header(),
            ring=list(self.ring),
            logs=list(self.logs),
            head=self.head,
        )
        self._tail = []
        return self._compaction

    def finish_compaction(self, c: Compaction) -> bool:
        """After ``c.write`` succeeded: add the records appended meanwhile, fsync, rename over the
        log, switch appends to it. On the loop, so no append interleaves. False if not done."""
        if c is not self._compaction or self._fd is None:  # abandoned (e.g. the log was closed)
            c.tmp.unlink(missing_ok=True)
            return False
        tail, self._tail, self._compaction = self._tail, [], None
        fd = -1
        try:
            fd = os.open(c.tmp, os.O_WRONLY | os.O_APPEND)
            if tail:
                view = memoryview(("\n".join(r.text for r in tail) + "\n").encode())
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            os.fsync(fd)
            os.replace(c.tmp, self.path)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            c.tmp.unlink(missing_ok=True)
            self._compaction_failed(exc)
            return False
        # The renamed temp file is the log now; keep appending through its fd.
        old, self._fd = self._fd, fd
        os.close(old)
        self._compacted_head = c.head
        self._lines_in_file = len(c.ring) + len(c.logs) + len(tail)
        self._unsynced = False
        try:
            fsync_dir(self.path.parent)
        except OSError as exc:
            log.warning("event log compaction: directory fsync failed (%s)", exc.strerror)
        return True

    def abandon_compaction(self, c: Compaction, exc: BaseException | None = None) -> None:
        """Give up ``c`` (its write failed or was cancelled): the old file stays the log."""
        if c is self._compaction:
            self._compaction, self._tail = None, []
            if exc is not None:
                self._compaction_failed(exc)
        c.tmp.unlink(missing_ok=True)

    def _compaction_failed(self, exc: BaseException) -> None:
        self._compact_retry_at = time.monotonic() + 5.0
        log.warning("event log compaction failed (%s); the old file stays, will retry", getattr(exc, "strerror", None) or exc)

    def _header(self) -> dict[str, Any]:
        kept_jobs = {r.job_id for r in self.ring if r.job_id is not None}
        return {
            HEADER_KEY: 1,
            "epoch": self.epoch,
            "baseSeq": self.lost_through,
            "jobSeqs": {j: s for j, s in self.job_seqs.items() if j not in kept_jobs},
            "jobLost": dict(self.job_lost),
            "logsBaseSeq": self.logs_lost_through,
            "compactedHead": self.head,
            "createdAt": wire.now_ms(),
        }

    def _rewrite(self) -> None:
        """Rewrite the file with the header and the kept events (compaction, synchronous)."""
        header = self._header()
        self._compacted_head = self.head
        lines = [wire.dumps(header)] + [r.text for r in heapq.merge(self.ring, self.logs, key=_seq)]
        atomic_write(self.path, ("\n".join(lines) + "\n").encode())
        if self._fd is not None:
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._lines_in_file = len(self.ring) + len(self.logs)
        self._unsynced = False

    def sync(self) -> None:
        if self._fd is not None and self._unsynced:
            self._unsynced = False
            os.fsync(self._fd)

    def close(self) -> None:
        if self._compaction is not None:  # its thread may still write the temp file: leave it
            self._compaction, self._tail = None, []
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None


def _seq(r: Record) -> int:
    return r.seq


def _tail(ring: deque[Record], since: int) -> Iterator[Record]:
    """Records of ``ring`` (ordered by seq) with seq > since."""
    n = len(ring)
    if n == 0 or ring[-1].seq <= since:
        return iter(())
    if ring[0].seq > since:
        return iter(ring)
    lo, hi = 0, n
    while lo < hi:  # first index with seq > since
        mid = (lo + hi) // 2
        if ring[mid].seq <= since:
            lo = mid + 1
        else:
            hi = mid
    return itertools.islice(ring, lo, None)
