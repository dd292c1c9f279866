"""The Store contract: the same tests against every backend (TinyDB and Redis), then what only
a networked store can get wrong (Redis down, hung, busy, wiped or of an older schema; replies
lost; instances racing).

Every write is checked with the event it logs (``events_after``): a state change and its event
are one unit on both stores. Redis tests use a private redis-server (tests/redisserver.py): one
per module, with a key prefix per test, or one per test when the test kills or pauses it.
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
from netproxy import NetProxy, netproxy  # noqa: F401 - pytest fixtures, used by name
from redisserver import RedisServer

from mangwale_cli import wire
from mangwale_cli.errors import Conflict, StaleWrite, StoreError, Unavailable
from mangwale_cli.store import Store
from mangwale_cli.store.base import SCHEMA_VERSION, Cursor, Expect, can_begin, refusal, stale_write
from mangwale_cli.store.datadir import DataDir
from mangwale_cli.store.redis_store import RedisStore, redact
from mangwale_cli.store.tinydb_store import TinyDBStore
from mangwale_cli.wire import Dataset, Job, JobStatus

T = TypeVar("T")
TIMEOUT = 0.5  # the socket timeout Redis stores get here; "fast" means well under a second
LEASE = 0.3  # seconds, for the tests that wait for a lease to run out

Q, R, S, F, C = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED,
                 JobStatus.CANCELLED)  # fmt: skip


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(fn())  # type: ignore[arg-type]  # asyncio.run takes a coroutine; Awaitable is what the lambdas give


def make_job(n: int, status: JobStatus = Q, created: int | None = None, attempt: int = 0) -> Job:
    t = 1_000 + n if created is None else created
    return Job(id=f"job-{n:02d}", kind="simulate", dataset_id=None, status=status, attempt=attempt,
               created_at=t, updated_at=t)  # fmt: skip


def make_dataset(n: int) -> Dataset:
    return Dataset(id=f"ds-{n}", name=f"data {n}", examples=[{"text": "hi", "intent": "greet"}] * n,
                   created_at=2_000 + n, updated_at=2_000 + n)  # fmt: skip


def running(job: Job, holder: str = "A") -> Job:
    """The job as a runner starting its next attempt writes it (with the lease it takes)."""
    out = Job.from_dict(job.to_dict())
    out.status, out.attempt = R, job.attempt + 1
    out.lease = {"holder": holder, "token": out.attempt}
    return out


def update(job: Job) -> dict[str, Any]:
    return wire.training_update(job)


class Backend:
    """Opens stores of one kind on one shared place: a data dir, or a Redis and a key prefix."""

    def __init__(self, name: str, tmp_path: Path, server: RedisServer | None = None) -> None:
        self.name = name
        self.tmp_path = tmp_path
        self.server = server
        self.prefix = f"test-{uuid.uuid4().hex[:8]}:"  # tests sharing a module's Redis stay apart
        self.shared = server is not None

    @asynccontextmanager
    async def open(self, instance: int = 0, **options: Any) -> AsyncIterator[Store]:
        """A store; each instance has its own cache dir (Redis). TinyDB: one open at a time.
        ``options``: ``lease``, ``idempotency_ttl``."""
        if self.server is None:
            datadir = DataDir(self.tmp_path / "data")
            datadir.prepare()
            store: Store = TinyDBStore(datadir, **options)
        else:
            store = redis_store(self.server, self.tmp_path / f"cache{instance}", self.prefix, **options)
        try:
            await store.open()
            yield store
        finally:
            await store.close()
            if self.server is None:
                datadir.unlock()


def redis_store(server: RedisServer, cache: Path, prefix: str = "mangwale:", url: str | None = None,
                **options: Any) -> RedisStore:  # fmt: skip
    settings: dict[str, Any] = {"socket_timeout": TIMEOUT, "connect_timeout": TIMEOUT, "health_check_interval": 0.1}
    return RedisStore(url or server.url, cache_dir=cache, prefix=prefix, **{**settings, **options})


@pytest.fixture(params=["tinydb", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    server = request.getfixturevalue("redis_server_module") if request.param == "redis" else None
    return Backend(request.param, tmp_path, server)


def ids(jobs: list[Job]) -> list[str]:
    return [j.id for j in jobs]


async def head(store: Store) -> int:
    events = await store.events_after(0)
    return int(events[-1]["seq"]) if events else 0


async def wait_until(cond: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# --- jobs -------------------------------------------------------------------------------------


def test_job_create_get_write_delete(backend: Backend) -> None:
    """A job round-trips through create, get, write and delete, its document exactly as written
    (floats, empty lists and objects included); deleting twice is harmless."""

    async def main() -> None:
        async with backend.open() as store:
            job = make_job(1)
            job.params = {"steps": 3, "lr": 0.1, "tiny": 1e-07, "third": 1 / 3, "empty": [], "none": {},
                          "nested": {"a": [1, 2.5, []]}}  # fmt: skip
            created, fresh = await store.create_job(job)
            assert fresh and created.job_seq == 1 and created == job
            assert await store.get_job(job.id) == created
            job.status, job.attempt, job.progress, job.message = R, 1, 42.5, "half é"
            job.metrics = {"loss": 0.30000000000000004, "curve": []}
            stored = await store.write_job(job, update(job))
            assert stored.job_seq == 2 and stored == job
            assert await store.get_job(job.id) == stored
            assert await store.count_jobs() == {"queued": 0, "running": 1, "succeeded": 0, "failed": 0,
                                                "cancelled": 0}  # fmt: skip
            job.status = S
            await store.write_job(job, update(job), durable=True)
            assert await store.delete_jobs([job.id]) == [job.id]
            assert await store.get_job(job.id) is None
            assert await store.delete_jobs([job.id]) == []
            assert await store.list_jobs() == [] and sum((await store.count_jobs()).values()) == 0
            assert await store.get_job("job-nope") is None

    run(main)


def test_list_jobs_order_filter_limit_and_cursor(backend: Backend) -> None:
    """list_jobs is newest first, filters by status, honours limit and pages after a cursor."""

    async def main() -> None:
        async with backend.open() as store:
            for n, status in enumerate([S, R, Q, F, S], start=1):
                await store.create_job(make_job(n, status))
            assert ids(await store.list_jobs()) == ["job-05", "job-04", "job-03", "job-02", "job-01"]
            assert ids(await store.list_jobs(statuses=[S])) == ["job-05", "job-01"]
            assert ids(await store.list_jobs(statuses={Q, R})) == ["job-03", "job-02"]
            assert ids(await store.list_jobs(statuses=[C])) == []
            assert ids(await store.list_jobs(limit=2)) == ["job-05", "job-04"]
            assert await store.list_jobs(limit=0) == []
            at4 = Cursor(1004, "job-04")
            assert ids(await store.list_jobs(after=at4)) == ["job-03", "job-02", "job-01"]
            assert ids(await store.list_jobs(after=at4, limit=1)) == ["job-03"]
            assert ids(await store.list_jobs(after=Cursor(1005, "job-05"), statuses=[S])) == ["job-01"]
            assert ids(await store.list_jobs(statuses=[S, F], limit=2)) == ["job-05", "job-04"]
            assert ids(await store.list_jobs(statuses=[S, F, Q], after=at4, limit=2)) == ["job-03", "job-01"]
            assert await store.list_jobs(after=Cursor(1001, "job-01")) == []
            assert ids(await store.list_jobs(after=Cursor(99_999, "z"))) == ids(await store.list_jobs())
            assert await store.count_jobs() == {"queued": 1, "running": 1, "succeeded": 2, "failed": 1,
                                                "cancelled": 0}  # fmt: skip
            job = make_job(2, R)
            job.status = S  # a status change moves the job between filters and counts
            await store.write_job(job, update(job))
            assert ids(await store.list_jobs(statuses=[S])) == ["job-05", "job-02", "job-01"]
            assert ids(await store.list_jobs(statuses=[R])) == []
            assert (await store.count_jobs())["succeeded"] == 3

    run(main)


def test_list_jobs_same_millisecond_pages_through_all(backend: Backend) -> None:
    """Jobs created in the same ms order by id, and the cursor pages through every one of them,
    with and without a status filter."""

    async def main() -> None:
        async with backend.open() as store:
            for n in range(1, 8):
                await store.create_job(make_job(n, S if n % 2 else Q, created=5_000))
            for statuses, want in ((None, range(7, 0, -1)), ([S], range(7, 0, -2)), ([S, Q], range(7, 0, -1))):
                seen: list[str] = []
                after = None
                while page := await store.list_jobs(limit=3, after=after, statuses=statuses):
                    seen += ids(page)
                    after = Cursor(page[-1].created_at, page[-1].id)
                assert seen == [f"job-{n:02d}" for n in want], statuses

    run(main)


def test_a_cursor_keeps_working_when_its_job_is_deleted(backend: Backend) -> None:
    """A page's last job deleted (pruned) before the next page is asked for: paging goes on
    from its position, skipping nothing and repeating nothing."""

    async def main() -> None:
        async with backend.open() as store:
            for n in range(1, 9):
                await store.create_job(make_job(n, S, created=1_000 + n // 2))  # pairs share a ms
            first = await store.list_jobs(limit=3)
            assert ids(first) == ["job-08", "job-07", "job-06"]
            cursor = Cursor(first[-1].created_at, first[-1].id)
            assert await store.delete_jobs(["job-06", "job-07"]) == ["job-06", "job-07"]
            assert ids(await store.list_jobs(limit=3, after=cursor)) == ["job-05", "job-04", "job-03"]
            assert ids(await store.list_jobs(after=cursor, statuses=[S])) == ["job-05", "job-04", "job-03",
                                                                              "job-02", "job-01"]  # fmt: skip

    run(main)


def test_idempotency_key(backend: Backend) -> None:
    """A key seen before returns its job and False; another fingerprint is a Conflict. The key
    outlives its job: deleted, the same request creates it anew, another is still a Conflict."""

    async def main() -> None:
        async with backend.open() as store:
            first, created = await store.create_job(make_job(1), ("key-1", "fp-a"))
            assert created
            seq = await head(store)
            again, created = await store.create_job(make_job(2), ("key-1", "fp-a"))
            assert not created and again == first
            assert await store.get_job("job-02") is None
            with pytest.raises(Conflict) as info:
                await store.create_job(make_job(3), ("key-1", "fp-b"))
            assert info.value.field == "Idempotency-Key" and info.value.code == "idempotency_mismatch"
            assert await store.get_job("job-03") is None
            assert await store.events_after(seq) == []  # a replay logs nothing
            done = make_job(1, S)
            await store.write_job(done, update(done))
            await store.delete_jobs([first.id])
            with pytest.raises(Conflict):
                await store.create_job(make_job(4), ("key-1", "fp-b"))
            _, created = await store.create_job(make_job(5), ("key-1", "fp-a"))
            assert created
            again, created = await store.create_job(make_job(6), ("key-1", "fp-a"))
            assert not created and again.id == "job-05"
            assert ids(await store.list_jobs()) == ["job-05"]

    run(main)


def test_idempotency_keys_expire(backend: Backend) -> None:
    """An Idempotency-Key is remembered for the store's TTL, then the same key creates anew."""
    ttl = 0.5

    async def main() -> None:
        async with backend.open(idempotency_ttl=ttl) as store:
            t0 = time.monotonic()
            await store.create_job(make_job(1), ("key-1", "fp"))
            _, created = await store.create_job(make_job(2), ("key-1", "fp"))
            assert not created
            assert time.monotonic() - t0 < ttl, "too slow to tell"
            await asyncio.sleep(ttl - (time.monotonic() - t0) + 0.05)  # the TTL itself must pass
            again, created = await store.create_job(make_job(3), ("key-1", "other"))
            assert created and again.id == "job-03"

    run(main)


