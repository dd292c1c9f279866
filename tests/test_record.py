"""The embedded store's record (store/wal.py, tinydb_store.py, snapshot.py, archive.py): one log
line per change with its event, group commit, snapshots, the archive, and what start-up does
with a log a crash or a disk left behind.

In-process tests on a real data dir. A "crash" here abandons the store without closing it (no
flush, no clean mark), which is what kill -9 leaves on disk; tests/test_crash.py kills real
server processes at each named window.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mangwale_cli import wire
from mangwale_cli.errors import InsufficientStorage, StaleWrite, StoreError, Unavailable
from mangwale_cli.eventlog import Record
from mangwale_cli.store import snapshot, wal
from mangwale_cli.store.base import Cursor, Expect
from mangwale_cli.store.datadir import DataDir
from mangwale_cli.store.tinydb_store import TinyDBStore, inspect
from mangwale_cli.wire import Dataset, Job, JobStatus

T = TypeVar("T")
Q, R, S, F = JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(fn())  # type: ignore[arg-type]  # asyncio.run takes a coroutine; Awaitable is what the lambdas give


def make_job(n: int, created: int | None = None) -> Job:
    t = 1_000 + n if created is None else created
    return Job(id=f"job-{n:05d}", kind="simulate", dataset_id=None, created_at=t, updated_at=t)


@asynccontextmanager
async def opened(root: Path, **kw: Any) -> AsyncIterator[TinyDBStore]:
    datadir = DataDir(root)
    datadir.prepare()
    store = TinyDBStore(datadir, **kw)
    try:
        await store.open()
    except BaseException:
        datadir.unlock()
        raise
    try:
        yield store
    finally:
        await store.close()
        datadir.unlock()


async def crash(store: TinyDBStore) -> None:
    """Leave the store as kill -9 would: nothing flushed or marked clean, the lock released."""
    for task in (store._writer, store._syncer, store._snapshot_task):
        if task is not None:
            task.cancel()
    await asyncio.sleep(0)
    if store.log._fd is not None:
        os.close(store.log._fd)
        store.log._fd = None
    store.reader.close()
    store.datadir.unlock()


async def start(store: TinyDBStore, job: Job, holder: str = "me") -> Job:
    previous = job.attempt
    job.status, job.attempt = R, job.attempt + 1
    job.lease = {"holder": holder, "token": job.attempt}
    assert await store.begin_attempt(job, previous, wire.training_update(job))
    return job


async def finish(store: TinyDBStore, job: Job, status: JobStatus = S) -> Job:
    expect = Expect.lease_of(job)
    job.status, job.lease = status, None
    return await store.write_job(job, wire.training_update(job), expect=expect, durable=True)


def log_lines(root: Path) -> list[wal.Line]:
    log = wal.RecordLog(root / "log")
    log.discover()
    return list(log.read(repair=False))


def last_segment(root: Path) -> Path:
    return max((root / "log").glob("*.log"))


# --- one record per change ------------------------------------------------------------------


def test_every_change_is_one_line_with_its_event(tmp_path: Path) -> None:
    """Create, start, progress, log, finish, delete and a dataset: each is one line holding its
    state change and its event; the job's jobSeq is its newest event's."""

    async def main() -> None:
        async with opened(tmp_path) as store:
            job, _ = await store.create_job(make_job(1))
            job = await start(store, job)
            job.progress = 50
            stored = await store.write_job(job, wire.training_update(job), expect=Expect.lease_of(job),
                                           lines=("metrics", [{"loss": 0.5, "pointNo": 1}]))  # fmt: skip
            await store.append_log(job.id, {"lineNo": 1, "line": "hi"}, wire.job_log(job.id, "stdout", "hi", 1, 1),
                                   Expect.lease_of(job))  # fmt: skip
            done = await finish(store, job)
            await store.create_dataset(Dataset(id="ds-1", name="d", created_at=5, updated_at=5))
            assert await store.delete_jobs([job.id, "job-nope"], "pruned") == [job.id]
            assert (stored.job_seq, done.job_seq) == (3, 4)
        lines = log_lines(tmp_path)
        events = [json.loads(ln.event) for ln in lines]
        assert [e["type"] for e in events] == ["job_created", "training_update", "training_update", "job_log",
                                               "training_update", "dataset_update", "job_deleted"]  # fmt: skip
        assert [ln.seq for ln in lines] == [1, 2, 3, 4, 5, 6, 7] == [e["seq"] for e in events]
        assert [ln.record for ln in lines] == [1, 2, 3, 4, 5, 6, 7]
        assert [e.get("jobSeq") for e in events] == [1, 2, 3, None, 4, None, None]
        assert events[-1]["jobIds"] == ["job-00001"] and events[-1]["reason"] == "pruned"
        assert all(ln.ops for ln in lines)  # every event came with its state change
        assert [(ln.kind, ln.job_id) for ln in lines][3:] == [("l", "job-00001"), ("e", "job-00001"), ("e", None),
                                                                ("d", None)]  # fmt: skip

    run(main)


def test_nothing_is_shown_before_it_is_in_the_log(tmp_path: Path) -> None:
    """When subscribers get an event, the log on disk already holds it and its state; a write's
    caller gets its answer after that too."""

    async def main() -> None:
        async with opened(tmp_path) as store:
            seen: list[tuple[int, str]] = []

            def on_events(batch: list[Record]) -> None:
                disk = inspect(tmp_path)
                for rec in batch:
                    ev = json.loads(rec.text)
                    assert ev in disk.events
                    if ev["type"] == "training_update":
                        assert disk.jobs[ev["jobId"]]["status"] == ev["status"]
                    seen.append((rec.seq, ev["type"]))

            store.on_events = on_events
            job, _ = await store.create_job(make_job(1))
            assert inspect(tmp_path).jobs[job.id]["status"] == "queued"
            job = await start(store, job)
            await finish(store, job, F)
            assert inspect(tmp_path).jobs[job.id]["status"] == "failed"
            assert seen == [(1, "job_created"), (2, "training_update"), (3, "training_update")]

    run(main)


def test_durable_writes_are_fsynced_before_they_return_and_share_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A durable write returns after an fsync of its line; concurrent creates share fsyncs (group
    commit); a progress write does not wait for one."""
    syncs: list[int] = []
    real_sync = wal.RecordLog.sync

    def sync(self: wal.RecordLog) -> None:
        real_sync(self)
        syncs.append(self.next_record - 1)

    monkeypatch.setattr(wal.RecordLog, "sync", sync)

    async def main() -> None:
        async with opened(tmp_path, fsync_interval=0) as store:
            job, _ = await store.create_job(make_job(1))
            assert syncs and syncs[-1] >= 1
            job = await start(store, job)
            n = len(syncs)
            job.progress = 10
            await store.write_job(job, wire.training_update(job), expect=Expect.lease_of(job))
            assert len(syncs) == n  # progress: written, not fsynced on its own
            n = len(syncs)
            created = await asyncio.gather(*(store.create_job(make_job(i)) for i in range(2, 52)))
            assert all(c for _, c in created)
            assert len(syncs) - n < 25, f"{len(syncs) - n} fsyncs for 50 concurrent creates"
            assert syncs[-1] == store._record  # the last create's line was in an fsync

    run(main)


