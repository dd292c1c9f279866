"""The embedded store's log: every change and its event as one line, appended, never rewritten.

This is the write-ahead log of ``TinyDBStore``: the state is the fold of its records over the
last snapshot, and the event log clients replay is read from the same lines. A line::

    <crc32 of the rest, 8 hex> <record no> <seq|-> <jobSeq|-> <kind> <job id|->\\t<ops JSON>\\t<event JSON>\\n

``kind`` is ``e`` (a state event), ``l`` (a ``job_log`` line), ``d`` (an event about several
jobs: ``job_deleted``) or ``-`` (no event). The prefix lets start-up rebuild the replay ring from
the lines before the snapshot without parsing any JSON; the event text is stored exactly as
clients receive it. ``ops`` is the state change (``TinyDBStore._apply``).

Lines live in segment files ``log/<first record no, 20 digits>.log``, each opened by a header
line (``H``) naming the log's epoch. A segment is deleted whole once the snapshot covers its
records and the replay ring no longer keeps its events (retention by segment, never by rewrite).

Reading: a line that fails its checksum or does not parse, followed only by more such bytes, is
a torn tail (a crash mid-append, or a power loss before fsync): it is cut off. Anything else that
does not check out (a bad line with good lines after it, a record number that does not follow)
means the log cannot be trusted: start-up stops with a ``StoreError`` naming the file and line.
"""

from __future__ import annotations

import logging
import os
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import faults, wire
from ..errors import StoreError
from .datadir import fsync_dir

log = logging.getLogger(__name__)

SUFFIX = ".log"
SEGMENT_BYTES = 8 * 1024 * 1024  # a new segment starts past this size
HEADER_KEY = "mangwaleLog"


@dataclass(slots=True)
class Line:
    """One record as read back: the parsed prefix; the JSON texts are decoded when asked for
    (start-up reads most lines only for their prefix and where their event is)."""

    record: int
    seq: int | None
    job_seq: int | None
    kind: str
    job_id: str | None
    body: bytes
    ops_at: int  # offsets in ``body``
    event_at: int
    segment: Segment
    offset: int  # of the line in its segment file

    @property
    def ops(self) -> str:
        return self.body[self.ops_at : self.event_at - 1].decode()

    @property
    def event(self) -> str:
        return self.body[self.event_at :].decode()

    @property
    def event_offset(self) -> int:
        """Where the event's text starts in the segment file (9: the checksum and its space)."""
        return self.offset + 9 + self.event_at

    @property
    def event_size(self) -> int:
        return len(self.body) - self.event_at


@dataclass(slots=True, eq=False)
class Segment:
    path: Path
    first: int  # first record number
    last: int = 0  # last record number written (0: none yet)
    max_seq: int = 0  # highest seq of a state event in it
    max_log_seq: int = 0  # highest seq of a job_log line in it
    epoch: str = ""
    fd: int | None = None  # for reading events back (replay of spilled ring records)

    def read(self, offset: int, size: int) -> str:
        """An event's text (a ring record that holds only its place). The descriptor stays
        open while records point here, even after the file is deleted."""
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self.fd, size, offset).decode()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.close()


def encode(record: int, seq: int | None, job_seq: int | None, kind: str, job_id: str | None, ops: str, event: str) -> bytes:
    """One line. Its event text is its last ``len(event.encode()) + 1`` bytes (with the newline)."""
    body = (
        f"{record} {'-' if seq is None else seq} {'-' if job_seq is None else job_seq} {kind} "
        f"{job_id or '-'}\t{ops}\t{event}"
    ).encode()
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def _header(epoch: str, first: int) -> bytes:
    body = ("H " + wire.dumps({HEADER_KEY: 2, "epoch": epoch, "firstRecord": first})).encode()
    return b"%08x " % zlib.crc32(body) + body + b"\n"


@dataclass(slots=True, frozen=True)
class Written:
    """Where ``RecordLog.write`` put a batch, and what its segment said before it."""

    segment: Segment
    start: int  # the batch's offset in the segment file
    last: int
    max_seq: int
    max_log_seq: int
    next_record: int


class Corrupt(Exception):
    """A line that does not check out (not raised past ``RecordLog``)."""


def _check(raw: bytes) -> bytes:
    if len(raw) < 10 or raw[8:9] != b" ":
        raise Corrupt("no checksum")
    body = raw[9:]
    try:
        crc = int(raw[:8], 16)
    except ValueError:
        raise Corrupt("bad checksum field") from None
    if zlib.crc32(body) != crc:
        raise Corrupt("checksum mismatch")
    return body


