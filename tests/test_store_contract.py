"""The Store contract: the same tests against every backend (TinyDB and Redis), then what only
a networked store can get wrong (Redis down, hung, busy or wiped; instances racing).

Redis tests use a private redis-server (tests/redisserver.py): one per module, with a key
prefix per test, or one per test when the test kills or pauses it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from redisserver import RedisServer

from mangwale_cli.errors import Conflict, StaleWrite, StoreError, Unavailable
from mangwale_cli.store import Store
from mangwale_cli.store.datadir import DataDir
from mangwale_cli.store.redis_store import RedisStore, redact
from mangwale_cli.store.tinydb_store import TinyDBStore
from mangwale_cli.wire import Dataset, Job, JobStatus

T = TypeVar("T")
TIMEOUT = 0.5  # the socket timeout Redis stores get here; "fast" means well under a second

Q, R, S, F, C = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED,
                 JobStatus.CANCELLED)  # fmt: skip


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(fn())  # type: ignore[arg-type]


def make_job(n: int, status: JobStatus = Q, created: int | None = None, attempt: int = 0) -> Job:
    t = 1_000 + n if created is None else created
    return Job(id=f"job-{n:02d}", kind="simulate", dataset_id=None, status=status, attempt=attempt,
               created_at=t, updated_at=t)  # fmt: skip


def make_dataset(n: int) -> Dataset:
    return Dataset(id=f"ds-{n}", name=f"data {n}", examples=[{"text": "hi", "intent": "greet"}] * n,
                   created_at=2_000 + n, updated_at=2_000 + n)  # fmt: skip


class Backend:
    """Opens stores of one kind on one shared place: a data dir, or a Redis and a key prefix."""

    def __init__(self, name: str, tmp_path: Path, server: RedisServer | None = None) -> None:
        self.name = name
        self.tmp_path = tmp_path
        self.server = server
        self.prefix = f"test-{uuid.uuid4().hex[:8]}:"  # tests sharing a module's Redis stay apart
        self.shared = server is not None

    @asynccontextmanager
    async def open(self, instance: int = 0) -> AsyncIterator[Store]:
        """A store; each instance has its own cache dir (Redis). TinyDB: one open at a time."""
        if self.server is None:
            datadir = DataDir(self.tmp_path / "data")
            datadir.prepare()
            store: Store = TinyDBStore(datadir, flush_interval=0.01)
        else:
            store = redis_store(self.server, self.tmp_path / f"cache{instance}", self.prefix)
        try:
            await store.open()
            yield store
        finally:
            await store.close()
            if self.server is None:
                datadir.unlock()


def redis_store(server: RedisServer, cache: Path, prefix: str = "mangwale:") -> RedisStore:
    return RedisStore(server.url, cache_dir=cache, prefix=prefix, socket_timeout=TIMEOUT,
                      connect_timeout=TIMEOUT, health_check_interval=0.1)  # fmt: skip


@pytest.fixture(params=["tinydb", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    server = request.getfixturevalue("redis_server_module") if request.param == "redis" else None
    return Backend(request.param, tmp_path, server)


def ids(jobs: list[Job]) -> list[str]:
    return [j.id for j in jobs]


# --- jobs -------------------------------------------------------------------------------------


def test_job_create_get_save_delete(backend: Backend) -> None:
    """A job round-trips through create, get, save and delete; deleting twice is harmless."""

    async def main() -> None:
        async with backend.open() as store:
            job = make_job(1)
            job.params, job.metrics = {"steps": 3, "nested": {"a": [1, 2.5]}}, {"loss": 0.25}
            assert await store.create_job(job) == (job, True)
            assert await store.get_job(job.id) == job
            job.status, job.progress, job.message = R, 42.5, "half é"
            await store.save_job(job)
            assert await store.get_job(job.id) == job
            assert await store.count_jobs() == {"queued": 0, "running": 1, "succeeded": 0, "failed": 0,
                                                "cancelled": 0}  # fmt: skip
            await store.delete_job(job.id)
            assert await store.get_job(job.id) is None
            await store.delete_job(job.id)
            assert await store.list_jobs() == [] and sum((await store.count_jobs()).values()) == 0
            assert await store.get_job("job-nope") is None

    run(main)


def test_list_jobs_order_filter_limit_and_cursor(backend: Backend) -> None:
    """list_jobs is newest first, filters by status, honours limit and pages with ``before``."""

    async def main() -> None:
        async with backend.open() as store:
            for n, status in enumerate([S, R, Q, F, S], start=1):
                await store.create_job(make_job(n, status))
            assert ids(await store.list_jobs()) == ["job-05", "job-04", "job-03", "job-02", "job-01"]
            assert ids(await store.list_jobs(statuses=[S])) == ["job-05", "job-01"]
            assert ids(await store.list_jobs(statuses={Q, R})) == ["job-03", "job-02"]
            assert ids(await store.list_jobs(statuses=[C])) == []
            assert ids(await store.list_jobs(limit=2)) == ["job-05", "job-04"]
            assert ids(await store.list_jobs(before="job-04")) == ["job-03", "job-02", "job-01"]
            assert ids(await store.list_jobs(before="job-04", limit=1)) == ["job-03"]
            assert ids(await store.list_jobs(before="job-05", statuses=[S])) == ["job-01"]
            assert ids(await store.list_jobs(statuses=[S, F], limit=2)) == ["job-05", "job-04"]
            assert await store.list_jobs(before="job-01") == []
            assert await store.list_jobs(before="job-nope") == []
            assert await store.count_jobs() == {"queued": 1, "running": 1, "succeeded": 2, "failed": 1,
                                                "cancelled": 0}  # fmt: skip
            job = make_job(2, R)
            job.status = S  # a status change moves the job between filters and counts
            await store.save_job(job)
            assert ids(await store.list_jobs(statuses=[S])) == ["job-05", "job-02", "job-01"]
            assert ids(await store.list_jobs(statuses=[R])) == []
            assert (await store.count_jobs())["succeeded"] == 3

    run(main)


def test_list_jobs_same_millisecond_pages_through_all(backend: Backend) -> None:
    """Jobs created in the same ms order by id, and the cursor pages through every one of them."""

    async def main() -> None:
        async with backend.open() as store:
            for n in range(1, 8):
                await store.create_job(make_job(n, created=5_000))
            seen: list[str] = []
            before = None
            while page := await store.list_jobs(limit=3, before=before):
                seen += ids(page)
                before = page[-1].id
            assert seen == [f"job-{n:02d}" for n in range(7, 0, -1)]

    run(main)


def test_idempotency_key(backend: Backend) -> None:
    """A key seen before returns its job and False; another fingerprint is a Conflict; deleting
    the job frees the key."""

    async def main() -> None:
        async with backend.open() as store:
            first, created = await store.create_job(make_job(1), ("key-1", "fp-a"))
            assert created
            again, created = await store.create_job(make_job(2), ("key-1", "fp-a"))
            assert not created and again == first
            assert await store.get_job("job-02") is None
            with pytest.raises(Conflict) as info:
                await store.create_job(make_job(3), ("key-1", "fp-b"))
            assert info.value.field == "Idempotency-Key" and info.value.code == "idempotency_mismatch"
            assert await store.get_job("job-03") is None
            await store.delete_job(first.id)
            _, created = await store.create_job(make_job(4), ("key-1", "fp-b"))
            assert created
            assert ids(await store.list_jobs()) == ["job-04"]

    run(main)


# --- guarded saves ------------------------------------------------------------------------------

GUARD_CASES = [
    # stored (status, attempt), new (status, attempt), refused
    ((Q, 0), (R, 1), False),  # a worker starts attempt 1
    ((R, 1), (R, 1), False),  # progress
    ((R, 1), (S, 1), False),
    ((R, 1), (Q, 1), False),  # re-queued by a stopping instance
    ((Q, 1), (R, 2), False),  # the retry
    ((S, 1), (C, 1), False),  # terminal to terminal: not this rule's business
    ((R, 2), (R, 1), True),   # (a) a stale instance still reporting attempt 1
    ((R, 2), (F, 1), True),   # (a) ... or finishing it
    ((C, 1), (R, 1), True),   # (b) a cancelled job brought back by a late progress write
    ((S, 1), (Q, 1), True),   # (b)
    ((F, 1), (R, 2), True),   # (b) and (c): a finished job cannot start again
    ((C, 0), (C, 1), True),   # (c) a higher attempt over a finished job
]  # fmt: skip


@pytest.mark.parametrize(("stored", "new", "refused"), GUARD_CASES)
def test_guarded_save(backend: Backend, stored: tuple[JobStatus, int], new: tuple[JobStatus, int],
                      refused: bool) -> None:  # fmt: skip
    """save_job refuses a lower attempt, reviving a terminal job, or a new attempt of a finished
    one with StaleWrite carrying the stored state, and leaves the stored job as it was."""

    async def main() -> None:
        async with backend.open() as store:
            await store.create_job(make_job(1, stored[0], attempt=stored[1]))
            job = make_job(1, new[0], attempt=new[1])
            job.message = "the new write"
            if not refused:
                await store.save_job(job, durable=True)
                assert await store.get_job(job.id) == job
                return
            with pytest.raises(StaleWrite) as info:
                await store.save_job(job, durable=True)
            err = info.value
            assert isinstance(err, Conflict) and err.status == 409 and err.code == "stale"
            assert (err.stored_status, err.stored_attempt) == (stored[0].value, stored[1])
            assert job.id in err.message
            kept = await store.get_job(job.id)
            assert kept is not None and (kept.status, kept.attempt, kept.message) == (*stored, None)
            assert ids(await store.list_jobs(statuses=[stored[0]])) == [job.id]

    run(main)


@pytest.mark.parametrize(("stored", "previous", "started"), [
    ((Q, 0), 0, True),    # the first attempt
    ((R, 1), 1, True),    # taking over attempt 1 of a job whose instance died
    ((R, 2), 1, False),   # another instance started attempt 2 first
    ((Q, 1), 0, False),   # re-queued after attempt 1: the caller read an older copy
    ((C, 0), 0, False),   # cancelled while the caller got ready
])  # fmt: skip
def test_begin_attempt_is_a_compare_and_set(backend: Backend, stored: tuple[JobStatus, int], previous: int,
                                            started: bool) -> None:  # fmt: skip
    """begin_attempt writes the running job only while the stored attempt is still the one read
    and the job is queued or running; otherwise it writes nothing and says so."""

    async def main() -> None:
        async with backend.open() as store:
            await store.create_job(make_job(1, stored[0], attempt=stored[1]))
            job = make_job(1, R, attempt=previous + 1)
            assert await store.begin_attempt(job, previous) is started
            kept = await store.get_job(job.id)
            assert kept is not None
            assert (kept.status, kept.attempt) == ((R, previous + 1) if started else stored)
            assert await store.begin_attempt(make_job(2, R, attempt=1), 0) is False  # no such job

    run(main)


def test_redis_created_job_is_queued_in_the_same_step(redis_server_module: RedisServer, tmp_path: Path) -> None:
    """In Redis, create_job also adds the job's queue entry (and a replayed key adds none)."""

    async def main() -> None:
        backend = Backend("redis", tmp_path, redis_server_module)
        async with backend.open() as store:
            await store.create_job(make_job(1), ("key-1", "fp"))
            await store.create_job(make_job(2), ("key-1", "fp"))
            await store.create_job(make_job(3))
            r = redis.Redis.from_url(redis_server_module.url)
            entries = r.xrange(backend.prefix + "queue")
            assert [f[b"job"] for _id, f in entries] == [b"job-01", b"job-03"]

    run(main)