def test_guards_run_in_commit_order_within_a_batch(tmp_path: Path) -> None:
    """Writes submitted together are checked in order against what the ones before them wrote:
    progress queued behind the terminal write is refused, and nothing of it is logged."""

    async def main() -> None:
        async with opened(tmp_path) as store:
            job = await start(store, (await store.create_job(make_job(1)))[0])
            expect = Expect.lease_of(job)
            late = Job.from_dict(job.to_dict())
            late.progress = 99
            job.status, job.lease = S, None
            results = await asyncio.gather(
                store.write_job(job, wire.training_update(job), expect=expect, durable=True),
                store.write_job(late, wire.training_update(late), expect=expect),
                return_exceptions=True,
            )
            assert isinstance(results[0], Job) and isinstance(results[1], StaleWrite)
            assert "lease is held by nobody" in str(results[1])
            stored = await store.get_job(job.id)
            assert stored is not None and (stored.status, stored.progress, stored.job_seq) == (S, 0, 3)
            assert [e["type"] for e in await store.events_after(0)] == ["job_created", "training_update",
                                                                         "training_update"]  # fmt: skip

    run(main)


def test_a_lease_that_expired_refuses_its_holder(tmp_path: Path) -> None:
    """A runner that stopped renewing is refused once its lease runs out, before anyone else
    takes the job; a renewal in time keeps it; a running job whose lease is gone can start again."""

    async def main() -> None:
        async with opened(tmp_path, lease=0.2) as store:
            job = await start(store, (await store.create_job(make_job(1)))[0])
            for _ in range(3):
                await asyncio.sleep(0.1)
                assert await store.renew_lease(job.id, "me", 1)
            assert not await store.renew_lease(job.id, "someone-else", 1)
            await asyncio.sleep(0.3)
            assert not await store.lease_live(job.id)
            job.progress = 5
            with pytest.raises(StaleWrite, match="expired"):
                await store.write_job(job, wire.training_update(job), expect=Expect.lease_of(job))
            assert not await store.renew_lease(job.id, "me", 1)
            taken = await start(store, Job.from_dict((await store.get_job(job.id)).to_dict()), "other")  # type: ignore[union-attr]  # the job was just created: get_job finds it
            assert taken.attempt == 2 and await store.lease_live(job.id)
            with pytest.raises(StaleWrite):
                await store.write_job(job, wire.training_update(job), expect=Expect(holder="me", token=1))

    run(main)


