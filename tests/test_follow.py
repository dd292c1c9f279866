"""The follower library (mangwale_cli/follow.py): backoff, retry rules, de-duplication, resync.

Most tests drive ``Follower`` in-process against a scripted WebSocket server (websockets on
port 0) and a fake REST client, so each case is exact and takes milliseconds; the resync and
fatal-answer cases run against a real ``mangwale serve``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import ServerProcess, free_port, simulate_power_loss, wait_for
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.frames import Close
from websockets.http11 import Response

from mangwale_cli.errors import (
    ConfigError,
    ExitCode,
    Forbidden,
    GaveUp,
    InvalidInput,
    NotFound,
    TimedOut,
    Unauthorized,
    Unreachable,
)
from mangwale_cli.follow import (
    ConnectionChange,
    EventItem,
    Follower,
    FollowSettings,
    ResyncItem,
    SnapshotItem,
    backoff,
    classify,
    outcome_code,
)

JOB = "job-1-aaaaaa"
EPOCH = "e1"


def fast() -> Iterator[float]:
    """Millisecond backoff for tests."""
    return backoff(0.001, 0.004, jitter=0)


def update(seq: int, status: str = "running", progress: float = 50, job_seq: int | None = None, epoch: str = EPOCH,
           job: str = JOB) -> dict[str, Any]:
    return {
        "type": "training_update", "jobId": job, "status": status, "progress": progress,
        "message": f"step {seq}", "attempt": 1, "timestamp": 1000 * seq, "seq": seq,
        "epoch": epoch, "jobSeq": job_seq or seq,
    }


def connected(head: int, epoch: str = EPOCH) -> str:
    return json.dumps({"type": "connected", "message": "hi", "timestamp": 1, "headSeq": head, "epoch": epoch, "protocol": 1})


class FakeRest:
    """Stands in for ``AsyncClient``: job documents and event lists the test sets."""

    def __init__(self, port: int, statuses: list[str] | None = None, job_seq: int | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/ws/training"
        self.headers: dict[str, str] = {}
        self.statuses = statuses or ["running"]  # one per get_job call; the last one repeats
        self.job_seq = job_seq  # the documents' jobSeq (None: a server that does not say)
        self.events: list[dict[str, Any]] = []
        self.calls: list[str] = []
        self.error: Exception | None = None

    async def get_job(self, job_id: str) -> dict[str, Any]:
        self.calls.append(f"get_job {job_id}")
        if self.error is not None:
            raise self.error
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        doc = {"id": job_id, "kind": "simulate", "status": status, "progress": 100 if status == "succeeded" else 10,
               "message": "from rest", "attempt": 1, "startedAt": 1, "finishedAt": 2, "error": None, "metrics": None}
        if self.job_seq is not None:
            doc["jobSeq"] = self.job_seq
        return doc

    async def job_events(self, job_id: str, since: int = 0) -> list[dict[str, Any]]:
        self.calls.append(f"job_events {job_id} {since}")
        return [e for e in self.events if e["seq"] > since]

    async def list_jobs(self, **kw: Any) -> list[dict[str, Any]]:
        return [{"id": JOB, "kind": "simulate", "status": "running"}]

    async def aclose(self) -> None:
        pass


Script = Callable[[ServerConnection, int], Awaitable[None]]


def run_scripted(script: Script, make: Callable[[int], Follower], handler: Callable[[Any], Any] | None = None) -> tuple[Follower, list[Any], list[dict[str, list[str]]]]:
    """Run a follower against a WebSocket server whose n-th connection plays ``script(ws, n)``."""
    items: list[Any] = []
    queries: list[dict[str, list[str]]] = []

    async def main() -> Follower:
        async def on_conn(ws: ServerConnection) -> None:
            assert ws.request is not None
            queries.append(parse_qs(urlsplit(ws.request.path).query))
            await script(ws, len(queries))

        async with serve(on_conn, "127.0.0.1", 0) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            follower = make(port)
            await asyncio.wait_for(follower.run(handler or items.append), 10)
            return follower

    return asyncio.run(main()), items, queries


# --- pure parts ------------------------------------------------------------------------------


def test_backoff_doubles_caps_and_jitters() -> None:
    """Delays go 1, 2, 4 ... capped at 30 s, each within +/-20 % jitter, never above the cap."""
    plain = backoff(1, 30, jitter=0)
    assert [next(plain) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    low = backoff(1, 30, rand=lambda: 0.0)
    high = backoff(1, 30, rand=lambda: 1.0)
    assert [round(next(low), 3) for _ in range(3)] == [0.8, 1.6, 3.2]
    assert [round(next(high), 3) for _ in range(6)] == [1.2, 2.4, 4.8, 9.6, 19.2, 30]


def test_settings_from_env_and_bad_values() -> None:
    """MANGWALE_BACKOFF_INITIAL/MAX and the ping settings come from the environment; bad ones fail loudly."""
    s = FollowSettings.from_env({"MANGWALE_BACKOFF_INITIAL": "0.01", "MANGWALE_BACKOFF_MAX": "0.04", "MANGWALE_WATCH_PING_TIMEOUT": "3"})
    assert (s.backoff_initial, s.backoff_max, s.ping_interval, s.ping_timeout) == (0.01, 0.04, 20.0, 3.0)
    gen = s.backoff()
    assert all(0.008 <= next(gen) <= 0.04 for _ in range(10))
    assert FollowSettings.from_env({}) == FollowSettings()
    for env in ({"MANGWALE_BACKOFF_INITIAL": "soon"}, {"MANGWALE_BACKOFF_MAX": "-1"}, {"MANGWALE_BACKOFF_INITIAL": "5", "MANGWALE_BACKOFF_MAX": "1"}):
        with pytest.raises(ConfigError, match="MANGWALE_BACKOFF"):
            FollowSettings.from_env(env)


def _closed(code: int, reason: str = "") -> ConnectionClosedError:
    return ConnectionClosedError(Close(code, reason), None)


def test_classify_retries_transport_failures_and_stops_on_fatal_answers() -> None:
    """Drops, restarts and slow-consumer closes are retried; 401/403/404, 1008 and 4400 are fatal."""
    for code in (1000, 1001, 1006, 1011, 1012, 4408):
        assert classify(_closed(code)) is None, code
    assert classify(ConnectionClosedError(None, None)) is None  # no close frame: 1006
    assert classify(ConnectionRefusedError()) is None
    assert classify(TimeoutError()) is None
    assert isinstance(classify(_closed(1008)), Forbidden)
    future = classify(_closed(4400), {"code": "since_in_future", "message": "since=9 is beyond the newest event"})
    assert isinstance(future, NotFound) and future.exit_code == ExitCode.NOT_FOUND and "since=9" in future.message
    assert isinstance(classify(_closed(4400), {"code": "bad_request", "message": "x"}), InvalidInput)
    for status, cls in ((401, Unauthorized), (403, Forbidden), (404, NotFound)):
        err = classify(InvalidStatus(Response(status, "no", Headers(), b"")))
        assert isinstance(err, cls), status
    assert classify(InvalidStatus(Response(503, "full", Headers(), b""))) is None
    assert isinstance(classify(Unauthorized("no")), Unauthorized)
    with pytest.raises(KeyError):  # a bug is not a network failure: never retried
        classify(KeyError("seq"))


def test_outcome_worst_wins() -> None:
    """With several jobs the exit code is failed (1), else cancelled (3), else succeeded (0)."""
    assert outcome_code(["succeeded", "succeeded"]) == ExitCode.OK
    assert outcome_code(["succeeded", "cancelled"]) == ExitCode.CANCELLED
    assert outcome_code(["cancelled", "failed", "succeeded"]) == ExitCode.FAILED


def test_connection_change_describes_the_badge() -> None:
    """The indicator reads "live" or "reconnecting in 4 s, attempt 3", counting down."""
    c = ConnectionChange("reconnecting", attempt=3, delay=4.0, reason="closed 1012", retry_at=104.0)
    assert c.describe() == "reconnecting in 4 s, attempt 3"
    assert c.describe(now=101.2) == "reconnecting in 3 s, attempt 3"
    assert ConnectionChange("live").describe() == "live"


def test_follower_needs_exactly_one_target() -> None:
    """Job ids, latest or all: one of them, else a usage error."""
    with pytest.raises(InvalidInput):
        Follower("http://x", jobs=["a"], all_jobs=True)
    with pytest.raises(InvalidInput):
        Follower("http://x")


# --- scripted server ---------------------------------------------------------------------------


def test_duplicates_dropped_and_resume_from_last_handled() -> None:
    """Events with seq <= last handled are dropped; a reconnect resumes with since/epoch/jobs of the last handled event."""

    async def script(ws: ServerConnection, n: int) -> None:
        if n == 1:
            await ws.send(connected(3))
            for seq in (1, 2, 2, 3, 1):
                await ws.send(json.dumps(update(seq)))
            await ws.close(1012, "restarting")
        else:
            await ws.send(connected(5))
            for ev in (update(3), update(4), update(5, "succeeded", 100)):
                await ws.send(json.dumps(ev))
            await ws.wait_closed()

    follower, items, queries = run_scripted(script, lambda p: Follower(jobs=[JOB], rest=FakeRest(p), backoff=fast))  # type: ignore[arg-type]  # FakeRest stands in for AsyncClient
    assert [i.seq for i in items if isinstance(i, EventItem)] == [1, 2, 3, 4, 5]
    assert follower.duplicates == 3
    assert queries[0] == {"since": ["0"], "jobs": [JOB]}
    assert queries[1] == {"since": ["3"], "epoch": [EPOCH], "jobs": [JOB]}
    states = [i.describe() for i in items if isinstance(i, ConnectionChange)]
    assert states == ["connecting", "live", "reconnecting in 0.001 s, attempt 1", "live"]
    assert follower.outcome().exit_code == ExitCode.OK
    assert follower.jobs[JOB].status == "succeeded" and follower.jobs[JOB].job_seq == 5


def test_last_handled_advances_only_after_the_handler_returns() -> None:
    """A handler that raises stops the follower (no reconnect loop) and the failed event is not counted as handled."""

    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(connected(2))
        await ws.send(json.dumps(update(1)))
        await ws.send(json.dumps(update(2)))
        await ws.wait_closed()

    def handler(item: Any) -> None:
        if isinstance(item, EventItem) and item.seq == 2:
            raise BrokenPipeError("stdout went away")

    holder: list[Follower] = []

    def make(port: int) -> Follower:
        holder.append(Follower(jobs=[JOB], rest=FakeRest(port), backoff=fast))  # type: ignore[arg-type]  # FakeRest stands in for AsyncClient
        return holder[0]

    with pytest.raises(BrokenPipeError):
        run_scripted(script, make, handler)
    assert holder[0].last_seq == 1
    assert holder[0].connections == 1


def test_backoff_resets_after_a_good_connection() -> None:
    """Each drop after a greeting starts the backoff over: attempt 1 and the first delay every time."""
    made: list[int] = []

    def counting() -> Iterator[float]:
        made.append(1)
        return iter([0.001, 0.5, 0.5])

    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(connected(n))
        if n < 4:
            await ws.close(1001, "going away")
        else:
            await ws.send(json.dumps(update(1, "succeeded", 100)))
            await ws.wait_closed()

    _, items, _ = run_scripted(script, lambda p: Follower(jobs=[JOB], rest=FakeRest(p), backoff=counting))  # type: ignore[arg-type]  # FakeRest stands in for AsyncClient
    waits = [(i.attempt, i.delay) for i in items if isinstance(i, ConnectionChange) and i.state == "reconnecting"]
    assert waits == [(1, 0.001)] * 3
    assert len(made) == 4  # the first, then a fresh one after each good connection


def test_job_that_ended_while_away_is_read_over_rest() -> None:
    """After a drop, REST says the job ended: its remaining events come from /events, without reconnecting."""
    rest: list[FakeRest] = []

    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(connected(2))
        await ws.send(json.dumps(update(1)))
        await ws.send(json.dumps(update(2)))
        ws.transport.abort()

    def make(port: int) -> Follower:
        rest.append(FakeRest(port, ["running", "succeeded"]))
        rest[0].events = [update(2), update(3, progress=90), update(4, "succeeded", 100)]
        return Follower(jobs=[JOB], rest=rest[0], backoff=fast)  # type: ignore[arg-type]  # FakeRest stands in for AsyncClient

    follower, items, queries = run_scripted(script, make)
    assert [i.seq for i in items if isinstance(i, EventItem)] == [1, 2, 3, 4]
    assert len(queries) == 1
    assert rest[0].calls == [f"get_job {JOB}", f"get_job {JOB}", f"job_events {JOB} 2"]
    assert follower.outcome().exit_code == ExitCode.OK


def test_job_that_ended_with_its_last_events_gone_gets_a_snapshot() -> None:
    """If the log no longer has the final events, the REST job document decides the final state."""
    rest: list[FakeRest] = []

    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(connected(1))
        await ws.send(json.dumps(update(1)))
        await ws.close(1011, "oops")

    def make(port: int) -> Follower:
        rest.append(FakeRest(port, ["running", "failed"]))
        return Follower(jobs=[JOB], rest=rest[0], backoff=fast)  # type: ignore[arg-type]  # FakeRest stands in for AsyncClient

    follower, items, _ = run_scripted(script, make)
    snaps = [i for i in items if isinstance(i, SnapshotItem)]
    assert [(s.reason, s.job.status) for s in snaps] == [("ended_while_away", "failed")]
    assert follower.outcome().exit_code == ExitCode.FAILED


def test_rest_says_ended_but_its_last_event_is_still_to_come() -> None:
    """After a drop REST says succeeded at jobSeq 4 while its /events stop at 3: the follower reconnects and ends on event 4 itself, not on a snapshot."""
    rest: list[FakeRest] = []

    async def script(ws: ServerConnection, n: int) -> None:
        if n == 1:
            await ws.send(connected(2))
            await ws.send(json.dumps(update(1)))
            await ws.send(json.dumps(update(2)))
            ws.transport.abort()
        else:
            await ws.send(connected(4))
            await ws.send(json.dumps(update(3, progress=90)))  # already read over REST: dropped
            await ws.send(json.dumps(update(4, "succeeded", 100)))
            await ws.wait_closed()

    def make(port: int) -> Follower:
        rest.append(FakeRest(port, ["running", "succeeded"], job_seq=4))
        rest[0].events = [update(2), update(3, progress=90)]  # the log REST reads lags the record by one event
        return Follower(jobs=[JOB], rest=rest[0], backoff=fast)  # type: ignore[arg-type]  # FakeRest stands in for AsyncClient

    follower, items, queries = run_scripted(script, make)
    events = [i.event for i in items if isinstance(i, EventItem)]
    assert [e["seq"] for e in events] == [1, 2, 3, 4] and events[-1]["status"] == "succeeded"
    assert not any(isinstance(i, SnapshotItem) for i in items)
    assert queries[1] == {"since": ["3"], "epoch": [EPOCH], "jobs": [JOB]}
    assert follower.duplicates == 1 and follower.jobs[JOB].job_seq == 4
    assert follower.outcome().exit_code == ExitCode.OK


def test_resync_waits_for_a_live_terminal_event_after_its_head() -> None:
    """On a resync REST says the job ended at jobSeq 7, an event after the resync's head: the snapshot comes first, then the live events up to jobSeq 7, then the end."""
    rest: list[FakeRest] = []

    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(connected(10))
        await ws.send(json.dumps({"type": "resync", "reason": "history_trimmed", "headSeq": 10, "epoch": EPOCH, "timestamp": 1}))
        await ws.send(json.dumps(update(11, progress=90, job_seq=6)))
        await ws.send(json.dumps(update(12, "succeeded", 100, job_seq=7)))
        await ws.wait_closed()

    def make(port: int) -> Follower:
        rest.append(FakeRest(port, ["running", "succeeded"], job_seq=7))
        rest[0].events = [update(11, progress=90, job_seq=6), update(12, "succeeded", 100, job_seq=7)]
        return Follower(jobs=[JOB], rest=rest[0], backoff=fast)  # type: ignore[arg-type]  # FakeRest stands in for AsyncClient

    follower, items, _ = run_scripted(script, make)
    shown = [i for i in items if not isinstance(i, ConnectionChange)]
    assert [type(i).__name__ for i in shown] == ["ResyncItem", "SnapshotItem", "EventItem", "EventItem"]
    assert isinstance(shown[1], SnapshotItem) and shown[1].job.status == "succeeded"
    assert [i.event["status"] for i in shown[2:] if isinstance(i, EventItem)] == ["running", "succeeded"]
    assert rest[0].calls[-1] == f"job_events {JOB} 10"
    assert follower.jobs[JOB].job_seq == 7 and follower.outcome().exit_code == ExitCode.OK


