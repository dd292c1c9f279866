"""The event bus of a Redis deployment: every instance follows the one shared stream.

Events are not published here. Each is appended by the store's script that commits the change it
announces (``store/redis_scripts.py``), with its ``seq`` (the stream id ``<seq>-1``), ``jobSeq``
and epoch, so stream order is seq order across instances and a state is never stored without its
event.

Delivery: one reader task per instance follows the stream (``XREAD BLOCK``) into an in-memory
``MirrorRing`` and hands each batch to the local subscribers. An instance's own events reach its
clients the same way as everyone else's, so every client of every instance sees one order.
Replay reads the mirror, so ``subscribe`` stays one synchronous step (no gap, no duplicate; see
docs/protocol.md).

Failures: when the reader loses Redis, live subscribers are closed with a reason (the client
reconnects and resumes with ``since``) and new ones are refused with 503 until it is back. If
Redis came back without its data, the epoch key is gone: the first instance to notice starts a
new epoch with seq continuing above what it has seen, and every instance resets its mirror and
closes its subscribers, which then get ``resync`` / ``epoch_changed``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import wire
from .errors import Unavailable
from .eventlog import EventRing, Record
from .events import EventBus
from .store.redis_store import RedisStore

log = logging.getLogger(__name__)


HOT_EVENTS = 4096  # newest mirrored events whose text stays in memory; older ones are re-read
LOAD_PAGE = 2000  # stream entries read per command when the mirror is filled at start-up
FETCH_SPAN = 1000  # at most this many seqs per XRANGE when texts are fetched back


class _StreamText:
    """Where a spilled mirror record's text is: the shared stream, read asynchronously by
    ``RedisEventBus.texts`` (a property cannot wait for Redis)."""

    def read(self, offset: int, size: int) -> str:
        raise RuntimeError("a mirrored event's text is fetched with RedisEventBus.texts()")


STREAM = _StreamText()


class MirrorRing(EventRing):
    """The kept events as this instance has read them from the stream. Below ``floor`` (where
    this instance's copy starts, or a gap it could not fill) it cannot tell per job what is
    missing, so replay from there is reported as trimmed."""

    floor = 0

    def missing_since(self, since: int, jobs: set[str] | None = None) -> bool:
        return since < self.floor or super().missing_since(since, jobs)


class RedisEventBus(EventBus):
    def __init__(
        self,
        store: RedisStore,
        reader: Redis,
        *,
        queue_size: int = 1000,
        block: float = 1.0,
        retry: float = 0.5,
    ) -> None:
        ring = MirrorRing(retention=store.retention, log_retention=store.log_retention, hot=HOT_EVENTS)
        super().__init__(ring, queue_size=queue_size)
        self.log: MirrorRing
        store.ring = self.log  # the store's epoch checks start above what this instance saw
        self.store = store
        self.r = store.client
        self.reader = reader  # its own connection: XREAD BLOCK holds it
        self.url = store.safe_url
        self.k = store.keys
        self.block = block
        self.retry = retry
        self.maxlen = store.maxlen
        self._advanced = asyncio.Event()
        self._reader_ok = False
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Read the stream's kept events into the mirror and start following it."""
        await self._load(await self.store.ensure_epoch())
        self._reader_ok = True
        self._task = asyncio.create_task(self._read_loop(), name="eventstream-reader")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await super().stop()

    @property
    def available(self) -> bool:
        return self._reader_ok

    async def _load(self, epoch: str) -> None:
        """Fill the mirror with the newest kept events of ``epoch``, newest first, a page at a
        time; beyond the hot window only their place is kept (no text, no reply of 100k)."""
        # The committed seq, read BEFORE the stream: when the stream turns out empty, nothing was
        # appended in between, so this is where the copy starts. Read after, it could count an
        # event another instance appended meanwhile: that event is in the stream, yet the copy
        # would start above it and report a replay from 0 as trimmed (a spurious resync).
        committed = int(await self.r.get(self.k.seq) or 0)
        pages: list[list[Record]] = []
        kept = 0
        end = "+"
        while kept < self.maxlen:
            entries: Any = await self.r.xrevrange(self.k.events, max=end, count=min(LOAD_PAGE, self.maxlen - kept))
            if not entries:
                break
            page = []
            for entry in entries:
                rec, rec_epoch = _record(entry, text=kept < HOT_EVENTS)
                if rec_epoch != epoch:
                    break
                page.append(rec)
                kept += 1
            pages.append(page)
            if len(page) < len(entries):
                break
            end = "(" + _text(entries[-1][0])
        records = [r for page in reversed(pages) for r in reversed(page)]
        base = records[0].seq - 1 if records else committed
        self.log.reset(epoch, base)
        self.log.floor = base
        self.log.keep(records)

    async def _read_loop(self) -> None:
        down_since: float | None = None
        while True:
            try:
                if not self._reader_ok:
                    await self._recover()
                    self._reader_ok = True
                    if down_since is not None:
                        log.info("event stream at %s is back", self.url)
                    down_since = None
                resp: Any = await self.reader.xread(
                    {self.k.events: f"{self.log.head}-1"}, count=1000, block=int(self.block * 1000)
                )
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, Unavailable) as exc:
                if self._reader_ok or down_since is None:
                    log.error("event stream at %s is unreachable (%s); clients are told to reconnect", self.url, exc)
                    down_since = asyncio.get_running_loop().time()
                self._reader_ok = False
                self._close_all("store_unavailable")
                await asyncio.sleep(self.retry)
                continue
            if resp:
                for _stream, entries in resp:
                    self._ingest(entries)
            elif not await self._same_history():
                self._reader_ok = False  # _recover starts the new epoch on the next turn

    async def _same_history(self) -> bool:
        """Whether Redis still holds the history this instance follows. A restart can go
        unnoticed by a blocked read (the client reconnects by itself), so an idle reader looks:
        no epoch, or a seq counter below what was read, means Redis lost data."""
        try:
            got: Any = await self.reader.mget(self.k.epoch, self.k.seq)
            epoch, seq = got
        except (RedisError, OSError):
            return True  # the next read reports the outage
        if epoch is not None and epoch.decode() == self.log.epoch and int(seq or 0) >= self.log.head:
            return True
        log.warning("event stream at %s lost its history (epoch %s, seq %s; read up to %d)", self.url,
                    epoch.decode() if epoch else None, int(seq or 0), self.log.head)
        return False

    async def _recover(self) -> None:
        """After an outage: same epoch, carry on from the head; a new one, start over."""
        epoch = await self.store.ensure_epoch()
        if epoch != self.log.epoch:
            log.warning("event stream epoch changed (%s -> %s): Redis lost its data; clients resync", self.log.epoch, epoch)
            await self._load(epoch)
            self._close_all("epoch_changed")

    def _ingest(self, entries: list[Any]) -> None:
        batch: list[Record] = []
        for entry in entries:
            rec, epoch = _record(entry)
            if epoch != self.log.epoch:
                # Redis lost its data and another instance started a new epoch: reload.
                self._reader_ok = False
                break
            if rec.seq <= self.log.head:
                continue
            expected = (batch[-1].seq if batch else self.log.head) + 1
            if rec.seq != expected:
                # The stream was trimmed past where this instance had read: what lies between
                # is gone, so replay from before it must resync, and live clients missed it.
                log.warning("event stream: seqs %d..%d were trimmed before this instance read them", expected, rec.seq - 1)
                self._deliver_batch(batch)
                batch = []
                self.log.reset(self.log.epoch, rec.seq - 1)
                self.log.floor = rec.seq - 1
                self._close_all("history_trimmed")
            batch.append(rec)
        self._deliver_batch(batch)

    def _deliver_batch(self, batch: list[Record]) -> None:
        if batch:
            self.log.keep(batch)
            self.deliver(batch)
            self._advanced.set()
            self._advanced = asyncio.Event()

    def _close_all(self, reason: str) -> None:
        for sub in list(self.subscribers):
            sub.close(reason)

    async def texts(self, records: list[Record]) -> list[str]:
        """Texts of mirrored records; those beyond the hot window are read back from the stream
        (by seq, which is the entry id), a range at a time. One the stream trimmed meanwhile
        cannot be sent: ``Unavailable`` ends that replay, and the client resumes and resyncs."""
        missing = sorted({r.seq for r in records if r._text is None})
        fetched: dict[int, str] = {}
        for lo, hi in _spans(missing):
            try:
                entries: Any = await self.r.xrange(self.k.events, min=f"{lo}-1", max=f"{hi}-1")
            except (RedisError, OSError) as exc:
                raise Unavailable(f"the event stream at {self.url} is unreachable: {exc}", code="store_unavailable") from None
            for entry_id, f in entries:
                fetched[int(entry_id.split(b"-", 1)[0])] = f[b"d"].decode()
        out = []
        for r in records:
            text = r._text if r._text is not None else fetched.get(r.seq)
            if text is None:
                raise Unavailable(f"event {r.seq} is no longer in the stream at {self.url}", code="history_trimmed")
            out.append(text)
        return out

    async def catch_up(self, since: int | None) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + max(2.0, 2 * self.block)
        while not self._reader_ok and loop.time() < end:  # it may be reconnecting right now
            await asyncio.sleep(0.05)
        if not self._reader_ok:
            raise Unavailable(f"the event stream at {self.url} is unreachable; try again", code="store_unavailable")
        if since is not None:
            # A replay is computed from this instance's copy, which may be behind the shared
            # stream (a busy instance): a job created on another instance a moment ago would be
            # missing from it, and its history reported trimmed. So first read up to what was
            # committed before the request came: the shared seq, now.
            try:
                since = max(since, int(await self.r.get(self.k.seq) or 0))
            except (RedisError, OSError) as exc:
                raise Unavailable(f"the event stream at {self.url} is unreachable ({exc}); try again",
                                  code="store_unavailable") from None  # fmt: skip
        while since is not None and since > self.log.head and loop.time() < end:
            try:
                async with asyncio.timeout(end - loop.time()):  # not wait_for: see redis_store
                    await self._advanced.wait()
            except TimeoutError:
                break