# --- start-up -------------------------------------------------------------------------------


def test_reopen_and_crash_keep_state_numbering_and_epoch(tmp_path: Path) -> None:
    """Close and reopen, or crash and reopen: the same state, the same epoch, seq and jobSeq go on
    from where they were."""

    async def main() -> None:
        async with opened(tmp_path) as store:
            job = await start(store, (await store.create_job(make_job(1)))[0])
            epoch = store.epoch
        async with opened(tmp_path) as store:
            assert (store.epoch, store.ring.head) == (epoch, 2)
            job.progress = 40
            await store.write_job(job, wire.training_update(job), expect=Expect.lease_of(job))
        store = TinyDBStore(DataDir(tmp_path))
        store.datadir.prepare()
        await store.open()
        job.progress = 60
        await store.write_job(job, wire.training_update(job), expect=Expect.lease_of(job))
        await crash(store)
        async with opened(tmp_path) as store:
            assert (store.epoch, store.ring.head) == (epoch, 4)
            stored = await store.get_job(job.id)
            assert stored is not None and (stored.progress, stored.job_seq) == (60, 4)
            done = await finish(store, job)
            assert done.job_seq == 5 and [e["seq"] for e in await store.events_after(0)] == [1, 2, 3, 4, 5]

    run(main)


def test_a_torn_tail_is_cut_and_the_rest_kept(tmp_path: Path) -> None:
    """A line cut short (a crash mid-append) or garbage after the last line (a power loss) is cut
    off at start-up; every complete line before it is kept, in the same epoch."""

    async def main() -> None:
        async with opened(tmp_path) as store:
            for n in range(1, 4):
                await store.create_job(make_job(n))
            epoch = store.epoch
        seg = last_segment(tmp_path)
        good = seg.read_bytes()
        for tail in (good.splitlines(keepends=True)[-1][:30], b"\0" * 4096, b"deadbeef 4 5 - e -\tnope\n\0\0"):
            seg.write_bytes(good + tail)
            async with opened(tmp_path) as store:
                assert store.epoch == epoch and store.ring.head == 3
                assert [j.id for j in await store.list_jobs()] == ["job-00003", "job-00002", "job-00001"]
            assert seg.read_bytes() == good

    run(main)


def test_a_corrupt_line_before_good_ones_stops_start_up(tmp_path: Path) -> None:
    """A line that fails its checksum with good lines after it is not a torn tail: start-up stops
    with an error naming the file and line, and the file is left as it was."""

    async def main() -> None:
        async with opened(tmp_path) as store:
            for n in range(1, 5):
                await store.create_job(make_job(n))
        seg = last_segment(tmp_path)
        lines = seg.read_bytes().splitlines(keepends=True)
        lines[2] = lines[2].replace(b"job-00002", b"job-0000X")
        seg.write_bytes(b"".join(lines))
        before = seg.read_bytes()
        with pytest.raises(StoreError) as info:
            async with opened(tmp_path):
                pass
        assert str(seg) in str(info.value) and "line 3" in str(info.value) and info.value.code == "corrupt"
        assert seg.read_bytes() == before

    run(main)