# --- datasets and metadata -----------------------------------------------------------------------


def test_dataset_create_get_save_delete_list(backend: Backend) -> None:
    """Datasets round-trip and list oldest first."""

    async def main() -> None:
        async with backend.open() as store:
            for n in (3, 1, 2):
                await store.create_dataset(make_dataset(n))
            assert [d.id for d in await store.list_datasets()] == ["ds-1", "ds-2", "ds-3"]
            ds = await store.get_dataset("ds-2")
            assert ds == make_dataset(2)
            assert ds is not None
            ds.name, ds.examples = "renamed", []
            await store.save_dataset(ds)
            assert await store.get_dataset("ds-2") == ds
            await store.delete_dataset("ds-2")
            await store.delete_dataset("ds-2")
            assert await store.get_dataset("ds-2") is None
            assert [d.id for d in await store.list_datasets()] == ["ds-1", "ds-3"]
            assert await store.get_dataset("ds-nope") is None

    run(main)


def test_meta_get_set_and_claim(backend: Backend) -> None:
    """Meta values round-trip as JSON; claim_meta sets only an absent key and says if it did."""

    async def main() -> None:
        async with backend.open() as store:
            assert await store.get_meta("nope") is None
            await store.set_meta("seqCeiling", 10_000)
            await store.set_meta("doc", {"a": [1, "b"], "c": None})
            assert await store.get_meta("seqCeiling") == 10_000
            assert await store.get_meta("doc") == {"a": [1, "b"], "c": None}
            assert await store.claim_meta("sampleLoaded", "ds-1") is True
            assert await store.claim_meta("sampleLoaded", "ds-2") is False
            assert await store.get_meta("sampleLoaded") == "ds-1"
            assert await store.claim_meta("seqCeiling", 1) is False
            assert await store.get_meta("seqCeiling") == 10_000

    run(main)


