"""How the CLI shows results: rich tables on a terminal, plain text in pipes, JSON with --json.

Tables keep ids whole at any width: on a terminal the other columns fold, and the least needed
ones are left out when even that does not fit; in a pipe every row is one line, however long,
so ``grep`` and ``awk '{print $1}'`` see whole rows whatever ``COLUMNS`` says.
"""

from __future__ import annotations

import io
import json
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..jsonin import cut_digits

_out: Console | None = None


def console() -> Console:
    global _out
    if _out is None:
        _out = Console(highlight=False, soft_wrap=False)
    return _out


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def error_line(message: str) -> None:
    """The one line a failing command writes on stderr (long values cut, see ``one_line``)."""
    sys.stderr.write(f"mangwale: error: {one_line(message)}\n")
    sys.stderr.flush()


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_LONG_WORD = re.compile(r"\S{121,}")
MAX_LINE = 600


def one_line(message: str) -> str:
    """``message`` fit for one line of a terminal: control characters shown escaped (a server's
    message cannot move the cursor), numbers past 24 digits and words past 120 characters cut
    (``1000000000…(310 digits)``; ``1000000000…`` when the server had cut it already), and
    the whole at most ``MAX_LINE`` characters."""
    text = " ".join(message.split())
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    text = cut_digits(text)
    text = _LONG_WORD.sub(lambda m: f"{m.group()[:60]}…({len(m.group())} characters)", text)
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 1] + "…"


def when(ms: int | None) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def duration(start: int | None, end: int | None) -> str:
    if not start:
        return "-"
    s = int(((end or int(time.time() * 1000)) - start) / 1000)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


STATUS_STYLE = {
    "queued": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}


@dataclass(frozen=True)
class Column:
    """A table column. ``whole``: never folded nor cut (ids, statuses); else it may fold down to
    ``min_width``. ``drop``: 0 is always shown; on a narrow terminal the highest goes first."""

    header: str
    whole: bool = False
    min_width: int = 10
    drop: int = 0
    right: bool = False


Cell = str | Text
GAP = 2  # between columns: padding (0, 1) without edge padding
FOLD_MIN = 6  # the narrowest a foldable column gets, when nothing else is left to give


def print_table(columns: list[Column], rows: list[list[Cell]]) -> None:
    """Print ``rows`` under ``columns`` (see the module docstring for how width is handled)."""
    c = console()
    natural = [
        max([cell_len(col.header), *(_width(row[i]) for row in rows)]) for i, col in enumerate(columns)
    ]
    keep = list(range(len(columns)))
    widths = dict(enumerate(natural))
    if c.is_terminal:
        low = {i: natural[i] if columns[i].whole else min(natural[i], columns[i].min_width) for i in keep}

        def needed() -> int:
            return sum(low[i] for i in keep) + GAP * (len(keep) - 1)

        for i in sorted((i for i in keep if columns[i].drop), key=lambda i: -columns[i].drop):
            if needed() <= c.width:
                break
            keep.remove(i)
        if needed() > c.width:  # the last resort before a line wider than the terminal
            low.update({i: min(low[i], FOLD_MIN) for i in keep if not columns[i].whole})
        spare = c.width - needed()
        for i in keep:  # the foldable columns get their full width while room lasts, in order
            widths[i] = low[i] + max(0, min(natural[i] - low[i], spare))
            spare -= widths[i] - low[i]
    t = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1))
    for i in keep:
        col = columns[i]
        t.add_column(
            col.header, width=widths[i], no_wrap=col.whole, overflow="fold", justify="right" if col.right else "left"
        )
    for row in rows:
        t.add_row(*(row[i] for i in keep))
    total = sum(widths[i] for i in keep) + GAP * (len(keep) - 1)
    if c.is_terminal and total <= c.width:
        c.print(t)
        return
    # A pipe, or a terminal narrower than the ids alone: lines as long as the rows (the terminal
    # wraps them, an id stays one string). Console.print caps a width at the console's own.
    buf = io.StringIO()
    tty = c.is_terminal
    wide = Console(file=buf, width=total, highlight=False, force_terminal=tty, color_system="auto" if tty else None)
    wide.print(t)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines()))
    sys.stdout.flush()