# --- the guard --------------------------------------------------------------------------------

GUARD_CASES = [
    # stored (status, attempt), new (status, attempt), refused
    ((Q, 0), (R, 1), False),  # a worker starts attempt 1
    ((R, 1), (R, 1), False),  # progress
    ((R, 1), (S, 1), False),
    ((R, 1), (Q, 1), False),  # re-queued by a stopping instance
    ((Q, 1), (R, 2), False),  # the retry
    ((Q, 0), (C, 0), False),  # cancelled before it started
    ((S, 1), (C, 1), True),   # terminal to terminal: a job has one terminal update
    ((S, 1), (S, 1), True),   # ... even the same one again
    ((R, 2), (R, 1), True),   # a stale instance still reporting attempt 1
    ((R, 2), (F, 1), True),   # ... or finishing it
    ((C, 1), (R, 1), True),   # a cancelled job brought back by a late progress write
    ((S, 1), (Q, 1), True),
    ((F, 1), (R, 2), True),   # a finished job cannot start again
    ((C, 0), (C, 1), True),
]  # fmt: skip


@pytest.mark.parametrize(("stored", "new", "refused"), GUARD_CASES)
def test_refusal_rules(stored: tuple[JobStatus, int], new: tuple[JobStatus, int], refused: bool) -> None:
    """The guard both stores apply (base.refusal), without a store."""
    doc = {"status": stored[0].value, "attempt": stored[1], "lease": None}
    assert (refusal(doc, new[0].value, new[1], None, False) is not None) is refused
    assert refusal(None, new[0].value, new[1], None, False) == "the job does not exist"


@pytest.mark.parametrize(("stored", "new", "refused"), GUARD_CASES)
def test_guarded_write(backend: Backend, stored: tuple[JobStatus, int], new: tuple[JobStatus, int],
                       refused: bool) -> None:  # fmt: skip
    """write_job refuses what base.refusal refuses, with the same reason, StaleWrite carrying the
    stored state; a refused write leaves the job as it was and logs nothing."""

    async def main() -> None:
        async with backend.open() as store:
            await store.create_job(make_job(1, stored[0], attempt=stored[1]))
            seq = await head(store)
            job = make_job(1, new[0], attempt=new[1])
            job.message = "the new write"
            if not refused:
                assert await store.write_job(job, update(job), durable=True) == job
                assert await store.get_job(job.id) == job and job.job_seq == 2
                assert [e["status"] for e in await store.events_after(seq)] == [new[0].value]
                return
            with pytest.raises(StaleWrite) as info:
                await store.write_job(job, update(job), durable=True)
            err = info.value
            assert isinstance(err, Conflict) and err.status == 409 and err.code == "stale"
            assert (err.stored_status, err.stored_attempt) == (stored[0].value, stored[1])
            doc = {"status": stored[0].value, "attempt": stored[1]}
            reason = refusal(doc, new[0].value, new[1], None, False)
            assert reason is not None
            assert err.message == stale_write(job.id, new[0].value, new[1], reason, doc).message
            kept = await store.get_job(job.id)
            assert kept is not None and (kept.status, kept.attempt, kept.message, kept.job_seq) == (*stored, None, 1)
            assert ids(await store.list_jobs(statuses=[stored[0]])) == [job.id]
            assert await store.events_after(seq) == []

    run(main)


