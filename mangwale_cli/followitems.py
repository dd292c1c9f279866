"""What a follower reports, in the order it learns it: the state of each job (``JobView``) and
the items its handler receives (``EventItem``, ``ResyncItem``, ``SnapshotItem``,
``ConnectionChange``), plus how several jobs' outcomes become one exit code.

Pure data: no I/O here. ``follow.Follower`` produces these; ``mangwale watch`` renders them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ExitCode
from .wire import MsgType


def is_terminal(status: str | None) -> bool:
    return status in ("succeeded", "failed", "cancelled")


@dataclass
class JobView:
    """The latest known state of one job, from its events (and REST snapshots)."""

    id: str
    kind: str | None = None
    status: str | None = None  # None until an event or a snapshot said
    progress: float = 0.0
    message: str | None = None
    attempt: int = 0
    eta: float | None = None  # seconds left, as of ``eta_at``
    eta_at: int | None = None  # ms
    error: str | None = None
    metrics: dict[str, Any] | None = None
    started_at: int | None = None  # ms: start of the current attempt
    finished_at: int | None = None  # ms
    job_seq: int | None = None  # last jobSeq handled
    deleted: str | None = None  # "deleted" / "pruned" once a job_deleted event named it
    worker: str | None = None  # the remote worker of the current or last attempt
    waiting_for: str | None = None  # queued, and no live taker can run it: what it waits for

    @property
    def terminal(self) -> bool:
        return is_terminal(self.status)

    @property
    def seconds(self) -> float | None:
        """How long the current (or last) attempt ran, once it has ended."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, (self.finished_at - self.started_at) / 1000)

    def apply_event(self, ev: Mapping[str, Any]) -> None:
        kind = ev.get("type")
        ts = ev.get("timestamp")
        if kind == MsgType.JOB_CREATED:
            self.apply_doc(ev.get("job") or {})
        elif kind == MsgType.TRAINING_UPDATE:
            status = ev.get("status")
            attempt = ev.get("attempt", self.attempt)
            if status == "running" and (self.status != "running" or attempt != self.attempt or self.started_at is None):
                self.started_at = ts
            elif status == "queued":
                self.started_at = None
            self.status = status
            self.progress = float(ev.get("progress") or 0)
            self.message = ev.get("message")
            self.attempt = attempt
            self.worker = ev.get("worker")
            self.waiting_for = ev.get("waitingFor") if status == "queued" else None
            self.eta = ev.get("eta")
            self.eta_at = ts
            self.error = ev.get("error")
            if ev.get("metrics"):
                self.metrics = ev["metrics"]
            self.finished_at = ts if is_terminal(status) else None
            if self.terminal:
                self.eta = None
        job_seq = ev.get("jobSeq")
        if isinstance(job_seq, int):
            self.job_seq = job_seq

    def apply_doc(self, doc: Mapping[str, Any]) -> None:
        """Take the state of a job document (``GET /training/jobs/{id}`` or ``job_created``)."""
        self.kind = doc.get("kind", self.kind)
        self.status = doc.get("status", self.status)
        self.progress = float(doc.get("progress") or 0)
        self.message = doc.get("message")
        self.attempt = doc.get("attempt", self.attempt)
        self.worker = doc.get("worker")
        self.waiting_for = doc.get("waitingFor") if self.status == "queued" else None
        self.error = doc.get("error")
        if doc.get("metrics"):
            self.metrics = doc["metrics"]
        self.started_at = doc.get("startedAt")
        self.finished_at = doc.get("finishedAt") if self.terminal else None
        self.eta = None

    def summary(self) -> dict[str, Any]:
        """The job's entry in ``watch --json``'s summary line."""
        out = {
            "status": self.status,
            "progress": self.progress,
            "attempt": self.attempt,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            "error": self.error,
            "metrics": self.metrics,
        }
        if self.waiting_for and self.status == "queued":  # only then: other summaries keep their shape
            out["waitingFor"] = self.waiting_for
        return out


@dataclass(frozen=True)
class EventItem:
    """A logged event, new to this follower. ``raw`` is its JSON as the server sent it."""

    event: dict[str, Any]
    raw: str
    job: JobView | None  # the job it concerns, already updated; None for dataset and delete events
    gone: tuple[JobView, ...] = ()  # job_deleted: the views of the jobs it names that were known

    @property
    def seq(self) -> int:
        return int(self.event["seq"])


@dataclass(frozen=True)
class ResyncItem:
    """The server could not replay everything (``reason``); a snapshot of each job follows."""

    message: dict[str, Any]
    raw: str

    @property
    def reason(self) -> str:
        return str(self.message.get("reason"))


@dataclass(frozen=True)
class SnapshotItem:
    """Job state fetched over REST: after a resync, or when a job ended while we were away
    and its last events are no longer in the server's log."""

    job: JobView
    doc: dict[str, Any]
    reason: Literal["resync", "ended_while_away"]


ConnState = Literal["connecting", "live", "reconnecting"]


@dataclass(frozen=True)
class ConnectionChange:
    state: ConnState
    attempt: int = 0
    delay: float | None = None
    reason: str | None = None  # why the last connection ended, for "reconnecting"
    retry_at: float | None = None  # time.monotonic() of the next attempt

    def describe(self, now: float | None = None) -> str:
        """"live", "connecting", or "reconnecting in 4 s, attempt 3" (counting down with ``now``)."""
        if self.state != "reconnecting":
            return self.state
        delay = self.delay or 0.0
        if now is not None and self.retry_at is not None:
            delay = max(0.0, self.retry_at - now)
        return f"reconnecting in {format_delay(delay)}, attempt {self.attempt}"


Item = EventItem | ResyncItem | SnapshotItem | ConnectionChange
Handler = Callable[[Item], Awaitable[None] | None]


def format_delay(seconds: float) -> str:
    if seconds >= 1 or seconds == 0:
        return f"{seconds:.0f} s"
    return f"{seconds:.2g} s"


def outcome_code(statuses: Iterable[str | None]) -> ExitCode:
    """The worst outcome wins: failed, then cancelled, then succeeded."""
    seen = set(statuses)
    if "failed" in seen:
        return ExitCode.FAILED
    if "cancelled" in seen:
        return ExitCode.CANCELLED
    return ExitCode.OK


@dataclass
class Outcome:
    jobs: dict[str, JobView] = field(default_factory=dict)

    @property
    def exit_code(self) -> ExitCode:
        return outcome_code(v.status for v in self.jobs.values())
