"""Tests for the data dir and the TinyDB store: durability, corruption, locking.

What every backend must do (CRUD, ordering, idempotency) is in test_store_contract.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mangwale_cli.errors import StoreError, Unavailable
from mangwale_cli.store import SCHEMA_VERSION, tinydb_store
from mangwale_cli.store.datadir import DataDir
from mangwale_cli.store.tinydb_store import TinyDBStore
from mangwale_cli.wire import Dataset, Job, JobStatus

T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(fn())  # type: ignore[arg-type]


@asynccontextmanager
async def open_store(path: Path, flush_interval: float = 0.01) -> AsyncIterator[TinyDBStore]:
    """A prepared (locked) data dir with an open store; closed and unlocked on exit."""
    datadir = DataDir(path)
    datadir.prepare()
    store = TinyDBStore(datadir, flush_interval=flush_interval)
    try:
        await store.open()
        yield store
    finally:
        await store.close()
        datadir.unlock()


def make_job(n: int, status: JobStatus = JobStatus.QUEUED, created: int | None = None) -> Job:
    t = 1_000 + n if created is None else created
    return Job(
        id=f"job-{n:02d}",
        kind="simulate",
        dataset_id=None,
        status=status,
        created_at=t,
        updated_at=t,
    )


def make_dataset(n: int) -> Dataset:
    return Dataset(
        id=f"ds-{n}",
        name=f"data {n}",
        examples=[{"text": "hi", "intent": "greet"}] * n,
        created_at=2_000 + n,
        updated_at=2_000 + n,
    )


def on_disk(path: Path) -> dict[str, Any]:
    """db.json as another process would read it now."""
    return json.loads((path / "db.json").read_text())  # type: ignore[no-any-return]


# --- durability ---------------------------------------------------------------------------


def test_durable_writes_are_on_disk_when_they_return(tmp_path: Path) -> None:
    """create_job, durable save_job, datasets and meta are in db.json when the call returns."""

    async def main() -> None:
        # A long flush interval: only the durable commit can have written the file.
        async with open_store(tmp_path, flush_interval=60) as store:
            job = make_job(1)
            await store.create_job(job, ("k", "fp"))
            disk = on_disk(tmp_path)
            assert disk["jobs"]["job-01"]["status"] == "queued"
            assert disk["idempotency"]["k"]["jobId"] == "job-01"

            job.status = JobStatus.SUCCEEDED
            await store.save_job(job, durable=True)
            assert on_disk(tmp_path)["jobs"]["job-01"]["status"] == "succeeded"

            await store.create_dataset(make_dataset(1))
            assert "ds-1" in on_disk(tmp_path)["datasets"]
            await store.set_meta("eventHead", 17)
            assert on_disk(tmp_path)["meta"]["eventHead"] == {"value": 17}
            await store.delete_job("job-01")
            assert "job-01" not in on_disk(tmp_path)["jobs"]
            assert on_disk(tmp_path)["meta"]["schema"] == {"version": SCHEMA_VERSION}

    run(main)


def test_progress_writes_reach_disk_within_the_flush_interval(tmp_path: Path) -> None:
    """A non-durable save is batched and written by the flusher shortly after."""

    async def main() -> None:
        async with open_store(tmp_path, flush_interval=0.02) as store:
            job = make_job(1, JobStatus.RUNNING)
            await store.create_job(job)
            job.progress = 55
            await store.save_job(job)
            for _ in range(500):
                if on_disk(tmp_path)["jobs"]["job-01"]["progress"] == 55:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("progress never reached the disk")

    run(main)


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    """Closing and reopening the store keeps jobs, datasets, meta and idempotency keys."""

    async def fill() -> None:
        async with open_store(tmp_path) as store:
            for n in range(1, 4):
                await store.create_job(make_job(n, JobStatus.SUCCEEDED), (f"key-{n}", f"fp-{n}"))
            job = make_job(9, JobStatus.RUNNING)
            await store.create_job(job)
            job.progress = 12.5  # non-durable: close() must still write it
            await store.save_job(job)
            await store.create_dataset(make_dataset(2))
            await store.set_meta("sampleLoaded", "ds-2")

    async def check() -> None:
        async with open_store(tmp_path) as store:
            assert [j.id for j in await store.list_jobs()] == [
                "job-09",
                "job-03",
                "job-02",
                "job-01",
            ]
            running = await store.get_job("job-09")
            assert (
                running is not None
                and running.progress == 12.5
                and running.status is JobStatus.RUNNING
            )
            ds = await store.get_dataset("ds-2")
            assert ds is not None and ds.size == 2
            assert await store.get_meta("sampleLoaded") == "ds-2"
            again, created = await store.create_job(make_job(7), ("key-2", "fp-2"))
            assert not created and again.id == "job-02"

    run(fill)
    run(check)


def test_an_empty_object_db_opens_and_stays_openable(tmp_path: Path) -> None:
    """A db.json holding {} opens as an empty store, and what is written to it opens again."""
    (tmp_path / "db.json").write_text("{}")

    async def write() -> None:
        async with open_store(tmp_path) as store:
            assert await store.list_jobs() == []
            await store.create_job(make_job(1))

    async def reopen() -> None:
        async with open_store(tmp_path) as store:
            assert [j.id for j in await store.list_jobs()] == ["job-01"]

    run(write)
    run(reopen)


# --- corruption -----------------------------------------------------------------------------


def _valid_db() -> bytes:
    return json.dumps(
        {
            "meta": {"schema": {"version": SCHEMA_VERSION}},
            "jobs": {"job-01": make_job(1).to_dict()},
        }
    ).encode()


CORRUPT = {
    "truncated": _valid_db()[: len(_valid_db()) // 2],
    "garbage": b"\x00\xffnot json at all",
    "list": b"[]",
    "null": b"null",
    "empty": b"",
    "string": b'"db"',
    "table-not-object": b'{"meta": {"schema": {"version": 1}}, "jobs": []}',
    "doc-not-object": b'{"meta": {"schema": {"version": 1}}, "jobs": {"job-01": 5}}',
    "schema-99": b'{"meta": {"schema": {"version": 99}}, "jobs": {}}',
    "schema-not-int": b'{"meta": {"schema": {"version": "1"}}, "jobs": {}}',
    "missing-version": b'{"jobs": {"job-01": {"id": "job-01"}}}',
    "schema-without-version": b'{"meta": {"schema": {}}, "jobs": {}}',
}


@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_corrupt_db_refuses_to_open_and_is_left_alone(tmp_path: Path, content: bytes) -> None:
    """An untrustworthy db.json stops open() with a StoreError naming it, and is left as it was."""
    db = tmp_path / "db.json"
    db.write_bytes(content)

    async def main() -> None:
        async with open_store(tmp_path):
            pass

    with pytest.raises(StoreError) as info:
        run(main)
    assert str(db) in info.value.message
    assert db.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts", "db.json", "mangwale.lock"]


def test_schema_too_new_says_upgrade(tmp_path: Path) -> None:
    """A store from a newer mangwale is refused with code too_new."""
    (tmp_path / "db.json").write_bytes(CORRUPT["schema-99"])

    async def main() -> None:
        async with open_store(tmp_path):
            pass

    with pytest.raises(StoreError) as info:
        run(main)
    assert info.value.code == "too_new" and "99" in info.value.message


# --- data dir ----------------------------------------------------------------------------------


def test_second_prepare_is_locked(tmp_path: Path) -> None:
    """A data dir in use refuses a second prepare() with code "locked"; unlock frees it."""
    first = DataDir(tmp_path)
    first.prepare()
    try:
        with pytest.raises(StoreError) as info:
            DataDir(tmp_path).prepare()
        assert info.value.code == "locked" and info.value.field == "data_dir"
        assert str(tmp_path) in info.value.message
    finally:
        first.unlock()
    second = DataDir(tmp_path)
    second.prepare()
    second.unlock()


def test_prepare_removes_stale_temp_files(tmp_path: Path) -> None:
    """Temp files a crash left behind (db.json.tmp-123) are removed; real files are kept."""
    (tmp_path / "db.json").write_bytes(b"{}")
    (tmp_path / "db.json.tmp-123").write_bytes(b'{"half": ')
    (tmp_path / "events.jsonl.tmp-9").write_bytes(b"x")
    dd = DataDir(tmp_path)
    dd.prepare()
    try:
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "artifacts",
            "db.json",
            "mangwale.lock",
        ]
        assert (tmp_path / "db.json").read_bytes() == b"{}"
    finally:
        dd.unlock()


def test_prepare_on_a_file_is_a_store_error(tmp_path: Path) -> None:
    """A data dir path that is a regular file is refused, naming it."""
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    with pytest.raises(StoreError) as info:
        DataDir(path).prepare()
    assert str(path) in info.value.message and info.value.field == "data_dir"


def disk_full(path: Path, data: bytes) -> None:
    """Stands in for atomic_write on a full disk."""
    raise OSError(28, "No space left on device")


def test_failed_disk_write_leaves_no_half_created_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the disk refuses the write, create_job raises Unavailable and keeps nothing."""

    async def main() -> None:
        async with open_store(tmp_path) as store:
            await store.create_job(make_job(1))
            before = (tmp_path / "db.json").read_bytes()
            real_write = tinydb_store.atomic_write
            monkeypatch.setattr(tinydb_store, "atomic_write", disk_full)

            with pytest.raises(Unavailable) as info:
                await store.create_job(make_job(2), ("key", "fp"))
            assert "No space left on device" in info.value.message
            assert await store.get_job("job-02") is None
            assert [j.id for j in await store.list_jobs()] == ["job-01"]
            assert sum((await store.count_jobs()).values()) == 1

            with pytest.raises(Unavailable):
                await store.create_dataset(make_dataset(1))
            assert await store.list_datasets() == []
            assert (tmp_path / "db.json").read_bytes() == before

            monkeypatch.setattr(tinydb_store, "atomic_write", real_write)
            # The key was not kept either: it may now be used with another request.
            _, created = await store.create_job(make_job(3), ("key", "other-fp"))
            assert created
            assert set(on_disk(tmp_path)["jobs"]) == {"job-01", "job-03"}

    run(main)


def test_failed_dataset_save_restores_the_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save_dataset the disk refuses raises Unavailable and memory keeps the previous version."""

    async def main() -> None:
        async with open_store(tmp_path) as store:
            await store.create_dataset(make_dataset(1))
            monkeypatch.setattr(tinydb_store, "atomic_write", disk_full)
            ds = make_dataset(1)
            ds.name = "new name"
            with pytest.raises(Unavailable):
                await store.save_dataset(ds)
            kept = await store.get_dataset("ds-1")
            assert kept is not None and kept.name == "data 1"
            monkeypatch.undo()

    run(main)
