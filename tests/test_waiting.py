"""``waiting.Waiting``: what queued jobs wait for follows the takers, and costs nothing while they stay.

In process, on a real embedded store (``TinyDBStore`` in a temporary data dir).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from test_record import opened

from mangwale_cli import waiting
from mangwale_cli.store.tinydb_store import TinyDBStore
from mangwale_cli.waiting import Taker, Waiting
from mangwale_cli.wire import Job, JobStatus

GPU: Taker = (frozenset({"gpu"}), frozenset({"simulate"}))


def queued(n: int) -> Job:
    return Job(id=f"job-{n:05d}", kind="simulate", dataset_id=None, created_at=1_000 + n, updated_at=1_000 + n,
               labels=["gpu"])  # fmt: skip


class Counting:
    """The store, counting the queue reads a pass makes."""

    def __init__(self, store: TinyDBStore) -> None:
        self.store = store
        self.pages = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def list_jobs(self, **kw: Any) -> list[Job]:
        self.pages += 1
        return await self.store.list_jobs(**kw)


def test_a_pass_reads_the_queue_only_when_the_takers_change(tmp_path: Path) -> None:
    """More queued gpu jobs than a page: with no taker each says it waits; the same takers again
    read nothing; a gpu taker clears every one of them, page by page; it leaving sets them again."""
    takers: list[Taker] = []
    n = waiting.PAGE + 7

    async def main() -> None:
        async with opened(tmp_path) as store:
            for i in range(1, n + 1):
                await store.create_job(queued(i))
            counting = Counting(store)
            board = Waiting(counting, "a", lambda: list(takers), stale_after=5)  # type: ignore[arg-type]  # Counting wraps a Store and forwards what Waiting calls

            async def answers() -> set[str | None]:
                return {j.waiting_for for j in await store.list_jobs(statuses=[JobStatus.QUEUED])}

            await board.refresh()
            assert await answers() == {"waiting for a worker with labels gpu"}
            assert counting.pages == 2  # a full page and the rest
            await board.refresh()
            await board.refresh()
            assert counting.pages == 2  # the same takers: the queue is not read again
            takers.append(GPU)
            await board.refresh()
            assert await answers() == {None} and counting.pages == 4
            takers.clear()
            await board.refresh()
            assert await answers() == {"waiting for a worker with labels gpu"}

    asyncio.run(main())


def test_a_cleared_wait_stays_cleared_after_a_restart(tmp_path: Path) -> None:
    """Clearing ``waitingFor`` removes a field from the record (it is only there while set): the
    embedded store writes that as the whole document, so the record read back, live or after a
    restart (the log replayed), no longer says the job waits."""
    job = queued(1)

    async def main() -> None:
        async with opened(tmp_path) as store:
            await store.create_job(job)
            board = Waiting(store, "a", list, stale_after=5)
            await board.refresh()
            assert (await store.get_job(job.id)).waiting_for == "waiting for a worker with labels gpu"
            board.own = lambda: [GPU]
            await board.refresh()
            assert (await store.get_job(job.id)).waiting_for is None
        async with opened(tmp_path) as store:
            assert (await store.get_job(job.id)).waiting_for is None

    asyncio.run(main())
