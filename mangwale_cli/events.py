"""The event bus: hands committed events to every subscriber without waiting on anyone.

Events are not published here: each is part of a change the store commits as one unit with the
state it announces (``store/base.py``). The store calls ``deliver`` with every committed batch,
in seq order, after it is in the log; the embedded store keeps the replay ring itself, a shared
store's bus (``redisbus.RedisEventBus``) mirrors the shared stream into it. Each subscriber has a
bounded buffer; one that falls ``queue_size`` events behind is marked overflowed and dropped (its
connection closes with 4408 and the client resumes from its last seq), so a stalled reader can
neither delay the others nor grow memory without bound.

``subscribe`` computes the replay and registers the subscriber in one synchronous step, so
there is no gap and no duplicate between replayed and live events (see docs/protocol.md).

A batch goes to subscribers for at most ``FANOUT_BUDGET`` seconds per event-loop callback; the
rest of the round runs in later callbacks, so requests and other connections are served between
slices (1,000 watchers written in one callback held the loop 10-50 ms, the worst loop lag under
load: bench/history.py; slices of 256 watchers still took up to 15 ms when batches were large). Batches committed while a round is under way
wait for it and then go out together, as one batch (fewer, larger writes when the loop is
busy). Each subscriber still gets every record once and in seq order: rounds never overlap,
and a subscriber that joined while records were waiting skips those its replay (or its live
start at the head) already covers (``Subscriber.after``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .eventlog import EventRing, Notice, Record

log = logging.getLogger(__name__)

FANOUT_STEP = 64  # subscribers handed a batch between two looks at the clock
FANOUT_BUDGET = 0.002  # seconds of handing out per event-loop callback, then the rest later

class Subscriber:
    """A consumer of live events with a bounded buffer."""

    __slots__ = ("_ready", "after", "buffer", "close_reason", "closed", "jobs", "limit", "on_drop", "overflowed", "sink")

    def __init__(self, jobs: set[str] | None, limit: int, after: int = 0) -> None:
        self.jobs = jobs
        # The head when it subscribed: records up to it reach it by replay, or not at all
        # (a live-only subscriber starts after them), never live.
        self.after = after
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
        if self.overflowed or self.closed:
            return
        first = batch[0]
        if first.seq <= self.after and first.logged:  # committed before it subscribed, delivered after (a round)
            after = self.after
            batch = [rec for rec in batch if rec.seq > after]
            if not batch:
                return
        if self.jobs is not None:
            jobs = self.jobs
            batch = [rec for rec in batch if rec.concerns(jobs)]
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
    def __init__(self, ring: EventRing, *, queue_size: int = 1000) -> None:
        self.log = ring
        self.queue_size = queue_size
        self.subscribers: set[Subscriber] = set()
        self._listeners: list[Callable[[list[Record]], None]] = []
        self._round: asyncio.Handle | None = None  # the next slice of a fan-out under way
        self._next: tuple[list[Record], list[Subscriber], int] | None = None  # its batch, subscribers, start
        self._waiting: list[Record] = []  # committed during a round: the next round's batch

    @property
    def epoch(self) -> str:
        return self.log.epoch

    @property
    def head(self) -> int:
        """The newest seq committed (and so may reach clients)."""
        return self.log.head

    async def stop(self) -> None:
        self.flush()
        for sub in list(self.subscribers):
            sub.close()

    def deliver(self, batch: list[Record]) -> None:
        """Hand committed records (in the ring already) to every subscriber and listener:
        listeners at once; subscribers at once when there are few, else in slices."""
        if not batch:
            return
        if self._round is not None:
            self._waiting.extend(batch)
        elif len(self.subscribers) <= FANOUT_STEP:
            for sub in self.subscribers:
                sub.offer_batch(batch)
        else:
            self._fan_out(batch, list(self.subscribers), 0)
        for listener in self._listeners:
            listener(batch)

    def _fan_out(self, batch: list[Record], subs: list[Subscriber], start: int, *, at_once: bool = False) -> None:
        """A round from ``start`` for ``FANOUT_BUDGET`` seconds, the rest in later callbacks (all
        now with ``at_once``); then, in a later callback, what was committed meanwhile."""
        clock = time.perf_counter
        while True:
            stop = clock() + FANOUT_BUDGET
            end = len(subs)
            while start < end:
                for sub in subs[start : start + FANOUT_STEP]:
                    sub.offer_batch(batch)
                start += FANOUT_STEP
                if not at_once and clock() >= stop:
                    break
            if start >= end:
                if not self._waiting:
                    self._round = self._next = None
                    return
                batch, self._waiting, subs, start = self._waiting, [], list(self.subscribers), 0
            if not at_once:
                self._next = (batch, subs, start)
                self._round = asyncio.get_running_loop().call_soon(self._resume)
                return

    def _resume(self) -> None:
        assert self._next is not None
        self._fan_out(*self._next)

    def flush(self) -> None:
        """Finish the fan-out under way now (shutdown: before the subscribers are closed)."""
        if self._round is not None and self._next is not None:
            self._round.cancel()
            self._fan_out(*self._next, at_once=True)

    def notify(self, notice: Notice) -> None:
        """Hand a live-only message to every subscriber that follows all jobs (a ``jobs=``
        subscriber filters it out). Listeners are not called: it is not a committed event."""
        batch: list[Record] = [notice]
        for sub in self.subscribers:
            if sub.jobs is None:
                sub.offer_batch(batch)

    def add_listener(self, fn: Callable[[list[Record]], None]) -> None:
        """Call ``fn`` with every committed batch (used by in-process followers and tests)."""
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
        sub = Subscriber(jobs, queue_size or self.queue_size, after=head)
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

    async def texts(self, records: list[Record]) -> list[str]:
        """The records' texts, as clients get them. Old ring records keep only where their text
        is (the embedded store reads it back from its log); a shared bus fetches it from the
        shared stream, which is why this is a coroutine. Callers pass chunks of a replay."""
        return [r.text for r in records]