def test_write_of_a_missing_job_is_refused(backend: Backend) -> None:
    """A write to a job that does not exist (deleted) is refused and creates nothing."""

    async def main() -> None:
        async with backend.open() as store:
            job = make_job(1, R, attempt=1)
            with pytest.raises(StaleWrite) as info:
                await store.write_job(job, update(job))
            assert info.value.stored_status == "deleted" and "the job does not exist" in info.value.message
            assert await store.get_job(job.id) is None and await store.events_after(0) == []

    run(main)


def test_expect_attempt_and_statuses(backend: Backend) -> None:
    """Expect(attempt=, statuses=) are checked against the stored job, atomically."""

    async def main() -> None:
        async with backend.open() as store:
            await store.create_job(make_job(1, Q, attempt=1))
            job = make_job(1, C, attempt=1)
            for expect, reason in ((Expect(attempt=2), "it is at attempt 1, not 2"),
                                   (Expect(statuses=frozenset({"running"})), "it is queued")):  # fmt: skip
                with pytest.raises(StaleWrite) as info:
                    await store.write_job(job, update(job), expect=expect)
                assert info.value.message.endswith(": " + reason)
            await store.write_job(job, update(job), expect=Expect(attempt=1, statuses=frozenset({"queued"})))
            assert (await store.get_job(job.id)).status is C  # type: ignore[union-attr]  # the job exists here: get_job is None only for an unknown id

    run(main)


def test_lease_holder_token_and_expiry(backend: Backend) -> None:
    """begin_attempt grants the runner's lease; writes naming another holder or token are refused,
    renewals keep it, and once it runs out the holder's writes and renewals are refused too."""

    async def main() -> None:
        async with backend.open(lease=LEASE) as store:
            await store.create_job(make_job(1))
            assert not await store.lease_live("job-01")
            job = running(make_job(1), "A")
            assert await store.begin_attempt(job, 0, update(job))
            assert await store.lease_live("job-01")
            if isinstance(store, RedisStore):  # the expiry is Redis's own, not an instance's clock
                ttl = redis.Redis.from_url(store.url).pttl(store.keys.lease("job-01"))
                assert 0 < ttl <= LEASE * 1000
            job.progress = 10
            await store.write_job(job, update(job), expect=Expect(holder="A", token=1))
            for expect, reason in (
                (Expect(holder="B", token=1), "its lease is held by A (token 1), not B (token 1)"),
                (Expect(holder="A", token=2), "its lease is held by A (token 1), not A (token 2)"),
            ):
                with pytest.raises(StaleWrite) as info:
                    await store.write_job(job, update(job), expect=expect)
                assert info.value.message.endswith(": " + reason)
            assert not await store.renew_lease("job-01", "B", 1)
            assert not await store.renew_lease("job-01", "A", 2)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.5 * LEASE:  # renewed, it outlives its first term
                assert await store.renew_lease("job-01", "A", 1)
                await asyncio.sleep(LEASE / 4)
            assert await store.lease_live("job-01")
            await wait_until(lambda: _not(store.lease_live("job-01")))
            assert not await store.renew_lease("job-01", "A", 1)
            with pytest.raises(StaleWrite) as info:
                await store.write_job(job, update(job), expect=Expect(holder="A", token=1))
            assert info.value.message.endswith(": the lease of A (token 1) expired")

    run(main)


def test_a_stale_workers_late_report_is_refused(backend: Backend) -> None:
    """A remote worker's attempt is fenced like a runner's: once its lease ran out and another
    worker began attempt 2, the first worker's late succeeded (token 1) is refused, the second's
    goes through; labels and the worker's name round-trip in the document."""

    async def main() -> None:
        async with backend.open(lease=LEASE) as store:
            job = make_job(1)
            job.labels = ["gpu"]
            await store.create_job(job)
            first = running(job, "worker:wk-1")
            first.worker = "box-1"
            assert await store.begin_attempt(first, 0, update(first))
            stored = await store.get_job("job-01")
            assert stored is not None and stored.labels == ["gpu"] and stored.worker == "box-1"
            assert stored.lease == {"holder": "worker:wk-1", "token": 1}
            await wait_until(lambda: _not(store.lease_live("job-01")))
            second = running(first, "worker:wk-2")
            second.worker = "box-2"
            assert await store.begin_attempt(second, 1, update(second))
            late = Job.from_dict(first.to_dict())
            late.status, late.lease, late.progress = JobStatus.SUCCEEDED, None, 100
            with pytest.raises(StaleWrite) as info:
                await store.write_job(late, update(late), expect=Expect(holder="worker:wk-1", token=1), durable=True)
            assert "not worker:wk-1 (token 1)" in info.value.message
            done = Job.from_dict(second.to_dict())
            done.status, done.lease = JobStatus.SUCCEEDED, None
            await store.write_job(done, update(done), expect=Expect(holder="worker:wk-2", token=2), durable=True)
            final = await store.get_job("job-01")
            assert final is not None and final.status is JobStatus.SUCCEEDED and final.worker == "box-2"

    run(main)


async def _not(value: Awaitable[bool]) -> bool:
    return not await value


def test_a_write_releasing_the_lease_ends_it(backend: Backend) -> None:
    """A write with no lease (the job re-queued or finished) releases it at once."""

    async def main() -> None:
        async with backend.open(lease=30) as store:
            await store.create_job(make_job(1))
            job = running(make_job(1))
            assert await store.begin_attempt(job, 0, update(job))
            job.status, job.lease = Q, None
            await store.write_job(job, update(job), expect=Expect(holder="A", token=1))
            assert not await store.lease_live("job-01")
            assert (await store.get_job("job-01")).lease is None  # type: ignore[union-attr]  # the job exists here: get_job is None only for an unknown id

    run(main)


@pytest.mark.parametrize(("stored", "previous", "started"), [
    ((Q, 0), 0, True),    # the first attempt
    ((R, 1), 1, True),    # taking over attempt 1 of a job whose runner died (no live lease)
    ((R, 2), 1, False),   # another runner started attempt 2 first
    ((Q, 1), 0, False),   # re-queued after attempt 1: the caller read an older copy
    ((C, 0), 0, False),   # cancelled while the caller got ready
])  # fmt: skip
def test_begin_attempt_is_a_compare_and_set(backend: Backend, stored: tuple[JobStatus, int], previous: int,
                                            started: bool) -> None:  # fmt: skip
    """begin_attempt writes the running job (and its event) only while the stored attempt is
    still the one read and the job is queued, or running with no live lease; otherwise it
    writes nothing and says so."""

    async def main() -> None:
        async with backend.open() as store:
            await store.create_job(make_job(1, stored[0], attempt=stored[1]))
            seq = await head(store)
            job = running(make_job(1, attempt=previous))
            assert await store.begin_attempt(job, previous, update(job)) is started
            kept = await store.get_job(job.id)
            assert kept is not None
            assert (kept.status, kept.attempt) == ((R, previous + 1) if started else stored)
            assert len(await store.events_after(seq)) == (1 if started else 0)
            assert await store.begin_attempt(running(make_job(2)), 0, update(job)) is False  # no such job
            doc = {"status": stored[0].value, "attempt": stored[1]}
            assert can_begin(doc, previous, False) is started

    run(main)


