"""The data directory: its layout, its exclusive lock and crash-safe file replacement."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import StoreError

LOCK_NAME = "mangwale.lock"
DB_NAME = "db.json"
EVENTS_NAME = "events.jsonl"
ARTIFACTS_NAME = "artifacts"
TMP_MARK = ".tmp-"


class DataDir:
    """A data dir owned by one server at a time (``flock`` on ``mangwale.lock``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    @property
    def db(self) -> Path:
        return self.path / DB_NAME

    @property
    def events(self) -> Path:
        return self.path / EVENTS_NAME

    @property
    def artifacts(self) -> Path:
        return self.path / ARTIFACTS_NAME

    def prepare(self) -> None:
        """Create the dir, take the lock, remove temp files a crash left behind."""
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"data dir {self.path} is a file, not a directory", field="data_dir")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.artifacts.mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create data dir {self.path}: {exc.strerror}", field="data_dir") from None
        self.lock()
        for stale in self.path.glob(f"*{TMP_MARK}*"):
            stale.unlink(missing_ok=True)

    def lock(self) -> None:
        lock_path = self.path / LOCK_NAME
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot open {lock_path}: {exc.strerror}", field="data_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise StoreError(
                    f"data dir {self.path} is in use by another mangwale server (pid {holder}); "
                    "stop it or pass another --data-dir",
                    code="locked",
                    field="data_dir",
                ) from None
            raise StoreError(f"cannot lock {lock_path}: {exc.strerror}", field="data_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def atomic_write(path: Path, data: bytes | Iterable[bytes], *, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data`` (bytes, or chunks of them) so that a crash leaves either
    the old or the new file. ``sync_dir=False`` leaves the directory's fsync to the caller (one
    for several files)."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, [data] if isinstance(data, bytes) else data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def write_all(fd: int, chunks: Iterable[bytes]) -> None:
    for data in chunks:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file or directory if it is there (best effort: a file gone meanwhile is fine)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
