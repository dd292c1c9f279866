"""The persisted, bounded event log: an append-only JSON-lines file with an epoch.

Layout of ``events.jsonl``::

    {"mangwaleEventLog": 1, "epoch": "...", "baseSeq": N, "jobSeqs": {...}, "jobLost": {...}}
    {"type": "job_created", "seq": N+1, "epoch": "...", ...}
    ...

The first line is a header. ``baseSeq`` is the seq before the first line kept, ``jobSeqs`` the
last ``jobSeq`` of jobs whose events were compacted away (so numbering continues), ``jobLost``
the highest compacted seq per job (so replay knows what it can no longer offer). Events are
appended in batches with one ``write``; when the file holds twice the retention it is rewritten
(atomically) with the newest ``retention`` events.

On open, a torn last line (a crash mid-append) is cut off; anything else that does not parse,
or a seq that does not increase by one, means the log cannot be trusted: it is moved aside and a
new epoch starts, with seq continuing above every seq seen, so a seq is never reused.
"""

from __future__ import annotations

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
from .store.datadir import atomic_write

log = logging.getLogger(__name__)

HEADER_KEY = "mangwaleEventLog"


def new_epoch() -> str:
    return secrets.token_hex(6)


@dataclass(slots=True)
class Record:
    """One logged event: its seq, the job it concerns, and its JSON text (serialized once)."""

    seq: int
    job_id: str | None
    job_seq: int | None
    text: str


class FileEventLog:
    def __init__(self, path: Path, *, retention: int, fallback_head: int = 0) -> None:
        self.path = Path(path)
        self.retention = retention
        self.fallback_head = fallback_head
        self.epoch = ""
        self.head = 0  # seq of the newest event logged
        self.ring: deque[Record] = deque()
        self.job_seqs: dict[str, int] = {}  # last jobSeq per job
        self.job_lost: dict[str, int] = {}  # highest seq per job no longer kept
        self.lost_through = 0  # highest seq no longer kept
        self._fd: int | None = None
        self._lines_in_file = 0
        self._unsynced = False

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
                seen = max(self.head, self.fallback_head)
                aside = self.path.with_name(f"{self.path.name}.untrusted-{int(time.time())}")
                os.replace(self.path, aside)
                log.warning("event log %s cannot be trusted (%s); moved to %s, new epoch", self.path, reason, aside)
                self._start_new(seen, reason=reason)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def _start_new(self, base_seq: int, reason: str | None) -> None:
        self.epoch = new_epoch()
        self.head = base_seq
        self.lost_through = base_seq
        self.ring.clear()
        self.job_seqs.clear()
        self.job_lost.clear()
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
        base = header.get("baseSeq", 0)
        self.job_seqs = dict(header.get("jobSeqs") or {})
        self.job_lost = dict(header.get("jobLost") or {})
        self.head = self.lost_through = base
        expected = base + 1
        for ln in body[1:]:
            try:
                ev = wire.loads(ln)
                seq = ev["seq"]
            except (ValueError, KeyError, TypeError):
                return f"unreadable event after seq {self.head}"
            if seq != expected or ev.get("epoch") != self.epoch:
                self.head = max(self.head, seq if isinstance(seq, int) else 0)
                return f"seq {seq} where {expected} was expected"
            job_id = wire.event_job_id(ev)
            job_seq = ev.get("jobSeq")
            if job_id is not None and isinstance(job_seq, int):
                self.job_seqs[job_id] = job_seq
            self.ring.append(Record(seq, job_id, job_seq, ln.decode()))
            self.head = seq
            expected += 1
        self._lines_in_file = len(self.ring)
        self._trim()
        return None

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
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._unsynced = True
        self.ring.extend(records)
        self.head = records[-1].seq
        self._lines_in_file += len(records)
        self._trim()
        if self._lines_in_file >= 2 * self.retention:
            self._rewrite()

    def _trim(self) -> None:
        while len(self.ring) > self.retention:
            r = self.ring.popleft()
            self.lost_through = r.seq
            if r.job_id is not None:
                self.job_lost[r.job_id] = r.seq

    def _rewrite(self) -> None:
        """Rewrite the file with the header and the kept events (compaction)."""
        kept_jobs = {r.job_id for r in self.ring if r.job_id is not None}
        header = {
            HEADER_KEY: 1,
            "epoch": self.epoch,
            "baseSeq": self.lost_through,
            "jobSeqs": {j: s for j, s in self.job_seqs.items() if j not in kept_jobs},
            "jobLost": self.job_lost,
            "createdAt": wire.now_ms(),
        }
        lines = [wire.dumps(header)] + [r.text for r in self.ring]
        atomic_write(self.path, ("\n".join(lines) + "\n").encode())
        if self._fd is not None:
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._lines_in_file = len(self.ring)
        self._unsynced = False

    def sync(self) -> None:
        if self._fd is not None and self._unsynced:
            self._unsynced = False
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None

    # --- read -----------------------------------------------------------------------------

    def after(self, since: int, jobs: set[str] | None = None) -> Iterator[Record]:
        """Kept records with seq > since, optionally only those of ``jobs``."""
        if not self.ring or since >= self.head:
            return iter(())
        first = self.ring[0].seq
        start = max(0, since + 1 - first)
        it: Iterable[Record] = (self.ring[i] for i in range(start, len(self.ring)))
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

    def describe(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "headSeq": self.head, "firstSeq": self.lost_through + 1}
