"""The trainer plug-in interface.

A trainer is given a ``TrainingContext`` (the job, its dataset, validated params, a progress
reporter and a directory for artifacts) and runs as a coroutine. Cancelling the coroutine
cancels the training; CPU-heavy trainers do their work in another process
(``trainers.process.run_in_process``) so the server's event loop stays responsive.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import InvalidInput
from ..store.base import Store
from ..wire import Dataset, Job, show


class Reporter(Protocol):
    async def progress(
        self,
        progress: float,
        message: str | None = None,
        *,
        metrics: dict[str, Any] | None = None,
        eta: float | None = None,
    ) -> None:
        """Report progress (0..100, never backwards within an attempt) and the current step."""

    async def log(self, stream: str, line: str) -> None:
        """Record one log line (``stream``: stdout, stderr or trainer)."""


@dataclass
class TrainingContext:
    job: Job
    dataset: Dataset | None
    params: dict[str, Any]
    reporter: Reporter
    artifacts_dir: Path
    kill_grace: float = 3.0  # seconds a cancelled child gets between SIGTERM and SIGKILL


class Trainer(ABC):
    """One job kind."""

    kind: str = ""
    description: str = ""
    requires_dataset: bool = True
    requires_examples: bool = False

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Return params with defaults applied; raise ``InvalidInput`` naming the field."""
        return dict(params)

    async def check(self, params: dict[str, Any], store: Store) -> None:
        """Checks that need the store (e.g. a base job); raise ``InvalidInput``."""

    def check_dataset(self, dataset: Dataset) -> None:
        """Whether this kind can train on ``dataset`` at all, checked when a job is created so
        that the client hears it at once (a 422 naming the dataset and what it lacks), not
        from a job that fails later; raise ``InvalidInput`` with ``field="datasetId"``."""

    @abstractmethod
    async def run(self, ctx: TrainingContext) -> dict[str, Any] | None:
        """Train; return final metrics (stored on the job) or None."""


@dataclass(frozen=True)
class Param:
    """A declared numeric/bool parameter with bounds, for ``validate_declared``."""

    name: str
    kind: type
    default: Any
    minimum: float | None = None
    maximum: float | None = None


def validate_declared(params: dict[str, Any], declared: list[Param]) -> dict[str, Any]:
    """Check params against declarations: unknown names, types, bounds, NaN/inf."""
    known = {p.name: p for p in declared}
    for name in params:
        if name not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise InvalidInput(f"unknown parameter {show(name)} (allowed: {allowed})", field=f"params.{name[:100]}")
    out: dict[str, Any] = {}
    for p in declared:
        value = params.get(p.name, p.default)
        field = f"params.{p.name}"
        if value is None:
            out[p.name] = None
            continue
        if p.kind is bool:
            if not isinstance(value, bool):
                raise InvalidInput(f"{field} must be true or false, got {show(value)}", field=field)
        elif p.kind is int:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()
            ):
                raise InvalidInput(f"{field} must be an integer, got {show(value)}", field=field)
            value = int(value)
        elif p.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidInput(f"{field} must be a number, got {show(value)}", field=field)
            if isinstance(value, int) and abs(value) > 2**1023:  # float() would overflow
                bound = f"<= {show(p.maximum)}" if p.maximum is not None else "a finite number"
                raise InvalidInput(f"{field} must be {bound}, got {show(value)}", field=field)
            if not math.isfinite(value):
                raise InvalidInput(f"{field} must be a finite number, got {show(value)}", field=field)
            value = float(value)
        elif p.kind is str and not isinstance(value, str):
            raise InvalidInput(f"{field} must be a string, got {show(value)}", field=field)
        if p.minimum is not None and value < p.minimum:
            raise InvalidInput(f"{field} must be >= {show(p.minimum)}, got {show(value)}", field=field)
        if p.maximum is not None and value > p.maximum:
            raise InvalidInput(f"{field} must be <= {show(p.maximum)}, got {show(value)}", field=field)
        out[p.name] = value
    return out