def test_a_log_that_does_not_follow_the_snapshot_is_refused(tmp_path: Path) -> None:
    """Records missing between the snapshot and the log (a deleted segment) stop start-up."""

    async def main() -> None:
        async with opened(tmp_path, segment_bytes=400) as store:
            for n in range(1, 10):
                await store.create_job(make_job(n))
        segments = sorted((tmp_path / "log").glob("*.log"))
        assert len(segments) > 2
        segments[0].unlink()
        with pytest.raises(StoreError, match="starts at record"):
            async with opened(tmp_path):
                pass

    run(main)


def test_schema_too_new_is_refused(tmp_path: Path) -> None:
    """A data dir written by a newer mangwale is refused with a message saying to upgrade."""
    (tmp_path / snapshot.NAME).write_text(json.dumps({snapshot.KEY: 99, "record": 0}))

    async def main() -> None:
        with pytest.raises(StoreError, match="newer than this mangwale") as info:
            async with opened(tmp_path):
                pass
        assert info.value.code == "too_new"

    run(main)


def test_power_loss_starts_a_new_epoch_above_every_seq_issued(tmp_path: Path) -> None:
    """After the machine restarted while the server ran (its boot id changed, no clean stop),
    unsynced events may be gone: a new epoch starts, with seq above any seq ever issued."""

    async def main() -> None:
        async with opened(tmp_path) as store:
            await store.create_job(make_job(1))
            epoch, head = store.epoch, store.ring.head
        run_file = tmp_path / "run.json"
        state = json.loads(run_file.read_text())
        assert state["clean"] is True and state["seqCeiling"] > head
        run_file.write_text(json.dumps({**state, "clean": False, "bootId": "an-earlier-boot"}))
        async with opened(tmp_path) as store:
            assert store.epoch != epoch and store.ring.head >= state["seqCeiling"]
            assert (await store.get_job("job-00001")) is not None
            await store.create_job(make_job(2))
            new = await store.events_after(0)
            assert [e["epoch"] for e in new] == [store.epoch] and new[0]["seq"] == state["seqCeiling"] + 1
        run_file.write_text(json.dumps({**json.loads(run_file.read_text()), "clean": False}))  # kill -9, same boot
        async with opened(tmp_path) as again:
            assert again.epoch == store.epoch  # no new epoch: nothing the OS held was lost

    run(main)


def test_a_failed_write_keeps_nothing_and_the_next_one_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk that takes half a batch: the caller gets 507, the log is cut back (no torn
    line), nothing is applied or numbered, and the next write goes on without a gap."""

    async def main() -> None:
        async with opened(tmp_path) as store:
            await store.create_job(make_job(1))
            size = last_segment(tmp_path).stat().st_size
            real_write = os.write
            calls = {"n": 0}

            def half_then_full(fd: int, data: Any) -> int:
                calls["n"] += 1
                if calls["n"] == 1:
                    return real_write(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(os, "write", half_then_full)
            with pytest.raises(InsufficientStorage):
                await store.create_job(make_job(2))
            monkeypatch.setattr(os, "write", real_write)
            assert last_segment(tmp_path).stat().st_size == size
            assert await store.get_job("job-00002") is None and store.ring.head == 1
            await store.create_job(make_job(3))
            assert [e["seq"] for e in await store.events_after(0)] == [1, 2]
        assert [ln.record for ln in log_lines(tmp_path)] == [1, 2]

    run(main)


def failing_once(real: Callable[[Any], None], calls: list[Any]) -> Callable[[Any], None]:
    """``real`` (an fsync), except that its first call fails with EIO; each call's argument is
    added to ``calls``."""

    def wrapped(arg: Any) -> None:
        calls.append(arg)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(arg)

    return wrapped


def test_a_failed_fsync_keeps_nothing_and_the_log_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fsync of a durable batch that fails: the batch's lines are cut off the log, none of it
    is answered, applied, numbered or broadcast, the next write goes on without a gap, and the
    next start reads the log back."""

    async def main() -> None:
        async with opened(tmp_path, fsync_interval=0) as store:
            await store.create_job(make_job(1))
            size = last_segment(tmp_path).stat().st_size
            shown: list[int] = []
            store.on_events = lambda batch: shown.extend(r.seq for r in batch)
            failed: list[int] = []
            monkeypatch.setattr(os, "fsync", failing_once(os.fsync, failed))
            with pytest.raises(Unavailable):
                await store.create_job(make_job(2))
            assert failed
            assert last_segment(tmp_path).stat().st_size == size
            assert await store.get_job("job-00002") is None and store.ring.head == 1 and shown == []
            await store.create_job(make_job(3))
            assert shown == [2]
            assert [e["seq"] for e in await store.events_after(0)] == [1, 2]
        assert [ln.record for ln in log_lines(tmp_path)] == [1, 2]
        async with opened(tmp_path) as store:
            assert [j.id for j in await store.list_jobs()] == ["job-00003", "job-00001"]
            await store.create_job(make_job(4))
            assert [e["seq"] for e in await store.events_after(0)] == [1, 2, 3]

    run(main)


