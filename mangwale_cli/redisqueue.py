"""The job queue that many instances share.

``RedisQueue`` is a Redis stream read by one consumer group that every instance joins. An entry
delivered to an instance is *leased* to it: while the job runs, the instance renews the lease
every ``lease / 3`` seconds by resetting the entry's idle time (``XCLAIM ... JUSTID``, and only
while the entry is still its own). An entry idle for longer than ``lease`` (its instance died or
hung) is claimed by another instance with ``XAUTOCLAIM``; the runner finds the job ``running``
and starts a new attempt. A renewal that finds the entry owned by someone else sets
``Lease.lost`` and the runner stops its copy. Execution is therefore at-least-once.

A cancel request crosses instances twice: a key that whoever takes the job next will see, and a
pub/sub message for the instance running it now.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from .jobqueue import Lease
from .store import redis_keys

log = logging.getLogger(__name__)

CANCEL_TTL = 24 * 3600  # seconds a cancel request waits for a job nobody runs


# KEYS: queue. ARGV: group, consumer, entry id. 1 if the entry is still this consumer's.
_OWNED = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
"""
_RENEW = _OWNED + "redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')\nreturn 1"
# Every entry is listed under its job in KEYS[1] .. ENTRIES_SUFFIX (job id -> entry id), so an
# entry nobody read can be deleted when its job no longer needs it (``forget``). An entry is
# unlisted only by the script that deletes it, and only if it is still the one listed.
_UNLIST = (
    f"if redis.call('HGET', KEYS[1] .. '{redis_keys.ENTRIES_SUFFIX}', ARGV[4]) == ARGV[3] then\n"
    f"  redis.call('HDEL', KEYS[1] .. '{redis_keys.ENTRIES_SUFFIX}', ARGV[4])\nend\n"
)
# ARGV: group, consumer, entry id, job id
_DONE = _OWNED + "redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])\nredis.call('XDEL', KEYS[1], ARGV[3])\n" + _UNLIST + "return 1"
_REQUEUE = _OWNED + (
    "redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])\nredis.call('XDEL', KEYS[1], ARGV[3])\n" + _UNLIST
    + f"redis.call('HSET', KEYS[1] .. '{redis_keys.ENTRIES_SUFFIX}', ARGV[4], redis.call('XADD', KEYS[1], '*', 'job', ARGV[4]))\n"
    "return 1"
)
# KEYS: queue. ARGV: job id.
_PUT = (
    f"local e = redis.call('XADD', KEYS[1], '*', 'job', ARGV[1])\n"
    f"redis.call('HSET', KEYS[1] .. '{redis_keys.ENTRIES_SUFFIX}', ARGV[1], e)\nreturn e"
)
# KEYS: queue. ARGV: group, job id. Delete the job's entry if no instance has read it (one that
# was read is the reader's: it finds the job taken and removes the entry itself). 1 if deleted.
_FORGET = f"""
local entries = KEYS[1] .. '{redis_keys.ENTRIES_SUFFIX}'
local e = redis.call('HGET', entries, ARGV[2])
if not e then return 0 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], e, e, 1) > 0 then return 0 end
redis.call('XDEL', KEYS[1], e)
redis.call('HDEL', entries, ARGV[2])
return 1
"""


