"""The event bus on Redis Streams: every instance sees every event, in one global ``seq`` order.

Publishing: ``publish`` queues the event; one flusher task per instance appends queued events
with a Lua script that numbers them (``INCR`` of the shared seq counter, ``HINCRBY`` of the
job's ``jobSeq``), writes ``seq``, ``jobSeq`` and the epoch into the JSON text it was given, and
``XADD``s each with the stream id ``<seq>-1``, so stream order is seq order across instances.
A batch carries a unique id: a retry after a lost reply is recognised and not appended twice.
While Redis is unreachable, events wait in memory in order; none is dropped.

Delivery: one reader task per instance follows the stream (``XREAD BLOCK``) into an in-memory
``EventRing`` mirror and hands each batch to the local subscribers. An instance's own events
reach its clients the same way as everyone else's, so every client of every instance sees one
order. Replay reads the mirror, so ``subscribe`` stays one synchronous step (no gap, no
duplicate; see docs/protocol.md).

Failures: when the reader loses Redis, live subscribers are closed with a reason (the client
reconnects and resumes with ``since``) and new ones are refused with 503 until it is back. If
Redis came back without its data, the epoch key is gone: the first instance to notice starts a
new epoch with seq continuing above what it has seen, and every instance resets its mirror and
closes its subscribers, which then get ``resync`` / ``epoch_changed``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from itertools import islice
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from . import wire
from .errors import Unavailable
from .eventlog import EventRing, Record, new_epoch
from .events import EventBus
from .store import redis_keys

log = logging.getLogger(__name__)

BATCH = 500  # events per append script call

# KEYS: stream, seq counter, epoch, jobSeq hash, batch marker
# ARGV: maxlen, count, then (job id, is_log, body) per event. Returns the number appended.
_APPEND = """
local epoch = redis.call('GET', KEYS[3])
if not epoch then return redis.error_reply('NOEPOCH no epoch') end
if not redis.call('SET', KEYS[5], '1', 'NX', 'EX', 600) then return 0 end
local n = tonumber(ARGV[2])
for i = 0, n - 1 do
  local jid, islog, body = ARGV[3 + 3 * i], ARGV[4 + 3 * i], ARGV[5 + 3 * i]
  local seq = redis.call('INCR', KEYS[2])
  local tail = ',"seq":' .. seq
  local js = ''
  if jid ~= '' and islog == '0' then
    js = redis.call('HINCRBY', KEYS[4], jid, 1)
    tail = tail .. ',"jobSeq":' .. js
  end
  tail = tail .. ',"epoch":"' .. epoch .. '"}'
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], seq .. '-1',
    'j', jid, 'k', islog, 's', js, 'e', epoch, 'd', string.sub(body, 1, -2) .. tail)