def test_a_failed_batch_that_cannot_be_cut_off_stops_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If cutting an unacknowledged batch off the log fails too, the store takes no more writes
    (they would number records twice); the next start keeps the batch, as after kill -9."""

    async def main() -> None:
        async with opened(tmp_path, fsync_interval=0) as store:
            await store.create_job(make_job(1))

            def eio(*_: Any) -> None:
                raise OSError(errno.EIO, os.strerror(errno.EIO))

            with monkeypatch.context() as m:
                m.setattr(os, "fsync", eio)
                m.setattr(os, "ftruncate", eio)
                with pytest.raises(Unavailable):
                    await store.create_job(make_job(2))
            with pytest.raises(Unavailable, match="restart"):
                await store.create_job(make_job(3))
        async with opened(tmp_path) as store:
            assert [j.id for j in await store.list_jobs()] == ["job-00002", "job-00001"]

    run(main)


def test_a_failed_background_fsync_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress waits for the ``events.fsync_interval`` fsync; when that fails, the next round
    fsyncs it rather than forget it."""

    async def main() -> None:
        async with opened(tmp_path, fsync_interval=0.01) as store:
            job = await start(store, (await store.create_job(make_job(1)))[0])
            calls: list[int] = []
            real_fsync = os.fsync
            monkeypatch.setattr(os, "fsync", failing_once(real_fsync, calls))
            job.progress = 10
            await store.write_job(job, wire.training_update(job), expect=Expect.lease_of(job))
            async with asyncio.timeout(10):
                while len(calls) < 2 or store._unsynced:
                    await asyncio.sleep(0.01)
            monkeypatch.setattr(os, "fsync", real_fsync)

    run(main)