def test_begin_attempt_waits_for_the_live_lease_to_run_out(backend: Backend) -> None:
    """A running job whose runner still holds its lease cannot be taken over; once the lease
    has run out, one runner, and only one, starts the next attempt."""

    async def main() -> None:
        async with backend.open(lease=LEASE) as store:
            await store.create_job(make_job(1))
            first = running(make_job(1), "A")
            assert await store.begin_attempt(first, 0, update(first))
            second = running(first, "B")
            assert not await store.begin_attempt(second, 1, update(second))
            await wait_until(lambda: _not(store.lease_live("job-01")))
            third = running(first, "C")
            assert await store.begin_attempt(second, 1, update(second))
            assert not await store.begin_attempt(third, 1, update(third))
            kept = await store.get_job("job-01")
            assert kept is not None and (kept.attempt, kept.lease) == (2, {"holder": "B", "token": 2})
            with pytest.raises(StaleWrite):  # A wakes up and reports: too late
                await store.write_job(first, update(first), expect=Expect(holder="A", token=1))

    run(main)


def test_append_log_checks_the_writers_lease(backend: Backend) -> None:
    """A log line is appended with its job_log event under a live lease, and refused (nothing
    appended, nothing logged) from a runner whose lease was taken over or that is gone."""

    async def main() -> None:
        async with backend.open(lease=LEASE) as store:
            await store.create_job(make_job(1))
            a = running(make_job(1), "A")
            assert await store.begin_attempt(a, 0, update(a))
            line = {"lineNo": 1, "stream": "stdout", "line": "epoch 1", "attempt": 1}
            await store.append_log("job-01", line, wire.job_log("job-01", "stdout", "epoch 1", 1, 1), Expect.lease_of(a))
            await wait_until(lambda: _not(store.lease_live("job-01")))
            b = running(a, "B")
            assert await store.begin_attempt(b, 1, update(b))
            seq = await head(store)
            late = {"lineNo": 2, "stream": "stdout", "line": "late", "attempt": 1}
            with pytest.raises(StaleWrite) as info:
                await store.append_log("job-01", late, wire.job_log("job-01", "stdout", "late", 2, 1), Expect.lease_of(a))
            assert "its lease is held by B (token 2), not A (token 1)" in info.value.message
            assert await store.events_after(seq) == []
            assert await store.read_job_lines("job-01", "logs") == [line]
            with pytest.raises(StaleWrite):  # a deleted job takes no lines either
                await store.append_log("job-02", late, wire.job_log("job-02", "stdout", "x", 1, 1), Expect.lease_of(b))

    run(main)


# --- events -----------------------------------------------------------------------------------


def test_each_write_logs_its_event(backend: Backend) -> None:
    """Every write logs its event in the same unit: seq +1 each, one epoch, and the job's jobSeq
    (its document's jobSeq, which job_log does not count); a write without an event logs none."""

    async def main() -> None:
        async with backend.open() as store:
            start = await head(store)
            job, _ = await store.create_job(make_job(1))
            run_ = running(job)
            assert await store.begin_attempt(run_, 0, update(run_))
            run_.progress = 50
            point = {"loss": 0.5, "pointNo": 1}
            stored = await store.write_job(run_, update(run_), expect=Expect.lease_of(run_), lines=("metrics", [point]))
            assert stored.job_seq == 3
            await store.append_log(job.id, {"lineNo": 1, "line": "hi"}, wire.job_log(job.id, "stdout", "hi", 1, 1),
                                   Expect.lease_of(run_))  # fmt: skip
            run_.message = "quiet"
            assert (await store.write_job(run_, None, expect=Expect.lease_of(run_))).job_seq == 3
            run_.status, run_.lease = S, None
            final = await store.write_job(run_, update(run_), expect=Expect(holder="A", token=1), durable=True)
            assert final.job_seq == 4 and (await store.get_job(job.id)).job_seq == 4  # type: ignore[union-attr]  # the job exists here: get_job is None only for an unknown id
            await store.create_dataset(make_dataset(1))
            await store.delete_jobs([job.id])

            events = await store.events_after(start)
            assert [e["type"] for e in events] == ["job_created", "training_update", "training_update", "job_log",
                                                   "training_update", "dataset_update", "job_deleted"]  # fmt: skip
            assert [e["seq"] for e in events] == list(range(start + 1, start + 8))
            assert len({e["epoch"] for e in events}) == 1 and events[0]["epoch"]
            assert [e.get("jobSeq") for e in events] == [1, 2, 3, None, 4, None, None]
            assert events[0]["job"]["jobSeq"] == 1 and events[0]["job"]["status"] == "queued"
            assert [e.get("status") for e in events[1:5]] == ["running", "running", None, "succeeded"]
            assert events[-1]["jobIds"] == [job.id]
            assert await store.events_after(start + 5) == events[5:]

    run(main)


def test_delete_jobs_skips_active_jobs_with_one_event(backend: Backend) -> None:
    """delete_jobs deletes the finished jobs named (and their lines), skips queued, running and
    unknown ones, and logs one job_deleted naming exactly the deleted; none deleted, no event."""

    async def main() -> None:
        async with backend.open() as store:
            for n, status in enumerate([Q, R, S, F, C], start=1):
                await store.create_job(make_job(n, status, attempt=1))
            done = make_job(3, S, attempt=1)
            await store.create_job(make_job(6, R, attempt=1))
            seq = await head(store)
            assert await store.delete_jobs(["job-01", "job-02"]) == []
            assert await store.events_after(seq) == []
            gone = await store.delete_jobs(["job-05", "job-03", "job-01", "job-02", "job-04", "job-nope", "job-03"])
            assert gone == ["job-05", "job-03", "job-04"]
            events = await store.events_after(seq)
            assert len(events) == 1 and events[0]["type"] == "job_deleted" and events[0]["jobIds"] == gone
            assert events[0]["reason"] == "deleted" and "jobSeq" not in events[0]
            assert ids(await store.list_jobs()) == ["job-06", "job-02", "job-01"]
            assert await store.count_jobs() == {"queued": 1, "running": 2, "succeeded": 0, "failed": 0,
                                                "cancelled": 0}  # fmt: skip
            assert await store.get_job(done.id) is None

    run(main)


def test_delete_jobs_spares_the_base_of_a_queued_or_running_job(backend: Backend) -> None:
    """A finished job that a queued or running job names as ``params.baseJobId`` is not deleted,
    checked inside the deletion itself; once that job is finished too, its base can go."""

    async def main() -> None:
        async with backend.open() as store:
            for n in (1, 2, 3, 4):
                await store.create_job(make_job(n, S, attempt=1))
            tune, running_tune, done_tune = make_job(5), make_job(6, R, attempt=1), make_job(7, F, attempt=1)
            tune.params, running_tune.params = {"baseJobId": "job-01"}, {"baseJobId": "job-02"}
            done_tune.params = {"baseJobId": "job-03"}
            for job in (tune, running_tune, done_tune):
                await store.create_job(job)
            seq = await head(store)
            assert await store.delete_jobs(["job-01", "job-02"]) == []
            assert await store.events_after(seq) == []
            assert await store.delete_jobs(["job-01", "job-02", "job-03", "job-04"], "pruned") == ["job-03", "job-04"]
            assert (await store.events_after(seq))[-1]["jobIds"] == ["job-03", "job-04"]
            assert await store.get_job("job-01") is not None and await store.get_job("job-02") is not None
            tune.status, tune.attempt = C, 1
            await store.write_job(tune, update(tune), durable=True)
            assert await store.delete_jobs(["job-01", "job-02"]) == ["job-01"]

    run(main)


