"""How ``mangwale watch`` shows what the follower reports: the three output modes.

* ``TtyRenderer``: a rich live view, one progress bar per job and a connection indicator;
* ``PlainRenderer``: one line per change, no ANSI codes (``::group::``/``::error::`` on GitHub
  Actions);
* ``JsonRenderer``: the events as the server sent them, one per line, then a summary line.

rich is imported inside the tty view only, so the plain and JSON modes never load it.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from ..follow import Follower, Item, JobView


def stderr_line(line: str) -> None:
    sys.stderr.write(f"mangwale: {line}\n")
    sys.stderr.flush()


# --- shared formatting ----------------------------------------------------------------------


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_metrics(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return ""
    parts = []
    for k, v in metrics.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        if isinstance(v, (int, str)):
            parts.append(f"{k}={v}")
    return f" [{', '.join(parts)}]" if parts else ""


def step_text(v: JobView) -> str:
    """The job's current step, led by its attempt once it has been re-run ("attempt 2: ...")."""
    message = v.message or ""
    if v.status == "queued" and v.waiting_for and v.waiting_for not in message:
        message = f"{message}; {v.waiting_for}" if message else v.waiting_for
    where = f" on {v.worker}" if v.worker and v.status == "running" else ""
    if v.attempt > 1 and v.status not in (None, "queued"):
        return f"attempt {v.attempt}{where}: {message}" if message else f"attempt {v.attempt}{where}"
    if where:
        return f"on {v.worker}: {message}" if message else where.strip()
    return message


def job_result(v: JobView) -> str:
    if v.terminal:
        took = f" in {fmt_seconds(v.seconds)}" if v.seconds is not None else ""
        tries = f" (attempt {v.attempt})" if v.attempt > 1 else ""
        return f"{v.id} {v.status}{took}{tries}{fmt_metrics(v.metrics)}"
    return f"{v.id} {v.status or 'unknown'} {v.progress:.0f}%"


def summary_line(follower: Follower, code: int, reason: str) -> str:
    """The one closing line: "finished: job-… succeeded in 2.1s; exit 0"."""
    label = {"finished": "finished", "detached": "detached", "cancelled": "cancelled"}.get(reason, f"stopped ({reason})")
    jobs = follower.outcome().jobs.values()
    body = ", ".join(job_result(v) for v in jobs) or "no jobs seen"
    return f"{label}: {body}; exit {code}"


# Errors that leave no job state worth a summary line: the job is unknown or gone, or the
# server never answered. Their one error line says it all.
ONE_LINE_ERRORS = frozenset({"not_found", "deleted", "pruned", "unreachable"})


def has_summary(follower: Follower, reason: str) -> bool:
    """Whether the human modes close with a summary line (JSON always has its summary object).
    A follow stopped by an unknown or deleted job, by a server never reached, or by any error
    before a job was seen, has only its error line."""
    if reason in ("finished", "detached", "cancelled"):
        return True
    if reason in ONE_LINE_ERRORS:
        return False
    return any(v.status is not None for v in follower.outcome().jobs.values())


# --- renderers ------------------------------------------------------------------------------


class Renderer:
    """What every output mode implements. ``handle`` is the follower's handler."""

    def handle(self, item: Item) -> None:
        raise NotImplementedError

    async def tick(self) -> None:
        """Redraw periodically (the tty view's clocks); others have nothing to do."""

    def close(self, reason: str) -> None:
        """Stop live drawing (before the summary is printed); ``reason`` is why it stopped."""

    def finish(self, follower: Follower, code: int, reason: str) -> None:
        raise NotImplementedError


def _connection_notice(item: Item) -> str | None:
    from ..follow import ConnectionChange, ResyncItem

    if isinstance(item, ConnectionChange):
        if item.state == "reconnecting":
            return f"connection: {item.reason}; {item.describe()}"
        if item.state == "live":
            return "connection: live"
        return None
    if isinstance(item, ResyncItem):
        return f"resync ({item.reason}): the server no longer has every event; job state re-read over REST"
    return None


class LineRenderer(Renderer):
    """A mode that writes whole lines to ``out`` and flushes each, so a CI log shows it at once."""

    out: TextIO

    def _write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()


