"""The jobs table of the embedded store: every job in a small index, documents only where needed.

``JobTable`` is the mapping TinyDB's jobs table reads and writes (``tinydb_store.RecordTable``).
Queued and running jobs, and finished ones not yet archived, keep their document in memory;
archived ones (``archive.py``) are read from their segment when asked for, through a small cache.
Every job has an ``Entry``: its list position ``(createdAt, id)``, status, finish time and where
its document is. Lists are sorted per status, so a page (``limit``, ``status``, cursor) is a
bisect and a slice, never a sort or a scan of the table, at any history size.
"""

from __future__ import annotations

import bisect
import heapq
from collections import OrderedDict
from collections.abc import Iterable, Iterator, MutableMapping
from itertools import islice
from typing import Any

from ..wire import ACTIVE, TERMINAL, JobStatus
from .archive import Reader

STATUSES = tuple(s.value for s in JobStatus)
_TERMINAL = frozenset(s.value for s in TERMINAL)
_ACTIVE = tuple(sorted(s.value for s in ACTIVE))
CACHE = 512  # archived documents kept decoded


class Entry:
    __slots__ = ("doc", "finished", "key", "off", "seg", "size", "status")

    def __init__(self, key: tuple[int, str], status: str, finished: int) -> None:
        self.key = key
        self.status = status
        self.finished = finished
        self.doc: dict[str, Any] | None = None
        self.seg = -1  # archive segment holding the document (-1: in memory only)
        self.off = 0
        self.size = 0