def deleted(seq: int, *jobs: str, reason: str = "deleted") -> dict[str, Any]:
    return {"type": "job_deleted", "jobIds": list(jobs), "reason": reason, "timestamp": 1000 * seq, "seq": seq, "epoch": EPOCH}


def test_job_deleted_before_its_end_was_seen_exits_4() -> None:
    """A job_deleted naming a followed job not seen to end stops the follow: NotFound (exit 4) with the event's reason as its code."""
    items: list[Any] = []

    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(connected(3))
        await ws.send(json.dumps(update(1)))
        await ws.send(json.dumps(update(2)))
        await ws.send(json.dumps(deleted(3, "job-other", JOB, reason="pruned")))
        await ws.wait_closed()

    with pytest.raises(NotFound) as exc:
        run_scripted(script, lambda p: Follower(jobs=[JOB], rest=FakeRest(p), backoff=fast), items.append)  # type: ignore[arg-type]  # FakeRest stands in for AsyncClient
    assert exc.value.exit_code == ExitCode.NOT_FOUND and exc.value.code == "pruned"
    assert exc.value.message == f"job {JOB} was pruned by the server's retention before watch saw it end"
    gone = [i for i in items if isinstance(i, EventItem) and i.event["type"] == "job_deleted"]
    assert [[v.id for v in i.gone] for i in gone] == [[JOB]] and gone[0].job is None


