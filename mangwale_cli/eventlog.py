"""The kept events in memory: what replay reads, in seq order, within two retention bounds.

The event log itself is part of the store's record (``store/``): the embedded store loads the
kept events from its log into an ``EventRing`` at start-up and adds each committed batch; with
the Redis store each instance mirrors the shared stream into one (``redisbus.RedisEventBus``).

Two bounds: state events (``job_created``, ``training_update``, ``dataset_update``,
``job_deleted``) keep the newest ``retention``; ``job_log`` lines keep the newest
``log_retention``, so a chatty training script cannot evict a job's progress from the replay
window.
"""

from __future__ import annotations

import heapq
import itertools
import secrets
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Protocol


def new_epoch() -> str:
    return secrets.token_hex(6)


class Source(Protocol):
    """Where a spilled record's text is: ``read(offset, size)`` gives it back."""

    def read(self, offset: int, size: int) -> str: ...


class Record:
    """One logged event: its seq, the job it concerns, and its JSON text (serialized once).

    The text is held in memory while the event is recent; older events in the ring keep only
    where their text is in the log (``spill``), and read it back when replayed."""

    __slots__ = ("_text", "is_log", "job_id", "job_ids", "job_seq", "off", "seq", "size", "src")
    logged = True  # False for a ``Notice``: a live message with no seq, never kept

    def __init__(
        self,
        seq: int,
        job_id: str | None,
        job_seq: int | None,
        text: str | None,
        is_log: bool = False,
        job_ids: frozenset[str] | None = None,  # an event about several jobs (job_deleted)
    ) -> None:
        self.seq = seq
        self.job_id = job_id
        self.job_seq = job_seq
        self._text = text
        self.is_log = is_log
        self.job_ids = job_ids
        self.src: Source | None = None
        self.off = 0
        self.size = 0

    @property
    def text(self) -> str:
        text = self._text
        if text is None:
            assert self.src is not None, "a record with neither text nor a place in the log"
            text = self.src.read(self.off, self.size)
        return text

    def place(self, src: Source, off: int, size: int) -> None:
        """Where the text is in the log (it stays in memory until ``spill``)."""
        self.src, self.off, self.size = src, off, size

    def spill(self) -> None:
        if self.src is not None:
            self._text = None

    def concerns(self, jobs: set[str]) -> bool:
        if self.job_id is not None:
            return self.job_id in jobs
        return self.job_ids is not None and not self.job_ids.isdisjoint(jobs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and (other.seq, other.job_id, other.text) == (self.seq, self.job_id, self.text)

    def __repr__(self) -> str:
        return f"Record(seq={self.seq}, job_id={self.job_id!r}, job_seq={self.job_seq})"


class Notice(Record):
    """A live message that is not logged (``worker_update``): it goes to the subscribers that
    follow every job, in the order it came, but has no seq, is never kept in a ring, never
    replayed, and moves no client's resume point (docs/protocol.md, "Live-only messages")."""

    __slots__ = ()
    logged = False

    def __init__(self, text: str) -> None:
        super().__init__(0, None, None, text)


class EventRing:
    """The kept events, in seq order, with the two retention bounds."""

    def __init__(self, *, retention: int, log_retention: int = 10_000, hot: int | None = None) -> None:
        self.retention = retention
        self.log_retention = log_retention
        # Records beyond the newest ``hot`` drop their text (read back from the log when
        # replayed), so memory holds offsets, not 100k event texts. None: keep every text.
        self.hot = hot
        self._warm = self._warm_logs = 0  # newest records that may still hold their text
        self.logs: deque[Record] = deque()  # job_log lines, bounded by log_retention
        self.logs_lost_through = 0
        self.epoch = ""
        self.head = 0  # seq of the newest event logged
        self.ring: deque[Record] = deque()
        # Per job with kept state events (so both stay within the retention bound): how many
        # are kept, and the highest seq of its events no longer kept.
        self.kept: dict[str, int] = {}
        self.job_lost: dict[str, int] = {}
        self.lost_through = 0  # highest seq no longer kept

    def reset(self, epoch: str, head: int) -> None:
        """Forget everything: an empty ring of ``epoch`` whose history ends at ``head``."""
        self.epoch = epoch
        self.head = head
        self.lost_through = head
        self.ring.clear()
        self.logs.clear()
        self._warm = self._warm_logs = 0
        self.logs_lost_through = head
        self.kept.clear()
        self.job_lost.clear()

    def keep(self, records: list[Record]) -> None:
        """Add records (seq order, above the head) to the rings and trim them."""
        kept = self.kept
        hot = self.hot
        for r in records:
            if r.is_log:
                self.logs.append(r)
                if hot is not None and r._text is not None:
                    # Trimming takes records from the other end: never more warm than there are.
                    self._warm_logs = min(self._warm_logs + 1, len(self.logs))
                    if self._warm_logs > hot:  # the oldest record still holding its text
                        self.logs[-hot - 1].spill()
                        self._warm_logs -= 1
            else:
                self.ring.append(r)
                if hot is not None and r._text is not None:
                    self._warm = min(self._warm + 1, len(self.ring))
                    if self._warm > hot:
                        self.ring[-hot - 1].spill()
                        self._warm -= 1
                if r.job_id is not None:
                    kept[r.job_id] = kept.get(r.job_id, 0) + 1
        if records:
            self.head = records[-1].seq
        self._trim()

    def drop_logs_through(self, seq: int) -> None:
        """Forget job_log records up to ``seq`` (their part of the log is being deleted)."""
        while self.logs and self.logs[0].seq <= seq:
            self.logs_lost_through = self.logs.popleft().seq

    def _trim(self) -> None:
        kept = self.kept
        while len(self.ring) > self.retention:
            r = self.ring.popleft()
            self.lost_through = r.seq
            j = r.job_id
            if j is not None:
                n = kept[j] - 1
                if n:
                    kept[j] = n
                    self.job_lost[j] = r.seq
                else:  # nothing of it is kept: missing_since answers for it without an entry
                    del kept[j]
                    self.job_lost.pop(j, None)
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
            it = (r for r in it if r.concerns(jobs))
        return iter(it)

    def missing_since(self, since: int, jobs: set[str] | None = None) -> bool:
        """True if events after ``since`` (of ``jobs``, if given) may no longer be kept. A job
        with no kept events at all is assumed to have lost some (the client re-reads it)."""
        if since >= self.lost_through:
            return False
        if jobs is None:
            return True
        return any(j not in self.kept or self.job_lost.get(j, 0) > since for j in jobs)

    def job_logs(self, job_id: str, since: int = 0) -> list[Record]:
        return [r for r in _tail(self.logs, since) if r.job_id == job_id]

    def describe(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "headSeq": self.head, "firstSeq": self.lost_through + 1}


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
