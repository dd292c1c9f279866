"""Tests for the event bus: numbering, log-before-send, replay at subscribe, slow subscribers."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mangwale_cli import wire
from mangwale_cli.eventlog import Compaction, FileEventLog, Record
from mangwale_cli.events import EventBus, FutureSince

T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(fn())  # type: ignore[arg-type]


def make_bus(tmp_path: Path, retention: int = 1000, queue_size: int = 100) -> EventBus:
    elog = FileEventLog(tmp_path / "events.jsonl", retention=retention)
    elog.open()
    return EventBus(elog, queue_size=queue_size)


def update(job_id: str, progress: float = 0) -> dict[str, Any]:
    return {"type": "training_update", "jobId": job_id, "status": "running", "progress": progress}


def events(records: list[Record]) -> list[dict[str, Any]]:
    return [json.loads(r.text) for r in records]


async def next_batch(sub: Any, timeout: float = 5.0) -> list[Record]:
    return await asyncio.wait_for(sub.get_batch(), timeout)  # type: ignore[no-any-return]


def test_publish_numbers_events_and_jobs(tmp_path: Path) -> None:
    """publish gives seq +1 per event, jobSeq +1 per job, the epoch, and returns the seq."""

    async def main() -> None:
        bus = make_bus(tmp_path)
        sub = bus.subscribe().subscriber
        got = [
            bus.publish(update("a")),
            bus.publish(wire.dataset_update("ds-1", "created")),
            bus.publish(update("b")),
            bus.publish(update("a", 50)),
        ]
        assert got == [1, 2, 3, 4]
        batch = events(await next_batch(sub))
        assert [e["seq"] for e in batch] == [1, 2, 3, 4]
        assert {e["epoch"] for e in batch} == {bus.epoch}
        assert [e.get("jobSeq") for e in batch] == [1, None, 1, 2]
        assert bus.head == 4
        await bus.stop()

    run(main)


def test_events_are_logged_before_subscribers_see_them(tmp_path: Path) -> None:
    """An event reaches subscribers only after the flush has written it to the log file."""

    async def main() -> None:
        bus = make_bus(tmp_path)
        sub = bus.subscribe().subscriber
        delivered: list[list[int]] = []

        def on_batch(batch: list[Record]) -> None:
            on_disk = (tmp_path / "events.jsonl").read_text().splitlines()[1:]
            assert [json.loads(ln)["seq"] for ln in on_disk][-len(batch) :] == [
                r.seq for r in batch
            ]
            delivered.append([r.seq for r in batch])

        bus.add_listener(on_batch)
        bus.publish(update("a"))
        bus.publish(update("a", 10))
        assert not sub.buffer and bus.head == 0  # not logged yet: not visible
        assert [r.seq for r in await next_batch(sub)] == [1, 2]
        assert delivered == [[1, 2]]  # one write for both
        await bus.stop()

    run(main)


def test_subscribe_since_replays_then_goes_live_without_gap(tmp_path: Path) -> None:
    """subscribe(since=N) replays N+1..head and then delivers head+1 onwards, nothing twice."""

    async def main() -> None:
        bus = make_bus(tmp_path)
        for i in range(5):
            bus.publish(update("a", i))
        bus.flush()
        sub = bus.subscribe(since=2, epoch=bus.epoch)
        assert sub.resync is None and sub.head == 5 and sub.epoch == bus.epoch
        assert [r.seq for r in sub.replay] == [3, 4, 5]
        bus.publish(update("a", 9))
        assert [r.seq for r in await next_batch(sub.subscriber)] == [6]
        live_only = bus.subscribe()
        assert live_only.replay == [] and live_only.head == 6
        assert bus.subscribe(since=6).replay == []
        await bus.stop()

    run(main)


def test_subscribe_jobs_filter(tmp_path: Path) -> None:
    """A jobs filter applies to replay and live events; other jobs and datasets are skipped."""

    async def main() -> None:
        bus = make_bus(tmp_path)
        bus.publish(update("a"))
        bus.publish(update("b"))
        bus.publish(wire.dataset_update("ds-1", "created"))
        bus.flush()
        sub = bus.subscribe(since=0, jobs={"b"})
        assert [r.seq for r in sub.replay] == [2]
        bus.publish(update("a", 5))
        bus.publish(update("b", 5))
        batch = await next_batch(sub.subscriber)
        assert [(r.seq, r.job_id, r.job_seq) for r in batch] == [(5, "b", 2)]
        assert [r.seq for r in bus.history(0, {"a"})] == [1, 4]
        await bus.stop()

    run(main)


def test_subscribe_beyond_head_raises(tmp_path: Path) -> None:
    """A since beyond the head is FutureSince and registers no subscriber."""

    async def main() -> None:
        bus = make_bus(tmp_path)
        bus.publish(update("a"))
        bus.flush()
        with pytest.raises(FutureSince):
            bus.subscribe(since=2)
        assert not bus.subscribers
        await bus.stop()

    run(main)


def test_subscribe_other_epoch_or_trimmed_history_resyncs(tmp_path: Path) -> None:
    """Another epoch resyncs (epoch_changed); a since the log no longer keeps, history_trimmed."""

    async def main() -> None:
        bus = make_bus(tmp_path, retention=10)
        for i in range(15):
            bus.publish(update("a", i))
            bus.publish(update("b", i))
        bus.flush()
        other = bus.subscribe(since=3, epoch="another-epoch")
        assert other.resync == "epoch_changed" and other.replay == []
        trimmed = bus.subscribe(since=3, epoch=bus.epoch)
        assert trimmed.resync == "history_trimmed" and trimmed.replay == []
        recent = bus.subscribe(since=25, epoch=bus.epoch)
        assert recent.resync is None and [r.seq for r in recent.replay] == [26, 27, 28, 29, 30]
        # Each still gets live events from the head.
        bus.publish(update("a", 99))
        for s in (other, trimmed, recent):
            assert [r.seq for r in await next_batch(s.subscriber)] == [31]
        await bus.stop()

    run(main)


def test_slow_subscriber_is_dropped_without_holding_back_others(tmp_path: Path) -> None:
    """A subscriber queue_size events behind overflows; the others get every event."""

    async def main() -> None:
        bus = make_bus(tmp_path, queue_size=3)
        slow = bus.subscribe().subscriber
        fast = bus.subscribe().subscriber
        got: list[int] = []
        for i in range(10):
            bus.publish(update("a", i))
            got += [r.seq for r in await next_batch(fast)]
        assert got == list(range(1, 11))
        assert slow.overflowed and await next_batch(slow) == []
        await bus.stop()

    run(main)


def test_unsubscribe_and_stop_end_waiting_readers(tmp_path: Path) -> None:
    """A reader waiting for events gets [] when it is unsubscribed or the bus stops."""

    async def main() -> None:
        bus = make_bus(tmp_path)
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


def test_failed_append_delays_delivery_until_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the log write fails, events are held (not sent) and go out in order once it works."""

    async def main() -> None:
        bus = make_bus(tmp_path)
        sub = bus.subscribe().subscriber
        real_append = bus.log.append
        failures = []

        def flaky(records: list[Record]) -> None:
            if not failures:
                failures.append(len(records))
                raise OSError(28, "No space left on device")
            real_append(records)

        monkeypatch.setattr(bus.log, "append", flaky)
        bus.publish(update("a"))
        await asyncio.sleep(0)  # let the scheduled flush run (and fail)
        assert failures == [1] and not sub.buffer and bus.head == 0
        bus.publish(update("a", 5))
        batch = await next_batch(sub)
        assert [r.seq for r in batch] == [1, 2]
        assert [
            json.loads(ln)["seq"] for ln in (tmp_path / "events.jsonl").read_text().splitlines()[1:]
        ] == [1, 2]
        await bus.stop()

    run(main)