def test_job_deleted_after_it_ended_keeps_its_outcome() -> None:
    """Following two jobs, one that ended and is then deleted keeps its outcome; the follow goes on to the other's end."""
    other = "job-2-bbbbbb"

    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(connected(4))
        await ws.send(json.dumps(update(1, "failed", 40)))
        await ws.send(json.dumps(update(2, job=other)))
        await ws.send(json.dumps(deleted(3, JOB)))
        await ws.send(json.dumps(update(4, "succeeded", 100, job=other)))
        await ws.wait_closed()

    follower, items, _ = run_scripted(script, lambda p: Follower(jobs=[JOB, other], rest=FakeRest(p), backoff=fast))  # type: ignore[arg-type]  # FakeRest stands in for AsyncClient
    assert [i.seq for i in items if isinstance(i, EventItem)] == [1, 2, 3, 4]
    assert follower.jobs[JOB].deleted == "deleted"
    assert {j: v.status for j, v in follower.outcome().jobs.items()} == {JOB: "failed", other: "succeeded"}
    assert follower.outcome().exit_code == ExitCode.FAILED


def test_all_jobs_forgets_deleted_jobs() -> None:
    """Following everything, a job_deleted removes the jobs it names from the follower's views."""
    other = "job-2-bbbbbb"

    class Enough(Exception):
        pass

    def handler(item: Any) -> None:
        if isinstance(item, EventItem) and item.seq == 4:
            raise Enough

    holder: list[Follower] = []

    def make(port: int) -> Follower:
        holder.append(Follower(all_jobs=True, rest=FakeRest(port), backoff=fast))  # type: ignore[arg-type]  # FakeRest stands in for AsyncClient
        return holder[0]

    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(connected(0))
        await ws.send(json.dumps(update(1, "succeeded", 100)))
        await ws.send(json.dumps(update(2, job=other)))
        await ws.send(json.dumps(deleted(3, JOB, "job-never-seen")))
        await ws.send(json.dumps(update(4, job=other)))
        await ws.wait_closed()

    with pytest.raises(Enough):
        run_scripted(script, make, handler)
    assert list(holder[0].jobs) == [other]