def test_finished_jobs_by_finish_time(backend: Backend) -> None:
    """``finished_jobs_by_finish_time``: (finishedAt, id) of the finished jobs of the statuses
    asked for, oldest first (updatedAt where finishedAt is missing; ties by id), from an index."""

    async def main() -> None:
        async with backend.open() as store:
            rows = [(1, S, 500), (2, F, 300), (3, S, 300), (4, C, None), (5, R, None), (6, Q, None)]
            for n, status, finished in rows:
                job = make_job(n, status, attempt=1)
                job.finished_at = finished
                job.updated_at = 400 if finished is None else finished
                await store.create_job(job)
            assert await store.finished_jobs_by_finish_time([S, F, C]) == [
                (300, "job-02"), (300, "job-03"), (400, "job-04"), (500, "job-01")]  # fmt: skip
            assert await store.finished_jobs_by_finish_time([S]) == [(300, "job-03"), (500, "job-01")]
            await store.delete_jobs(["job-03"])
            assert await store.finished_jobs_by_finish_time([S]) == [(500, "job-01")]

    run(main)


def test_head_moves_with_every_job_and_dataset_write(backend: Backend) -> None:
    """head() changes with each write that changes a job or a dataset (create, status, log line,
    delete, dataset create/save/delete), before the write returns; a refused write or a read
    leaves it; a second instance on a shared store reads the same head."""

    async def main() -> None:
        async with backend.open() as store:
            seen = [await store.head()]

            async def moved() -> None:
                now = await store.head()
                assert now not in seen, (now, seen)
                seen.append(now)

            job, _ = await store.create_job(make_job(1))
            await moved()
            job = running(job)
            assert await store.begin_attempt(job, 0, update(job))
            await moved()
            job.progress = 0.5
            await store.write_job(job, update(job), expect=Expect.lease_of(job))
            await moved()
            entry = {"lineNo": 1, "stream": "stdout", "line": "x", "attempt": 1}
            await store.append_log(job.id, entry, wire.job_log(job.id, "stdout", "x", 1, 1), Expect.lease_of(job))
            await moved()
            job.status = S
            await store.write_job(job, update(job), expect=Expect.lease_of(job))
            await moved()
            with pytest.raises(StaleWrite):
                await store.write_job(job, update(job))
            await store.list_jobs()
            assert await store.head() == seen[-1]
            assert await store.delete_jobs([job.id]) == [job.id]
            await moved()
            ds = make_dataset(1)
            await store.create_dataset(ds)
            await moved()
            ds.name = "renamed"
            await store.save_dataset(ds)
            await moved()
            await store.delete_dataset(ds.id)
            await moved()
            if backend.shared:
                async with backend.open(1) as other:
                    assert await other.head() == seen[-1]

    run(main)


# --- datasets and metadata -----------------------------------------------------------------------


def test_datasets_with_their_events(backend: Backend) -> None:
    """Datasets round-trip and list oldest first; each change logs its dataset_update (created,
    updated, deleted); creating an existing one is a Conflict; deleting a missing one logs nothing."""

    async def main() -> None:
        async with backend.open() as store:
            seq = await head(store)
            for n in (3, 1, 2):
                await store.create_dataset(make_dataset(n))
            with pytest.raises(Conflict):
                await store.create_dataset(make_dataset(1))
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
            events = await store.events_after(seq)
            assert [(e["type"], e["datasetId"], e["action"]) for e in events] == [
                ("dataset_update", "ds-3", "created"), ("dataset_update", "ds-1", "created"),
                ("dataset_update", "ds-2", "created"), ("dataset_update", "ds-2", "updated"),
                ("dataset_update", "ds-2", "deleted")]  # fmt: skip
            assert [e["seq"] for e in events] == list(range(seq + 1, seq + 6))

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
    """Log lines (append_log) and metrics points (write_job lines) come back in order, per job and
    per name; nothing yet is an empty list; delete_artifacts removes a job's lines."""

    async def main() -> None:
        async with backend.open() as store:
            assert await store.read_job_lines("job-01", "logs") == []
            for n in (1, 2):
                await store.create_job(make_job(n, R, attempt=1))
            logs = [{"lineNo": 1, "line": "a"}, {"lineNo": 2, "line": "b é"}, {"lineNo": 3}]
            for entry in logs:
                await store.append_log("job-01", entry, wire.job_log("job-01", "stdout", "x", entry["lineNo"], 1), None)
            await store.append_log("job-02", {"lineNo": 1, "line": "other"}, wire.job_log("job-02", "stdout", "o", 1, 1),
                                   None)  # fmt: skip
            job = make_job(1, R, attempt=1)
            await store.write_job(job, update(job), lines=("metrics", [{"loss": 0.5, "pointNo": 1}]))
            await store.write_job(job, update(job), lines=("metrics", []))
            await store.write_job(job, update(job), lines=("metrics", [{"loss": 0.25, "pointNo": 2},
                                                                       {"loss": 0.125, "pointNo": 3}]))  # fmt: skip
            assert await store.read_job_lines("job-01", "logs") == logs
            assert [p["loss"] for p in await store.read_job_lines("job-01", "metrics")] == [0.5, 0.25, 0.125]
            assert await store.read_job_lines("job-02", "logs") == [{"lineNo": 1, "line": "other"}]
            await store.delete_artifacts("job-01")
            assert await store.read_job_lines("job-01", "logs") == []
            assert await store.read_job_lines("job-01", "metrics") == []
            assert len(await store.read_job_lines("job-02", "logs")) == 1

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
            await writer.append_log("job-01", {"lineNo": 1}, wire.job_log("job-01", "stdout", "x", 1, 1), None)
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


def test_an_uploaded_file_is_put_in_place_for_every_instance(backend: Backend) -> None:
    """put_artifact renames a complete upload in as the job's file, durably, and another
    instance sees it (Redis: on artifacts.dir, shared, with a name/size/sha256 manifest in
    Redis, never the bytes). Redis without artifacts.dir refuses uploads, saying why."""
    shared = backend.tmp_path / "shared-artifacts"
    options: dict[str, Any] = {"shared_dir": shared} if backend.shared else {}

    async def main() -> None:
        async with AsyncExitStack() as stack:
            writer = await stack.enter_async_context(backend.open(0, **options))
            reader = await stack.enter_async_context(backend.open(1, **options)) if backend.shared else writer
            assert writer.uploads_refused() is None
            root = writer.artifact_dir("job-01")
            root.mkdir(parents=True)
            tmp = root / ".upload.tmp-1"
            tmp.write_bytes(b"weights" * 1000)
            dest = await writer.put_artifact("job-01", "weights.bin", tmp, 7000, "ab" * 32)
            assert dest == root / "weights.bin" and not tmp.exists()
            got = await reader.load_artifacts("job-01")
            assert (got / "weights.bin").read_bytes() == b"weights" * 1000
            if backend.shared:
                assert got.parent == shared
                assert isinstance(writer, RedisStore)
                async with writer._redis() as r:
                    manifest = await r.hgetall(writer.keys.artifact("job-01"))
                assert wire.loads(manifest[b"weights.bin"]) == {"size": 7000, "sha256": "ab" * 32}
                await writer.save_artifacts("job-01")  # the job's end: the manifest of the whole set
                async with writer._redis() as r:
                    entry = await r.hget(writer.keys.artifact("job-01"), "weights.bin")
                assert wire.loads(entry)["size"] == 7000
                assert max(len(v) for v in manifest.values()) < 200  # a manifest, not the bytes
            await writer.delete_artifacts("job-01")
            assert not root.exists()
        if backend.shared:
            async with backend.open(2) as plain:
                assert "artifacts.dir" in (plain.uploads_refused() or "")
                with pytest.raises(Conflict):
                    await plain.put_artifact("job-02", "x.bin", tmp, 1, "ab" * 32)

    run(main)