end
return n
"""

# KEYS: epoch, seq counter. ARGV: a candidate epoch, the highest seq the caller has seen.
# Returns the epoch in force: the existing one, or the candidate when there was none (Redis
# lost its data) or when the counter is below a seq the caller saw (Redis came back from an
# older snapshot, so those seqs would be issued again): the new epoch continues above them.
_ENSURE_EPOCH = """
local e = redis.call('GET', KEYS[1])
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
local seen = tonumber(ARGV[2])
if e and cur >= seen then return e end
redis.call('SET', KEYS[1], ARGV[1])
if cur < seen then redis.call('SET', KEYS[2], seen) end
return ARGV[1]
"""


class MirrorRing(EventRing):
    """The kept events as this instance has read them from the stream. Below ``floor`` (where
    this instance's copy starts, or a gap it could not fill) it cannot tell per job what is
    missing, so replay from there is reported as trimmed."""

    floor = 0

    def missing_since(self, since: int, jobs: set[str] | None = None) -> bool:
        return since < self.floor or super().missing_since(since, jobs)


class RedisEventBus(EventBus):
    def __init__(
        self,
        redis: Redis,
        reader: Redis,
        *,
        url: str,
        prefix: str,
        instance: str,
        retention: int,
        log_retention: int,
        queue_size: int = 1000,
        block: float = 1.0,
        retry: float = 0.5,
    ) -> None:
        super().__init__(MirrorRing(retention=retention, log_retention=log_retention), queue_size=queue_size)  # type: ignore[arg-type]  # see self.log
        self.log: MirrorRing  # type: ignore[assignment]  # the bus reads only the EventRing part
        self.r = redis
        self.reader = reader  # its own connection: XREAD BLOCK holds it
        self.url = url
        self.k = redis_keys.RedisKeys(prefix)
        self.instance = instance
        self.block = block
        self.retry = retry
        self.maxlen = retention + log_retention
        self._outbox: deque[tuple[str, str, str]] = deque()  # (job id, "1" if job_log, JSON)
        self._wake = asyncio.Event()
        self._advanced = asyncio.Event()
        self._boot = secrets.token_hex(4)
        self._batches = 0
        self._reader_ok = False
        self._append_failing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._append = redis.register_script(_APPEND)
        self._ensure = redis.register_script(_ENSURE_EPOCH)

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Read the stream's kept events into the mirror and start following it."""
        await self._load(await self._ensure_epoch())
        self._reader_ok = True
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="eventstream-reader"),
            asyncio.create_task(self._flush_loop(), name="eventstream-flusher"),
        ]

    def start(self, fsync_interval: float) -> None:
        """Nothing to fsync: Redis persists the stream (as its own configuration says)."""

    def reserve(self, *args: Any) -> None:
        """Seqs come from the shared counter; no local reservation."""

    async def stop(self) -> None:
        self._stopping = True
        loop = asyncio.get_running_loop()
        end = loop.time() + 3.0
        while self._outbox and loop.time() < end and not self._append_failing:
            await asyncio.sleep(0.01)
        if self._outbox:
            log.error("stopping with %d events not appended to %s", len(self._outbox), self.url)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in list(self.subscribers):
            sub.close()

    @property
    def available(self) -> bool:
        return self._reader_ok

    @property
    def pending(self) -> int:
        """Events published here and not yet appended to the stream."""
        return len(self._outbox)

    # --- publishing -----------------------------------------------------------------------

    def publish(self, event: dict[str, Any]) -> int:
        """Queue ``event`` for the stream; its seq is assigned there (0 is returned)."""
        job_id = wire.event_job_id(event)
        is_log = event["type"] == wire.MsgType.JOB_LOG
        self._outbox.append((job_id or "", "1" if is_log else "0", wire.dumps(event)))
        self._wake.set()
        return 0

    def flush(self) -> None:
        """Appending is the flusher task's job."""

    async def _flush_loop(self) -> None:
        while True:
            while not self._outbox:
                self._wake.clear()
                await self._wake.wait()
            batch = list(islice(self._outbox, BATCH))
            self._batches += 1
            marker = self.k.batch(f"{self.instance}:{self._boot}:{self._batches}")
            args: list[Any] = [self.maxlen, len(batch)]
            for item in batch:
                args.extend(item)
            keys = [self.k.events, self.k.seq, self.k.epoch, self.k.jobseq, marker]
            while True:
                try:
                    await self._append(keys=keys, args=args)
                    break
                except ResponseError as exc:
                    if "NOEPOCH" not in str(exc):
                        raise
                    await self._ensure_epoch()  # Redis lost its data: start a new epoch
                except (RedisError, OSError) as exc:
                    if not self._append_failing:
                        log.error("cannot append events to %s (%s); %d wait", self.url, exc, len(self._outbox))
                    self._append_failing = True
                    await asyncio.sleep(self.retry)
            if self._append_failing:
                self._append_failing = False
                log.info("appending events to %s works again", self.url)
            for _ in batch:
                self._outbox.popleft()

    async def _ensure_epoch(self) -> str:
        epoch = await self._ensure(keys=[self.k.epoch, self.k.seq], args=[new_epoch(), self.log.head])
        return epoch.decode() if isinstance(epoch, bytes) else str(epoch)

    # --- following ------------------------------------------------------------------------

    async def _load(self, epoch: str) -> None:
        """Fill the mirror with the newest kept events of ``epoch``."""
        entries: Any = await self.r.xrevrange(self.k.events, count=self.maxlen)
        records = [r for r in (_record(e) for e in reversed(entries)) if r[1] == epoch]
        if records:
            head, base = records[-1][0].seq, records[0][0].seq - 1
        else:
            head = base = int(await self.r.get(self.k.seq) or 0)
        self.log.reset(epoch, base)
        self.log.floor = base
        self.log.keep([r for r, _ in records])
        assert self.log.head == head or not records

    async def _read_loop(self) -> None:
        down_since: float | None = None
        while True:
            try:
                if not self._reader_ok:
                    await self._recover()
                    self._reader_ok = True
                    if down_since is not None:
                        log.info("event stream at %s is back", self.url)
                    down_since = None
                resp: Any = await self.reader.xread(
                    {self.k.events: f"{self.log.head}-1"}, count=1000, block=int(self.block * 1000)
                )
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self._reader_ok or down_since is None:
                    log.error("event stream at %s is unreachable (%s); clients are told to reconnect", self.url, exc)
                    down_since = asyncio.get_running_loop().time()
                self._reader_ok = False
                self._close_all("store_unavailable")
                await asyncio.sleep(self.retry)
                continue
            if resp:
                for _stream, entries in resp:
                    self._ingest(entries)
            elif not await self._same_history():
                self._reader_ok = False  # _recover starts the new epoch on the next turn

    async def _same_history(self) -> bool:
        """Whether Redis still holds the history this instance follows. A restart can go
        unnoticed by a blocked read (the client reconnects by itself), so an idle reader looks:
        no epoch, or a seq counter below what was read, means Redis lost data."""
        try:
            got: Any = await self.reader.mget(self.k.epoch, self.k.seq)
            epoch, seq = got
        except (RedisError, OSError):
            return True  # the next read reports the outage
        if epoch is not None and epoch.decode() == self.log.epoch and int(seq or 0) >= self.log.head:
            return True
        log.warning("event stream at %s lost its history (epoch %s, seq %s; read up to %d)", self.url,
                    epoch.decode() if epoch else None, int(seq or 0), self.log.head)
        return False

    async def _recover(self) -> None:
        """After an outage: same epoch, carry on from the head; a new one, start over."""
        epoch = await self._ensure_epoch()
        if epoch != self.log.epoch:
            log.warning("event stream epoch changed (%s -> %s): Redis lost its data; clients resync", self.log.epoch, epoch)
            await self._load(epoch)
            self._close_all("epoch_changed")

    def _ingest(self, entries: list[Any]) -> None:
        batch: list[Record] = []
        for entry in entries:
            rec, epoch = _record(entry)
            if epoch != self.log.epoch:
                # Redis lost its data and another instance started a new epoch: reload.
                self._reader_ok = False
                break
            if rec.seq <= self.log.head:
                continue
            expected = (batch[-1].seq if batch else self.log.head) + 1
            if rec.seq != expected:
                # The stream was trimmed past where this instance had read: what lies between
                # is gone, so replay from before it must resync, and live clients missed it.
                log.warning("event stream: seqs %d..%d were trimmed before this instance read them", expected, rec.seq - 1)
                self._deliver_batch(batch)
                batch = []
                self.log.reset(self.log.epoch, rec.seq - 1)
                self.log.floor = rec.seq - 1
                self._close_all("history_trimmed")
            batch.append(rec)
        self._deliver_batch(batch)

    def _deliver_batch(self, batch: list[Record]) -> None:
        if batch:
            self.log.keep(batch)
            self._deliver(batch)
            self._advanced.set()
            self._advanced = asyncio.Event()

    def _close_all(self, reason: str) -> None:
        for sub in list(self.subscribers):
            sub.close(reason)

    async def catch_up(self, since: int | None) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + max(2.0, 2 * self.block)
        while not self._reader_ok and loop.time() < end:  # it may be reconnecting right now
            await asyncio.sleep(0.05)
        if not self._reader_ok:
            raise Unavailable(f"the event stream at {self.url} is unreachable; try again", code="store_unavailable")
        while since is not None and since > self.log.head and loop.time() < end:
            try:
                await asyncio.wait_for(self._advanced.wait(), end - loop.time())
            except TimeoutError:
                break


def _record(entry: Any) -> tuple[Record, str]:
    entry_id, f = entry
    seq = int(entry_id.split(b"-", 1)[0])
    job = f.get(b"j") or b""
    js = f.get(b"s") or b""
    rec = Record(
        seq,
        job.decode() if job else None,
        int(js) if js else None,
        f[b"d"].decode(),
        f.get(b"k") == b"1",
    )
    return rec, (f.get(b"e") or b"").decode()