# --- lines and artifacts -------------------------------------------------------------------------


def test_job_lines_append_and_read(backend: Backend) -> None:
    """Lines come back in append order, per job and per name; nothing yet is an empty list."""

    async def main() -> None:
        async with backend.open() as store:
            assert await store.read_job_lines("job-01", "logs") == []
            await store.append_job_lines("job-01", "logs", [{"lineNo": 1, "line": "a"}])
            await store.append_job_lines("job-01", "logs", [])
            await store.append_job_lines("job-01", "logs", [{"lineNo": 2, "line": "b"}, {"lineNo": 3}])
            await store.append_job_lines("job-01", "metrics", [{"loss": 0.5}])
            await store.append_job_lines("job-02", "logs", [{"lineNo": 1, "line": "other"}])
            assert await store.read_job_lines("job-01", "logs") == [
                {"lineNo": 1, "line": "a"}, {"lineNo": 2, "line": "b"}, {"lineNo": 3}]  # fmt: skip
            assert await store.read_job_lines("job-01", "metrics") == [{"loss": 0.5}]
            assert await store.read_job_lines("job-02", "logs") == [{"lineNo": 1, "line": "other"}]
            await store.delete_artifacts("job-01")
            assert await store.read_job_lines("job-01", "logs") == []
            assert await store.read_job_lines("job-01", "metrics") == []
            assert len(await store.read_job_lines("job-02", "logs")) == 1

    run(main)


