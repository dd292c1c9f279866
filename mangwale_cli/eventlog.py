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
from dataclasses import dataclass
from typing import Any


def new_epoch() -> str:
    return secrets.token_hex(6)


@dataclass(slots=True)
class Record:
    """One logged event: its seq, the job it concerns, and its JSON text (serialized once)."""

    seq: int
    job_id: str | None
    job_seq: int | None
    text: str
    is_log: bool = False
    job_ids: frozenset[str] | None = None  # an event about several jobs (job_deleted)

    def concerns(self, jobs: set[str]) -> bool:
        if self.job_id is not None:
            return self.job_id in jobs
        return self.job_ids is not None and not self.job_ids.isdisjoint(jobs)


class EventRing:
    """The kept events, in seq order, with the two retention bounds."""

    def __init__(self, *, retention: int, log_retention: int = 10_000) -> None:
        self.retention = retention
        self.log_retention = log_retention
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
        self.logs_lost_through = head
        self.kept.clear()
        self.job_lost.clear()

    def keep(self, records: list[Record]) -> None:
        """Add records (seq order, above the head) to the rings and trim them."""
        kept = self.kept
        for r in records:
            if r.is_log:
                self.logs.append(r)
            else:
                self.ring.append(r)
                if r.job_id is not None:
                    kept[r.job_id] = kept.get(r.job_id, 0) + 1
        if records:
            self.head = records[-1].seq
        self._trim()

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