def test_fatal_rest_answer_is_not_retried() -> None:
    """A 401 from REST stops the follower at once: no reconnect attempt."""
    items: list[Any] = []
    rest = FakeRest(free_port())
    rest.error = Unauthorized("token expired")
    with pytest.raises(Unauthorized):
        asyncio.run(Follower(jobs=[JOB], rest=rest, backoff=fast).run(items.append))  # type: ignore[arg-type]  # FakeRest stands in for AsyncClient
    assert [i.state for i in items] == ["connecting"]


# --- real network, real server -------------------------------------------------------------


def test_never_reached_server_is_unreachable_after_max_retries() -> None:
    """With nothing listening it reports each attempt, then raises Unreachable (exit 8) after max_retries: a server never reached is not retried as one that went away."""
    items: list[Any] = []
    f = Follower(f"http://127.0.0.1:{free_port()}", jobs=[JOB], max_retries=3, backoff=lambda: iter([0.001, 0.002, 0.003, 0.004]))
    with pytest.raises(Unreachable, match="3 retries") as exc:
        asyncio.run(f.run(items.append))
    assert exc.value.exit_code == ExitCode.UNREACHABLE
    assert [i.describe() for i in items] == [
        "connecting",
        "reconnecting in 0.001 s, attempt 1",
        "reconnecting in 0.002 s, attempt 2",
        "reconnecting in 0.003 s, attempt 3",
    ]
    assert all(i.reason == "server unreachable" for i in items[1:])


