"""The event bus: replay at subscribe, filters, resync, slow subscribers.

Numbering and logging are the store's (tests/test_record.py); here a ``Feed`` stands in for it:
it numbers events as a store commits them, keeps them in the ring and hands them to the bus.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from mangwale_cli import wire
from mangwale_cli.eventlog import EventRing, Record
from mangwale_cli.events import EventBus, FutureSince

T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(fn())  # type: ignore[arg-type]  # asyncio.run takes a coroutine; Awaitable is what the lambdas give


class Feed:
    """Commits events the way a store does: seq +1, jobSeq +1 per job, into the ring, then to the bus."""

    def __init__(self, retention: int = 1000, queue_size: int = 100) -> None:
        self.ring = EventRing(retention=retention, log_retention=100)
        self.ring.reset("epoch-1", 0)
        self.bus = EventBus(self.ring, queue_size=queue_size)
        self.job_seqs: dict[str, int] = {}

    def publish(self, *events: dict[str, Any]) -> None:
        batch = []
        for ev in events:
            seq = self.ring.head + len(batch) + 1
            ev = {**ev, "seq": seq, "epoch": self.ring.epoch}
            job = ev.get("jobId")
            job_seq = None
            if job is not None and ev["type"] != "job_log":
                job_seq = self.job_seqs[job] = self.job_seqs.get(job, 0) + 1
                ev["jobSeq"] = job_seq
            ids = frozenset(ev["jobIds"]) if ev["type"] == "job_deleted" else None
            batch.append(Record(seq, job, job_seq, json.dumps(ev), ev["type"] == "job_log", ids))
        self.ring.keep(batch)
        self.bus.deliver(batch)


def update(job_id: str, progress: float = 0) -> dict[str, Any]:
    return {"type": "training_update", "jobId": job_id, "status": "running", "progress": progress}


async def next_batch(sub: Any, timeout: float = 5.0) -> list[Record]:
    return await asyncio.wait_for(sub.get_batch(), timeout)


def test_subscribe_since_replays_then_goes_live_without_gap() -> None:
    """subscribe(since=N) replays N+1..head and then delivers head+1 onwards, nothing twice."""

    async def main() -> None:
        feed = Feed()
        bus = feed.bus
        feed.publish(*(update("a", i) for i in range(5)))
        sub = bus.subscribe(since=2, epoch=bus.epoch)
        assert sub.resync is None and sub.head == 5 and sub.epoch == bus.epoch
        assert [r.seq for r in sub.replay] == [3, 4, 5]
        feed.publish(update("a", 9))
        assert [r.seq for r in await next_batch(sub.subscriber)] == [6]
        live_only = bus.subscribe()
        assert live_only.replay == [] and live_only.head == 6
        assert bus.subscribe(since=6).replay == []
        await bus.stop()

    run(main)


def test_subscribe_jobs_filter() -> None:
    """A jobs filter applies to replay and live events; other jobs and datasets are skipped, and a
    job_deleted naming a filtered job (among others) reaches the subscriber."""

    async def main() -> None:
        feed = Feed()
        bus = feed.bus
        feed.publish(update("a"), update("b"), wire.dataset_update("ds-1", "created"))
        sub = bus.subscribe(since=0, jobs={"b"})
        assert [r.seq for r in sub.replay] == [2]
        feed.publish(update("a", 5))
        feed.publish(update("b", 5))
        batch = await next_batch(sub.subscriber)
        assert [(r.seq, r.job_id, r.job_seq) for r in batch] == [(5, "b", 2)]
        feed.publish(wire.job_deleted(["a"], "pruned"), wire.job_deleted(["c", "b"], "deleted"))
        batch = await next_batch(sub.subscriber)
        assert [(r.seq, json.loads(r.text)["jobIds"]) for r in batch] == [(7, ["c", "b"])]
        assert [r.seq for r in bus.history(0, {"a"})] == [1, 4, 6]
        await bus.stop()

    run(main)


def test_subscribe_beyond_head_raises() -> None:
    """A since beyond the head is FutureSince and registers no subscriber."""

    async def main() -> None:
        feed = Feed()
        feed.publish(update("a"))
        with pytest.raises(FutureSince):
            feed.bus.subscribe(since=2)
        assert not feed.bus.subscribers
        await feed.bus.stop()

    run(main)


def test_subscribe_other_epoch_or_trimmed_history_resyncs() -> None:
    """Another epoch resyncs (epoch_changed); a since the ring no longer keeps, history_trimmed."""

    async def main() -> None:
        feed = Feed(retention=10)
        bus = feed.bus
        for i in range(15):
            feed.publish(update("a", i), update("b", i))
        other = bus.subscribe(since=3, epoch="another-epoch")
        assert other.resync == "epoch_changed" and other.replay == []
        trimmed = bus.subscribe(since=3, epoch=bus.epoch)
        assert trimmed.resync == "history_trimmed" and trimmed.replay == []
        recent = bus.subscribe(since=25, epoch=bus.epoch)
        assert recent.resync is None and [r.seq for r in recent.replay] == [26, 27, 28, 29, 30]
        # Each still gets live events from the head.
        feed.publish(update("a", 99))
        for s in (other, trimmed, recent):
            assert [r.seq for r in await next_batch(s.subscriber)] == [31]
        await bus.stop()

    run(main)


def test_per_job_trim_knows_what_each_job_lost() -> None:
    """With a jobs filter, a since older than the ring is fine for a job none of whose events were
    trimmed, a resync for one that lost some, and a resync for one with no event kept at all."""

    async def main() -> None:
        feed = Feed(retention=4)
        bus = feed.bus
        feed.publish(update("old"), update("old", 1), update("mid"))  # seqs 1-3
        feed.publish(update("mid", 1), update("new"), update("new", 1))  # 4-6: ring keeps 3..6
        assert feed.ring.lost_through == 2
        assert bus.subscribe(since=0, jobs={"new"}).resync is None
        assert [r.seq for r in bus.subscribe(since=0, jobs={"new"}).replay] == [5, 6]
        assert bus.subscribe(since=0, jobs={"mid"}).resync is None  # its first event (3) is kept
        assert bus.subscribe(since=0, jobs={"old"}).resync == "history_trimmed"  # nothing of it kept
        feed.publish(update("new", 2))  # 7: trims 3, mid's first
        assert bus.subscribe(since=0, jobs={"mid"}).resync == "history_trimmed"
        assert bus.subscribe(since=3, jobs={"mid"}).resync is None  # but from 3 on all is kept
        assert set(feed.ring.kept) == {"mid", "new"} and set(feed.ring.job_lost) <= {"mid", "new"}
        await bus.stop()

    run(main)


def test_slow_subscriber_is_dropped_without_holding_back_others() -> None:
    """A subscriber queue_size events behind overflows; the others get every event."""

    async def main() -> None:
        feed = Feed(queue_size=3)
        slow = feed.bus.subscribe().subscriber
        fast = feed.bus.subscribe().subscriber
        got: list[int] = []
        for i in range(10):
            feed.publish(update("a", i))
            got += [r.seq for r in await next_batch(fast)]
        assert got == list(range(1, 11))
        assert slow.overflowed and await next_batch(slow) == []
        await feed.bus.stop()

    run(main)


def test_a_fan_out_in_slices_gives_every_subscriber_each_event_once_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past FANOUT_STEP subscribers a batch goes out one slice per loop callback (here a step:
    the time budget is spent at once); batches committed meanwhile wait and go out together
    after it. Subscribers that join while records
    wait get them by replay (since=) or not at all (live only), never twice; one that leaves
    mid-round gets nothing more; stop() finishes a round under way first."""
    from mangwale_cli import events

    monkeypatch.setattr(events, "FANOUT_STEP", 2)
    monkeypatch.setattr(events, "FANOUT_BUDGET", 0.0)

    async def main() -> None:
        feed = Feed()
        first = [feed.bus.subscribe().subscriber for _ in range(5)]
        got: dict[Any, list[int]] = {}

        def seqs(sub: Any) -> list[int]:
            got.setdefault(sub, []).extend(r.seq for r in sub.buffer)
            sub.buffer = []
            return got[sub]

        feed.publish(update("a", 1), update("a", 2))
        reached = [sub for sub in first if sub.buffer]
        assert len(reached) == 2  # one slice now, the rest later
        leaver = next(sub for sub in first if not sub.buffer)
        feed.bus.unsubscribe(leaver)
        feed.publish(update("a", 3))  # during the round: waits for it
        live = feed.bus.subscribe().subscriber  # after seq 3 was committed, before it went out
        replayed = feed.bus.subscribe(since=1)
        assert [r.seq for r in replayed.replay] == [2, 3]
        feed.publish(update("a", 4))
        for _ in range(20):
            await asyncio.sleep(0)
        for sub in first:
            assert seqs(sub) == ([] if sub is leaver else [1, 2, 3, 4]), sub
        assert seqs(live) == [4]
        assert seqs(replayed.subscriber) == [4]

        feed.publish(update("a", 5))  # a round under way when the bus stops
        await feed.bus.stop()
        assert all(seqs(sub)[-1] == 5 for sub in [*first, live, replayed.subscriber] if sub is not leaver)

    run(main)