def test_numbering_continues_after_reopen(tmp_path: Path) -> None:
    """A bus on a reopened log continues seq and jobSeq where the last one stopped."""

    async def first() -> str:
        bus = make_bus(tmp_path)
        bus.publish(update("a"))
        bus.publish(update("a", 1))
        await bus.stop()
        return bus.epoch

    async def second() -> tuple[int, int, str]:
        bus = make_bus(tmp_path)
        sub = bus.subscribe().subscriber
        bus.publish(update("a", 2))
        rec = (await next_batch(sub))[0]
        await bus.stop()
        return rec.seq, rec.job_seq or 0, json.loads(rec.text)["epoch"]

    epoch = run(first)
    assert run(second) == (3, 3, epoch)


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Yield to the loop until ``cond()`` holds (fails after ``timeout`` seconds)."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.001)


def file_seqs(path: Path) -> list[int]:
    return [json.loads(ln)["seq"] for ln in path.read_text().splitlines()[1:]]


def gated_write(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> tuple[threading.Event, threading.Event]:
    """Make Compaction.write block until ``release`` is set (and then fail, if asked)."""
    started, release = threading.Event(), threading.Event()
    real_write = Compaction.write

    def write(self: Compaction) -> None:
        started.set()
        assert release.wait(10), "the test never released the compaction thread"
        if fail:
            raise OSError(28, "No space left on device")
        real_write(self)

    monkeypatch.setattr(Compaction, "write", write)
    return started, release


def test_background_compaction_keeps_every_event_in_order_across_the_seam(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events appended while the compaction thread writes are in the new file exactly once, in order."""
    path = tmp_path / "events.jsonl"
    started, release = gated_write(monkeypatch)

    async def main() -> None:
        bus = make_bus(tmp_path, retention=10)
        for i in range(20):  # the 20th flush finds 20 lines for 10 kept: compaction starts
            bus.publish(update("a", i))
            bus.flush()
        await wait_until(started.is_set)
        assert bus._compact_task is not None
        for i in range(20, 25):  # appended to the old file while the thread writes
            bus.publish(update("b", i))
            bus.flush()
        assert file_seqs(path) == list(range(1, 26))  # the old file is complete meanwhile
        release.set()
        await wait_until(lambda: bus._compact_task is None)
        assert file_seqs(path) == list(range(11, 26))  # snapshot 11-20, then the seam 21-25
        bus.publish(update("b", 99))  # appends go to the new file
        await bus.stop()
        assert not list(tmp_path.glob("*.tmp-*"))

    run(main)
    again = FileEventLog(path, retention=10)
    again.open()
    assert file_seqs(path) == list(range(11, 27))
    assert [r.seq for r in again.after(0)] == list(range(17, 27)) and again.head == 26
    assert again.next_job_seq("a") == 21 and again.next_job_seq("b") == 7
    again.close()


def test_failed_compaction_thread_leaves_the_old_file_intact_and_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the thread's write fails, the temp file goes, the old file stays whole and takes appends."""
    path = tmp_path / "events.jsonl"
    started, release = gated_write(monkeypatch, fail=True)

    async def main() -> None:
        bus = make_bus(tmp_path, retention=10)
        sub = bus.subscribe().subscriber
        for i in range(20):
            bus.publish(update("a", i))
            bus.flush()
        await wait_until(started.is_set)
        bus.publish(update("a", 20))
        bus.flush()
        release.set()
        await wait_until(lambda: bus._compact_task is None)
        assert file_seqs(path) == list(range(1, 22))
        assert not list(tmp_path.glob("*.tmp-*"))
        bus.publish(update("a", 21))
        bus.flush()
        assert [r.seq for r in await next_batch(sub)] == list(range(1, 23))
        assert file_seqs(path) == list(range(1, 23))
        await bus.stop()

    run(main)
    again = FileEventLog(path, retention=10)
    again.open()
    assert again.head == 22 and [r.seq for r in again.after(0)] == list(range(13, 23))
    again.close()


def test_compaction_does_not_block_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the compaction thread is stuck, the loop runs, publishes are logged and delivered."""
    path = tmp_path / "events.jsonl"
    started, release = gated_write(monkeypatch)

    async def main() -> None:
        bus = make_bus(tmp_path, retention=10)
        for i in range(20):
            bus.publish(update("a", i))
            bus.flush()
        await wait_until(started.is_set)
        sub = bus.subscribe(since=bus.head).subscriber
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.create_task(ticker())
        for i in range(5):
            seq = bus.publish(update("a", 100 + i))
            batch = await next_batch(sub)  # logged and delivered while the thread is blocked
            assert [r.seq for r in batch] == [seq]
        await wait_until(lambda: ticks >= 50)
        assert not release.is_set() and bus._compact_task is not None
        assert file_seqs(path) == list(range(1, 26))
        tick_task.cancel()
        release.set()
        await bus.stop()  # finishes the compaction before closing
        assert file_seqs(path) == list(range(11, 26))

    run(main)


def test_stop_abandons_a_cancelled_compaction_and_leaves_a_valid_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compaction task cancelled mid-write is given up; the old file is the complete log."""
    path = tmp_path / "events.jsonl"
    started, release = gated_write(monkeypatch)

    async def main() -> None:
        bus = make_bus(tmp_path, retention=10)
        for i in range(20):
            bus.publish(update("a", i))
            bus.flush()
        await wait_until(started.is_set)
        assert bus._compact_task is not None
        bus._compact_task.cancel()
        bus.publish(update("a", 20))
        await bus.stop()
        release.set()

    run(main)  # asyncio.run waits for the executor thread; its temp file is then deleted
    assert not list(tmp_path.glob("*.tmp-*"))
    assert file_seqs(path) == list(range(1, 22))
    again = FileEventLog(path, retention=10)
    again.open()
    assert again.head == 21
    again.close()