def test_a_failed_directory_fsync_is_retried_by_the_next_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory fsync that makes a new segment's name durable fails: the next sync does it
    again rather than forget it."""
    calls: list[Path] = []
    monkeypatch.setattr(wal, "fsync_dir", failing_once(wal.fsync_dir, calls))
    log = wal.RecordLog(tmp_path / "log")
    log.discover()
    log.open_for_append("e1")  # creates a segment: its directory entry needs an fsync
    with pytest.raises(OSError):
        log.sync()
    log.sync()
    assert calls == [tmp_path / "log", tmp_path / "log"]
    log.sync()
    assert len(calls) == 2  # done once it worked
    log.close()


def test_log_lines_a_crash_kept_from_the_job_file_are_written_once(tmp_path: Path) -> None:
    """A log line is in the record before the job's logs file; a crash between the two is
    repaired at start-up, and a line that made it to both is not written twice."""

    async def main() -> None:
        async with opened(tmp_path) as store:
            job = await start(store, (await store.create_job(make_job(1)))[0])
            for n in (1, 2, 3):
                ev = wire.job_log(job.id, "stdout", f"line {n}", n, 1)
                await store.append_log(job.id, {"lineNo": n, "line": f"line {n}"}, ev, Expect.lease_of(job))
            logs = store.artifact_dir(job.id) / "logs.jsonl"
            await crash(store)
        logs.write_text("\n".join(logs.read_text().splitlines()[:1]) + "\n")  # line 1 made it, 2-3 not
        async with opened(tmp_path) as store:
            assert [e["lineNo"] for e in await store.read_job_lines(job.id, "logs")] == [1, 2, 3]

    run(main)


# --- snapshots and the archive ----------------------------------------------------------------


def test_snapshots_archive_finished_jobs_and_start_up_reads_them_back(tmp_path: Path) -> None:
    """Finished jobs leave memory for an archive segment at the snapshot; lists, gets and counts
    read them back, before and after a restart; the log the snapshot covers is deleted."""

    async def main() -> None:
        async with opened(tmp_path, snapshot_records=10**9, segment_bytes=2000, retention=5) as store:
            for n in range(1, 41):
                job = await start(store, (await store.create_job(make_job(n)))[0])
                if n % 4:
                    await finish(store, job, S if n % 2 else F)
            segments_before = len(list((tmp_path / "log").glob("*.log")))
            await store.snapshot()
            entries = store.jobs.entries
            assert sum(e.doc is None for e in entries.values()) == 30  # archived
            assert {e.status for e in entries.values() if e.doc is not None} == {"running"}
            assert len(list((tmp_path / "log").glob("*.log"))) < segments_before
            counts = await store.count_jobs()
            page = [j.id for j in await store.list_jobs(statuses=[S], limit=3)]
            old = await store.get_job("job-00001")
        assert counts == {"queued": 0, "running": 10, "succeeded": 20, "failed": 10, "cancelled": 0}
        async with opened(tmp_path) as store:
            assert await store.count_jobs() == counts
            assert [j.id for j in await store.list_jobs(statuses=[S], limit=3)] == page == [
                "job-00039", "job-00037", "job-00035"]  # fmt: skip
            assert await store.get_job("job-00001") == old and old is not None and old.status is S
            assert [j.id for j in await store.list_jobs(statuses=[R], limit=2)] == ["job-00040", "job-00036"]

    run(main)


def test_deleted_archived_jobs_stay_deleted_and_sparse_segments_merge(tmp_path: Path) -> None:
    """Deleting archived jobs hides them at once and after restarts; once most of a segment is
    dead, the next snapshot merges its live jobs into a new segment and deletes the old files."""

    async def main() -> None:
        async with opened(tmp_path, snapshot_records=10**9) as store:
            for n in range(1, 31):
                await finish(store, await start(store, (await store.create_job(make_job(n)))[0]))
            await store.snapshot()
            first = sorted((tmp_path / "jobs").glob("*.seg"))
            assert len(first) == 1
            assert len(await store.delete_jobs([f"job-{n:05d}" for n in range(1, 21)])) == 20
            assert await store.get_job("job-00005") is None
        async with opened(tmp_path, snapshot_records=10**9) as store:
            assert await store.get_job("job-00005") is None and len(await store.list_jobs()) == 10
            await store.snapshot()  # two thirds dead: merged away
            assert not first[0].exists() and len(list((tmp_path / "jobs").glob("*.seg"))) == 1
        async with opened(tmp_path) as store:
            assert [j.id for j in await store.list_jobs(limit=2)] == ["job-00030", "job-00029"]
            assert await store.get_job("job-00021") is not None and await store.get_job("job-00020") is None

    run(main)


def test_inspect_reads_a_live_store_that_a_snapshot_overtakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``inspect`` of a running store, aimed at its worst window: it has read the snapshot and is
    about to read a job segment when the server's next snapshot merges that segment away and
    deletes it. The read starts over on the new snapshot and sees the store as it is."""
    import threading

    from mangwale_cli.store import archive

    reading, merged = threading.Event(), threading.Event()
    original = archive.Reader.read
    seen: dict[str, Any] = {}

    def read(self: archive.Reader, n: int, offset: int, size: int) -> dict[str, Any]:
        if threading.current_thread().name == "inspect" and not reading.is_set():
            reading.set()
            assert merged.wait(10)
        return original(self, n, offset, size)

    monkeypatch.setattr(archive.Reader, "read", read)

    def look() -> None:
        try:
            seen["jobs"] = sorted(inspect(tmp_path).jobs)
        except StoreError as exc:
            seen["error"] = exc

    async def main() -> None:
        async with opened(tmp_path, snapshot_records=10**9) as store:
            for n in range(1, 31):
                await finish(store, await start(store, (await store.create_job(make_job(n)))[0]))
            await store.snapshot()
            first = sorted((tmp_path / "jobs").glob("*.seg"))
            reader = threading.Thread(target=look, name="inspect")
            reader.start()
            assert await asyncio.to_thread(reading.wait, 10)
            await store.delete_jobs([f"job-{n:05d}" for n in range(1, 22)])
            await store.snapshot()  # two thirds dead: segment 1 is merged into a new one and deleted
            assert not first[0].exists()
            merged.set()
            await asyncio.to_thread(reader.join, 10)

    run(main)
    assert "error" not in seen, seen.get("error")
    assert seen["jobs"] == [f"job-{n:05d}" for n in range(22, 31)]


