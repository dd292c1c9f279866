"""Follow training events live over the WebSocket, resuming after any disconnect.

``Follower`` is the client side of the replay contract in docs/protocol.md:

* It connects to ``/ws/training`` with ``since`` (the last seq it handled), ``epoch`` and
  ``jobs``. Following job ids starts at ``since=0``, so the output holds each job's whole
  history; following everything (``all_jobs``) starts live from the server's head.
* It drops every event with ``seq <= last handled`` and advances ``last handled`` only after
  the handler has returned.
* On ``resync`` it re-fetches job state over REST (``SnapshotItem``) and continues live.
* On a transport failure or a retryable close code (``reconnect.classify``) it reconnects
  with exponential backoff and jitter (``reconnect.backoff``), reset after each good connection. Before each
  reconnect it asks REST about the jobs, since they may have ended while it was away. A job
  document that says terminal names the ``jobSeq`` of the job's newest event: the follower ends
  only once it has handled the events up to it (over REST if they are all there, else over the
  WebSocket), so the terminal event is always shown as the event it is.
* A ``job_deleted`` event (or a 404 for a job it had seen) ends the follow with ``NotFound``
  (exit 4, ``code`` "deleted" or "pruned") if the job had not been seen to end; ``all_jobs``
  drops the deleted jobs from its views.
* Fatal answers (401/403, unknown job, close 1008/4400) raise at once; ``max_retries`` and
  ``give_up_after`` raise ``GaveUp``; ``timeout`` raises ``TimedOut``; a server never reached
  within ``connect_timeout`` raises ``Unreachable`` (exit 8).

Everything it learns goes to one handler, in order: ``EventItem`` (a logged event, with its
text as the server sent it), ``ResyncItem``, ``SnapshotItem`` and ``ConnectionChange``
(defined in ``followitems``, re-exported here). No typer or rich here: ``mangwale watch``
renders what this module reports.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import urlencode

from . import __version__, wire
from .client import AsyncClient
from .errors import GaveUp, InvalidInput, MangwaleError, NotFound, TimedOut, Unreachable
from .followitems import (
    ConnectionChange,
    EventItem,
    Handler,
    Item,
    JobView,
    Outcome,
    ResyncItem,
    SnapshotItem,
    format_delay,
    is_terminal,
    outcome_code,
)
from .reconnect import (
    FollowSettings,
    backoff,
    classify,
    describe_failure,
    foreign_server,
    never_reached,
)
from .wire import MsgType

__all__ = [
    "ConnectionChange", "EventItem", "FollowSettings", "Follower", "Item", "JobView", "Outcome",
    "ResyncItem", "SnapshotItem", "backoff", "classify", "format_delay", "is_terminal", "outcome_code",
]

log = logging.getLogger(__name__)

SUBPROTOCOL = "mangwale.v1"


class _Dropped(Exception):
    """The connection ended without a fatal answer; reconnect."""


class _HandlerFailed(Exception):
    """The handler raised (its ``__cause__``): not a network problem, never retried."""


# --- the follower ------------------------------------------------------------------------------


class Follower:
    """Follow ``jobs`` (or the newest job with ``latest``, or everything with ``all_jobs``).

    ``run(handler)`` returns an ``Outcome`` once every followed job has ended (never with
    ``all_jobs``, which stops only at ``timeout`` or when cancelled). ``backoff`` is a factory of
    delay iterators (``FollowSettings.backoff`` by default); tests pass millisecond delays.
    ``rest`` replaces the REST client (an ``AsyncClient``-like object). ``connect_timeout``
    (default ``FollowSettings.connect_timeout``) bounds the wait for a server never reached yet.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        jobs: Sequence[str] = (),
        all_jobs: bool = False,
        latest: bool = False,
        since: int | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        give_up_after: float | None = None,
        connect_timeout: float | None = None,
        settings: FollowSettings | None = None,
        backoff: Callable[[], Iterator[float]] | None = None,
        rest: AsyncClient | None = None,
        token: str | None = None,
        rest_timeout: float = 10.0,
    ) -> None:
        if sum((bool(jobs), all_jobs, latest)) != 1:
            raise InvalidInput("follow job ids, the latest job or all jobs (exactly one of them)")
        if since is not None and since < 0:
            raise InvalidInput(f"since must be >= 0, got {since}", field="since")
        self.settings = settings or FollowSettings()
        self._backoff = backoff or self.settings.backoff
        self._own_rest = rest is None
        self.rest: Any = rest or AsyncClient(url, token=token, timeout=rest_timeout)
        self.url: str = self.rest.url
        self.all_jobs = all_jobs
        self.latest = latest
        self.timeout = timeout
        self.max_retries = max_retries
        self.give_up_after = give_up_after
        self.connect_timeout = self.settings.connect_timeout if connect_timeout is None else connect_timeout
        self.followed: list[str] = list(dict.fromkeys(jobs))
        self.jobs: dict[str, JobView] = {j: JobView(j) for j in self.followed}
        # With job ids, start from their first event; with --all, live from the head.
        self.last_seq: int | None = since if since is not None or all_jobs else 0
        self.epoch: str | None = None
        self.connection = ConnectionChange("connecting")
        self.duplicates = 0
        self.resyncs = 0
        self.connections = 0
        self.reached = False  # the server has answered once (REST or WebSocket)
        self._handler: Handler | None = None
        self._server_error: dict[str, Any] | None = None
        self._good = False
        self._dropped = False
        self._reach_deadline: asyncio.Timeout | None = None
        # Jobs REST said had ended, with the job document; each is done once its events up to
        # the document's jobSeq have been handled (they may still be on their way).
        self._ended: dict[str, dict[str, Any]] = {}

    # --- public ------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Every followed job has reached a terminal state (never true with ``all_jobs``)."""
        return bool(self.followed) and all(self.settled(j) for j in self.followed)

    def settled(self, job_id: str) -> bool:
        """The job has ended and every event up to the one that ended it has been handled."""
        view = self.jobs[job_id]
        doc = self._ended.get(job_id)
        if doc is None:
            return view.terminal
        return view.job_seq is not None and view.job_seq >= _job_seq(doc)

    def outcome(self) -> Outcome:
        ids = self.followed or list(self.jobs)
        return Outcome({j: self.jobs[j] for j in ids if j in self.jobs})

    async def run(self, handler: Handler) -> Outcome:
        self._handler = handler
        try:
            if self.timeout is None:
                await self._follow()
            else:
                try:
                    async with asyncio.timeout(self.timeout) as deadline:
                        await self._follow()
                except TimeoutError:
                    if not deadline.expired():
                        raise
                    raise TimedOut(f"--timeout {self.timeout:g} s reached before the jobs ended") from None
        except _HandlerFailed as exc:
            assert exc.__cause__ is not None
            raise exc.__cause__ from None
        finally:
            if self._own_rest:
                await self.rest.aclose()
        return self.outcome()

    def ws_url(self) -> str:
        params: dict[str, Any] = {}
        if self.last_seq is not None:
            params["since"] = self.last_seq
            if self.epoch:
                params["epoch"] = self.epoch
        if self.followed:
            params["jobs"] = ",".join(self.followed)
        query = urlencode(params, safe=",")
        return self.rest.ws_url + ("?" + query if query else "")

    # --- the loop ----------------------------------------------------------------------

    async def _follow(self) -> None:
        """The reconnect loop, bounded by ``connect_timeout`` until the server first answers."""
        reason: list[str] = []
        try:
            async with asyncio.timeout(self.connect_timeout) as self._reach_deadline:
                await self._loop(reason)
        except TimeoutError:
            if self.reached or self._reach_deadline is None or not self._reach_deadline.expired():
                raise
            raise never_reached(self.url, self.connect_timeout, reason[-1] if reason else None) from None

    def _mark_reached(self) -> None:
        if not self.reached:
            self.reached = True
            if self._reach_deadline is not None:
                self._reach_deadline.reschedule(None)  # from now on only the reconnect rules apply

    async def _loop(self, reasons: list[str]) -> None:
        delays = self._backoff()
        attempt = 0
        lost_at = time.monotonic()
        await self._state(ConnectionChange("connecting"))
        while True:
            self._good = False
            try:
                if await self._check_jobs():
                    return
                if await self._session():
                    return
                reason = "connection closed"
            except _HandlerFailed:
                raise
            except _Dropped as exc:
                reason = str(exc)
            except Exception as exc:  # noqa: BLE001 - classify re-raises what is not a network failure
                if not self.reached and (foreign := await foreign_server(exc, self.rest)):
                    raise foreign from None  # a wrong --url: no point in retrying it
                if _is_answer(exc):
                    self._mark_reached()
                fatal = classify(exc, self._server_error)
                if fatal is not None:
                    raise fatal from None
                reason = describe_failure(exc)
                log.debug("connection failed: %r", exc)
            reasons.append(reason)
            self._dropped = True
            if self._good:  # the last connection was good: start the backoff over
                delays, attempt, lost_at = self._backoff(), 0, time.monotonic()
            attempt += 1
            waited = time.monotonic() - lost_at
            # A server never reached is a wrong URL or one not started (exit 8); one that went
            # away after answering is waited for (exit 7 when the limits run out).
            stop = Unreachable if not self.reached else GaveUp
            if self.max_retries is not None and attempt > self.max_retries:
                raise stop(f"gave up after {self.max_retries} retries: {self.url} never answered ({reason})"
                           if not self.reached else f"gave up after {self.max_retries} retries ({reason})")
            if self.give_up_after is not None and waited >= self.give_up_after:
                raise stop(f"gave up: no connection to {self.url} for {waited:.1f} s ({reason})")
            delay = next(delays)
            if self.give_up_after is not None:
                delay = min(delay, self.give_up_after - waited)
            now = time.monotonic()
            await self._state(ConnectionChange("reconnecting", attempt, delay, reason, now + delay))
            await asyncio.sleep(delay)

    async def _check_jobs(self) -> bool:
        """Before each connection: resolve ``latest``, check that the jobs exist and, after a
        drop, whether they all ended meanwhile. True when there is nothing left to follow."""
        if self.latest and not self.followed:
            rows = await self.rest.list_jobs(limit=1)
            self._mark_reached()
            if not rows:
                raise NotFound("there are no jobs to follow yet", field="jobId")
            self.followed = [rows[0]["id"]]
            self.jobs[rows[0]["id"]] = JobView(rows[0]["id"], kind=rows[0].get("kind"))
        pending = [j for j in self.followed if not self.settled(j)]
        docs: dict[str, dict[str, Any] | None] = {}
        for j in pending:
            try:
                docs[j] = await self.rest.get_job(j)
            except NotFound:
                self._mark_reached()
                if not self._dropped or self.jobs[j].status is None:
                    raise
                # It existed and is gone: it ended and was deleted while we were away. The
                # WebSocket replay may still hold its last events (its outcome); if not, the
                # resync that follows says it was deleted.
                docs[j] = None
            self._mark_reached()
        for j, doc in docs.items():
            if doc is not None:
                self.jobs[j].kind = self.jobs[j].kind or doc.get("kind")
        if not self._dropped or not docs:
            return not pending and bool(self.followed)
        ended = {j: d for j, d in docs.items() if d is not None and is_terminal(d.get("status"))}
        if len(ended) < len(docs):
            return False
        return await self._catch_up_over_rest(ended)

    async def _catch_up_over_rest(self, docs: dict[str, dict[str, Any]]) -> bool:
        """Every followed job ended while we were away: read their remaining events over REST
        instead of reconnecting. True when that covered everything, up to each document's
        ``jobSeq``; False when some events are not there yet (a server whose log lags its
        store), so they are awaited over the WebSocket. A job whose events have a gap, or a
        server that gives no ``jobSeq``, gets the job document as its final state."""
        since = self.last_seq or 0
        events: list[dict[str, Any]] = []
        gaps: set[str] = set()
        for job_id in docs:
            got = sorted(await self.rest.job_events(job_id, since), key=lambda e: e["seq"])
            known = self.jobs[job_id].job_seq
            first = next((e["jobSeq"] for e in got if isinstance(e.get("jobSeq"), int)), None)  # job_log has none
            if known is not None and isinstance(first, int) and first != known + 1:
                gaps.add(job_id)  # the log no longer has what came between
            else:
                events.extend(got)
        for job_id, doc in docs.items():
            if job_id not in gaps and _job_seq(doc):
                self._ended[job_id] = doc
        for ev in sorted(events, key=lambda e: e["seq"]):
            await self._handle_event(ev, wire.dumps(ev))
        for job_id, doc in docs.items():
            if job_id in self._ended:
                continue
            if not self.jobs[job_id].terminal or job_id in gaps:
                await self._snapshot(job_id, doc, "ended_while_away")
        return self.done

    async def _session(self) -> bool:
        """One WebSocket connection. True when the followed jobs are done; raises when the
        connection ends."""
        from websockets.asyncio.client import connect
        from websockets.typing import Subprotocol

        s = self.settings
        self._server_error = None
        headers = {k: v for k, v in getattr(self.rest, "headers", {}).items() if k == "Authorization"}
        async with connect(
            self.ws_url(),
            additional_headers=headers,
            user_agent_header=f"mangwale/{__version__}",
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            compression=None,
            open_timeout=max(5.0, s.ping_timeout),
            ping_interval=s.ping_interval,
            ping_timeout=s.ping_timeout,
            close_timeout=min(2.0, s.ping_timeout),
            max_size=2**24,
        ) as ws:
            self.connections += 1
            self._mark_reached()
            while True:
                raw = await ws.recv()
                if await self._on_message(raw if isinstance(raw, str) else raw.decode()):
                    return True

    async def _on_message(self, raw: str) -> bool:
        try:
            msg = wire.loads(raw)
        except ValueError:
            raise _Dropped("the server sent a message that is not JSON") from None
        if not isinstance(msg, dict):
            raise _Dropped("the server sent a message that is not a JSON object")
        kind = msg.get("type")
        if kind == MsgType.CONNECTED:
            self.epoch = msg.get("epoch") or self.epoch
            if self.last_seq is None:  # live only: we are at the head now
                self.last_seq = int(msg.get("headSeq", 0))
            self._good = True
            await self._state(ConnectionChange("live"))
            return False
        if kind == MsgType.RESYNC:
            await self._resync(msg, raw)
            return self.done
        if kind == MsgType.ERROR:
            self._server_error = msg
            log.info("server error message: %s", msg.get("message"))
            return False
        if "seq" in msg:
            return await self._handle_event(msg, raw)
        return False  # pong, or a control message a newer server added

    async def _handle_event(self, ev: dict[str, Any], raw: str) -> bool:
        seq = int(ev["seq"])
        if self.last_seq is not None and seq <= self.last_seq:
            self.duplicates += 1
            return False
        if ev.get("type") == MsgType.JOB_DELETED:
            return await self._deleted(ev, raw)
        view = None
        job_id = wire.event_job_id(ev)
        if job_id is not None and (self.all_jobs or job_id in self.jobs):
            view = self.jobs.get(job_id)
            if view is None:
                view = self.jobs[job_id] = JobView(job_id)
            view.apply_event(ev)
            doc = self._ended.get(job_id)
            if doc is not None and view.job_seq is not None and view.job_seq >= _job_seq(doc) and not view.terminal:
                view.apply_doc(doc)  # REST's outcome stands (never needed with an atomic record)
        await self._emit(EventItem(ev, raw, view))
        self.last_seq = seq  # only now: the event has been handled
        self.epoch = ev.get("epoch") or self.epoch
        return self.done

    async def _deleted(self, ev: dict[str, Any], raw: str) -> bool:
        """A ``job_deleted`` event: ``all_jobs`` forgets the jobs; a followed job that had not
        been seen to end stops the follow (exit 4)."""
        reason = str(ev.get("reason") or "deleted")
        named = [j for j in ev.get("jobIds") or () if isinstance(j, str)]
        gone = tuple(self.jobs[j] for j in named if j in self.jobs)
        unsettled = [v.id for v in gone if v.id in self.followed and not self.settled(v.id)]
        for v in gone:
            v.deleted = reason
        await self._emit(EventItem(ev, raw, None, gone))
        self.last_seq = int(ev["seq"])
        self.epoch = ev.get("epoch") or self.epoch
        if self.all_jobs:
            for v in gone:
                self.jobs.pop(v.id, None)
        if unsettled:
            raise _deleted_error(unsettled, reason, "before watch saw it end")
        return self.done

    async def _resync(self, msg: dict[str, Any], raw: str) -> None:
        self.resyncs += 1
        await self._emit(ResyncItem(msg, raw))
        head = int(msg.get("headSeq", self.last_seq or 0))
        self._ended.clear()
        docs: dict[str, dict[str, Any]] = {}
        if self.all_jobs:
            active = await self.rest.list_jobs(statuses=["queued", "running"], limit=1000)
            docs = {d["id"]: d for d in active}
            for job_id, view in list(self.jobs.items()):
                if not view.terminal and job_id not in docs:
                    try:
                        docs[job_id] = await self.rest.get_job(job_id)
                    except NotFound:
                        self.jobs.pop(job_id)  # deleted while we were away
        else:
            missing = []
            for j in self.followed:
                try:
                    docs[j] = await self.rest.get_job(j)
                except NotFound:
                    if self.settled(j):
                        continue  # seen to end; its deletion changes nothing
                    missing.append(j)
            if missing:
                raise _deleted_error(missing, "deleted", "while watch was away")
        for job_id, doc in docs.items():
            await self._snapshot(job_id, doc, "resync")
        for view in self.jobs.values():
            view.job_seq = None  # numbering continues, but we no longer know where we are
        if not self.all_jobs:
            # A job that ended after the resync's head has its last events still to come live:
            # wait for them rather than end on the snapshot and drop them.
            for job_id, doc in docs.items():
                if is_terminal(doc.get("status")) and _job_seq(doc):
                    after = await self.rest.job_events(job_id, head)
                    if any(e.get("jobSeq") == _job_seq(doc) for e in after):
                        self._ended[job_id] = doc
        self.epoch = msg.get("epoch") or self.epoch
        self.last_seq = head

    async def _snapshot(self, job_id: str, doc: dict[str, Any], reason: Literal["resync", "ended_while_away"]) -> None:
        view = self.jobs.get(job_id)
        if view is None:
            view = self.jobs[job_id] = JobView(job_id)
        view.apply_doc(doc)
        await self._emit(SnapshotItem(view, doc, reason))

    async def _state(self, change: ConnectionChange) -> None:
        self.connection = change
        await self._emit(change)

    async def _emit(self, item: Item) -> None:
        assert self._handler is not None
        try:
            result = self._handler(item)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # whatever the handler raised is not a network failure
            raise _HandlerFailed() from exc


def _job_seq(doc: Mapping[str, Any]) -> int:
    """The ``jobSeq`` of a job document's newest event (0 from a server that does not say)."""
    value = doc.get("jobSeq")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _is_answer(exc: BaseException) -> bool:
    """The failure came from a server that answered (an HTTP status, an error body), not from
    one that could not be reached at all."""
    from websockets.exceptions import InvalidStatus

    if isinstance(exc, MangwaleError):
        return not isinstance(exc, Unreachable)
    return isinstance(exc, InvalidStatus)


def _deleted_error(job_ids: list[str], reason: str, when: str) -> NotFound:
    what = "pruned by the server's retention" if reason == "pruned" else "deleted on the server"
    jobs = ", ".join(job_ids)
    noun = "job" if len(job_ids) == 1 else "jobs"
    verb = "was" if len(job_ids) == 1 else "were"
    return NotFound(f"{noun} {jobs} {verb} {what} {when}", field="jobId", code="pruned" if reason == "pruned" else "deleted")
