"""Artifact uploads: ``PUT /training/jobs/{id}/artifacts/{name}`` (docs/protocol.md,
"Uploading an artifact"), without the web framework: the route hands over the headers and the
body as an async iterator of chunks.

The body streams to a temp file beside its final place, a megabyte at a time (never held whole),
is checked against Content-Length, ``X-Content-SHA256`` and ``artifacts.max_size``, fenced by
the job's lease (checked before the transfer and again before the rename), refused when it is
a pickle, audited when it is the model (``nlu.modelfile``, in the predictor's child process),
fsynced and renamed in by the store (``Store.put_artifact``). Nothing is kept unless it is 201.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from . import wire
from .errors import Conflict, InvalidInput, ModelRefused, PayloadTooLarge, StaleWrite, Unavailable
from .nlu.predictor import Predictor, PredictorFailed
from .store.base import Store
from .store.datadir import TMP_MARK
from .wire import Job, JobStatus

log = logging.getLogger(__name__)

UPLOAD_CHUNK = 1 << 20  # bytes gathered before one write to the temp file


def _looks_pickled(head: bytes) -> bool:
    """A pickle of protocol 2 or later starts with PROTO (0x80) and the protocol number; 4 and
    5 go on with a FRAME (0x95). (Protocols 0 and 1 have no header: a model.skops audit catches
    them, since they are no zip.)"""
    if len(head) < 3 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        return False
    return head[1] < 4 or head[2] == 0x95


async def _receive(path: Path, body: AsyncIterator[bytes], limit: int) -> tuple[int, str, bytes]:
    """Stream ``body`` into ``path`` (at most ``limit`` bytes, else 413), fsynced; returns its
    size, sha256 and first bytes. Writes go to a thread a megabyte at a time, so neither the
    loop nor the memory holds more than that."""
    h = hashlib.sha256()
    size = 0
    head = b""
    pending: list[bytes] = []
    pending_bytes = 0
    f = await asyncio.to_thread(open, path, "wb")
    try:
        async for chunk in body:
            if not chunk:
                continue
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the artifact is larger than artifacts.max_size ({limit} bytes)", field="body")
            if len(head) < 8:
                head += chunk[: 8 - len(head)]
            h.update(chunk)
            pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= UPLOAD_CHUNK:
                await asyncio.to_thread(f.write, b"".join(pending))
                pending, pending_bytes = [], 0
        if pending:
            await asyncio.to_thread(f.write, b"".join(pending))
        await asyncio.to_thread(_flush_and_sync, f)
    finally:
        await asyncio.to_thread(f.close)
    return size, h.hexdigest(), head


def _flush_and_sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())



class Uploads:
    """Takes uploaded artifacts into ``store`` for the holders of jobs' leases."""

    def __init__(self, store: Store, predictor: Predictor, get_job: Callable[[str], Awaitable[Job]], max_size: int) -> None:
        self.store = store
        self.predictor = predictor
        self.get_job = get_job
        self.max_size = max_size

    async def receive(
        self,
        job_id: str,
        name: str,
        body: AsyncIterator[bytes],
        *,
        lease: str | None,
        sha256: str | None,
        length: str | None,
    ) -> dict[str, Any]:
        """Store a file of a running job, uploaded by the holder of its lease (docs/protocol.md,
        "Uploading an artifact"). The body streams to a temp file beside its final place (never
        held in memory), is checked against ``length`` and ``sha256``, audited when it is a
        model, fsynced, then renamed in: it is complete and durable before the answer, so
        before the job can be recorded terminal. Anything refused leaves nothing behind."""
        problem = wire.artifact_name_problem(name)
        if problem is not None:
            raise InvalidInput(problem, field="name", code="bad_name", status=400)
        digest = wire.parse_sha256(sha256)
        if digest is None:
            raise InvalidInput(
                f"{wire.SHA256_HEADER} must be the body's sha256 as 64 hex digits", field=wire.SHA256_HEADER, code="bad_header", status=400
            )
        held = wire.parse_lease(lease)
        if held is None:
            raise InvalidInput(
                f"{wire.LEASE_HEADER} must be HOLDER:TOKEN, the job's lease (its lease field)", field=wire.LEASE_HEADER, code="bad_header", status=400
            )
        size = int(length) if length is not None and length.isdigit() else None
        if size is None:
            raise InvalidInput("an artifact upload needs a Content-Length", field="Content-Length", code="bad_header", status=400)
        limit = self.max_size
        if size > limit:
            raise PayloadTooLarge(f"the artifact is {size} bytes, more than artifacts.max_size ({limit})", field="body")
        if name.lower().endswith(wire.PICKLE_SUFFIXES) or (name.startswith("model.") and name != wire.MODEL_ARTIFACT):
            raise InvalidInput(
                f"{name!r} names a pickle; models are uploaded as {wire.MODEL_ARTIFACT} (skops), and pickles "
                "are never accepted: loading one runs code",
                field="name",
                code="untrusted_artifact",
            )
        refused = self.store.uploads_refused()
        if refused is not None:
            raise Conflict(refused, field="name", code="no_shared_artifacts_dir")
        await self._check_lease(job_id, held)
        directory = self.store.artifact_dir(job_id)
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        tmp = directory / f".upload{TMP_MARK}{secrets.token_hex(6)}"
        try:
            got, actual, head = await _receive(tmp, body, limit)
            if got != size:
                raise InvalidInput(f"the body has {got} bytes, Content-Length said {size}", field="body", code="bad_length", status=400)
            if actual != digest:
                raise InvalidInput(
                    f"the body's sha256 is {actual}, {wire.SHA256_HEADER} said {digest}; nothing was kept",
                    field=wire.SHA256_HEADER,
                    code="sha256_mismatch",
                )
            if _looks_pickled(head):
                raise InvalidInput(
                    f"{name} is a pickle; pickles are never accepted (loading one runs code): "
                    f"models are uploaded as {wire.MODEL_ARTIFACT} (skops)",
                    field="body",
                    code="untrusted_artifact",
                )
            if name == wire.MODEL_ARTIFACT:
                await self._audit(tmp, name)
            await self._check_lease(job_id, held)  # still its holder after the transfer
            await self.store.put_artifact(job_id, name, tmp, size, actual)
        finally:
            await asyncio.to_thread(tmp.unlink, True)
        log.info("job %s: artifact %s uploaded (%d bytes)", job_id, name, size)
        return wire.artifact_out(job_id, name, size, actual)

    async def _check_lease(self, job_id: str, held: tuple[str, int]) -> None:
        """409 unless ``held`` is the job's current, live lease and the job is running."""
        job = await self.get_job(job_id)
        holder, token = held
        lease = job.lease or {}

        def stale(reason: str) -> StaleWrite:
            return StaleWrite(
                f"job {job_id} takes no artifact from {holder} (token {token}): {reason}",
                stored_status=job.status.value,
                stored_attempt=job.attempt,
            )

        if job.status is not JobStatus.RUNNING:
            raise stale(f"it is {job.status.value}, not running")
        if lease.get("holder") != holder or lease.get("token") != token:
            who = f"{lease.get('holder')} (token {lease.get('token')})" if lease else "nobody"
            raise stale(f"its lease is held by {who}")
        if not await self.store.lease_live(job_id):
            raise stale("the lease expired")

    async def _audit(self, path: Path, name: str) -> None:
        """Refuse (422) a model the server would not load; nothing in it is run."""
        try:
            await self.predictor.audit(path)
        except ModelRefused as exc:
            raise InvalidInput(f"{name} refused: {exc}", field="body", code="untrusted_artifact") from None
        except PredictorFailed as exc:  # nothing is kept: a file that kills the checker never gets in
            raise Unavailable(f"{name} could not be checked ({exc}); nothing was kept", field="body") from None

