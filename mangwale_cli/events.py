"""The event bus: numbers events, logs them, then fans them out without waiting on anyone.

``publish`` assigns ``seq`` / ``jobSeq`` and serializes the event once. Events published in the
same loop iteration are appended to the log with one write, and only then handed to
subscribers. Each subscriber has a bounded buffer; one that falls ``queue_size`` events behind
is marked overflowed and dropped (its connection closes with 4408 and the client resumes from
its last seq), so a stalled reader can neither delay the others nor grow memory without bound.

``subscribe`` computes the replay and registers the subscriber in one synchronous step, so
there is no gap and no duplicate between replayed and live events (see docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import wire
from .eventlog import FileEventLog, Record

log = logging.getLogger(__name__)


class Subscriber:
    """A consumer of live events with a bounded buffer."""

    __slots__ = ("jobs", "buffer", "limit", "overflowed", "_ready", "closed")

    def __init__(self, jobs: set[str] | None, limit: int) -> None:
        self.jobs = jobs
        self.buffer: deque[Record] = deque()
        self.limit = limit
        self.overflowed = False
        self.closed = False
        self._ready = asyncio.Event()

    def offer(self, record: Record) -> None:
        if self.overflowed:
            return
        if self.jobs is not None and record.job_id not in self.jobs:
            return
        if len(self.buffer) >= self.limit:
            self.overflowed = True
            self.buffer.clear()
        else:
            self.buffer.append(record)
        self._ready.set()

    async def get_batch(self) -> list[Record]:
        """Wait for events; returns [] when the subscriber overflowed or was closed."""
        while not self.buffer and not self.overflowed and not self.closed:
            self._ready.clear()
            await self._ready.wait()
        if self.overflowed or self.closed:
            return []
        batch = list(self.buffer)
        self.buffer.clear()
        return batch

    def close(self) -> None:
        self.closed = True
        self._ready.set()


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
        self._listeners: list[Callable[[list[Record]], None]] = []
        self._sync_task: asyncio.Task[None] | None = None

    @property
    def epoch(self) -> str:
        return self.log.epoch

    @property
    def head(self) -> int:
        """The newest seq that has reached the log (and so may reach clients)."""
        return self.log.head

    def start(self, fsync_interval: float) -> None:
        if fsync_interval > 0:
            self._sync_task = asyncio.create_task(self._sync_loop(fsync_interval), name="eventlog-fsync")

    async def stop(self) -> None:
        self.flush()
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

    # --- publishing -----------------------------------------------------------------------

    def publish(self, event: dict[str, Any]) -> int:
        """Log and broadcast ``event`` (a wire message dict); returns its seq."""
        seq = self._next_seq
        self._next_seq += 1
        event["seq"] = seq
        event["epoch"] = self.log.epoch
        job_id = wire.event_job_id(event)
        job_seq = None
        if job_id is not None:
            job_seq = self.log.next_job_seq(job_id)
            event["jobSeq"] = job_seq
        self._pending.append(Record(seq, job_id, job_seq, wire.dumps(event)))
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
            log.error("event log append failed (%s); %d events wait", exc.strerror, len(batch))
            self._pending = batch + self._pending
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(0.5, self.flush)
            return
        for sub in self.subscribers:
            for rec in batch:
                sub.offer(rec)
        for listener in self._listeners:
            listener(batch)

    def add_listener(self, fn: Callable[[list[Record]], None]) -> None:
        """Call ``fn`` with every logged batch (used by in-process followers and tests)."""
        self._listeners.append(fn)

    # --- subscribing ----------------------------------------------------------------------

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
