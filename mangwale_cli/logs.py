"""Follow a job's log lines: the stored ones over REST, then new ``job_log`` events live.

The seam between the two is a seq: ``follow_logs`` reads the server's head seq first, then
the stored lines, then follows the job's events from that head. The runner stores a line
before it publishes it, so every line published up to the head is in the stored set, and
every later one arrives live; a line seen both ways is dropped by its ``lineNo``. After a
``resync`` (or a job that ended while the follower was reconnecting) the stored lines fill
the gap.

Lines reach the callback in the stored form, live ones too: ``lineNo``, ``stream``, ``line``,
``attempt``, ``timestamp``.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from .client import AsyncClient
from .follow import EventItem, Follower, FollowSettings, Item, JobView, SnapshotItem, is_terminal
from .wire import MsgType

LineHandler = Callable[[dict[str, Any]], Awaitable[None] | None]


def entry_from_event(event: dict[str, Any]) -> dict[str, Any]:
    """A ``job_log`` event in the stored form of ``GET /training/jobs/{id}/logs``."""
    return {k: event[k] for k in ("lineNo", "stream", "line", "attempt", "timestamp") if k in event}


async def follow_logs(
    url: str | None,
    job_id: str,
    on_line: LineHandler,
    *,
    settings: FollowSettings | None = None,
    token: str | None = None,
) -> JobView:
    """Hand every log line of the job to ``on_line``, once each and in order, until the job
    ends; return its final state. Raises ``NotFound`` for an unknown job."""
    last = 0

    async def deliver(entry: dict[str, Any]) -> None:
        nonlocal last
        if int(entry.get("lineNo", 0)) <= last:
            return
        last = int(entry["lineNo"])
        result = on_line(entry)
        if inspect.isawaitable(result):
            await result

    async with AsyncClient(url, token=token) as rest:
        head = int((await rest.health())["headSeq"])
        doc = await rest.get_job(job_id)
        for entry in await rest.job_logs(job_id):
            await deliver(entry)
        if is_terminal(doc.get("status")):
            view = JobView(job_id)
            view.apply_doc(doc)
            return view

        async def handle(item: Item) -> None:
            if isinstance(item, EventItem):
                ev = item.event
                if ev.get("type") == MsgType.JOB_LOG and ev.get("jobId") == job_id:
                    await deliver(entry_from_event(ev))
            elif isinstance(item, SnapshotItem):
                for entry in await rest.job_logs(job_id, since=last):
                    await deliver(entry)

        follower = Follower(
            jobs=[job_id], since=head, rest=rest, settings=settings or FollowSettings.from_env()
        )
        outcome = await follower.run(handle)
        return outcome.jobs[job_id]