def test_tinydb_job_lines_skip_a_torn_last_line(tmp_path: Path) -> None:
    """TinyDB: a line cut short by a crash is skipped, the lines before it are kept."""

    async def main() -> None:
        async with Backend("tinydb", tmp_path).open() as store:
            await store.append_job_lines("job-01", "logs", [{"lineNo": 1}, {"lineNo": 2}])
            path = store.artifact_dir("job-01") / "logs.jsonl"
            path.write_bytes(path.read_bytes() + b'{"lineNo": 3, "li')
            assert await store.read_job_lines("job-01", "logs") == [{"lineNo": 1}, {"lineNo": 2}]

    run(main)


MODEL = {"model.joblib": bytes(range(256)) * 4096, "sub/vocab.txt": "ünïcode\n".encode()}


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def read_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".")}  # fmt: skip


def test_artifacts_published_are_loaded_by_another_instance(backend: Backend) -> None:
    """save_artifacts then load_artifacts on another instance (TinyDB: the same one) gives the
    same bytes, without logs and metrics; a republished set replaces a stale cache."""

    async def main() -> None:
        async with AsyncExitStack() as stack:
            writer = await stack.enter_async_context(backend.open(0))
            reader = await stack.enter_async_context(backend.open(1)) if backend.shared else writer
            local = writer.artifact_dir("job-01")
            write_files(local, MODEL)
            await writer.append_job_lines("job-01", "logs", [{"lineNo": 1}])
            await writer.save_artifacts("job-01")
            got = await reader.load_artifacts("job-01")
            assert got == reader.artifact_dir("job-01")
            assert read_files(got) == (MODEL if backend.shared else {**MODEL, "logs.jsonl": b'{"lineNo":1}\n'})
            assert await reader.load_artifacts("job-01") == got  # cached: still the same files

            write_files(local, {"model.joblib": b"retrained"})
            await writer.save_artifacts("job-01")
            assert read_files(await reader.load_artifacts("job-01"))["model.joblib"] == b"retrained"

            await writer.delete_artifacts("job-01")
            assert not local.exists()
            assert not (await writer.load_artifacts("job-01")).exists()

    run(main)


