"""The job queue: which instance runs a queued job, and for how long it may hold it.

``LocalQueue`` is an ``asyncio.Queue``: one process owns the embedded store, and the runner's
start-up scan recovers what a crash interrupted.

``RedisQueue`` (``redisqueue.py``) is the queue that many instances share. It lives in a module
of its own so that a server on the embedded store never imports the Redis client: that import
is about a sixth of ``mangwale serve``'s start-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from .redisqueue import RedisQueue

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Lease:
    """A job handed to this instance's runner."""

    job_id: str
    entry: bytes | None = None  # the stream entry (RedisQueue)
    deliveries: int = 1  # how many times the entry was handed out (> 1: taken over)
    lost: asyncio.Event = field(default_factory=asyncio.Event)


class LocalQueue:
    """One process: an asyncio queue."""

    shared = False

    def __init__(self) -> None:
        self._q: asyncio.Queue[str] = asyncio.Queue()

    async def start(self, on_cancel: Callable[[str], None]) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def put(self, job_id: str) -> None:
        self._q.put_nowait(job_id)

    async def take(self) -> Lease:
        return Lease(await self._q.get())

    async def done(self, lease: Lease) -> None:
        pass

    async def forget(self, job_id: str) -> bool:
        """Nothing to delete: the runner skips a job it finds taken."""
        return False

    async def requeue(self, lease: Lease) -> None:
        """The job goes back for the next start (it is ``queued`` in the store)."""

    def release(self, lease: Lease) -> None:
        """Not used: with the embedded store a failing write fails the job's attempt, and the
        start-up scan re-queues what a crash left running."""

    async def request_cancel(self, job_id: str) -> None:
        pass

    async def cancel_requested(self, job_id: str) -> bool:
        return False

    @property
    def depth(self) -> int:
        return self._q.qsize()


JobQueue: TypeAlias = "LocalQueue | RedisQueue"
