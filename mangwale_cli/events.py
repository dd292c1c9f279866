"""The event bus: numbers events, logs them, then fans them out without waiting on anyone.

``publish`` assigns ``seq`` / ``jobSeq`` and serializes the event once. Events published in the
same loop iteration are appended to the log with one write, and only then handed to
subscribers. Each subscriber has a bounded buffer; one that falls ``queue_size`` events behind
is marked overflowed and dropped (its connection closes with 4408 and the client resumes from
its last seq), so a stalled reader can neither delay the others nor grow memory without bound.

``subscribe`` computes the replay and registers the subscriber in one synchronous step, so
there is no gap and no duplicate between replayed and live events (see docs/protocol.md).

Compacting the log (rewriting the whole kept file) would stall every client if done on the
loop, so the bus runs it as a background task: the snapshot and the final rename happen on the
loop, the bulk write and fsync in a worker thread (see eventlog.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import wire
from .eventlog import Compaction, FileEventLog, Record

log = logging.getLogger(__name__)


class Subscriber:
    """A consumer of live events with a bounded buffer."""

    __slots__ = ("_ready", "buffer", "close_reason", "closed", "jobs", "limit", "on_drop", "overflowed", "sink")

    def __init__(self, jobs: set[str] | None, limit: int) -> None:
        self.jobs = jobs
        # A list, and the event only made when someone waits (SSE): an idle WebSocket
        # subscriber never buffers nor waits, and each deque costs ~760 bytes.
        self.buffer: list[Record] = []
        self.limit = limit
        self.overflowed = False
        self.closed = False
        # Why the server ended the stream, when it is not shutting down (the store went away,
        # the epoch changed): the connection closes with 1012 and the client resumes.
        self.close_reason: str | None = None
        self._ready: asyncio.Event | None = None
        # Called once when the subscriber overflows or is closed: a sender blocked on a peer that
        # stopped reading would otherwise never look at the buffer again.
        self.on_drop: Callable[[], None] | None = None
        # Set by the sender while it is idle (nothing buffered, nothing in flight): takes a batch
        # and returns True if it sent it at once, so a peer that keeps up costs no buffering and
        # no task wake-up per event. False (the peer is not writable) buffers as usual.
        self.sink: Callable[[list[Record]], bool] | None = None

    def offer_batch(self, batch: list[Record]) -> None:
        """Take a logged batch (the records of this subscriber's jobs): straight to ``sink``
        when it is idle, else into the buffer; past ``limit`` buffered, overflow and drop."""
        if self.overflowed:
            return
        if self.jobs is not None:
            jobs = self.jobs
            batch = [rec for rec in batch if rec.job_id in jobs]
            if not batch:
                return
        buffer = self.buffer
        sink = self.sink
        if sink is not None and not buffer and sink(batch):
            return
        if len(buffer) + len(batch) > self.limit:
            self.overflowed = True
            buffer.clear()
            self._drop()
        else:
            buffer.extend(batch)
        if self._ready is not None:
            self._ready.set()

    def _drop(self) -> None:
        self.sink = None
        hook, self.on_drop = self.on_drop, None
        if hook is not None:
            hook()

    async def get_batch(self) -> list[Record]:
        """Wait for events; returns [] when the subscriber overflowed or was closed."""
        while not self.buffer and not self.overflowed and not self.closed:
            if self._ready is None:
                self._ready = asyncio.Event()
            self._ready.clear()
            await self._ready.wait()
        if self.overflowed or self.closed:
            return []
        batch, self.buffer = self.buffer, []
        return batch

    def close(self, reason: str | None = None) -> None:
        if reason is not None and not self.closed:
            self.close_reason = reason
        self.closed = True
        if self._ready is not None:
            self._ready.set()
        self._drop()


@dataclass
class Subscription:
    subscriber: Subscriber
    replay: list[Record] = field(default_factory=list)
    resync: str | None = None  # why replay could not be complete, if it could not
    head: int = 0
    epoch: str = ""


class FutureSince(ValueError):
    """The client asked to resume from a seq the log has not reached."""


class EventBus:
    def __init__(self, log_: FileEventLog, *, queue_size: int = 1000) -> None:
        self.log = log_
        self.queue_size = queue_size
        self.subscribers: set[Subscriber] = set()
        self._pending: list[Record] = []
        self._next_seq = log_.head + 1
        self._flush_scheduled = False
        self._append_failing = False
        self._listeners: list[Callable[[list[Record]], None]] = []
        self._ceiling: int | None = None
        self._block = 0
        self._on_reserve: Callable[[int], None] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._compact_task: asyncio.Task[None] | None = None
        self._stopping = False
        log_.background_compaction = True

    @property
    def epoch(self) -> str:
        return self.log.epoch

    @property
    def head(self) -> int:
        """The newest seq that has reached the log (and so may reach clients)."""
        return self.log.head

    def reserve(self, ceiling: int, block: int, on_reserve: Callable[[int], None]) -> None:
        """Seqs below ``ceiling`` are durably reserved; when half a block is left, ask
        ``on_reserve`` to persist a higher ceiling (so a lost log never reuses a seq)."""
        self._ceiling, self._block, self._on_reserve = ceiling, block, on_reserve

    def start(self, fsync_interval: float) -> None:
        if fsync_interval > 0:
            self._sync_task = asyncio.create_task(self._sync_loop(fsync_interval), name="eventlog-fsync")

    async def stop(self) -> None:
        self._stopping = True  # no new compaction; a running one is finished (or given up)
        self.flush()
        task = self._compact_task
        if task is not None:
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise  # stop() itself was cancelled
            self.flush()  # events published while it finished
        if self._sync_task is not None:
            self._sync_task.cancel()
        for sub in list(self.subscribers):
            sub.close()
        self.log.close()

    async def _sync_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.log.sync)
            except OSError as exc:
                log.error("event log fsync failed: %s", exc.strerror)

    def _maybe_compact(self) -> None:
        if self._compact_task is None and not self._stopping and self.log.compaction_due():
            c = self.log.begin_compaction()
            self._compact_task = asyncio.create_task(self._compact(c), name="eventlog-compact")

    async def _compact(self, c: Compaction) -> None:
        """Write the snapshot in a thread, then (on the loop) add what was appended and rename."""
        fut = asyncio.get_running_loop().run_in_executor(None, c.write)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The thread cannot be stopped: forget the compaction, and delete its temp file
            # once the thread is done with it. The old file stays the (complete) log.
            fut.add_done_callback(lambda _f: self.log.abandon_compaction(c))
            self.log.abandon_compaction(c)
            raise
        except OSError as exc:
            self.log.abandon_compaction(c, exc)
        else:
            self.log.finish_compaction(c)
        finally:
            self._compact_task = None

    # --- publishing -----------------------------------------------------------------------

    def publish(self, event: dict[str, Any]) -> int:
        """Log and broadcast ``event`` (a wire message dict); returns its seq."""
        seq = self._next_seq
        self._next_seq += 1
        if self._ceiling is not None and seq > self._ceiling - self._block // 2:
            self._ceiling = seq + self._block
            assert self._on_reserve is not None
            self._on_reserve(self._ceiling)
        event["seq"] = seq
        event["epoch"] = self.log.epoch
        job_id = wire.event_job_id(event)
        job_seq = None
        is_log = event["type"] == wire.MsgType.JOB_LOG
        if job_id is not None and not is_log:
            job_seq = self.log.next_job_seq(job_id)
            event["jobSeq"] = job_seq
        self._pending.append(Record(seq, job_id, job_seq, wire.dumps(event), is_log))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)
        return seq

    def flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            self.log.append(batch)
        except OSError as exc:
            # Not logged means not sent: keep the batch and try again shortly.
            if not self._append_failing:  # once per outage, not every half second
                log.error("event log append failed (%s); %d events wait", exc.strerror, len(batch))
            self._append_failing = True
            self._pending = batch + self._pending
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(0.5, self.flush)
            return
        if self._append_failing:
            self._append_failing = False
            log.info("event log append works again; %d events sent", len(batch))
        self._maybe_compact()
        self._deliver(batch)

    def _deliver(self, batch: list[Record]) -> None:
        """Hand logged records to every subscriber and listener."""
        for sub in self.subscribers:
            sub.offer_batch(batch)
        for listener in self._listeners:
            listener(batch)

    def add_listener(self, fn: Callable[[list[Record]], None]) -> None:
        """Call ``fn`` with every logged batch (used by in-process followers and tests)."""
        self._listeners.append(fn)

    # --- subscribing ----------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while the log cannot be read (a shared store is unreachable)."""
        return True

    async def catch_up(self, since: int | None) -> None:
        """Wait until this instance has seen every event up to ``since`` (a shared log may be
        a moment ahead of this instance's copy). The local log always is up to date."""

    def subscribe(
        self,
        *,
        since: int | None = None,
        epoch: str | None = None,
        jobs: set[str] | None = None,
        queue_size: int | None = None,
    ) -> Subscription:
        """Register a live subscriber and compute its replay in one step (no await).

        ``since`` None: live only. ``since`` beyond the head raises ``FutureSince``. An old
        ``since`` or another ``epoch`` yields ``resync`` and live events from the head.
        """
        head = self.log.head
        sub = Subscriber(jobs, queue_size or self.queue_size)
        result = Subscription(sub, head=head, epoch=self.log.epoch)
        if since is not None:
            if epoch is not None and epoch != self.log.epoch:
                result.resync = "epoch_changed"
            elif since > head:
                raise FutureSince(f"since={since} is beyond the newest event (headSeq {head})")
            elif self.log.missing_since(since, jobs):
                result.resync = "history_trimmed"
            else:
                result.replay = list(self.log.after(since, jobs))
        self.subscribers.add(sub)
        return result

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.close()
        self.subscribers.discard(sub)

    def history(self, since: int = 0, jobs: set[str] | None = None) -> list[Record]:
        return list(self.log.after(since, jobs))