def test_give_up_after_seconds() -> None:
    """give_up_after bounds the time without a connection."""
    f = Follower(f"http://127.0.0.1:{free_port()}", jobs=[JOB], give_up_after=0.3, backoff=lambda: backoff(0.05, 0.1))
    loop_start = asyncio.run(_timed(f, Unreachable, "no connection"))
    assert 0.25 <= loop_start < 3


def test_connect_timeout_bounds_the_wait_for_a_server_never_reached() -> None:
    """Nothing ever answers: Unreachable (exit 8) once connect_timeout has passed, naming the URL and the last failure."""
    url = f"http://127.0.0.1:{free_port()}"
    f = Follower(url, jobs=[JOB], connect_timeout=0.3, backoff=lambda: backoff(0.05, 0.1))
    took = asyncio.run(_timed(f, Unreachable, "within 0.3 s"))
    assert 0.25 <= took < 3
    assert not f.reached


def test_connect_timeout_default_comes_from_the_environment() -> None:
    """MANGWALE_CONNECT_TIMEOUT sets the default (30 s without it); a bad value names the variable."""
    assert FollowSettings().connect_timeout == 30
    assert FollowSettings.from_env({"MANGWALE_CONNECT_TIMEOUT": "2.5"}).connect_timeout == 2.5
    assert Follower("http://x", jobs=[JOB], settings=FollowSettings(connect_timeout=4)).connect_timeout == 4
    with pytest.raises(ConfigError, match="MANGWALE_CONNECT_TIMEOUT"):
        FollowSettings.from_env({"MANGWALE_CONNECT_TIMEOUT": "0"})