def _spans(seqs: list[int]) -> list[tuple[int, int]]:
    """Ranges of seqs to read with one XRANGE each (no range wider than FETCH_SPAN)."""
    spans: list[tuple[int, int]] = []
    for seq in seqs:
        if spans and seq - spans[-1][0] < FETCH_SPAN:
            spans[-1] = (spans[-1][0], seq)
        else:
            spans.append((seq, seq))
    return spans


def _record(entry: Any, *, text: bool = True) -> tuple[Record, str]:
    """A stream entry: fields ``j`` (job id), ``k`` (0 state, 1 job_log, d job_deleted), ``s``
    (jobSeq), ``e`` (epoch), ``d`` (the event's JSON text, as clients get it). Without ``text``
    the record keeps only its place (it is re-read from the stream when replayed)."""
    entry_id, f = entry
    seq = int(entry_id.split(b"-", 1)[0])
    job = f.get(b"j") or b""
    js = f.get(b"s") or b""
    kind = f.get(b"k")
    body = f[b"d"].decode() if text or kind == b"d" else None
    rec = Record(
        seq,
        sys.intern(job.decode()) if job else None,
        int(js) if js else None,
        body if text else None,
        kind == b"1",
        frozenset(wire.loads(body).get("jobIds") or ()) if kind == b"d" and body else None,
    )
    rec.place(STREAM, seq, 0)
    return rec, (f.get(b"e") or b"").decode()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
