"""The storage interface: one atomic record of every change. TinyDB (embedded, the default) and
Redis are peer backends.

Every write here is one atomic unit of state and the event that announces it: a job and its
``job_created``, a status and its ``training_update``, a log line and its ``job_log``, a
deletion and its ``job_deleted``, a dataset and its ``dataset_update``. A backend numbers the
event (``seq``, ``jobSeq``, ``epoch``) inside the same unit, so the stored state and the event
log can never disagree, whatever instant a process dies at (docs/storage.md, "The record").

Job writes are guarded inside the same unit (``refusal``): a write that would move a job
backwards, touch a finished job, or come from a runner whose lease is gone is refused with
``StaleWrite`` and changes nothing.

Every method is async so a networked backend fits without changing callers.
"""

from __future__ import annotations

import asyncio
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..artifacts import write_digest
from ..errors import StaleWrite
from ..eventlog import EventRing, Record
from ..wire import ACTIVE, TERMINAL, Dataset, Job, JobStatus
from .datadir import fsync_path

SCHEMA_VERSION = 2
IDEMPOTENCY_TTL = 24 * 3600.0  # seconds an Idempotency-Key is remembered (store.idempotency_ttl)

_TERMINAL = frozenset(s.value for s in TERMINAL)
_ACTIVE = frozenset(s.value for s in ACTIVE)


@dataclass(frozen=True, slots=True)
class Expect:
    """What the stored job must look like for a write to go through (checked atomically).

    ``holder`` / ``token``: the job's lease must be held by ``holder`` with fencing token
    ``token`` and must not have expired. ``attempt``: the stored attempt. ``statuses``: the
    stored status is one of these.
    """

    attempt: int | None = None
    statuses: frozenset[str] | None = None
    holder: str | None = None
    token: int | None = None

    @classmethod
    def lease_of(cls, job: Job) -> Expect:
        """The runner holding ``job``'s current lease (as it last wrote it)."""
        lease = job.lease or {}
        return cls(holder=lease.get("holder"), token=lease.get("token"))

    def to_args(self) -> list[str]:
        """Positional form for the Redis scripts ('' = no condition)."""
        return [
            "" if self.attempt is None else str(self.attempt),
            "" if self.statuses is None else ",".join(sorted(self.statuses)),
            self.holder or "",
            "" if self.token is None else str(self.token),
        ]


def refusal(
    stored: dict[str, Any] | None,
    new_status: str,
    new_attempt: int,
    expect: Expect | None,
    lease_live: bool,
) -> str | None:
    """Why a job write must be refused, or None when it may be stored. The Redis backend runs
    the same rule in Lua (``redis_scripts.GUARD``); the contract suite checks both.

    Always: a finished job takes no more writes (terminal to anything is refused); an older
    attempt never overwrites a newer one; a higher attempt starts only from queued or running.
    """
    if stored is None:
        return "the job does not exist"
    status, attempt = stored["status"], int(stored.get("attempt") or 0)
    lease = stored.get("lease") or {}
    if expect is not None:
        if expect.attempt is not None and attempt != expect.attempt:
            return f"it is at attempt {attempt}, not {expect.attempt}"
        if expect.statuses is not None and status not in expect.statuses:
            return f"it is {status}"
        if expect.holder is not None:
            if lease.get("holder") != expect.holder or lease.get("token") != expect.token:
                held = f"{lease.get('holder')} (token {lease.get('token')})" if lease else "nobody"
                return f"its lease is held by {held}, not {expect.holder} (token {expect.token})"
            if not lease_live:
                return f"the lease of {expect.holder} (token {expect.token}) expired"
    if status in _TERMINAL:
        return f"the job already {status}"
    if new_attempt < attempt:
        return f"attempt {new_attempt} is older than the stored attempt {attempt}"
    if new_attempt > attempt and status not in _ACTIVE:
        return f"attempt {new_attempt} cannot start: the job already {status}"
    return None


def can_begin(stored: dict[str, Any] | None, previous: int, lease_live: bool) -> bool:
    """Whether attempt ``previous + 1`` may start: the stored job is still at ``previous`` and
    queued, or running under a lease that is gone (its runner died). The compare-and-set that
    lets one runner, and only one, start an attempt."""
    if stored is None or int(stored.get("attempt") or 0) != previous:
        return False
    return stored["status"] == "queued" or (stored["status"] == "running" and not lease_live)


