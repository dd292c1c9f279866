"""The storage interface. TinyDB (embedded, the default) and Redis are peer backends.

The runner, the event bus and the service only see ``Store``. Every method is async so a
networked backend fits without changing callers. Writes marked ``durable`` return only once
the change would survive kill -9; other writes (progress) may be batched.
"""

from __future__ import annotations

import asyncio
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from .. import wire
from ..errors import StaleWrite
from ..wire import TERMINAL, Dataset, Job, JobStatus

SCHEMA_VERSION = 1


def stale_reason(stored_status: str, stored_attempt: int, new_status: str, new_attempt: int) -> str | None:
    """Why saving a job over the stored one would lose newer state, or None when it may be saved.

    The rule of ``Store.save_job``; the Redis backend runs the same rule in Lua.
    """
    terminal = {s.value for s in TERMINAL}
    if new_attempt < stored_attempt:
        return f"attempt {new_attempt} is older than the stored attempt {stored_attempt}"
    if stored_status in terminal and new_status not in terminal:
        return f"the job already {stored_status}"
    if new_attempt > stored_attempt and stored_status not in ("queued", "running"):
        return f"attempt {new_attempt} cannot start: the job already {stored_status}"
    return None


def stale_write(job: Job, reason: str, stored_status: str, stored_attempt: int) -> StaleWrite:
    return StaleWrite(
        f"job {job.id} was not saved as {job.status.value} (attempt {job.attempt}): {reason}",
        stored_status=stored_status,
        stored_attempt=stored_attempt,
    )


class Store(ABC):
    """Jobs, datasets, idempotency keys and small metadata."""

    #: several instances may use this store at once (the runner then expects guarded saves,
    #: ``claim_meta`` races and artifacts published with ``save_artifacts``)
    shared: ClassVar[bool] = False
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
        """Replace a job document (or create it).

        Guarded saves: a write is refused with ``StaleWrite`` when (a) its ``attempt`` is lower
        than the stored one (a stale instance), (b) the stored status is terminal and the new
        one is not, or (c) its attempt is higher while the stored status is neither queued nor
        running (``stale_reason``). Backends shared by several instances enforce it; TinyDB
        (one process) may too.
        """

    async def begin_attempt(self, job: Job, previous: int) -> bool:
        """Save ``job`` (now running its next attempt) only if the stored job is still at attempt
        ``previous`` and queued or running: the compare-and-set that lets one runner, and only
        one, start an attempt. False (nothing written) if another got there first.

        This default suits one process (one runner): nothing runs between the read and the write
        that could start the job too. Shared backends do it atomically.
        """
        stored = await self.get_job(job.id)
        if stored is None or stored.attempt != previous or stored.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            return False
        await self.save_job(job, durable=True)
        return True

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

    async def save_artifacts(self, job_id: str) -> None:
        """Publish the files of a succeeded job so every instance can serve them.

        A local store serves them from ``artifact_dir`` already: nothing to do.
        """

    async def load_artifacts(self, job_id: str) -> Path:
        """Make sure the job's published files are in ``artifact_dir`` and return it."""
        return self.artifact_dir(job_id)

    async def delete_artifacts(self, job_id: str) -> None:
        """Remove the job's files, logs and metrics, here and wherever they were published."""
        await asyncio.to_thread(shutil.rmtree, self.artifact_dir(job_id), True)

    # metadata
    @abstractmethod
    async def get_meta(self, key: str) -> object | None: ...

    @abstractmethod
    async def set_meta(self, key: str, value: object) -> None: ...

    async def claim_meta(self, key: str, value: object) -> bool:
        """Set ``key`` only if it has no value; True if this call set it.

        Instances starting together use it to do a one-time job once (seeding the sample data
        set). This default suits one process: nothing can run between the read and the write.
        """
        if await self.get_meta(key) is not None:
            return False
        await self.set_meta(key, value)
        return True