def test_unsubscribe_and_stop_end_waiting_readers() -> None:
    """A reader waiting for events gets [] when it is unsubscribed or the bus stops."""

    async def main() -> None:
        bus = Feed().bus
        a = bus.subscribe().subscriber
        b = bus.subscribe().subscriber
        waiting_a = asyncio.ensure_future(a.get_batch())
        waiting_b = asyncio.ensure_future(b.get_batch())
        await asyncio.sleep(0)
        bus.unsubscribe(a)
        assert await asyncio.wait_for(waiting_a, 5) == [] and a not in bus.subscribers
        await bus.stop()
        assert await asyncio.wait_for(waiting_b, 5) == []

    run(main)


def test_a_ring_smaller_than_its_hot_window_keeps_taking_events() -> None:
    """With retention below the hot window (events.retention 1000 < 4096), trimming takes texts away
    from the old end: keeping more events never fails, and only what is beyond the window spills."""
    ring = EventRing(retention=3, log_retention=2, hot=4)
    ring.reset("e", 0)
    for seq in range(1, 50):
        ring.keep([Record(seq, "a", seq, f"t{seq}"), Record(seq + 1000, "a", None, f"l{seq}", True)][: 1 + seq % 2])
    assert [r.seq for r in ring.ring] == [47, 48, 49] and all(r._text is not None for r in ring.ring)
    hot = EventRing(retention=10, hot=2)
    hot.reset("e", 0)
    hot.keep([Record(seq, "a", seq, f"t{seq}") for seq in range(1, 6)])
    assert [r._text is None for r in hot.ring] == [False] * 5  # nothing placed in a log: nothing to spill to