def test_a_second_instance_sees_durable_writes(backend: Backend) -> None:
    """What one store wrote durably, another store on the same backend reads (Redis: while
    the first is still open; TinyDB: after it closed)."""

    async def main() -> None:
        async with AsyncExitStack() as stack:
            first = await stack.enter_async_context(backend.open(0))
            job = make_job(1)
            await first.create_job(job, ("key", "fp"))
            job.status, job.attempt = R, 1
            await first.save_job(job, durable=True)
            await first.create_dataset(make_dataset(1))
            await first.set_meta("sampleLoaded", "ds-1")
            if not backend.shared:
                await stack.aclose()
            second = await stack.enter_async_context(backend.open(1))
            assert await second.get_job(job.id) == job
            assert ids(await second.list_jobs(statuses=[R])) == [job.id]
            assert [d.id for d in await second.list_datasets()] == ["ds-1"]
            assert await second.get_meta("sampleLoaded") == "ds-1"
            again, created = await second.create_job(make_job(2), ("key", "fp"))
            assert (again, created) == (job, False)

    run(main)


# --- Redis only ----------------------------------------------------------------------------------


def assert_unavailable(err: Unavailable, server: RedisServer, started: float) -> None:
    assert type(err) is Unavailable and err.code == "store_unavailable" and err.status == 503
    assert f"redis at {server.url} " in err.message
    assert time.monotonic() - started < TIMEOUT * 1.8, "did not fail fast"


def test_redis_down_is_unavailable_fast_and_recovers_after_restart(redis_server: RedisServer, tmp_path: Path) -> None:
    """With Redis killed every call raises Unavailable (503, store_unavailable) quickly; after a
    restart that lost the data the same store works again and re-stamps the schema version."""

    async def main() -> None:
        store = redis_store(redis_server, tmp_path / "cache")
        await store.open()
        try:
            await store.create_job(make_job(1))
            redis_server.kill()
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: store.get_job("job-01"),
                lambda: store.create_job(make_job(2)),
                lambda: store.save_job(make_job(1)),
                lambda: store.list_jobs(statuses=[Q]),
                lambda: store.count_jobs(),
                lambda: store.list_datasets(),
                lambda: store.set_meta("k", 1),
                lambda: store.claim_meta("k", 1),
                lambda: store.append_job_lines("job-01", "logs", [{"a": 1}]),
                lambda: store.load_artifacts("job-01"),
            ]
            for call in calls:
                started = time.monotonic()
                with pytest.raises(Unavailable) as info:
                    await call()
                assert_unavailable(info.value, redis_server, started)
                assert "unreachable: Connection refused" in info.value.message

            redis_server.restart(wipe=True)
            assert await store.get_job("job-01") is None  # the data went with the old Redis
            await store.create_job(make_job(3))
            assert ids(await store.list_jobs()) == ["job-03"]
            raw = redis.Redis.from_url(redis_server.url).hget("mangwale:meta", "schema")
            assert raw == b"1"
        finally:
            await store.close()

    run(main)


def test_redis_hung_times_out_as_unavailable(redis_server: RedisServer, tmp_path: Path) -> None:
    """A Redis that accepts but never answers (SIGSTOP) costs one socket timeout, then 503."""

    async def main() -> None:
        store = redis_store(redis_server, tmp_path / "cache")
        await store.open()
        try:
            await store.create_job(make_job(1))
            redis_server.pause()
            started = time.monotonic()
            with pytest.raises(Unavailable) as info:
                await store.get_job("job-01")
            assert_unavailable(info.value, redis_server, started)
            assert "did not answer in time" in info.value.message
            redis_server.resume()
            assert await store.get_job("job-01") == make_job(1)
        finally:
            redis_server.resume()
            await store.close()

    run(main)


