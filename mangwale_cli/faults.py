"""Crash points for tests: ``MANGWALE_FAULT=name[:n],...`` makes the process kill itself (SIGKILL)
the n-th time (default: the first) it reaches ``point(name)``.

Each name is a window the crash model (docs/storage.md) promises to survive; tests aim kill -9
exactly there instead of hoping a random kill lands in it. Unset, ``point`` is one attribute
check. Names:

    wal-written        a batch of records is in the log file, not yet fsynced nor applied
    wal-synced         the batch is durable, not yet applied, answered or broadcast
    wal-drop           deleting log segments the snapshot covers
    snapshot-written   the new snapshot is written and fsynced, not yet renamed into place
    snapshot-renamed   the snapshot is in place, the log segments it covers not yet deleted
    segments-merged    job segments rewritten, the old ones not yet deleted
    migrate-copied     a schema-1 store copied into the new layout, not yet switched to it
    migrate-switched   switched to the new layout, the old files not yet moved to the backup
    redis-committed    (Redis) a write's script ran; its reply not yet handled
"""

from __future__ import annotations

import os
import signal

ENV = "MANGWALE_FAULT"


def _parse(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in text.split(","):
        name, _, n = item.strip().partition(":")
        if name:
            out[name] = int(n) if n.isdigit() else 1
    return out


_armed: dict[str, int] = _parse(os.environ.get(ENV, ""))


def point(name: str) -> None:
    """Die here (SIGKILL, no clean-up of any kind) if this crash point is armed and due."""
    if not _armed or name not in _armed:
        return
    _armed[name] -= 1
    if _armed[name] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


def arm(spec: str) -> None:
    """Arm crash points in this process (tests that fork a child after arming)."""
    _armed.update(_parse(spec))
