"""The class of every ``mangwale`` command: typer's, with usage lines in typer's documented
convention (``mangwale jobs create [OPTIONS] KIND``). From typer 0.26 on, a required argument
shows as ``{KIND}``, which reads as a set or a template placeholder to be typed literally."""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand


class Command(TyperCommand):
    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]