class JobTable(MutableMapping[str, dict[str, Any]]):
    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.entries: dict[str, Entry] = {}
        self.order: list[tuple[int, str]] = []  # every job, ascending (createdAt, id)
        self.by_status: dict[str, list[tuple[int, str]]] = {s: [] for s in STATUSES}
        self.unarchived: set[str] = set()  # finished jobs whose document is only in memory
        self.live: dict[int, int] = {}  # archive segment -> jobs whose document is there
        self.dead: dict[int, set[str]] = {}  # archive segment -> deleted jobs still in it
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()

    # --- the mapping TinyDB sees ------------------------------------------------------------

    def __getitem__(self, job_id: str) -> dict[str, Any]:
        e = self.entries[job_id]
        if e.doc is not None:
            return e.doc
        doc = self._cache.get(job_id)
        if doc is None:
            doc = self.reader.read(e.seg, e.off, e.size)
            self._cache[job_id] = doc
            if len(self._cache) > CACHE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(job_id)
        return doc

    def __setitem__(self, job_id: str, doc: dict[str, Any]) -> None:
        e = self.entries.get(job_id)
        status = doc["status"]
        finished = int(doc.get("finishedAt") or doc.get("updatedAt") or 0)
        if e is None:
            key = (int(doc.get("createdAt") or 0), job_id)
            e = self.entries[job_id] = Entry(key, status, finished)
            _insert(self.order, key)
            _insert(self.by_status[status], key)
        else:
            if e.status != status:
                _remove(self.by_status[e.status], e.key)
                _insert(self.by_status[status], e.key)
                e.status = status
            e.finished = finished
            if e.seg >= 0:  # only a merge rewrites an archived job; its old line is garbage now
                self._unarchive(job_id, e)
        e.doc = doc
        self._cache.pop(job_id, None)
        if status in _TERMINAL:
            self.unarchived.add(job_id)
        else:
            self.unarchived.discard(job_id)

    def __delitem__(self, job_id: str) -> None:
        e = self.entries.pop(job_id)
        _remove(self.order, e.key)
        _remove(self.by_status[e.status], e.key)
        if e.seg >= 0:
            self._unarchive(job_id, e)
            self.dead.setdefault(e.seg, set()).add(job_id)
        self.unarchived.discard(job_id)
        self._cache.pop(job_id, None)

    def _unarchive(self, job_id: str, e: Entry) -> None:
        self.live[e.seg] -= 1
        e.seg = -1

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self.entries

    # --- loading ----------------------------------------------------------------------------

    def load_segment(self, n: int, rows: list[list[Any]], dead: Iterable[str]) -> None:
        """Add the index of archive segment ``n`` (start-up), skipping its dead jobs."""
        gone = set(dead)
        if gone:
            self.dead[n] = gone
        live = 0
        entries = self.entries
        for job_id, created, status, finished, off, size in rows:
            if job_id in gone:
                continue
            key = (created, job_id)
            e = Entry(key, status, finished)
            e.seg, e.off, e.size = n, off, size
            entries[job_id] = e
            self.order.append(key)
            self.by_status[status].append(key)
            live += 1
        self.live[n] = live

    def sort(self) -> None:
        """After ``load_segment`` calls: put the lists in order (once, at start-up)."""
        self.order.sort()
        for lst in self.by_status.values():
            lst.sort()

    # --- queries ----------------------------------------------------------------------------

    def page(self, statuses: Iterable[str] | None, after: tuple[int, str] | None, limit: int | None) -> list[str]:
        """Job ids newest first, only ``statuses``, only older than ``after``, at most ``limit``."""
        lists = [self.order] if statuses is None else [self.by_status[s] for s in sorted(set(statuses))]
        its = [_newest_first(lst, after) for lst in lists]
        merged: Iterator[tuple[int, str]] = its[0] if len(its) == 1 else heapq.merge(*its, reverse=True)
        if limit is not None:
            merged = islice(merged, limit)
        return [key[1] for key in merged]

    def counts(self) -> dict[str, int]:
        return {s: len(lst) for s, lst in self.by_status.items()}

    def finished_by_time(self, statuses: Iterable[str]) -> list[tuple[int, str]]:
        """``(finish time, id)`` of the finished jobs of ``statuses``, oldest first: the index
        alone (no document), for pruning."""
        entries = self.entries
        out = [(entries[job_id].finished, job_id)
               for s in sorted(set(statuses) & _TERMINAL) for _, job_id in self.by_status[s]]  # fmt: skip
        out.sort()
        return out

    def active_docs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Queued and running jobs with their documents (always in memory)."""
        for s in _ACTIVE:
            for _, job_id in self.by_status[s]:
                doc = self.entries[job_id].doc
                if doc is not None:
                    yield job_id, doc

    # --- archiving (the snapshot) -------------------------------------------------------------

    def to_archive(self) -> list[dict[str, Any]]:
        """Finished documents still only in memory (the snapshot writes them to a segment)."""
        out = []
        for job_id in self.unarchived:
            doc = self.entries[job_id].doc
            assert doc is not None
            out.append(doc)
        return out

    def archived(self, n: int, written: list[tuple[str, int, int]], docs: list[dict[str, Any]]) -> None:
        """Segment ``n`` holds ``docs`` now (at ``written`` positions): drop from memory those
        not written again since. Jobs deleted meanwhile are dead in ``n``."""
        live = 0
        for (job_id, off, size), doc in zip(written, docs, strict=True):
            e = self.entries.get(job_id)
            if e is None or (e.doc is not None and e.doc is not doc):
                self.dead.setdefault(n, set()).add(job_id)
                continue
            if e.seg >= 0:  # merged: its old line is garbage now
                self._unarchive(job_id, e)
            e.seg, e.off, e.size = n, off, size
            if e.doc is doc:
                e.doc = None
                self.unarchived.discard(job_id)
            live += 1
        self.live[n] = self.live.get(n, 0) + live

    def sparse(self, segments: Iterable[int], *, min_live: float = 0.5, min_size: int = 256) -> list[int]:
        """Segments worth merging: more dead than ``min_live`` allows, or small."""
        out = []
        for n in segments:
            live = self.live.get(n, 0)
            dead = len(self.dead.get(n, ()))
            if live + dead and (live < (live + dead) * min_live or live < min_size):
                out.append(n)
        return out

    def archived_in(self, n: int) -> list[tuple[str, int, int]]:
        return [(job_id, e.off, e.size) for job_id, e in self.entries.items() if e.seg == n]

    def forget_segment(self, n: int) -> None:
        self.live.pop(n, None)
        self.dead.pop(n, None)
        self.reader.forget(n)


def _insert(lst: list[tuple[int, str]], key: tuple[int, str]) -> None:
    if not lst or lst[-1] < key:  # the common case: a new job is the newest
        lst.append(key)
    else:
        bisect.insort(lst, key)


def _remove(lst: list[tuple[int, str]], key: tuple[int, str]) -> None:
    i = bisect.bisect_left(lst, key)
    if i < len(lst) and lst[i] == key:
        del lst[i]


def _newest_first(lst: list[tuple[int, str]], after: tuple[int, str] | None) -> Iterator[tuple[int, str]]:
    end = len(lst) if after is None else bisect.bisect_left(lst, after)
    return (lst[i] for i in range(end - 1, -1, -1))