def test_a_second_instance_sees_durable_writes(backend: Backend) -> None:
    """What one store wrote durably, another store on the same backend reads, events included
    (Redis: while the first is still open; TinyDB: after it closed)."""

    async def main() -> None:
        async with AsyncExitStack() as stack:
            first = await stack.enter_async_context(backend.open(0))
            job, _ = await first.create_job(make_job(1), ("key", "fp"))
            job = running(job)
            assert await first.begin_attempt(job, 0, update(job))
            await first.create_dataset(make_dataset(1))
            await first.set_meta("sampleLoaded", "ds-1")
            events = await first.events_after(0)
            if not backend.shared:
                await stack.aclose()
            second = await stack.enter_async_context(backend.open(1))
            assert await second.get_job(job.id) == job
            assert ids(await second.list_jobs(statuses=[R])) == [job.id]
            assert [d.id for d in await second.list_datasets()] == ["ds-1"]
            assert await second.get_meta("sampleLoaded") == "ds-1"
            again, created = await second.create_job(make_job(2), ("key", "fp"))
            assert (again, created) == (job, False)
            assert await second.events_after(0) == events

    run(main)


def test_tinydb_job_lines_skip_a_torn_last_line(tmp_path: Path) -> None:
    """TinyDB: a line cut short by a crash is skipped, the lines before it are kept."""

    async def main() -> None:
        async with Backend("tinydb", tmp_path).open() as store:
            for n in (1, 2):
                await store.append_log("job-01", {"lineNo": n}, wire.job_log("job-01", "stdout", "x", n, 1), None)
            path = store.artifact_dir("job-01") / "logs.jsonl"
            path.write_bytes(path.read_bytes() + b'{"lineNo": 3, "li')
            assert await store.read_job_lines("job-01", "logs") == [{"lineNo": 1}, {"lineNo": 2}]

    run(main)


# --- Redis only ----------------------------------------------------------------------------------


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
            ttl = r.pttl(backend.prefix + "idem:key-1")  # keys are forgotten on Redis's clock
            assert 0 < ttl <= 24 * 3600 * 1000

    run(main)


def test_redis_a_retried_write_changes_nothing_twice(
    redis_server_module: RedisServer, tmp_path: Path, netproxy: Callable[[int], NetProxy]  # noqa: F811 - pytest fixtures imported by name, received as parameters
) -> None:
    """Replies lost on the way back (the script ran): redis-py's retry on a fresh connection, and
    the caller's own retry of the same write, get the first reply back; nothing is appended or
    applied twice, so a retried create is not "already exists" and a retried begin is not "lost"."""
    proxy = netproxy(redis_server_module.port)
    url = f"redis://127.0.0.1:{proxy.port}/0"
    prefix = f"retry-{uuid.uuid4().hex[:8]}:"

    async def main() -> None:
        # No health-check PINGs: each lost reply must be a write's.
        store = redis_store(redis_server_module, tmp_path / "cache", prefix, url=url, health_check_interval=0)
        await store.open()
        try:
            await warm_up(store)  # each script loaded: a lost reply is the script's, not NOSCRIPT's
            start = await head(store)
            proxy.lose_replies(1)  # redis-py retries once on a fresh connection
            job, created = await store.create_job(make_job(1), ("key", "fp"))
            assert created and job.job_seq == 1
            run_ = running(job)
            proxy.lose_replies(1)
            assert await store.begin_attempt(run_, 0, update(run_))
            run_.progress = 50
            event = update(run_)
            proxy.lose_replies(2)  # the client's retry fails too (Unavailable): the caller retries
            with pytest.raises(Unavailable):
                await store.write_job(run_, event, expect=Expect.lease_of(run_))
            assert (await store.write_job(run_, event, expect=Expect.lease_of(run_))).job_seq == 3
            proxy.lose_replies(1)
            line = wire.job_log(job.id, "stdout", "hi", 1, 1)
            await store.append_log(job.id, {"lineNo": 1}, line, Expect.lease_of(run_))
            run_.status, run_.lease = S, None
            proxy.lose_replies(1)
            assert (await store.write_job(run_, update(run_), expect=Expect(holder="A", token=1))).job_seq == 4
            proxy.lose_replies(1)
            assert await store.delete_jobs([job.id]) == [job.id]
            proxy.lose_replies(1)
            await store.create_dataset(make_dataset(1))
            proxy.lose_replies(1)
            assert await store.claim_meta("once", 1) is True

            events = await store.events_after(start)
            assert [e["type"] for e in events] == ["job_created", "training_update", "training_update", "job_log",
                                                   "training_update", "job_deleted", "dataset_update"]  # fmt: skip
            assert [e["seq"] for e in events] == list(range(start + 1, start + 8))
            assert await store.read_job_lines(job.id, "logs") == []  # deleted with the job
            assert proxy.accepted >= 9  # each lost reply cost its connection
        finally:
            await store.close()

    run(main)


def test_redis_deleting_a_job_leaves_no_key_of_it(redis_server_module: RedisServer, tmp_path: Path) -> None:
    """Deleting a finished job in Redis deletes its document, index entries, lease, lines and
    published files in the same script; another instance then finds nothing of it."""

    async def main() -> None:
        backend = Backend("redis", tmp_path, redis_server_module)
        async with backend.open(0, lease=30) as store, backend.open(1) as other:
            job, _ = await store.create_job(make_job(1))
            job = running(job)
            assert await store.begin_attempt(job, 0, update(job))
            await store.append_log(job.id, {"lineNo": 1}, wire.job_log(job.id, "stdout", "x", 1, 1), Expect.lease_of(job))
            await store.write_job(job, update(job), lines=("metrics", [{"loss": 1}]), expect=Expect.lease_of(job))
            write_files(store.artifact_dir(job.id), MODEL)
            await store.save_artifacts(job.id)
            job.status = S  # finished, its lease still on record: the delete takes it too
            await store.write_job(job, update(job), expect=Expect.lease_of(job))
            assert await store.lease_live(job.id)
            assert await store.delete_jobs([job.id]) == [job.id]
            assert await other.read_job_lines(job.id, "logs") == []
            assert await other.read_job_lines(job.id, "metrics") == []
            assert not (await other.load_artifacts(job.id)).exists()
            r = redis.Redis.from_url(redis_server_module.url)
            left = sorted(k.decode().removeprefix(backend.prefix) for k in r.keys(backend.prefix + "*"))
            assert [k for k in left if not k.startswith("write:")] == ["epoch", "events", "meta", "queue", "seq"]

    run(main)


async def warm_up(store: Store) -> None:
    """One write of each kind, on a job of its own."""
    job, _ = await store.create_job(make_job(99))
    job = running(job)
    await store.begin_attempt(job, 0, update(job))
    await store.write_job(job, update(job), expect=Expect.lease_of(job))
    await store.append_log(job.id, {"lineNo": 1}, wire.job_log(job.id, "stdout", "x", 1, 1), None)
    job.status, job.lease = S, None
    await store.write_job(job, update(job))
    await store.delete_jobs([job.id])
    await store.create_dataset(make_dataset(99))
    await store.claim_meta("warm", 1)


