"""What a queued job waits for: ``waitingFor`` ("waiting for a worker with labels gpu"), kept in
the job record for as long as no live taker can run the job.

A taker is a server's own runner or a remote worker (``routing``). When the takers change (a
worker registers, disconnects or falls silent; checked again on every sweep of the worker hub),
every queued job is looked at, and one whose answer changed is written with its
``training_update``, through the store's one write path. So ``GET /training/jobs/{id}``, the
event stream (``watch``: bars, plain lines, ``--json``) and the dashboard all say it, and the
cached GET is invalidated by the same event.

On a shared store each instance knows only its own runner and workers: each publishes its
takers under one metadata key (``TAKERS_META``, refreshed on every sweep, an entry older than
``stale_after`` ignored), and reads the others' from there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from . import routing, wire
from .errors import MangwaleError, StaleWrite
from .store.base import Cursor, Expect, Store
from .wire import Job, JobStatus, now_ms

log = logging.getLogger(__name__)

Taker = tuple[frozenset[str], frozenset[str]]  # (labels, kinds)

PAGE = 500  # queued jobs read per step of a pass

TAKERS_META = "takers"  # shared store: instance -> {"takers": [[labels, kinds], ...], "seen": ms}


class Waiting:
    """Keeps each queued job's ``waitingFor`` in step with the live takers."""

    def __init__(self, store: Store, instance: str, own: Callable[[], list[Taker]], stale_after: float) -> None:
        self.store = store
        self.instance = instance
        self.own = own  # this instance's takers: its runner (if it runs jobs) and its live workers
        self.stale_after = stale_after  # seconds: another instance's entry older than this is gone
        self._lock = asyncio.Lock()
        self._last: frozenset[Taker] | None = None  # the takers the last complete pass answered for

    async def takers(self) -> list[Taker]:
        """Every live taker this instance knows of: its own, and (shared store) the others'."""
        out = list(self.own())
        if self.store.shared:
            known = await self.store.get_meta(TAKERS_META)
            cutoff = now_ms() - self.stale_after * 1000
            for instance, entry in (known if isinstance(known, dict) else {}).items():
                if instance == self.instance or not isinstance(entry, dict) or entry.get("seen", 0) < cutoff:
                    continue
                for pair in entry.get("takers") or []:
                    if isinstance(pair, list) and len(pair) == 2:
                        out.append((frozenset(map(str, pair[0])), frozenset(map(str, pair[1]))))
        return out

    async def publish(self) -> None:
        """Shared store: put this instance's takers where the others read them."""
        if not self.store.shared:
            return
        known = await self.store.get_meta(TAKERS_META)
        cutoff = now_ms() - self.stale_after * 1000 * 4
        entries = {k: v for k, v in (known if isinstance(known, dict) else {}).items()
                   if isinstance(v, dict) and v.get("seen", 0) >= cutoff}  # fmt: skip
        entries[self.instance] = {"takers": [[sorted(labels), sorted(kinds)] for labels, kinds in self.own()],
                                  "seen": now_ms()}  # fmt: skip
        await self.store.set_meta(TAKERS_META, entries)

    async def waiting_for(self, job: Job) -> str | None:
        """What ``job`` waits for, were it queued now (None: some live taker can run it)."""
        return routing.waiting_for(job, await self.takers())

    async def answer(self, job: Job) -> str | None:
        """``waiting_for`` of a job being written now (re-queued). When the takers cannot be
        read (the store is away), None, and the next pass reads the whole queue again."""
        try:
            return await self.waiting_for(job)
        except MangwaleError:
            self._last = None
            return None

    async def refresh(self, *, publish: bool = False) -> None:
        """Write the queued jobs whose ``waitingFor`` changed (each with its ``training_update``).

        A queued job's answer changes only when the takers do: a job created or re-queued gets
        its answer as it is written (``Service.create_job``, ``WorkerHub._requeue``). So with
        the same takers as at the last pass this reads nothing (the hub's sweep calls it every
        few seconds, and a queue of 65,000 jobs read each time held the loop for half a second:
        POST p99 261 ms in bench/rest.py). A pass reads the queue a page at a time, giving the
        loop back between pages."""
        async with self._lock:
            if publish:
                await self.publish()
            takers = await self.takers()
            seen = frozenset(takers)
            if seen == self._last:
                return
            after: Cursor | None = None
            while True:
                page = await self.store.list_jobs(statuses=[JobStatus.QUEUED], limit=PAGE, after=after)
                for job in page:
                    await self._settle(job, takers)
                if len(page) < PAGE:
                    break
                after = Cursor(page[-1].created_at, page[-1].id)
                await asyncio.sleep(0)
            self._last = seen

    async def _settle(self, job: Job, takers: list[Taker]) -> None:
        """Write ``job`` if what it waits for is not what it says."""
        now = routing.waiting_for(job, takers)
        if now == job.waiting_for:
            return
        if job.message is None or job.message == job.waiting_for:
            job.message = now  # the message said what it waited for: say the new answer
        job.waiting_for = now
        job.updated_at = now_ms()
        try:
            await self.store.write_job(job, wire.training_update(job),
                                       expect=Expect(attempt=job.attempt, statuses=frozenset({"queued"})))  # fmt: skip
        except StaleWrite:
            return  # it started (or ended) meanwhile: nothing waits any more
        log.info("job %s: %s", job.id, now or "a taker that can run it is live")
