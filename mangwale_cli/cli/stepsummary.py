"""The Markdown summary ``mangwale watch`` appends to ``$GITHUB_STEP_SUMMARY`` on GitHub Actions.

For each followed job: its outcome and how long it ran, its final metrics, and its epoch curve
as a table (read once, at the end, from ``GET /training/jobs/{id}/metrics``). Writing it never
changes the exit code: a summary that cannot be written or a curve that cannot be read is one
notice on stderr.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..follow import Follower, JobView

MAX_CURVE_ROWS = 50  # a longer curve is sampled evenly (first and last epoch kept)
# Added by the server to each /metrics point; not part of what the trainer reported.
NOT_CURVE = frozenset({"progress", "attempt", "timestamp", "pointNo", "epochs"})
OUTCOME = {"succeeded": "✅ succeeded", "failed": "❌ failed", "cancelled": "⏹️ cancelled"}


def append_step_summary(follower: Follower, reason: str, path: str) -> None:
    """Append the summary of ``follower``'s jobs to the file at ``path``."""
    if follower.all_jobs:
        return  # --all follows whatever runs; a summary belongs to the jobs a step waited for
    views = list(follower.outcome().jobs.values())
    curves = {v.id: _curve(follower.url, v.id) for v in views if v.status is not None}
    text = render(views, reason, curves)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        sys.stderr.write(f"mangwale: could not append the step summary to {path}: {exc.strerror or exc}\n")


def _curve(url: str, job_id: str) -> list[dict[str, Any]] | str:
    """The job's metrics points, or why they could not be read."""
    from ..client import Client
    from ..errors import MangwaleError

    try:
        with Client(url, timeout=10) as client:
            return client.job_metrics(job_id)
    except MangwaleError as exc:
        return exc.message


def render(views: list[JobView], reason: str, curves: dict[str, list[dict[str, Any]] | str]) -> str:
    """The Markdown text (tested on its own, without a server)."""
    from .watchview import fmt_seconds

    noun = "job" if len(views) == 1 else "jobs"
    lines = [f"### mangwale watch: {len(views)} {noun}, {_stopped(reason)}", ""]
    seen = [v for v in views if v.status is not None]
    if not seen:
        ids = ", ".join(f"`{v.id}`" for v in views) or "no job"
        return "\n".join([*lines, f"Stopped before {ids} could be seen ({reason}).", "", ""])
    lines += ["| job | kind | outcome | duration |", "|---|---|---|---|"]
    for v in views:
        outcome = OUTCOME.get(v.status or "", f"{v.status or 'unknown'} at {v.progress:.0f}%")
        if v.attempt > 1:
            outcome += f" (attempt {v.attempt})"
        if v.deleted:
            outcome += f", {v.deleted} on the server"
        took = fmt_seconds(v.seconds) if v.seconds is not None else "-"
        lines.append(f"| `{v.id}` | {_cell(v.kind or '-')} | {outcome} | {took} |")
    lines.append("")
    for v in seen:
        if v.error:
            lines += [f"**`{v.id}` error:** {_cell(v.error)}", ""]
        final = _scalars(v.metrics)
        if final:
            lines += [f"#### `{v.id}`: final metrics", "", "| metric | value |", "|---|---:|"]
            lines += [f"| {_cell(k)} | {_num(x)} |" for k, x in final.items()]
            lines.append("")
        lines += _curve_table(v, curves.get(v.id))
    return "\n".join(lines) + "\n"


def _stopped(reason: str) -> str:
    return {"finished": "finished", "detached": "detached (still running)", "cancelled": "cancelled on interrupt"}.get(
        reason, f"stopped ({reason})"
    )


def _curve_table(v: JobView, curve: list[dict[str, Any]] | str | None) -> list[str]:
    if curve is None:
        return []
    if isinstance(curve, str):
        return [f"_Epoch curve of `{v.id}` not available: {_cell(curve)}_", ""]
    attempt = max((p.get("attempt") or 0 for p in curve), default=0)
    points = [p for p in curve if (p.get("attempt") or 0) == attempt]  # the attempt that counts
    columns: list[str] = []
    for p in points:
        for k, x in p.items():
            if k not in NOT_CURVE and k not in columns and _is_number(x):
                columns.append(k)
    if not points or not columns:
        return []
    if "epoch" in columns:
        columns.remove("epoch")
        columns.insert(0, "epoch")
    shown = _sample(points, MAX_CURVE_ROWS)
    title = f"#### `{v.id}`: epoch curve"
    if len(shown) < len(points):
        title += f" ({len(shown)} of {len(points)} points)"
    out = [title, "", "| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---:|" * len(columns)]
    out += ["| " + " | ".join(_num(p.get(c)) for c in columns) + " |" for p in shown]
    return [*out, ""]


def _sample(points: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    if len(points) <= limit:
        return points
    step = (len(points) - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]


def _scalars(metrics: dict[str, Any] | None) -> dict[str, Any]:
    return {k: x for k, x in (metrics or {}).items() if _is_number(x) or isinstance(x, str)}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "" if x is None else _cell(str(x))


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped, bounded."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= 300 else text[:299] + "…"
