"""Snapshots of the embedded store: the state as of one record, written off the event loop.

``snapshot.json`` names the record it reflects (start-up loads it, then replays the log after
that record) and holds the small tables (metadata, idempotency keys), the active jobs, the list of
archive segments with their dead jobs, and the dataset files. A snapshot is incremental: it
writes only the finished jobs not yet archived (one new segment, ``archive.py``), the datasets
changed since the last one (one file each), and segments worth merging (their live documents
move into the new segment). Everything is fsynced before ``snapshot.json`` is replaced (temp file
+ rename), which is the moment the snapshot counts; files it replaced are deleted after.

The file work (``write``) runs in a worker thread. Large documents are serialized in pieces, so
the event loop's thread gets the GIL back between them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import faults, wire
from ..errors import StoreError
from . import archive
from .base import SCHEMA_VERSION
from .datadir import TMP_MARK, fsync_dir, fsync_path, write_all

NAME = "snapshot.json"
KEY = "mangwaleSnapshot"


@dataclass
class Plan:
    """What one snapshot covers, captured on the event loop (references, never copies of docs)."""

    record: int
    seq: int
    epoch: str
    meta: dict[str, Any]
    idem: dict[str, Any]
    active: list[dict[str, Any]]
    to_archive: list[dict[str, Any]]
    merge: dict[int, list[tuple[str, int, int]]]  # segment -> its live (job id, offset, size)
    dead: dict[int, list[str]]
    segments: list[int]  # listed by the previous snapshot
    segment: int  # the number of the segment this one writes
    datasets: dict[str, dict[str, Any] | None]  # changed since the last snapshot (None: deleted)
    dataset_files: dict[str, str]  # as the previous snapshot listed them
    lines: set[tuple[str, str]] = field(default_factory=set)  # job line files written since


@dataclass
class Done:
    written: list[tuple[str, int, int]]
    docs: list[dict[str, Any]]
    segments: list[int]
    dataset_files: dict[str, str]


def write(plan: Plan, root: Path, artifacts: Path) -> Done:
    """Write the snapshot ``plan`` describes (worker thread); ``snapshot.json`` last."""
    archive_dir, datasets_dir = root / "jobs", root / "datasets"
    docs = list(plan.to_archive)
    reader = archive.Reader(archive_dir)  # its own descriptors: the loop reads too
    try:
        for n, rows in plan.merge.items():
            docs.extend(reader.read(n, off, size) for _job_id, off, size in rows)
    finally:
        reader.close()
    written = archive.write_segment(archive_dir, plan.segment, docs) if docs else []
    files = dict(plan.dataset_files)
    for ds_id, doc in plan.datasets.items():
        if doc is None:
            files.pop(ds_id, None)
        else:
            name = f"{ds_id}.{plan.record}.json"
            datasets_dir.mkdir(exist_ok=True)
            write_json(datasets_dir / name, doc)
            files[ds_id] = name
    if plan.datasets:
        fsync_dir(datasets_dir)
    for job_id, name in plan.lines:  # log lines are as durable as the snapshot that covers them
        fsync_path(artifacts / job_id / f"{name}.jsonl")
    segments = [s for s in plan.segments if s not in plan.merge] + ([plan.segment] if docs else [])
    doc = {
        KEY: SCHEMA_VERSION,
        "record": plan.record,
        "seq": plan.seq,
        "epoch": plan.epoch,
        "createdAt": wire.now_ms(),
        "meta": plan.meta,
        "idem": plan.idem,
        "active": plan.active,
        "dead": {str(k): v for k, v in plan.dead.items()},
        "jobSegments": segments,
        "datasets": files,
    }
    path = root / NAME
    tmp = path.with_name(f"{path.name}{TMP_MARK}snap")
    write_json(tmp, doc)
    faults.point("snapshot-written")
    os.replace(tmp, path)
    fsync_dir(root)
    faults.point("snapshot-renamed")
    return Done([(w.job_id, w.offset, w.size) for w in written], docs, segments, files)


def cleanup(root: Path, merged: Iterable[int], old_dataset_files: Iterable[str]) -> None:
    """Delete what the snapshot just replaced (worker thread)."""
    for n in merged:
        faults.point("segments-merged")
        archive.remove_segment(root / "jobs", n)
    for name in old_dataset_files:
        (root / "datasets" / name).unlink(missing_ok=True)


def read(root: Path) -> dict[str, Any]:
    """The snapshot as start-up loads it ({} for none); refuses one that is corrupt or too new."""
    path = root / NAME
    snap = read_json(path, "snapshot", missing={})
    if not isinstance(snap, dict):
        raise StoreError(f"the store's snapshot {path} is not a mangwale snapshot", code="corrupt")
    if snap:
        version = snap.get(KEY)
        if not isinstance(version, int):
            raise StoreError(f"the store's snapshot {path} has no schema version", code="corrupt")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store {root} has schema version {version}, newer than this mangwale ({SCHEMA_VERSION}); "
                "upgrade mangwale",
                code="too_new",
            )
    return snap


def read_json(path: Path, what: str, missing: Any = None) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if missing is not None:
            return missing
        raise StoreError(f"the store's {what} {path} is missing; restore the data dir from a backup", code="corrupt") from None
    except OSError as exc:
        raise StoreError(f"cannot read the store's {what} {path}: {exc.strerror}", code="corrupt") from None
    try:
        return wire.loads(raw)
    except ValueError as exc:
        raise StoreError(f"the store's {what} {path} is corrupt ({exc}); restore the data dir from a backup",
                         code="corrupt") from None  # fmt: skip


def write_json(path: Path, doc: Any) -> None:
    """Write a JSON file durably (no rename: callers rename, or use names nobody reads yet).
    Large lists are serialized in pieces so the event loop's thread gets the GIL back."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, _chunks(doc))
        os.fsync(fd)
    finally:
        os.close(fd)


def _chunks(doc: Any, depth: int = 0) -> Iterable[bytes]:
    """``doc`` as JSON in pieces: a big list or dict is not serialized in one call (one call
    holds the GIL for all of it, and the event loop waits that long)."""
    if depth < 3 and isinstance(doc, dict) and (len(doc) > 64 or any(_big(v) for v in doc.values())):
        yield b"{"
        for i, (k, v) in enumerate(doc.items()):
            yield (("," if i else "") + wire.dumps(k) + ":").encode()
            yield from _chunks(v, depth + 1)
        yield b"}"
    elif depth < 3 and isinstance(doc, list) and len(doc) > 64:
        yield b"["
        for i in range(0, len(doc), 64):
            yield (("," if i else "") + wire.dumps(doc[i : i + 64])[1:-1]).encode()
        yield b"]"
    else:
        yield wire.dumps(doc).encode()


def _big(value: Any) -> bool:
    return isinstance(value, (list, dict)) and len(value) > 64