def test_redis_busy_with_a_script_is_unavailable(redis_server: RedisServer, tmp_path: Path) -> None:
    """A Redis stuck in a long script answers BUSY: that is a 503 too, not a raw redis error."""
    admin = redis.Redis.from_url(redis_server.url)
    admin.config_set("busy-reply-threshold", 10)  # ms before Redis answers others with BUSY
    looping = threading.Thread(target=lambda: _ignore(admin.eval, "while true do end", 0), daemon=True)

    async def main() -> None:
        store = redis_store(redis_server, tmp_path / "cache")
        await store.open()
        try:
            looping.start()
            with pytest.raises(Unavailable) as info:
                for _ in range(200):  # until the script has run past the threshold
                    await store.get_job("job-01")
                    await asyncio.sleep(0.005)
            assert "refused the command: BUSY" in info.value.message
        finally:
            redis.Redis.from_url(redis_server.url).script_kill()
            looping.join(5)
            assert await store.get_job("job-01") is None
            await store.close()

    run(main)


def _ignore(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except redis.RedisError:
        pass  # SCRIPT KILL ends the script with an error


def test_redis_open_against_a_dead_redis_is_a_clear_store_error(tmp_path: Path, redis_server: RedisServer) -> None:
    """open() with Redis down raises StoreError naming the URL but not its password."""
    redis_server.kill()
    url = redis_server.url.replace("//", "//mangwale:s3cret@")

    async def main() -> None:
        store = RedisStore(url, cache_dir=tmp_path / "cache", connect_timeout=TIMEOUT)
        await store.open()

    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        run(main)
    assert time.monotonic() - started < TIMEOUT * 1.8
    assert info.value.message == (
        f"cannot open the store: redis at {redact(url)} is unreachable: Connection refused"
    )
    assert "s3cret" not in info.value.message and "mangwale@127.0.0.1" in info.value.message


def test_redis_schema_too_new_is_refused(redis_server_module: RedisServer, tmp_path: Path) -> None:
    """A Redis written by a newer mangwale is refused at open with code too_new."""
    redis.Redis.from_url(redis_server_module.url).hset("newer:meta", "schema", "99")

    async def main() -> None:
        await redis_store(redis_server_module, tmp_path, "newer:").open()

    with pytest.raises(StoreError) as info:
        run(main)
    assert info.value.code == "too_new" and "99" in info.value.message


def test_redis_instances_racing_claim_meta_one_wins(redis_server_module: RedisServer, tmp_path: Path) -> None:
    """Two stores claiming one key at once: exactly one call gets True."""
    prefix = f"race-{uuid.uuid4().hex[:8]}:"

    async def main() -> None:
        stores = [redis_store(redis_server_module, tmp_path / f"c{i}", prefix) for i in range(2)]
        for s in stores:
            await s.open()
        try:
            for round_ in range(20):
                key = f"sample-{round_}"
                won = await asyncio.gather(*(s.claim_meta(key, i) for i in range(5) for s in stores))
                assert won.count(True) == 1, won
        finally:
            for s in stores:
                await s.close()

    run(main)


def test_redis_delete_job_removes_its_lines_and_published_files(redis_server_module: RedisServer,
                                                                tmp_path: Path) -> None:  # fmt: skip
    """Deleting a job in Redis also deletes its logs, metrics and published artifacts."""

    async def main() -> None:
        backend = Backend("redis", tmp_path, redis_server_module)
        async with backend.open(0) as store, backend.open(1) as other:
            await store.create_job(make_job(1, S, attempt=1))
            await store.append_job_lines("job-01", "logs", [{"lineNo": 1}])
            await store.append_job_lines("job-01", "metrics", [{"loss": 1}])
            write_files(store.artifact_dir("job-01"), MODEL)
            await store.save_artifacts("job-01")
            await store.delete_job("job-01")
            assert await other.read_job_lines("job-01", "logs") == []
            assert await other.read_job_lines("job-01", "metrics") == []
            assert not (await other.load_artifacts("job-01")).exists()
            left = redis.Redis.from_url(redis_server_module.url).keys(backend.prefix + "*")
            # The queue stream stays: the runner removes a job's entry when the job ends.
            assert sorted(left) == [(backend.prefix + "meta").encode(), (backend.prefix + "queue").encode()]

    run(main)


def test_redact_drops_only_the_password() -> None:
    """Messages name the Redis URL without its password."""
    assert redact("redis://u:pw@h:6390/2") == "redis://u@h:6390/2"
    assert redact("redis://:pw@h/0") == "redis://h/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"