def test_inspect_reads_events_whose_log_segment_is_dropped_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``inspect`` aimed at the window after a snapshot is renamed into place and before the log
    segments it covers are deleted: the read takes the new snapshot, replays the old segments,
    and then the server deletes them before the events' texts are read back. The events still
    read (through the descriptors the replay opened) and the read checks out."""
    import threading

    renamed, replayed, dropped = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, Any] = {}
    cleanup, replay = snapshot.cleanup, TinyDBStore._replay_log

    def cleanup_then_wait(*args: Any) -> None:
        cleanup(*args)
        renamed.set()
        assert replayed.wait(10)

    def replay_then_wait(self: TinyDBStore, **kw: Any) -> None:
        replay(self, **kw)
        if threading.current_thread().name == "inspect" and not replayed.is_set():
            replayed.set()
            assert dropped.wait(10)

    monkeypatch.setattr(snapshot, "cleanup", cleanup_then_wait)
    monkeypatch.setattr(TinyDBStore, "_replay_log", replay_then_wait)

    def look() -> None:
        try:
            seen["inspection"] = inspect(tmp_path)
        except (StoreError, OSError) as exc:
            seen["error"] = exc

    async def main() -> None:
        async with opened(tmp_path, snapshot_records=10**9, segment_bytes=400, retention=5) as store:
            for n in range(1, 16):
                await finish(store, await start(store, (await store.create_job(make_job(n)))[0]))
            segments = sorted((tmp_path / "log").glob("*.log"))
            assert len(segments) > 3
            reader = threading.Thread(target=look, name="inspect")
            snapped = asyncio.ensure_future(store.snapshot())
            assert await asyncio.to_thread(renamed.wait, 10)
            reader.start()
            await snapped  # cleanup returns once the read has replayed; then the segments go
            assert not segments[0].exists()
            dropped.set()
            await asyncio.to_thread(reader.join, 10)

    run(main)
    assert "error" not in seen, repr(seen.get("error"))
    got = seen["inspection"]
    assert sorted(got.jobs) == [f"job-{n:05d}" for n in range(1, 16)]
    assert all(job["status"] == "succeeded" for job in got.jobs.values())
    seqs = [e["seq"] for e in got.events]
    assert seqs == sorted(seqs) and seqs[-1] == got.head


def test_cursor_pages_go_on_across_deletes(tmp_path: Path) -> None:
    """A cursor is a position, not a job: deleting the job it names (a prune) keeps paging exact."""

    async def main() -> None:
        async with opened(tmp_path) as store:
            for n in range(1, 8):
                await finish(store, await start(store, (await store.create_job(make_job(n, created=5_000)))[0]))
            page = await store.list_jobs(limit=3)
            assert [j.id for j in page] == ["job-00007", "job-00006", "job-00005"]
            cursor = Cursor(page[-1].created_at, page[-1].id)
            await store.delete_jobs(["job-00005", "job-00004"])
            rest = await store.list_jobs(limit=3, after=cursor)
            assert [j.id for j in rest] == ["job-00003", "job-00002", "job-00001"]

    run(main)


def test_the_snapshot_writes_its_files_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a snapshot's files are being written, writes keep committing; the snapshot then
    covers exactly the record it started at and a restart replays the rest."""
    import threading

    started, release = threading.Event(), threading.Event()
    real_write = snapshot.write

    def gated(*args: Any) -> Any:
        started.set()
        assert release.wait(10)
        return real_write(*args)

    monkeypatch.setattr(snapshot, "write", gated)

    async def main() -> None:
        async with opened(tmp_path, snapshot_records=10**9) as store:
            for n in range(1, 6):
                await finish(store, await start(store, (await store.create_job(make_job(n)))[0]))
            covered = store._record
            snap = asyncio.ensure_future(store.snapshot())
            await asyncio.to_thread(started.wait, 5)
            for n in range(6, 9):  # the loop is free: these commit while the thread waits
                await store.create_job(make_job(n))
            release.set()
            await snap
            assert json.loads((tmp_path / snapshot.NAME).read_text())["record"] == covered
        async with opened(tmp_path) as store:
            assert len(await store.list_jobs()) == 8

    run(main)


