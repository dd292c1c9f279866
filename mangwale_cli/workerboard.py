"""The worker board: who sees which workers, and how their changes reach the event streams.

The hub (``workers.py``) owns the workers connected to its instance. The board publishes each
change of one as a ``worker_update`` (a ``GET /workers`` row, docs/protocol.md) and answers which
workers the other instances have. Two peers:

- ``LocalBoard`` (the embedded store, one instance): a change goes straight to this instance's
  subscribers (``EventBus.notify``); there is nobody else to tell.
- ``RedisBoard`` (many instances on one Redis): a change is written as the worker's row
  (``worker:{id}``, with a TTL its heartbeats renew) and appended to its own small stream
  (``workerupdates``, MAXLEN ~ ``workers.update_retention``), in one MULTI. Every instance,
  this one included, follows that stream and hands each message to its own subscribers, so all
  clients of all instances see one order. ``rows`` reads every instance's rows.

When an instance dies, nobody is left to announce its workers lost: every instance's sweep
(``RedisBoard.sweep``) marks a row whose heartbeat is half a lease old ``lost``, and announces an
expired row ``gone``; a compare-and-set makes exactly one instance do each. A heartbeat that finds
its row marked so (its instance was only cut off from Redis) announces it back.

``worker_update`` messages are never in the event log: they have no seq, are not replayed, and
cannot push a training event out of the replay window. A client takes the current rows from
``GET /workers`` and the changes after it from the stream.

This module never imports the web framework.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

from . import wire
from .eventlog import Notice

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from .events import EventBus
    from .store.redis_keys import RedisKeys

log = logging.getLogger(__name__)


class Board(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, row: dict[str, Any]) -> None:
        """A worker changed: keep its row where others see it and announce it."""

    async def refresh(self, row: dict[str, Any]) -> None:
        """A heartbeat: keep the row fresh, announce nothing."""

    async def remove(self, row: dict[str, Any]) -> None:
        """A worker is forgotten: drop its row and announce it ``gone``."""

    async def rows(self) -> list[dict[str, Any]]:
        """Rows of workers that other instances (may) hold; [] with one instance."""

    async def instance_of(self, worker_id: str) -> str | None:
        """The instance whose row of the worker is current (None: nobody's, or one instance)."""

    async def sweep(self, silent_ms: float) -> None:
        """Announce the workers of instances that can no longer do it (shared store only)."""


def gone(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "state": "gone", "removed": True}


class LocalBoard:
    """One instance: announce to this instance's subscribers, keep nothing."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def publish(self, row: dict[str, Any]) -> None:
        self.bus.notify(Notice(wire.dumps(wire.worker_update(row))))

    async def refresh(self, row: dict[str, Any]) -> None:
        pass

    async def remove(self, row: dict[str, Any]) -> None:
        await self.publish(gone(row))

    async def rows(self) -> list[dict[str, Any]]:
        return []

    async def instance_of(self, worker_id: str) -> str | None:
        return None

    async def sweep(self, silent_ms: float) -> None:
        pass


# KEYS: worker:{id}, workerupdates; ARGV: the row as read, the row marked lost, its update, maxlen.
MARK_LOST = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'd', ARGV[3])
return 1
"""

# KEYS: worker:{id}, workers, workerupdates; ARGV: id, the row, its update, ttl ms, maxlen.
# A heartbeat: keep the row fresh; announce it only when another instance had marked it lost.
REFRESH = """
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
if old and cjson.decode(old)['state'] ~= cjson.decode(ARGV[2])['state'] then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'd', ARGV[3])
  return 1
end
return 0
"""


class RedisBoard:
    """Many instances on one Redis: rows with a TTL, and a stream of their changes."""

    def __init__(self, client: Redis, reader: Redis, keys: RedisKeys, bus: EventBus, *, ttl: float,
                 retention: int, block: float = 1.0, retry: float = 0.5) -> None:  # fmt: skip
        self.r = client
        self.reader = reader  # a pool whose socket timeout allows XREAD BLOCK
        self.k = keys
        self.bus = bus
        self.ttl_ms = max(1, int(ttl * 1000))
        self.retention = retention
        self.block = block
        self.retry = retry
        self._last = "$"
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.seen: dict[str, dict[str, Any]] = {}  # the newest row announced of each worker
        self._mark_lost = client.register_script(MARK_LOST)
        self._refresh = client.register_script(REFRESH)

    async def start(self) -> None:
        newest: Any = await self.r.xrevrange(self.k.worker_updates, count=1)
        self._last = newest[0][0].decode() if newest else "0-0"
        self._task = asyncio.create_task(self._follow(), name="workerboard-reader")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            # Not gather: a cancel that lands inside redis-py's read can come out as a
            # ConnectionError; the flag ends the loop then, within one block.
            await asyncio.wait({self._task}, timeout=self.block + self.retry + 1)

    async def _follow(self) -> None:
        from redis.exceptions import RedisError

        failing = False
        while not self._stopping:
            try:
                resp: Any = await self.reader.xread({self.k.worker_updates: self._last}, count=500,
                                                    block=int(self.block * 1000))  # fmt: skip
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("worker updates: the stream is unreachable (%s); retrying", exc)
                failing = True
                await asyncio.sleep(self.retry)
                continue
            failing = False
            for _stream, entries in resp or ():
                for entry_id, fields in entries:
                    self._last = entry_id.decode()
                    text = fields[b"d"].decode()
                    self._saw(text)
                    self.bus.notify(Notice(text))

    def _saw(self, text: str) -> None:
        row = wire.loads(text).get("worker") or {}
        if row.get("removed"):
            self.seen.pop(str(row.get("id")), None)
        elif "id" in row:
            self.seen[row["id"]] = row

    async def publish(self, row: dict[str, Any]) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.set(self.k.worker(row["id"]), wire.dumps(row), px=self.ttl_ms)
            p.sadd(self.k.workers, row["id"])
            p.xadd(self.k.worker_updates, {"d": wire.dumps(wire.worker_update(row))}, maxlen=self.retention,
                   approximate=True)  # fmt: skip
            await p.execute()

    async def refresh(self, row: dict[str, Any]) -> None:
        # SADD too: a reader may have pruned the id between its SMEMBERS and its MGET.
        await self._refresh(keys=[self.k.worker(row["id"]), self.k.workers, self.k.worker_updates],
                            args=[row["id"], wire.dumps(row), wire.dumps(wire.worker_update(row)), self.ttl_ms,
                                  self.retention])  # fmt: skip

    async def sweep(self, silent_ms: float) -> None:
        ids: Any = sorted(await self.r.smembers(self.k.workers))
        if not ids:
            return
        docs: Any = await self.r.mget([self.k.worker(i.decode()) for i in ids])
        now = wire.now_ms()
        for worker_id, doc in zip(ids, docs, strict=True):
            if doc is None:  # expired: its instance died forget_after ago; one instance says gone
                if await self.r.srem(self.k.workers, worker_id):
                    wid = worker_id.decode()
                    row = self.seen.get(wid) or {"id": wid, "name": wid, "labels": [], "kinds": [], "versions": {},
                                                 "concurrency": 0, "running": [], "lastHeartbeat": 0}  # fmt: skip
                    await self.r.xadd(self.k.worker_updates, {"d": wire.dumps(wire.worker_update(gone(row)))},
                                      maxlen=self.retention, approximate=True)  # fmt: skip
                continue
            row = wire.loads(doc)
            if row.get("state") != "lost" and now - int(row.get("lastHeartbeat") or 0) > silent_ms:
                lost = {**row, "state": "lost"}
                await self._mark_lost(keys=[self.k.worker(row["id"]), self.k.worker_updates],
                                      args=[doc, wire.dumps(lost), wire.dumps(wire.worker_update(lost)), self.retention])  # fmt: skip

    async def instance_of(self, worker_id: str) -> str | None:
        doc: Any = await self.r.get(self.k.worker(worker_id))
        return None if doc is None else wire.loads(doc).get("instance")

    async def remove(self, row: dict[str, Any]) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.delete(self.k.worker(row["id"]))
            p.srem(self.k.workers, row["id"])
            p.xadd(self.k.worker_updates, {"d": wire.dumps(wire.worker_update(gone(row)))}, maxlen=self.retention,
                   approximate=True)  # fmt: skip
            await p.execute()

    async def rows(self) -> list[dict[str, Any]]:
        ids: Any = sorted(await self.r.smembers(self.k.workers))
        if not ids:
            return []
        docs: Any = await self.r.mget([self.k.worker(i.decode()) for i in ids])
        expired = [i for i, doc in zip(ids, docs, strict=True) if doc is None]
        if expired:  # the instance that held it died and nobody renewed it: forgotten
            await self.r.srem(self.k.workers, *expired)
        return [wire.loads(doc) for doc in docs if doc is not None]