_IDS: dict[bytes, str] = {}  # job ids as read: one str per job however many lines name it


def _parse(body: bytes, segment: Segment, offset: int) -> Line:
    try:
        tab1 = body.index(b"\t")
        tab2 = body.index(b"\t", tab1 + 1)
        r, seq, js, kind, job = body[:tab1].split(b" ")
        job_id = None
        if job != b"-":
            job_id = _IDS.get(job)
            if job_id is None:
                if len(_IDS) > 65536:
                    _IDS.clear()
                job_id = _IDS[job] = sys.intern(job.decode())
        return Line(
            int(r),
            None if seq == b"-" else int(seq),
            None if js == b"-" else int(js),
            "e" if kind == b"e" else kind.decode(),
            job_id,
            body,
            tab1 + 1,
            tab2 + 1,
            segment,
            offset,
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise Corrupt(f"unreadable record ({exc})") from None


class RecordLog:
    """Segment files of record lines. Synchronous I/O: the store calls ``write`` on the event
    loop (one small ``write`` per batch) and ``sync`` from a worker thread."""

    def __init__(self, directory: Path, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self.segments: list[Segment] = []
        self._fd: int | None = None
        self._size = 0
        self._dir_dirty = False  # a segment was created since the last sync
        self.next_record = 1
        self.epoch = ""

    # --- reading --------------------------------------------------------------------------

    def discover(self) -> None:
        """Find the segments (oldest first); creates the directory."""
        self.dir.mkdir(parents=True, exist_ok=True)
        found = []
        for path in self.dir.iterdir():
            if path.suffix == SUFFIX and path.stem.isdigit():
                found.append(Segment(path, int(path.stem)))
            elif ".tmp-" in path.name:
                path.unlink(missing_ok=True)
        self.segments = sorted(found, key=lambda s: s.first)

    def read(self, *, repair: bool = True) -> Iterator[Line]:
        """Every record line of every segment, in order, checked. Cuts a torn tail off the last
        segment (only skips it without ``repair``); raises ``StoreError`` for anything else that
        does not check out. Reads each file as a stream: memory holds a line at a time."""
        expected: int | None = None
        for i, seg in enumerate(self.segments):
            last_segment = i == len(self.segments) - 1
            seg.last = seg.first - 1
            try:
                f = open(seg.path, "rb")  # noqa: SIM115 - closed below, after the loop
            except OSError as exc:
                raise StoreError(f"cannot read the store's log {seg.path}: {exc.strerror}", code="corrupt") from None
            with f:
                if seg.fd is None:  # events read back later go through this very file, even once it is deleted
                    seg.fd = os.dup(f.fileno())
                offset = 0
                n = 0
                for chunk in f:
                    n += 1
                    complete = chunk.endswith(b"\n")
                    raw = chunk[:-1] if complete else chunk
                    try:
                        if not complete:
                            raise Corrupt("incomplete line")
                        body = _check(raw)
                        if n == 1:
                            self._read_header(seg, body)
                            offset += len(chunk)
                            continue
                        line = _parse(body, seg, offset)
                        if expected is not None and line.record != expected:
                            raise StoreError(
                                f"the store's log {seg.path} is corrupt at line {n}: record {line.record} where "
                                f"{expected} was expected; restore the data dir from a backup",
                                code="corrupt",
                            )
                    except Corrupt as exc:
                        if last_segment and self._only_torn(f):
                            if repair:
                                size = seg.path.stat().st_size
                                log.warning("store log %s: cutting off a torn tail of %d bytes at line %d (%s)",
                                            seg.path, size - offset, n, exc)  # fmt: skip
                                self._cut(seg.path, offset)
                            break
                        raise StoreError(
                            f"the store's log {seg.path} is corrupt at line {n} ({exc}); "
                            "restore the data dir from a backup",
                            code="corrupt",
                        ) from None
                    expected = line.record + 1
                    seg.last = line.record
                    if line.seq is not None:
                        if line.kind == "l":
                            seg.max_log_seq = line.seq
                        else:
                            seg.max_seq = line.seq
                    offset += len(chunk)
                    yield line
        if expected is not None:
            self.next_record = expected
        elif self.segments:
            self.next_record = self.segments[-1].first

    def _read_header(self, seg: Segment, body: bytes) -> None:
        if not body.startswith(b"H "):
            raise Corrupt("no segment header")
        try:
            head = wire.loads(body[2:])
        except ValueError:
            raise Corrupt("unreadable segment header") from None
        if not isinstance(head, dict) or head.get(HEADER_KEY) != 2 or head.get("firstRecord") != seg.first:
            raise Corrupt("bad segment header")
        seg.epoch = str(head.get("epoch"))
        self.epoch = seg.epoch

    @staticmethod
    def _only_torn(rest: Iterable[bytes]) -> bool:
        """True when no complete, valid line follows: what a crash mid-append leaves."""
        for chunk in rest:
            if not chunk.endswith(b"\n"):
                continue
            try:
                _check(chunk[:-1])
            except Corrupt:
                continue
            return False
        return True

    @staticmethod
    def _cut(path: Path, size: int) -> None:
        with open(path, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())

    # --- writing --------------------------------------------------------------------------

    def open_for_append(self, epoch: str) -> None:
        """Append to the last segment, or start one. A new ``epoch`` starts a new segment."""
        if self.segments and self.segments[-1].epoch == epoch:
            seg = self.segments[-1]
            self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND)
            self._size = os.fstat(self._fd).st_size
            if self._size == 0:  # a crash right after creating it: write its header again
                self._write(_header(epoch, seg.first))
        else:
            self._new_segment(epoch)
        self.epoch = epoch

    def _new_segment(self, epoch: str) -> None:
        first = self.next_record
        path = self.dir / f"{first:020d}{SUFFIX}"
        if self._fd is not None:
            os.fsync(self._fd)  # the old segment is complete before the new one counts
            os.close(self._fd)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)
        self._size = 0
        self._dir_dirty = True
        self.segments.append(Segment(path, first, first - 1, epoch=epoch))
        self._write(_header(epoch, first))

    def write(self, data: bytes, last_record: int, max_seq: int, max_log_seq: int) -> Written:
        """Append encoded lines (records up to ``last_record``) with one ``write``; returns where
        the batch went (``unwrite`` takes it back). Raises OSError, after cutting off what a full
        disk let through, so the log never holds half a batch."""
        if self._size >= self.segment_bytes:
            self._new_segment(self.epoch)
        before = self._size
        try:
            self._write(data)
        except OSError:
            self.undo(before)
            raise
        faults.point("wal-written")
        seg = self.segments[-1]
        written = Written(seg, before, seg.last, seg.max_seq, seg.max_log_seq, self.next_record)
        seg.last = last_record
        seg.max_seq = max(seg.max_seq, max_seq)
        seg.max_log_seq = max(seg.max_log_seq, max_log_seq)
        self.next_record = last_record + 1
        return written

    def unwrite(self, written: Written) -> bool:
        """Cut a batch ``write`` appended back off (its fsync failed, so it is not acknowledged):
        the log is again what it was before it, and the records it numbered are free. False when
        the cut itself fails: the log then holds records nobody was told of, and appending more
        would number them twice."""
        seg = written.segment
        if self._fd is None or seg is not self.segments[-1]:
            return False
        try:
            os.ftruncate(self._fd, written.start)
        except OSError:
            return False
        self._size = written.start
        seg.last, seg.max_seq, seg.max_log_seq = written.last, written.max_seq, written.max_log_seq
        self.next_record = written.next_record
        return True

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self._size += n

    def undo(self, size: int) -> None:
        """Cut the current segment back to ``size`` (a batch that will not be acknowledged)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, size)
            self._size = size
        except OSError:
            pass  # the next start finds a torn tail and cuts it

    def sync(self) -> None:
        """fsync the current segment (and the directory, when a segment was created)."""
        if self._fd is not None:
            os.fsync(self._fd)
        if self._dir_dirty:
            self._dir_dirty = False  # before: a segment created meanwhile (on the loop) marks it again
            try:
                fsync_dir(self.dir)
            except OSError:
                self._dir_dirty = True  # the next sync tries again: a name not yet durable stays owed
                raise

    def drop_through(self, record: int, seq: int) -> list[Segment]:
        """Delete whole segments (never the current one) whose records are all at or below
        ``record`` (the snapshot has them) and whose state events are all at or below ``seq``
        (no longer kept for replay). Their job_log lines go with them (the caller trims them
        from the ring): log lines are never worth keeping a segment of old progress for.
        Returns the segments deleted."""
        dropped = []
        while len(self.segments) > 1:
            seg = self.segments[0]
            if seg.last > record or seg.max_seq > seq:
                break
            faults.point("wal-drop")
            seg.path.unlink(missing_ok=True)  # records still replaying read through seg.fd
            self.segments.pop(0)
            dropped.append(seg)
        if dropped:
            self._dir_dirty = True
        return dropped

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None
        for seg in self.segments:
            seg.close()