def test_idempotency_keys_expire(tmp_path: Path) -> None:
    """A replayed key returns its job within the key's TTL; after it, the key is free again."""

    async def main() -> None:
        async with opened(tmp_path, idempotency_ttl=0.2) as store:
            first, created = await store.create_job(make_job(1), ("k", "fp"))
            again, created_again = await store.create_job(make_job(2), ("k", "fp"))
            assert created and not created_again and again.id == first.id
            await asyncio.sleep(0.3)
            third, created = await store.create_job(make_job(3), ("k", "fp"))
            assert created and third.id == "job-00003"

    run(main)


def test_expired_idempotency_keys_leave_memory_at_the_next_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys past their TTL are dropped from memory by the next snapshot (not only from its file),
    so a server taking a key per request does not grow forever; live keys stay, and a key
    re-used before the snapshot finishes keeps its new life."""
    from mangwale_cli.store import tinydb_store

    clock = {"now": 1_000_000}
    monkeypatch.setattr(tinydb_store, "now_ms", lambda: clock["now"])

    async def main() -> None:
        async with opened(tmp_path, idempotency_ttl=60) as store:
            for n in range(1, 4):
                await store.create_job(make_job(n), (f"old-{n}", "fp"))
            clock["now"] += 30_000
            await store.create_job(make_job(4), ("young", "fp"))
            clock["now"] += 40_000  # the old keys are 70 s old, "young" 40 s
            await store.snapshot()
            assert set(store._raw["idem"]) == {"young"}
            again, created = await store.create_job(make_job(5), ("old-1", "fp"))
            assert created and again.id == "job-00005"  # an expired key is free again
        async with opened(tmp_path) as store:
            assert set(store._raw["idem"]) == {"young", "old-1"}

    run(main)


def test_old_events_leave_memory_and_replay_from_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond the newest few, ring records keep only where their text is in the log; replay reads
    them back byte for byte, before and after a restart, also once their segment is rolled."""
    from mangwale_cli.store import tinydb_store

    monkeypatch.setattr(tinydb_store, "HOT_EVENTS", 3)

    async def main() -> None:
        async with opened(tmp_path, segment_bytes=2000) as store:
            live: list[str] = []
            store.on_events = lambda batch: live.extend(r.text for r in batch)
            for n in range(1, 8):
                await finish(store, await start(store, (await store.create_job(make_job(n)))[0]))
            ring = list(store.ring.ring)
            assert [r._text is None for r in ring] == [True] * (len(ring) - 3) + [False] * 3
            assert len(store.log.segments) > 2
            assert [r.text for r in ring] == live
        async with opened(tmp_path) as store:
            assert all(r._text is None for r in store.ring.ring)
            assert [r.text for r in store.ring.ring] == live
            assert [json.dumps(e, separators=(",", ":"), ensure_ascii=False) for e in await store.events_after(0)] == live

    run(main)