def test_server_that_went_away_keeps_the_reconnect_rules() -> None:
    """Once the server has answered, connect_timeout no longer applies: it retries past it and gives up with GaveUp (exit 7)."""
    items: list[Any] = []

    async def main() -> None:
        greeted = asyncio.Event()

        async def on_conn(ws: ServerConnection) -> None:
            await ws.send(connected(1))
            await ws.send(json.dumps(update(1)))
            greeted.set()
            await ws.wait_closed()

        server = await serve(on_conn, "127.0.0.1", 0)
        port = next(iter(server.sockets)).getsockname()[1]
        f = Follower(f"http://127.0.0.1:{port}", jobs=[JOB], connect_timeout=0.05, max_retries=4,
                     backoff=lambda: iter([0.05] * 10))
        f.rest.get_job = FakeRest(port).get_job
        task = asyncio.create_task(f.run(items.append))
        await greeted.wait()
        server.close()  # closes the connection (1001) and refuses new ones
        await server.wait_closed()
        with pytest.raises(GaveUp, match="4 retries") as exc:
            await asyncio.wait_for(task, 10)
        assert exc.value.exit_code == ExitCode.GAVE_UP and f.reached

    asyncio.run(main())
    assert [i.attempt for i in items if isinstance(i, ConnectionChange) and i.state == "reconnecting"] == [1, 2, 3, 4]


async def _timed(f: Follower, error: type[Exception], match: str) -> float:
    t = asyncio.get_running_loop().time()
    with pytest.raises(error, match=match):
        await f.run(lambda i: None)
    return asyncio.get_running_loop().time() - t


def create_job(server: ServerProcess, **params: Any) -> str:
    with server.client() as c:
        r = c.post("/training/jobs", json={"kind": "simulate", "params": params})
        r.raise_for_status()
        return str(r.json()["id"])


def job_status(server: ServerProcess, job_id: str) -> str:
    with server.client() as c:
        return str(c.get(f"/training/jobs/{job_id}").json()["status"])


def test_trimmed_history_gives_resync_then_rest_state(server_factory: Callable[..., ServerProcess]) -> None:
    """Following a job whose events the log no longer keeps: resync, a REST snapshot, the right outcome."""
    server = server_factory(env={"MANGWALE_EVENTS_RETENTION": "10"})
    old = create_job(server, steps=12, stepMs=1, failAt=11)
    wait_for(lambda: job_status(server, old) == "failed", what="the job to fail")
    create_job(server, steps=12, stepMs=1)  # pushes the first job's events out of the log
    items: list[Any] = []
    outcome = asyncio.run(Follower(server.url, jobs=[old], backoff=fast).run(items.append))
    kinds = [type(i).__name__ for i in items if not isinstance(i, ConnectionChange)]
    assert kinds == ["ResyncItem", "SnapshotItem"]
    resync = items[2]
    assert isinstance(resync, ResyncItem) and resync.reason == "history_trimmed"
    assert outcome.exit_code == ExitCode.FAILED and outcome.jobs[old].error is not None


