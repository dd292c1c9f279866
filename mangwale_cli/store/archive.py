"""Finished jobs on disk: immutable segment files, read by offset.

A finished job takes no more writes, so the snapshot moves it out of memory once, into the
segment that snapshot writes (``jobs/<n, 8 digits>.seg``: one JSON document per line). Next to
each segment an index file (``.idx``, one JSON array of ``[id, createdAt, status, finishedAt,
offset, size]``) lets start-up rebuild the in-memory job index without parsing a single
document. A job is in exactly one segment; deleting it leaves its line as garbage (the snapshot
lists it as dead) until the segment is merged: its live documents rewritten into the next
segment, and the old files deleted.

Files are written with temp file + fsync + rename, in a worker thread; reading one document is
one ``pread`` (the page cache holds the hot ones).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import wire
from ..errors import StoreError
from .datadir import TMP_MARK, atomic_write, fsync_dir


@dataclass(slots=True)
class Written:
    """Where ``write_segment`` put one document."""

    job_id: str
    offset: int
    size: int


def seg_path(root: Path, n: int) -> Path:
    return root / f"{n:08d}.seg"


def idx_path(root: Path, n: int) -> Path:
    return root / f"{n:08d}.idx"


def write_segment(root: Path, n: int, docs: list[dict[str, Any]]) -> list[Written]:
    """Write segment ``n`` (documents, then their index) durably. Runs in a worker thread: each
    document is serialized on its own, so the event loop gets the GIL back in between."""
    root.mkdir(parents=True, exist_ok=True)
    out: list[Written] = []
    rows: list[list[Any]] = []
    chunks: list[bytes] = []
    offset = 0
    for doc in docs:
        data = wire.dumps(doc).encode() + b"\n"
        chunks.append(data)
        out.append(Written(doc["id"], offset, len(data) - 1))
        rows.append([doc["id"], doc.get("createdAt", 0), doc["status"], doc.get("finishedAt") or doc.get("updatedAt") or 0,
                     offset, len(data) - 1])  # fmt: skip
        offset += len(data)
    atomic_write(seg_path(root, n), chunks, sync_dir=False)
    atomic_write(idx_path(root, n), wire.dumps(rows).encode(), sync_dir=False)
    fsync_dir(root)
    return out


def read_index(root: Path, n: int) -> list[list[Any]]:
    path = idx_path(root, n)
    try:
        rows = wire.loads(path.read_bytes())
    except FileNotFoundError:
        raise StoreError(f"the store's job segment index {path} is missing; restore the data dir from a backup",
                         code="corrupt") from None  # fmt: skip
    except (OSError, ValueError) as exc:
        raise StoreError(f"the store's job segment index {path} is unreadable ({exc}); restore the data dir "
                         "from a backup", code="corrupt") from None  # fmt: skip
    if not isinstance(rows, list):
        raise StoreError(f"the store's job segment index {path} is not a list", code="corrupt")
    return rows


class Reader:
    """Open segment files, read by offset."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fds: dict[int, int] = {}

    def read(self, n: int, offset: int, size: int) -> dict[str, Any]:
        fd = self._fds.get(n)
        if fd is None:
            try:
                fd = os.open(seg_path(self.root, n), os.O_RDONLY)
            except OSError as exc:
                raise StoreError(f"cannot read job segment {seg_path(self.root, n)}: {exc.strerror}", code="corrupt") from None
            self._fds[n] = fd
        data = os.pread(fd, size, offset)
        try:
            doc = wire.loads(data)
        except ValueError:
            raise StoreError(f"job segment {seg_path(self.root, n)} is corrupt at offset {offset}", code="corrupt") from None
        if not isinstance(doc, dict):
            raise StoreError(f"job segment {seg_path(self.root, n)} is corrupt at offset {offset}", code="corrupt")
        return doc

    def forget(self, n: int) -> None:
        fd = self._fds.pop(n, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for n in list(self._fds):
            self.forget(n)


def remove_segment(root: Path, n: int) -> None:
    seg_path(root, n).unlink(missing_ok=True)
    idx_path(root, n).unlink(missing_ok=True)


def existing(root: Path) -> set[int]:
    """Segment numbers present on disk (listed in a snapshot or not)."""
    if not root.is_dir():
        return set()
    out = set()
    for p in root.iterdir():
        if p.suffix in (".seg", ".idx") and p.stem.isdigit():
            out.add(int(p.stem))
        elif TMP_MARK in p.name:
            p.unlink(missing_ok=True)
    return out