def test_redis_schema_1_is_migrated_once(redis_server_module: RedisServer, tmp_path: Path) -> None:
    """A Redis written by mangwale before the record (schema 1: documents without jobSeq or lease,
    status sets, jobSeq counters in a hash, idempotency keys forever) is migrated by the first
    store that opens it, atomically; old events stay readable and jobSeq goes on where it was."""
    p = f"old-{uuid.uuid4().hex[:8]}:"
    r = redis.Redis.from_url(redis_server_module.url)
    old = {}
    for n, status in ((1, S), (2, R), (3, Q)):
        doc = make_job(n, status, attempt=1 if status is not Q else 0).to_dict()
        del doc["jobSeq"], doc["lease"]
        doc["params"] = {"lr": 0.1, "layers": []}
        old[doc["id"]] = doc
        r.set(f"{p}job:{doc['id']}", wire.dumps(doc))
        r.zadd(f"{p}jobs", {doc["id"]: doc["createdAt"]})
        r.sadd(f"{p}status:{status.value}", doc["id"])
        r.hset(f"{p}jobseq", doc["id"], n + 1)
    r.hset(f"{p}idem:key-1", mapping={"jobId": "job-03", "fingerprint": "fp"})
    r.set(f"{p}jobidem:job-03", f"{p}idem:key-1")
    r.set(f"{p}epoch", "oldepoch")
    r.set(f"{p}seq", 9)
    r.xadd(f"{p}events", {"j": "job-03", "k": "0", "s": "4", "e": "oldepoch",
                          "d": '{"type":"training_update","jobId":"job-03","seq":9,"jobSeq":4,"epoch":"oldepoch"}'},
           id="9-1")  # fmt: skip
    r.hset(f"{p}meta", "schema", "1")

    async def main() -> None:
        stores = [redis_store(redis_server_module, tmp_path / f"c{i}", p) for i in range(2)]
        await asyncio.gather(*(s.open() for s in stores))  # two instances start together
        store = stores[0]
        try:
            assert r.hget(f"{p}meta", "schema") == str(SCHEMA_VERSION).encode()
            assert r.exists(f"{p}jobseq") == 0
            for n, status in ((1, S), (2, R), (3, Q)):
                job = await store.get_job(f"job-{n:02d}")
                assert job is not None and job.job_seq == n + 1 and job.lease is None and job.status is status
                assert job.params == {"lr": 0.1, "layers": []}
            assert ids(await store.list_jobs(statuses=[R, Q])) == ["job-03", "job-02"]
            assert (await store.count_jobs())["succeeded"] == 1
            assert 0 < r.pttl(f"{p}idem:key-1") <= 24 * 3600 * 1000 and not r.exists(f"{p}jobidem:job-03")
            again, created = await store.create_job(make_job(9), ("key-1", "fp"))
            assert (again.id, created) == ("job-03", False)
            assert [e["seq"] for e in await store.events_after(0)] == [9]
            job = running(make_job(3))  # a job queued before the upgrade runs on
            assert await store.begin_attempt(job, 0, update(job))
            events = await store.events_after(9)
            assert [(e["seq"], e["jobSeq"], e["epoch"]) for e in events] == [(10, 5, "oldepoch")]
            taken = running(make_job(2, attempt=1), "B")  # no lease: its old runner is gone
            assert await store.begin_attempt(taken, 1, update(taken))
        finally:
            for s in stores:
                await s.close()

    run(main)


def assert_unavailable(err: Unavailable, server: RedisServer, started: float) -> None:
    assert type(err) is Unavailable and err.code == "store_unavailable" and err.status == 503
    assert f"redis at {server.url} " in err.message
    assert time.monotonic() - started < TIMEOUT * 1.8, "did not fail fast"


def test_redis_down_is_unavailable_fast_and_recovers_after_restart(redis_server: RedisServer, tmp_path: Path) -> None:
    """With Redis killed every call raises Unavailable (503, store_unavailable) quickly; after a
    restart that lost the data the same store works again: a new epoch, the schema stamped."""

    async def main() -> None:
        store = redis_store(redis_server, tmp_path / "cache")
        await store.open()
        try:
            await store.create_job(make_job(1))
            old_epoch = (await store.events_after(0))[0]["epoch"]
            redis_server.kill()
            job = make_job(1, R, attempt=1)
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: store.get_job("job-01"),
                lambda: store.create_job(make_job(2)),
                lambda: store.write_job(job, update(job)),
                lambda: store.begin_attempt(job, 0, update(job)),
                lambda: store.append_log("job-01", {"lineNo": 1}, wire.job_log("job-01", "stdout", "x", 1, 1), None),
                lambda: store.lease_live("job-01"),
                lambda: store.renew_lease("job-01", "A", 1),
                lambda: store.delete_jobs(["job-01"]),
                lambda: store.list_jobs(statuses=[Q]),
                lambda: store.count_jobs(),
                lambda: store.create_dataset(make_dataset(1)),
                lambda: store.list_datasets(),
                lambda: store.set_meta("k", 1),
                lambda: store.claim_meta("k", 1),
                lambda: store.events_after(0),
                lambda: store.read_job_lines("job-01", "logs"),
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
            events = await store.events_after(0)
            assert [e["type"] for e in events] == ["job_created"] and events[0]["epoch"] != old_epoch
            raw = redis.Redis.from_url(redis_server.url).hget("mangwale:meta", "schema")
            assert raw == str(SCHEMA_VERSION).encode()
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
            assert (await store.get_job("job-01")).id == "job-01"  # type: ignore[union-attr]  # the job exists here: get_job is None only for an unknown id
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


@pytest.mark.parametrize(("raw", "code", "says"), [
    ("99", "too_new", "has schema version 99, newer than this mangwale (2); upgrade mangwale"),
    ("0", "too_old", "has schema version 0, which this mangwale cannot migrate"),
    ("two", "corrupt", "has a bad schema version"),
])  # fmt: skip
def test_redis_unknown_schema_is_refused(redis_server_module: RedisServer, tmp_path: Path, raw: str, code: str,
                                         says: str) -> None:  # fmt: skip
    """A Redis of a schema this mangwale cannot use is refused at open with one line naming the
    URL and prefix, and left as it was."""
    prefix = f"odd-{uuid.uuid4().hex[:8]}:"
    r = redis.Redis.from_url(redis_server_module.url)
    r.hset(prefix + "meta", "schema", raw)

    async def main() -> None:
        await redis_store(redis_server_module, tmp_path, prefix).open()

    with pytest.raises(StoreError) as info:
        run(main)
    assert info.value.code == code and says in info.value.message
    assert f"redis at {redis_server_module.url} (prefix '{prefix}')" in info.value.message
    assert r.keys(prefix + "*") == [(prefix + "meta").encode()] and r.hget(prefix + "meta", "schema") == raw.encode()


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