def stale_write(job_id: str, status: str, attempt: int, reason: str, stored: dict[str, Any] | None) -> StaleWrite:
    return StaleWrite(
        f"job {job_id} was not saved as {status} (attempt {attempt}): {reason}",
        stored_status=stored["status"] if stored else "deleted",
        stored_attempt=int(stored.get("attempt") or 0) if stored else 0,
    )


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in the newest-first job list: the (createdAt, id) of the last job seen.
    Pages stay consistent when jobs before the position are deleted (pruned)."""

    created_at: int
    job_id: str

    def encode(self) -> str:
        return f"{self.created_at}.{self.job_id}"

    @classmethod
    def decode(cls, text: str) -> Cursor | None:
        """None when ``text`` is not a cursor (the service reports the field)."""
        head, sep, tail = text.partition(".")
        if not sep or not head.isdigit() or not tail or len(text) > 300:
            return None
        return cls(int(head), tail)

    def key(self) -> tuple[int, str]:
        return (self.created_at, self.job_id)


class Store(ABC):
    """Jobs, datasets, idempotency keys, small metadata, and the event log they share."""

    #: several instances may use this store at once (artifacts are published, metadata raced)
    shared: ClassVar[bool] = False
    #: where trained models and job files live (a directory per job)
    artifacts_dir: Path
    #: the kept events for replay, in seq order (the embedded store fills it from its log; a
    #: shared store's event bus mirrors the shared stream into it)
    ring: EventRing
    #: seconds a lease lasts without renewal (``runner.lease``)
    lease: float = 30.0
    #: called with each batch of committed events, in seq order (set by the event bus)
    on_events: Callable[[list[Record]], None] | None = None

    @abstractmethod
    async def open(self) -> None:
        """Load or create the store; raise ``StoreError`` if it cannot be trusted."""

    @abstractmethod
    async def close(self) -> None:
        """Make everything written durable and release resources."""

    @abstractmethod
    async def head(self) -> str:
        """Where the record stands: a token that changes with every write that changes a job or a
        dataset, before that write is answered. On a shared store every instance reads the same
        token. The server keys its cached response bodies on it (``server/bodycache.py``)."""

    # --- jobs -----------------------------------------------------------------------------

    @abstractmethod
    async def create_job(self, job: Job, idempotency: tuple[str, str] | None = None) -> tuple[Job, bool]:
        """Durably store a new job with its ``job_created`` event (and, on a shared store, its
        queue entry). With ``(key, fingerprint)``, a key seen before (within its TTL) returns
        the job it created and False; the same key with another fingerprint raises
        ``Conflict``. The returned job carries ``jobSeq`` 1."""

    @abstractmethod
    async def write_job(
        self,
        job: Job,
        event: dict[str, Any] | None,
        *,
        expect: Expect | None = None,
        lines: tuple[str, list[dict[str, Any]]] | None = None,
        durable: bool = False,
    ) -> Job:
        """Replace the stored job with ``job`` and log ``event`` about it, as one unit; with
        ``lines`` (``("metrics", [...])``), append them to the job's lines too. Refused with
        ``StaleWrite`` (nothing written) by ``refusal``. A change of ``job.lease`` grants the
        lease for ``self.lease`` seconds (or releases it). Returns the job as stored, with the
        ``jobSeq`` of its event. ``durable``: on disk (fsync) before it returns."""

    @abstractmethod
    async def begin_attempt(self, job: Job, previous: int, event: dict[str, Any]) -> bool:
        """Store ``job`` (running its next attempt, with its new lease) and ``event`` only if
        ``can_begin``; False (nothing written) if another runner got there first or the job
        ended. Durable."""

    @abstractmethod
    async def append_log(self, job_id: str, entry: dict[str, Any], event: dict[str, Any], expect: Expect | None) -> None:
        """One log line: appended to the job's ``logs`` lines with its ``job_log`` event, as one
        unit; refused with ``StaleWrite`` when ``expect`` (the writer's lease) does not hold."""

    @abstractmethod
    async def lease_live(self, job_id: str) -> bool:
        """Whether the job's lease is held and unexpired (its runner is alive)."""

    @abstractmethod
    async def renew_lease(self, job_id: str, holder: str, token: int) -> bool:
        """Extend the lease ``holder`` has on the job by ``self.lease`` seconds from now; False
        if it is not (or no longer) theirs, or expired already."""

    @abstractmethod
    async def delete_jobs(self, job_ids: list[str], reason: str = "deleted") -> list[str]:
        """Delete finished jobs (with their lines) and log one ``job_deleted`` event (``reason``:
        deleted or pruned) naming the ones deleted, as one unit; jobs that are unknown or still
        queued/running are skipped, and so is the base (``params.baseJobId``) of a queued or
        running job, checked in the same unit (a fine-tune created a moment ago keeps its base).
        Returns the ids deleted. Durable. Files are removed by ``delete_artifacts``."""

    @abstractmethod
    async def get_job(self, job_id: str) -> Job | None: ...

    @abstractmethod
    async def list_jobs(
        self,
        *,
        statuses: Iterable[JobStatus] | None = None,
        limit: int | None = None,
        after: Cursor | None = None,
    ) -> list[Job]:
        """Newest first by (createdAt, id); ``after``: only jobs older than that position."""

    @abstractmethod
    async def count_jobs(self) -> dict[str, int]:
        """Number of jobs per status (every status, zeros included)."""

    @abstractmethod
    async def finished_jobs_by_finish_time(self, statuses: Iterable[JobStatus]) -> list[tuple[int, str]]:
        """``(finishedAt, id)`` of every finished job of ``statuses``, oldest first (``updatedAt``
        where a job has no ``finishedAt``; ties by id): what pruning chooses from. Read from an
        index, not by decoding the documents (history can be 100k jobs)."""

    # --- datasets -------------------------------------------------------------------------

    @abstractmethod
    async def create_dataset(self, dataset: Dataset) -> None:
        """Store a new dataset with its ``dataset_update`` (created). Durable."""

    @abstractmethod
    async def save_dataset(self, dataset: Dataset) -> None:
        """Replace a dataset, with its ``dataset_update`` (updated). Durable."""

    @abstractmethod
    async def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset, with its ``dataset_update`` (deleted). Durable."""

    @abstractmethod
    async def get_dataset(self, dataset_id: str) -> Dataset | None: ...

    @abstractmethod
    async def list_datasets(self) -> list[Dataset]:
        """Oldest first (createdAt, then id)."""

    # --- metadata -------------------------------------------------------------------------

    @abstractmethod
    async def get_meta(self, key: str) -> object | None: ...

    @abstractmethod
    async def set_meta(self, key: str, value: object) -> None:
        """Durably set a metadata value (no event)."""

    @abstractmethod
    async def claim_meta(self, key: str, value: object) -> bool:
        """Set ``key`` only if it has no value; True if this call set it. Instances starting
        together use it to do a one-time job once (seeding the sample data set)."""

    # --- the event log, read side -----------------------------------------------------------

    @abstractmethod
    async def events_after(self, since: int) -> list[dict[str, Any]]:
        """The committed events with seq > ``since`` that the log still keeps, oldest first,
        as clients receive them (tests and diagnostics; clients read the bus's ring)."""

    # --- job lines (logs, metrics), read side -----------------------------------------------

    @abstractmethod
    async def read_job_lines(self, job_id: str, name: str) -> list[dict[str, Any]]:
        """A job's ``logs`` or ``metrics`` lines, oldest first."""

    # --- artifacts ------------------------------------------------------------------------

    def artifact_dir(self, job_id: str) -> Path:
        """The local directory holding a job's files (model, metrics, logs)."""
        return self.artifacts_dir / job_id

    async def save_artifacts(self, job_id: str) -> None:
        """Publish the files of a job about to succeed so every instance can serve them; done
        before the terminal state is written, so a succeeded job always has its model.

        A local store serves them from ``artifact_dir`` already: it only makes them durable."""
        await asyncio.to_thread(_fsync_tree, self.artifact_dir(job_id))

    async def load_artifacts(self, job_id: str) -> Path:
        """Make sure the job's published files are in ``artifact_dir`` and return it."""
        return self.artifact_dir(job_id)

    async def delete_artifacts(self, job_id: str) -> None:
        """Remove the job's files (after ``delete_jobs``), here and wherever they were published."""
        await asyncio.to_thread(shutil.rmtree, self.artifact_dir(job_id), True)

    def uploads_refused(self) -> str | None:
        """Why this store cannot take uploaded artifacts (``put_artifact``), or None when it can."""
        return None

    async def put_artifact(self, job_id: str, name: str, src: Path, size: int, sha256: str) -> Path:
        """Put an uploaded file in place as ``name`` among the job's files. ``src`` is complete,
        checked (``size`` bytes, ``sha256`` hex) and fsynced, in ``artifact_dir(job_id)`` (so
        the rename is atomic); the rename and the directory's fsync make it durable before the
        caller answers, hence before the job can be recorded terminal. Returns the new path."""
        dest = self.artifact_dir(job_id) / name
        await asyncio.to_thread(_rename_durably, src, dest, sha256)
        return dest


def _rename_durably(src: Path, dest: Path, sha256: str) -> None:
    src.replace(dest)
    write_digest(dest, sha256)  # its ETag when it is downloaded (artifacts.py)
    fsync_path(dest.parent)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and the directories holding them (a model must survive
    a power loss once its job is recorded as succeeded)."""
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(root)


