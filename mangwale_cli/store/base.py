"""The storage interface. TinyDB (embedded, the default) and Redis are peer backends.

The runner, the event bus and the service only see ``Store``. Every method is async so a
networked backend fits without changing callers. Writes marked ``durable`` return only once
the change would survive kill -9; other writes (progress) may be batched.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

from .. import wire
from ..wire import Dataset, Job, JobStatus

SCHEMA_VERSION = 1


class Store(ABC):
    """Jobs, datasets, idempotency keys and small metadata."""

    #: where trained models and job files live (a directory per job)
    artifacts_dir: Path

    @abstractmethod
    async def open(self) -> None:
        """Load or create the store; raise ``StoreError`` if it cannot be trusted."""

    @abstractmethod
    async def close(self) -> None:
        """Flush everything and release resources."""

    # jobs
    @abstractmethod
    async def create_job(self, job: Job, idempotency: tuple[str, str] | None = None) -> tuple[Job, bool]:
        """Durably store a new job. With ``(key, fingerprint)``, a key seen before returns the
        job it created and False; the same key with another fingerprint raises ``Conflict``."""

    @abstractmethod
    async def get_job(self, job_id: str) -> Job | None: ...

    @abstractmethod
    async def save_job(self, job: Job, *, durable: bool = False) -> None:
        """Replace a job document."""

    @abstractmethod
    async def delete_job(self, job_id: str) -> None: ...

    @abstractmethod
    async def list_jobs(
        self,
        *,
        statuses: Iterable[JobStatus] | None = None,
        limit: int | None = None,
        before: str | None = None,
    ) -> list[Job]:
        """Newest first; ``before`` is a job id: only jobs created before it."""

    @abstractmethod
    async def count_jobs(self) -> dict[str, int]:
        """Number of jobs per status."""

    # datasets
    @abstractmethod
    async def create_dataset(self, dataset: Dataset) -> None: ...

    @abstractmethod
    async def get_dataset(self, dataset_id: str) -> Dataset | None: ...

    @abstractmethod
    async def save_dataset(self, dataset: Dataset) -> None: ...

    @abstractmethod
    async def delete_dataset(self, dataset_id: str) -> None: ...

    @abstractmethod
    async def list_datasets(self) -> list[Dataset]: ...

    # artifacts, logs and metrics history (files in the job's directory by default)
    def artifact_dir(self, job_id: str) -> Path:
        """The local directory holding a job's files (model, metrics, logs)."""
        return self.artifacts_dir / job_id

    async def append_job_lines(self, job_id: str, name: str, items: list[dict[str, object]]) -> None:
        """Append JSON lines to a job's ``logs`` or ``metrics`` file (not fsynced: best effort)."""
        if not items:
            return
        path = self.artifact_dir(job_id) / f"{name}.jsonl"
        text = "".join(wire.dumps(i) + "\n" for i in items)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)

        await asyncio.to_thread(write)

    async def read_job_lines(self, job_id: str, name: str) -> list[dict[str, object]]:
        path = self.artifact_dir(job_id) / f"{name}.jsonl"

        def read() -> list[dict[str, object]]:
            try:
                raw = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return []
            out = []
            for ln in raw.splitlines():
                try:
                    out.append(wire.loads(ln))
                except ValueError:
                    continue  # a torn last line after a crash
            return out

        return await asyncio.to_thread(read)

    # metadata
    @abstractmethod
    async def get_meta(self, key: str) -> object | None: ...

    @abstractmethod
    async def set_meta(self, key: str, value: object) -> None: ...