def test_new_epoch_after_a_power_loss(server_factory: Callable[..., ServerProcess]) -> None:
    """When the server restarts after a power loss, the epoch differs: resync, then live events to the end."""
    server = server_factory(env={"MANGWALE_RUNNER_MAX_ATTEMPTS": "5"})
    job = create_job(server, steps=40, stepMs=25)
    items: list[Any] = []

    async def main() -> Any:
        f = Follower(server.url, jobs=[job], backoff=lambda: backoff(0.05, 0.1))
        task = asyncio.create_task(f.run(items.append))
        await asyncio.to_thread(wait_for, lambda: sum(isinstance(i, EventItem) for i in items) >= 3)
        await asyncio.to_thread(server.kill)
        simulate_power_loss(server.data_dir)
        await asyncio.to_thread(server.start)
        return await asyncio.wait_for(task, 20)

    outcome = asyncio.run(main())
    resyncs = [i for i in items if isinstance(i, ResyncItem)]
    assert [r.reason for r in resyncs] == ["epoch_changed"]
    after = items[items.index(resyncs[0]) :]
    assert any(isinstance(i, SnapshotItem) for i in after)
    shown = [i.event for i in after if isinstance(i, EventItem)]
    assert shown[-1]["status"] == "succeeded" and outcome.exit_code == ExitCode.OK
    # Every event of the new epoch after the resync's head, even if its seq was seen before.
    with server.client() as c:
        logged = c.get(f"/training/jobs/{job}/events", params={"since": 0}).json()
    head = resyncs[0].message["headSeq"]
    assert [e["seq"] for e in shown] == [e["seq"] for e in logged if e["seq"] > head]


def test_unknown_job_and_since_beyond_head_are_fatal(server: ServerProcess) -> None:
    """An unknown job is NotFound (exit 4) and so is a since beyond the head (close 4400), without retries."""
    items: list[Any] = []
    with pytest.raises(NotFound, match="job-nope"):
        asyncio.run(Follower(server.url, jobs=["job-nope"], backoff=fast).run(items.append))
    with pytest.raises(NotFound, match="beyond") as exc:
        asyncio.run(Follower(server.url, all_jobs=True, since=10**6, backoff=fast).run(items.append))
    assert exc.value.code == "since_in_future"
    assert not any(isinstance(i, ConnectionChange) and i.state == "reconnecting" for i in items)


def test_timeout_raises_timed_out(server: ServerProcess) -> None:
    """timeout bounds the whole wait: TimedOut (exit 6) while the job still runs."""
    job = create_job(server, steps=100, stepMs=100)
    f = Follower(server.url, jobs=[job], timeout=0.5, backoff=fast)
    with pytest.raises(TimedOut) as exc:
        asyncio.run(f.run(lambda i: None))
    assert exc.value.exit_code == ExitCode.TIMEOUT
    assert f.jobs[job].status == "running"


def test_all_jobs_starts_live_from_the_head(server: ServerProcess) -> None:
    """all_jobs replays nothing: only jobs created after the greeting appear, and resumes use the greeting's headSeq."""
    before = create_job(server, steps=1, stepMs=1)
    wait_for(lambda: job_status(server, before) == "succeeded")
    items: list[Any] = []

    class Enough(Exception):
        pass

    async def main() -> Follower:
        f = Follower(server.url, all_jobs=True, timeout=15, backoff=fast)

        def handle(item: Any) -> None:
            items.append(item)
            if isinstance(item, ConnectionChange) and item.state == "live":
                asyncio.get_running_loop().run_in_executor(None, lambda: create_job(server, steps=2, stepMs=10))
            if isinstance(item, EventItem) and item.event.get("status") == "succeeded":
                raise Enough

        with pytest.raises(Enough):
            await f.run(handle)
        return f

    f = asyncio.run(main())
    events = [i.event for i in items if isinstance(i, EventItem)]
    assert before not in {e["jobId"] for e in events} and len({e["jobId"] for e in events}) == 1
    assert events[0]["type"] == "job_created"
    assert f.last_seq == events[-2]["seq"]  # the raising handler did not handle the last one