class RedisQueue:
    """Many instances: a stream with a consumer group, leases renewed by heartbeat."""

    shared = True

    def __init__(
        self,
        redis: Redis,
        reader: Redis,
        *,
        url: str,
        prefix: str,
        consumer: str,
        lease: float,
        block: float = 1.0,
        retry: float = 0.5,
    ) -> None:
        self.r = redis
        self.reader = reader  # its own connections: XREADGROUP BLOCK holds one
        self.url = url
        self.k = redis_keys.RedisKeys(prefix)
        self.consumer = consumer
        self.lease = lease
        self.block = block
        self.retry = retry
        self.held: dict[bytes, Lease] = {}
        self._own: deque[tuple[bytes, bytes]] = deque()  # entries a previous life of this consumer held
        self._tasks: list[asyncio.Task[None]] = []
        self._renew = redis.register_script(_RENEW)
        self._done = redis.register_script(_DONE)
        self._requeue = redis.register_script(_REQUEUE)
        self._put = redis.register_script(_PUT)
        self._forget = redis.register_script(_FORGET)
        self._failing = False
        self.depth = 0  # entries never delivered, as of the last look

    async def start(self, on_cancel: Callable[[str], None]) -> None:
        await self._ensure_group()
        # Entries still pending for this consumer name were held by this instance before it
        # restarted: take them over now rather than after the lease runs out.
        resp: Any = await self.r.xreadgroup(redis_keys.WORKERS_GROUP, self.consumer, {self.k.queue: "0"}, count=10_000)
        for _stream, entries in resp or ():
            for entry_id, fields in entries:
                if fields:
                    self._own.append((entry_id, fields.get(b"job", b"")))
        self._tasks = [
            asyncio.create_task(self._heartbeat(), name="queue-heartbeat"),
            asyncio.create_task(self._listen(on_cancel), name="queue-cancel-listener"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _ensure_group(self) -> None:
        try:
            await self.r.xgroup_create(self.k.queue, redis_keys.WORKERS_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def put(self, job_id: str) -> None:
        await self._put(keys=[self.k.queue], args=[job_id])

    async def forget(self, job_id: str) -> bool:
        """The job no longer needs its entry (a remote worker started it): delete it, unless an
        instance has read it already. True if deleted. Never raises: an entry left behind is
        removed by the next runner that reads it (the job is taken)."""
        try:
            return bool(await self._forget(keys=[self.k.queue], args=[redis_keys.WORKERS_GROUP, job_id]))
        except (RedisError, OSError) as exc:  # NOGROUP (Redis lost its data) too
            log.warning("job queue: could not delete the entry of %s (%s)", job_id, exc)
            return False

    async def take(self) -> Lease:
        """Wait for a job: a stale entry of a dead instance first, else a new one."""
        while True:
            try:
                lease = await self._take_once()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if not self._failing:
                    log.error("job queue at %s is unreachable (%s); workers wait", self.url, exc)
                self._failing = True
                await asyncio.sleep(self.retry)
                continue
            if self._failing:
                self._failing = False
                log.info("job queue at %s is back", self.url)
            if lease is not None:
                if lease.entry is not None and lease.entry in self.held:
                    # Our own entry, idle because renewals failed while Redis was away: the copy
                    # holding it here still starts or runs the job (XAUTOCLAIM just renewed it).
                    # A second copy would find the job busy here and delete the entry, which a
                    # start that then failed needs to be taken again.
                    continue
                self.held[lease.entry or b""] = lease
                return lease

    async def _take_once(self) -> Lease | None:
        if self._own:
            entry_id, job = self._own.popleft()
            return Lease(job.decode(), entry_id, 2)
        try:
            claim: Any = await self.r.xautoclaim(
                self.k.queue, redis_keys.WORKERS_GROUP, self.consumer, int(self.lease * 1000), start_id="0-0", count=1
            )
            claimed = claim[1]
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._ensure_group()  # Redis lost its data
            return None
        for entry_id, fields in claimed:
            if fields:
                pending = await self.r.xpending_range(self.k.queue, redis_keys.WORKERS_GROUP, entry_id, entry_id, 1)
                n = int(pending[0]["times_delivered"]) if pending else 2
                log.warning("job queue: took over %s (delivery %d): its instance stopped renewing", fields.get(b"job", b"?").decode(), n)
                return Lease(fields[b"job"].decode(), entry_id, n)
        try:
            resp: Any = await self.reader.xreadgroup(
                redis_keys.WORKERS_GROUP, self.consumer, {self.k.queue: ">"}, count=1, block=int(self.block * 1000)
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._ensure_group()
            return None
        for _stream, entries in resp or ():
            for entry_id, fields in entries:
                return Lease(fields[b"job"].decode(), entry_id, 1)
        return None

    async def _owned(self, script: AsyncScript, lease: Lease) -> bool:
        if lease.entry is None:
            return False
        ok = await script(keys=[self.k.queue], args=[redis_keys.WORKERS_GROUP, self.consumer, lease.entry, lease.job_id])
        return bool(ok)

    async def done(self, lease: Lease) -> None:
        """The job reached a terminal state (or needs no run): remove its entry."""
        self.held.pop(lease.entry or b"", None)
        if not lease.lost.is_set():
            await self._owned(self._done, lease)

    async def requeue(self, lease: Lease) -> None:
        """Hand the job back at once (graceful shutdown), not after the lease runs out."""
        self.held.pop(lease.entry or b"", None)
        if not lease.lost.is_set():
            await self._owned(self._requeue, lease)

    def release(self, lease: Lease) -> None:
        """Stop renewing: once the lease runs out, an instance takes the job again."""
        self.held.pop(lease.entry or b"", None)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                self.depth = await self._undelivered()
            except (RedisError, OSError):
                pass
            for key, lease in list(self.held.items()):
                try:
                    owned = await self._owned(self._renew, lease)
                except (RedisError, OSError) as exc:
                    log.warning("job queue: cannot renew the lease on %s (%s)", lease.job_id, exc)
                    continue
                if not owned and self.held.get(key) is lease:
                    log.warning("job queue: lost the lease on %s to another instance; stopping this copy", lease.job_id)
                    self.held.pop(key, None)
                    lease.lost.set()

    async def _undelivered(self) -> int:
        """Entries in the stream that no instance holds: all of them but the pending ones (the
        group's ``lag`` is unknown to Redis once an entry nobody read was deleted: ``forget``)."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.xlen(self.k.queue)
            pipe.xpending(self.k.queue, redis_keys.WORKERS_GROUP)
            length, pending = await pipe.execute()
        return max(0, int(length) - int(pending.get("pending") or 0))

    async def request_cancel(self, job_id: str) -> None:
        await self.r.set(self.k.cancel(job_id), b"1", ex=CANCEL_TTL)
        await self.r.publish(self.k.cancel_channel, job_id)

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.r.exists(self.k.cancel(job_id)))

    async def _listen(self, on_cancel: Callable[[str], None]) -> None:
        while True:
            pubsub = self.reader.pubsub()
            try:
                await pubsub.subscribe(self.k.cancel_channel)
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.block)
                    if msg is not None and msg.get("type") == "message":
                        data = msg["data"]
                        on_cancel(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):
                await asyncio.sleep(self.retry)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001, S110 - closing a broken client: nothing to learn from its error
                    pass