def test_redis_instances_racing_writes_keep_one_order(redis_server_module: RedisServer, tmp_path: Path) -> None:
    """Two stores writing many jobs at once: the stream holds every event once, seqs without a
    gap, and each job's events in its own order with jobSeq 1, 2, 3... equal to its document's."""
    prefix = f"order-{uuid.uuid4().hex[:8]}:"

    async def main() -> None:
        stores = [redis_store(redis_server_module, tmp_path / f"c{i}", prefix) for i in range(2)]
        for s in stores:
            await s.open()

        async def life(n: int) -> None:
            a, b = stores[n % 2], stores[(n + 1) % 2]
            job, _ = await a.create_job(make_job(n))
            job = running(job, f"i{n % 2}")
            assert await b.begin_attempt(job, 0, update(job))
            for step in range(5):
                job.progress = step * 20
                await (a, b)[step % 2].write_job(job, update(job), expect=Expect.lease_of(job))
            job.status, job.lease = S, None
            await a.write_job(job, update(job), expect=Expect(holder=f"i{n % 2}", token=1))

        try:
            await asyncio.gather(*(life(n) for n in range(1, 21)))
            events = await stores[1].events_after(0)
            assert [e["seq"] for e in events] == list(range(1, 20 * 8 + 1))
            for n in range(1, 21):
                mine = [e for e in events if e["jobId"] == f"job-{n:02d}"]
                assert [e["jobSeq"] for e in mine] == list(range(1, 9))
                assert mine[0]["type"] == "job_created" and [e.get("status") for e in mine][-1] == "succeeded"
                assert [e["progress"] for e in mine[2:7]] == [0, 20, 40, 60, 80]
                assert (await stores[0].get_job(f"job-{n:02d}")).job_seq == 8  # type: ignore[union-attr]  # the job exists here: get_job is None only for an unknown id
        finally:
            for s in stores:
                await s.close()

    run(main)


def test_redis_clients_keep_a_cancellation(redis_server_module: RedisServer, tmp_path: Path) -> None:
    """A task looping on Redis commands, cancelled at any point, ends cancelled: the store's
    clients never swallow a cancellation (what made SIGTERM hang, see redis_store)."""

    async def main() -> None:
        store = redis_store(redis_server_module, tmp_path / "cache")
        client = store.connect()
        lost = []
        try:
            for steps in range(200):

                async def loop() -> None:
                    while True:
                        await client.get("k")

                task = asyncio.create_task(loop())
                for _ in range(steps):
                    await asyncio.sleep(0)
                task.cancel()
                done, _ = await asyncio.wait([task], timeout=2)
                if not done or not task.cancelled():
                    lost.append(steps)
                    task.cancel()
                    await asyncio.wait([task], timeout=2)
        finally:
            await client.aclose()
        assert lost == [], f"cancellations lost after {lost} loop steps"

    run(main)


def test_redact_drops_only_the_password() -> None:
    """Messages name the Redis URL without its password."""
    assert redact("redis://u:pw@h:6390/2") == "redis://u@h:6390/2"
    assert redact("redis://:pw@h/0") == "redis://h/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"


def test_redis_a_burst_of_writes_waits_for_connections_instead_of_failing(
    redis_server_module: RedisServer, tmp_path: Path
) -> None:
    """Hundreds of writes at once (a burst of POSTs) share the client's pool: past its size they wait
    for a connection, none fails (redis-py's default pool refused the 101st: 'Too many connections')."""

    async def main() -> None:
        # The default command timeout (5 s), which is also how long a write waits for a pooled
        # connection: the suite's 0.5 s is for noticing a dead Redis fast, not for a burst.
        async with Backend("redis", tmp_path, redis_server_module).open(socket_timeout=5.0) as store:
            jobs = [make_job(n) for n in range(300)]
            results = await asyncio.gather(*(store.create_job(job) for job in jobs), return_exceptions=True)
            assert [r for r in results if isinstance(r, BaseException)] == []
            assert (await store.count_jobs())["queued"] == 300

    run(main)


def test_redis_mirror_keeps_old_texts_in_the_stream_and_replays_them_exactly(
    redis_server_module: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance's mirror of the stream keeps texts only for its newest events (a tiny hot window
    here); replay reads the older ones back from the stream, byte for byte, both for events read
    live and for those loaded at start-up."""
    from mangwale_cli import redisbus, wire

    monkeypatch.setattr(redisbus, "HOT_EVENTS", 3)

    async def main() -> None:
        async with Backend("redis", tmp_path, redis_server_module).open() as store:
            bus = redisbus.RedisEventBus(store, store.connect(extra_timeout=0.2), block=0.2)
            await bus.open()
            for n in range(1, 8):
                await store.create_job(make_job(n))
            await store.create_dataset(make_dataset(1))
            expected = [wire.dumps(e) for e in await store.events_after(0)]
            await asyncio.wait_for(bus.catch_up(len(expected)), 5)
            ring = list(bus.log.ring)
            assert [r._text is None for r in ring] == [True] * (len(ring) - 3) + [False] * 3
            assert await bus.texts(bus.history(0)) == expected
            await bus.stop()
            await bus.reader.aclose()
            again = redisbus.RedisEventBus(store, store.connect(extra_timeout=0.2), block=0.2)
            await again.open()
            assert sum(r._text is not None for r in again.log.ring) == 3
            assert await again.texts(again.history(0)) == expected
            assert await again.texts(again.history(0, {"job-03"})) == [expected[2]]
            await again.stop()
            await again.reader.aclose()

    run(main)


def test_redis_mirror_loaded_while_another_instance_appends_replays_from_0(
    redis_server_module: RedisServer, tmp_path: Path
) -> None:
    """An instance that starts on an empty stream while another appends its first event (the
    sample dataset of instances started together) replays from 0 without a resync: its copy
    starts below that event, which it then reads, rather than above it (the SSE replay of a
    three-instance test waited forever for events the resync left out)."""
    from mangwale_cli import redisbus

    async def main() -> None:
        async with Backend("redis", tmp_path, redis_server_module).open() as store:
            bus = redisbus.RedisEventBus(store, store.connect(extra_timeout=0.2), block=0.2)
            real_xrevrange = bus.r.xrevrange

            async def xrevrange_then_another_instance_appends(*args: Any, **kwargs: Any) -> Any:
                entries = await real_xrevrange(*args, **kwargs)
                await store.create_dataset(make_dataset(1))  # in Redis now, after the read
                return entries

            bus.r.xrevrange = xrevrange_then_another_instance_appends  # type: ignore[method-assign]  # the race, made to happen
            await bus.open()
            bus.r.xrevrange = real_xrevrange  # type: ignore[method-assign]  # the race, made to happen
            await asyncio.wait_for(bus.catch_up(1), 5)
            sub = bus.subscribe(since=0)
            assert sub.resync is None and [r.seq for r in sub.replay] == [1]
            bus.unsubscribe(sub.subscriber)
            await bus.stop()
            await bus.reader.aclose()

    run(main)


def test_redis_queue_never_hands_an_instance_an_entry_it_holds(redis_server_module: RedisServer) -> None:
    """An entry this instance holds but could not renew (Redis was away for longer than a lease)
    is not handed to it a second time: the second copy found the job starting here and removed
    the entry, and when the start then failed the job stayed queued with no entry, forever."""
    from mangwale_cli.redisqueue import RedisQueue

    async def main() -> None:
        prefix = f"test-{uuid.uuid4().hex[:8]}:"
        client = redis.asyncio.Redis.from_url(redis_server_module.url)
        reader = redis.asyncio.Redis.from_url(redis_server_module.url)
        queue = RedisQueue(client, reader, url=redis_server_module.url, prefix=prefix, consumer="a", lease=0.05, block=0.05)
        try:
            await queue._ensure_group()  # no heartbeat: the held entry is never renewed
            await queue.put("job-1")
            first = await queue.take()
            assert first.job_id == "job-1"

            async def idle_past_lease() -> bool:
                rows = await client.xpending_range(queue.k.queue, "workers", "-", "+", 1)
                return bool(rows) and rows[0]["time_since_delivered"] > 100

            await wait_until(idle_past_lease)
            await queue.put("job-2")
            second = await asyncio.wait_for(queue.take(), 5)
            assert second.job_id == "job-2"
            assert queue.held[first.entry or b""] is first
        finally:
            await client.aclose()
            await reader.aclose()

    run(main)
