"""How the CLI shows what training produced: log lines, the metrics curve and predictions."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.table import Table
from rich.text import Text

from .render import console, print_json

CURVE_META = ("progress", "attempt", "timestamp", "pointNo")  # stored beside each metrics report


def log_lines(entries: list[dict[str, Any]], as_json: bool = False) -> None:
    """Stored log lines: stdout lines on stdout, stderr and trainer lines on stderr (as
    ``docker logs`` does); with ``as_json`` one JSON object per line, all on stdout."""
    for entry in entries:
        if as_json:
            sys.stdout.write(json.dumps(entry, ensure_ascii=False) + "\n")
            sys.stdout.flush()
            continue
        out = sys.stdout if entry.get("stream") == "stdout" else sys.stderr
        out.write(f"{entry.get('line', '')}\n")
        out.flush()
        if entry.get("note"):
            sys.stderr.write(f"mangwale: note: {entry['note']}\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def metrics_table(points: list[dict[str, Any]]) -> None:
    """The training curve: one row per report, one column per metric (first seen first)."""
    if not points:
        sys.stderr.write("no metrics reported (yet)\n")
        return
    names: list[str] = []
    for p in points:
        names.extend(k for k in p if k not in CURVE_META and k not in names)
    attempts = {p.get("attempt") for p in points}
    t = Table(box=None, header_style="bold")
    columns = (["attempt"] if len(attempts) > 1 else []) + names + ["progress"]
    for name in columns:
        t.add_column(name, justify="right")
    for p in points:
        row = [_cell(p.get(n)) for n in columns]
        if p.get("progress") is not None:
            row[-1] = f"{float(p['progress']):.0f}%"
        t.add_row(*row)
    console().print(t)


def prediction(result: dict[str, Any], as_json: bool = False) -> None:
    """An intent with its confidence, the entities found and the runners-up."""
    if as_json:
        print_json(result)
        return
    t = Table(box=None, show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    # Text, not str: an intent or entity value with "[...]" is not rich markup
    t.add_row("intent", Text(f"{result['intent']} ({result['confidence']:.2f})"))
    entities = result.get("entities") or []
    t.add_row(
        "entities",
        Text(", ".join(f"{e['entity']}={e['value']!r}" for e in entities) if entities else "-"),
    )
    others = [r for r in result.get("ranking", [])[1:] if r.get("confidence", 0) > 0]
    if others:
        t.add_row("also", Text(", ".join(f"{r['intent']} ({r['confidence']:.2f})" for r in others)))
    console().print(t)
