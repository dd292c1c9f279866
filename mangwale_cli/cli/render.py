"""How the CLI shows results: rich tables on a terminal, plain text in pipes, JSON with --json."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

_out: Console | None = None


def console() -> Console:
    global _out
    if _out is None:
        _out = Console(highlight=False, soft_wrap=False)
    return _out


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def error_line(message: str) -> None:
    """The one line a failing command writes on stderr."""
    sys.stderr.write(f"mangwale: error: {message}\n")


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


def datasets_table(rows: list[dict[str, Any]]) -> None:
    t = Table(box=None, header_style="bold")
    for col in ("ID", "NAME", "SIZE", "INTENTS", "UPDATED"):
        t.add_column(col, justify="right" if col in ("SIZE", "INTENTS") else "left")
    for d in rows:
        t.add_row(d["id"], d["name"], str(d["size"]), str(d.get("intentCount", "")), when(d.get("updatedAt")))
    console().print(t)


def dataset_detail(d: dict[str, Any]) -> None:
    c = console()
    c.print(f"[bold]{d['name']}[/bold]  {d['id']}")
    if d.get("description"):
        c.print(d["description"])
    c.print(f"{d['size']} examples, {d.get('intentCount', 0)} intents, updated {when(d.get('updatedAt'))}")
    counts: dict[str, int] = {}
    for ex in d.get("examples", []):
        counts[ex["intent"]] = counts.get(ex["intent"], 0) + 1
    if counts:
        t = Table(box=None, header_style="bold")
        t.add_column("INTENT")
        t.add_column("EXAMPLES", justify="right")
        for intent, n in sorted(counts.items()):
            t.add_row(intent, str(n))
        c.print(t)


def jobs_table(rows: list[dict[str, Any]]) -> None:
    t = Table(box=None, header_style="bold")
    for col in ("ID", "KIND", "DATASET", "STATUS", "PROGRESS", "MESSAGE", "CREATED"):
        t.add_column(col, justify="right" if col == "PROGRESS" else "left", overflow="fold")
    for j in rows:
        style = STATUS_STYLE.get(j["status"], "")
        t.add_row(
            j["id"],
            j["kind"],
            j.get("datasetId") or "-",
            f"[{style}]{j['status']}[/{style}]" if style else j["status"],
            f"{j['progress']:.0f}%",
            j.get("message") or "",
            when(j.get("createdAt")),
        )
    console().print(t)


def job_detail(j: dict[str, Any]) -> None:
    c = console()
    style = STATUS_STYLE.get(j["status"], "")
    c.print(f"[bold]{j['id']}[/bold]  {j['kind']}  [{style}]{j['status']}[/{style}]  {j['progress']:.0f}%")
    rows = [
        ("dataset", j.get("datasetId") or "-"),
        ("agent", j.get("agentId") or "-"),
        ("message", j.get("message") or "-"),
        ("attempt", str(j.get("attempt", 0))),
        ("created", when(j.get("createdAt"))),
        ("started", when(j.get("startedAt"))),
        ("finished", when(j.get("finishedAt"))),
        ("duration", duration(j.get("startedAt"), j.get("finishedAt"))),
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
        t.add_row(k, v)
    c.print(t)