class PlainRenderer(LineRenderer):
    """One line per change on stdout; connection notices on stderr. No ANSI codes."""

    def __init__(self, *, github: bool = False, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.github = github
        self.shown: dict[str, tuple[Any, ...]] = {}
        self.group: str | None = None

    def handle(self, item: Item) -> None:
        from ..follow import EventItem, SnapshotItem

        notice = _connection_notice(item)
        if notice is not None:
            stderr_line(notice)
        elif isinstance(item, EventItem):
            ev = item.event
            if item.job is not None:
                v = item.job
                created = ev.get("type") == "job_created"
                waits = f", {v.waiting_for}" if v.waiting_for and v.status == "queued" else ""
                self._job_line(v, f"created ({v.kind}){waits}" if created else None)
            elif ev.get("type") == "dataset_update":
                self._write(f"dataset {ev.get('datasetId')} {ev.get('action')}")
            for v in item.gone:
                self._write(f"{v.id}  {'pruned' if v.deleted == 'pruned' else 'deleted'} on the server")
        elif isinstance(item, SnapshotItem):
            self._job_line(item.job, None, "  [state from REST]")

    def _job_line(self, v: JobView, message: str | None, suffix: str = "") -> None:
        message = message or step_text(v)
        key = (v.status, v.attempt, round(v.progress), message)
        if self.shown.get(v.id) == key and not suffix:
            return
        self.shown[v.id] = key
        if self.github and self.group != v.id:
            if self.group is not None:
                self._write("::endgroup::")
            self._write(f"::group::{_gha(v.id)} ({_gha(v.kind or 'job')})")
            self.group = v.id
        eta = f"  (eta {fmt_seconds(v.eta)})" if v.eta is not None and not v.terminal else ""
        self._write(f"{v.id}  {v.status or '?':<9} {v.progress:>3.0f}%  {message}{eta}{suffix}".rstrip())

    def finish(self, follower: Follower, code: int, reason: str) -> None:
        if self.github:
            if self.group is not None:
                self._write("::endgroup::")
                self.group = None
            for v in follower.outcome().jobs.values():
                if v.status == "failed":
                    detail = v.error or v.message or "failed"
                    self._write(f"::error title=mangwale job failed::{_gha(v.id)} failed: {_gha(detail)}")
                elif v.status == "cancelled":
                    self._write(f"::warning title=mangwale job cancelled::{_gha(v.id)} was cancelled")
        if has_summary(follower, reason):
            self._write(summary_line(follower, code, reason))


def _gha(text: str) -> str:
    """Escape text for a GitHub Actions workflow command."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


class JsonRenderer(LineRenderer):
    """JSON lines on stdout: each event as the server sent it, then one summary object."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def handle(self, item: Item) -> None:
        from ..follow import EventItem, ResyncItem, SnapshotItem

        notice = _connection_notice(item)
        if notice is not None:
            stderr_line(notice)
        if isinstance(item, (EventItem, ResyncItem)):
            self._write(item.raw)
        elif isinstance(item, SnapshotItem):
            doc = {"type": "snapshot", "jobId": item.job.id, "reason": item.reason, "job": item.doc}
            self._write(json.dumps(doc, separators=(",", ":"), ensure_ascii=False))

    def finish(self, follower: Follower, code: int, reason: str) -> None:
        jobs = {j: v.summary() for j, v in follower.outcome().jobs.items()}
        line = {"type": "summary", "jobs": jobs, "exitCode": code, "reason": reason}
        self._write(json.dumps(line, separators=(",", ":"), ensure_ascii=False))


# What the badge says once the view stops: the job may well still run after a detach.
BADGE_AT_END = {
    "finished": "done",
    "detached": "detached (the job keeps running)",
    "cancelled": "interrupted: cancelling",
}


class TtyRenderer(Renderer):
    """A rich live view: a connection line, then one progress bar per job.

    The id, status and percent of a row are never cut: at any width from 80 columns up, the
    bar and then the step text give way instead."""

    MAX_ROWS = 20
    BAR_MAX = 24
    BAR_MIN = 6

    def __init__(self, follower: Follower, *, forced: bool = False) -> None:
        from rich.console import Console
        from rich.live import Live

        self.follower = follower
        self.url = follower.url
        self.console = Console(highlight=False, force_terminal=True if forced else None)
        self.notice: str | None = None
        self.live = Live(console=self.console, auto_refresh=False, transient=False, redirect_stderr=False)
        self.started = False

    def handle(self, item: Item) -> None:
        from ..follow import ConnectionChange, ResyncItem

        if isinstance(item, ResyncItem):
            self.notice = f"resynced ({item.reason})"
        if not self.started:
            if isinstance(item, ConnectionChange) and item.state == "connecting":
                return  # nothing to show yet: an unknown job stays one error line
            self.live.start()
            self.started = True
        self.live.update(self._render(), refresh=True)

    async def tick(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(0.25)
            if self.started:
                self.live.update(self._render(), refresh=True)

    def close(self, reason: str) -> None:
        if self.started:
            self.live.update(self._render(end=BADGE_AT_END.get(reason, f"stopped ({reason})")), refresh=True)
            self.live.stop()
            self.started = False

    def finish(self, follower: Follower, code: int, reason: str) -> None:
        if not has_summary(follower, reason):
            return
        style = "green" if code == 0 else "red" if code in (1, 4, 5, 6, 7, 8) else "yellow"
        self.console.print(summary_line(follower, code, reason), style=style, markup=False)

    def _render(self, end: str | None = None) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        from .render import STATUS_STYLE

        f = self.follower
        conn = f.connection
        state = conn.describe(time.monotonic())
        color = "green" if state == "live" else "yellow"
        if end is not None:
            state, color = end, "dim"
        header = Text.assemble(("● ", color), (state, f"bold {color}"), (f"  {self.url}", "dim"), no_wrap=True, overflow="ellipsis")
        if self.notice:
            header.append(f"  {self.notice}", style="yellow")
        if conn.state == "reconnecting" and conn.reason and end is None:
            header.append(f"  ({conn.reason})", style="dim")
        views = list(f.jobs.values())
        if f.all_jobs:
            views = views[-self.MAX_ROWS :]
        now_ms = time.time() * 1000
        cells = []
        for v in views:
            elapsed = None
            if v.started_at:
                elapsed = ((v.finished_at or now_ms) - v.started_at) / 1000
            eta = None
            if v.eta is not None and v.eta_at is not None and not v.terminal:
                eta = max(0.0, v.eta - (now_ms - v.eta_at) / 1000)
            step = step_text(v) + (" (deleted on the server)" if v.deleted else "")
            cells.append((v, v.status or "waiting", f"{v.progress:.0f}%", step, fmt_seconds(elapsed),
                          f"eta {fmt_seconds(eta)}" if eta is not None else ""))
        # Whole columns first (id, status, percent, clocks), then the bar, then the step text.
        def widest(i: int) -> int:
            return max((len(str(c[i])) for c in cells), default=0)

        id_w = max((len(c[0].id) for c in cells), default=0)
        status_w, pct_w, elapsed_w, eta_w = widest(1), widest(2), widest(4), widest(5)
        spare = self.console.width - id_w - status_w - pct_w - elapsed_w - eta_w - 6  # 7 columns, 6 gaps
        bar_w = min(self.BAR_MAX, max(self.BAR_MIN, spare // 2))
        step_w = max(1, spare - bar_w)
        rows = Table.grid(padding=(0, 1))
        for name, width in (("id", id_w), ("status", status_w), ("bar", bar_w), ("pct", pct_w),
                            ("step", step_w), ("elapsed", elapsed_w), ("eta", eta_w)):
            rows.add_column(
                justify="right" if name in ("pct", "elapsed", "eta") else "left",
                no_wrap=True,
                overflow="ellipsis" if name == "step" else "fold",
                width=width,
            )
        for v, status, pct, step, elapsed_s, eta_s in cells:
            style = STATUS_STYLE.get(v.status or "", "dim")
            rows.add_row(
                v.id,
                Text(status, style=style),
                ProgressBar(total=100, completed=v.progress, width=bar_w, complete_style=style, finished_style=style),
                pct,
                Text(step, style="dim" if v.terminal else ""),
                elapsed_s,
                eta_s,
            )
        parts: list[Any] = [header, rows]
        if end is None:
            parts.append(Text("Ctrl-C detaches (the job keeps running)", style="dim"))
        return Group(*parts)