def _width(cell: Cell) -> int:
    return cell.cell_len if isinstance(cell, Text) else cell_len(cell)


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def datasets_table(rows: list[dict[str, Any]]) -> None:
    columns = [
        Column("ID", whole=True),
        Column("NAME", min_width=24),
        Column("SIZE", whole=True, right=True, drop=2),
        Column("INTENTS", whole=True, right=True, drop=3),
        Column("UPDATED", drop=1),
    ]
    print_table(
        columns,
        [
            [d["id"], d["name"], str(d["size"]), str(d.get("intentCount", "")), when(d.get("updatedAt"))]
            for d in rows
        ],
    )


def dataset_detail(d: dict[str, Any]) -> None:
    c = console()
    c.print(Text.assemble((d["name"], "bold"), f"  {d['id']}"))
    if d.get("description"):
        c.print(Text(d["description"]))
    c.print(f"{d['size']} examples, {d.get('intentCount', 0)} intents, updated {when(d.get('updatedAt'))}")
    counts: dict[str, int] = {}
    for ex in d.get("examples", []):
        counts[ex["intent"]] = counts.get(ex["intent"], 0) + 1
    if counts:
        t = Table(box=None, header_style="bold")
        t.add_column("INTENT")
        t.add_column("EXAMPLES", justify="right")
        for intent, n in sorted(counts.items()):
            t.add_row(Text(intent), str(n))
        c.print(t)


def jobs_table(rows: list[dict[str, Any]]) -> None:
    """One row per job. At 80 columns: ID, KIND, STATUS, PROGRESS, MESSAGE and CREATED (folded);
    DATASET (an id, never cut) from about 105 columns; all of them in a pipe."""
    columns = [
        Column("ID", whole=True),
        Column("KIND", whole=True, drop=3),
        Column("DATASET", whole=True, drop=6),
        Column("STATUS", whole=True),
        Column("PROGRESS", whole=True, right=True, drop=2),
        Column("MESSAGE", drop=5),
        Column("CREATED", drop=4),
    ]
    print_table(
        columns,
        [
            [
                j["id"],
                j["kind"],
                j.get("datasetId") or "-",
                status_text(j["status"]),
                f"{j['progress']:.0f}%",
                j.get("message") or "",
                when(j.get("createdAt")),
            ]
            for j in rows
        ],
    )


def artifacts_table(rows: list[dict[str, Any]]) -> None:
    """A job's files: name, size in bytes, sha256 (when the server knows it)."""
    columns = [Column("NAME", whole=True), Column("SIZE", whole=True, right=True), Column("SHA256", drop=1)]
    print_table(columns, [[r["name"], str(r["size"]), r.get("sha256") or "-"] for r in rows])


def _waits(j: dict[str, Any]) -> bool:
    """Whether a job's detail needs a line for what it waits for (not when its message says it)."""
    wait = j.get("waitingFor")
    return bool(wait) and j.get("status") == "queued" and wait not in (j.get("message") or "")


def job_detail(j: dict[str, Any]) -> None:
    c = console()
    c.print(
        Text.assemble(
            (j["id"], "bold"), f"  {j['kind']}  ", status_text(j["status"]), f"  {j['progress']:.0f}%"
        )
    )
    # A queued job that ran before (re-queued) keeps its last attempt's start and worker: say
    # so, and count no duration while it waits.
    last = " (last attempt)" if j.get("status") == "queued" else ""
    rows = [
        ("dataset", j.get("datasetId") or "-"),
        ("agent", j.get("agentId") or "-"),
        ("message", j.get("message") or "-"),
        *([("waits for", j["waitingFor"])] if _waits(j) else []),
        ("attempt", str(j.get("attempt", 0))),
        *([("worker", j["worker"] + last)] if j.get("worker") else []),
        *([("labels", ", ".join(j["labels"]))] if j.get("labels") else []),
        ("created", when(j.get("createdAt"))),
        ("started", when(j.get("startedAt")) + (last if j.get("startedAt") else "")),
        ("finished", when(j.get("finishedAt"))),
        ("duration", "-" if last else duration(j.get("startedAt"), j.get("finishedAt"))),
    ]
    if j.get("error"):
        rows.append(("error", j["error"]))
    if j.get("params"):
        rows.append(("params", json.dumps(j["params"])))
    if j.get("metrics"):
        rows.append(("metrics", json.dumps(j["metrics"])))
    t = Table(box=None, show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for k, v in rows:
        t.add_row(k, Text(v))  # Text: a message's "[...]" is not rich markup
    c.print(t)
