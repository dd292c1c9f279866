"""Upgrading a data dir: schema 1 (``db.json`` + ``events.jsonl``) to schema 2 (the record).

Runs once, at start-up, before the store opens; crash-safe at every step:

1. The new layout is built in ``migrate.tmp/`` beside the old files, which are only read:
   finished jobs into archive segment 1, active jobs and small tables into a snapshot, datasets
   into their files, and the kept events into a log segment (one record per event, exactly as
   clients saw it, so ``epoch`` and ``seq`` carry on and watchers resume across the upgrade).
2. Everything is fsynced, then moved into place; renaming ``snapshot.json`` in is the switch.
   A crash before it leaves no ``snapshot.json``: the next start wipes the partial copy and
   migrates again from the untouched old files.
3. The old files move to ``backup-schema1-<time>/`` (logged). A crash before that finishes it on
   the next start. Rolling back is the old version plus that backup (docs/storage.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .. import faults, wire
from ..errors import StoreError
from . import snapshot
from .datadir import DB_NAME, EVENTS_NAME, atomic_write, fsync_dir

log = logging.getLogger(__name__)

TMP_DIR = "migrate.tmp"
NEW_DIRS = ("log", "jobs", "datasets")
OLD_FILES = (DB_NAME, EVENTS_NAME)
_TERMINAL = {"succeeded", "failed", "cancelled"}


def migrate_if_needed(root: Path) -> None:
    snap = root / "snapshot.json"
    tmp = root / TMP_DIR
    if snap.exists():
        _backup_old(root)  # a crash after the switch left the old files behind
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if (root / DB_NAME).exists():
        for name in (TMP_DIR, *NEW_DIRS):  # a migration cut short: start it again
            shutil.rmtree(root / name, ignore_errors=True)
        _migrate(root, tmp)
        _backup_old(root)
        return
    shutil.rmtree(tmp, ignore_errors=True)
    if not (root / "log").exists():  # a new store: stamp its schema at once
        atomic_write(snap, wire.dumps({snapshot.KEY: 2, "record": 0, "seq": 0, "epoch": ""}).encode())


def load_db_file(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and check a schema-1 ``db.json``. Never modifies the file."""
    from .base import SCHEMA_VERSION

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read store {path}: {exc.strerror}", field="data_dir") from None
    hint = "restore it from a backup or move it away to start empty"
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"store {path} is corrupt ({exc}); {hint}", code="corrupt") from None
    if not isinstance(data, dict) or not all(
        isinstance(t, dict) and all(isinstance(d, dict) for d in t.values()) for t in data.values()
    ):
        raise StoreError(f"store {path} is not a mangwale store (unexpected structure); {hint}", code="corrupt")
    version = data.get("meta", {}).get("schema", {}).get("version")
    if version is None and data:
        raise StoreError(f"store {path} has no schema version; {hint}", code="corrupt")
    if version is not None and (not isinstance(version, int) or version > SCHEMA_VERSION):
        raise StoreError(
            f"store {path} has schema version {version}, newer than this mangwale ({SCHEMA_VERSION}); upgrade mangwale",
            code="too_new",
        )
    return data


def _read_old_log(path: Path) -> tuple[str | None, int, dict[str, int], list[dict[str, Any]], int]:
    """(epoch, seq before the first event kept, jobSeqs of compacted jobs, the contiguous kept
    events, highest seq seen anywhere). An untrusted log gives no epoch and no events."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, 0, {}, [], 0
    lines = raw.split(b"\n")
    if lines and lines[-1] != b"":
        lines = lines[:-1]  # a torn last line
    docs: list[Any] = []
    highest = 0
    trusted = True
    for ln in lines:
        if not ln:
            continue
        try:
            doc = wire.loads(ln)
        except ValueError:
            trusted = False
            continue
        docs.append(doc)
        if isinstance(doc, dict):
            for key in ("seq", "baseSeq"):
                if isinstance(doc.get(key), int):
                    highest = max(highest, doc[key])
    header = docs[0] if docs else None
    if not trusted or not isinstance(header, dict) or header.get("mangwaleEventLog") != 1:
        log.warning("the old event log %s cannot be trusted: migrating without its events (new epoch)", path)
        return None, 0, {}, [], highest
    epoch = header.get("epoch")
    events = [d for d in docs[1:] if isinstance(d, dict) and isinstance(d.get("seq"), int) and d.get("epoch") == epoch]
    # Keep the contiguous tail: the old format trimmed log lines on their own, leaving gaps.
    start = len(events)
    while start > 0 and (start == len(events) or events[start - 1]["seq"] == events[start]["seq"] - 1):
        start -= 1
    kept = events[start:]
    base = kept[0]["seq"] - 1 if kept else int(header.get("baseSeq") or 0)
    return str(epoch), base, dict(header.get("jobSeqs") or {}), kept, highest


def _migrate(root: Path, tmp: Path) -> None:
    from . import archive
    from .wal import RecordLog, encode

    started = time.monotonic()
    data = load_db_file(root / DB_NAME)
    epoch, base, job_seqs, events, highest = _read_old_log(root / EVENTS_NAME)
    meta = data.get("meta", {})
    ceiling = int((meta.get("seqCeiling") or {}).get("value") or 0)
    if epoch is None:  # no trusted history: a new epoch above every seq that may have been shown
        from ..eventlog import new_epoch

        epoch, base = new_epoch(), max(highest, ceiling)
    tmp.mkdir()
    # Each job's last jobSeq, so numbering continues.
    for ev in events:
        if isinstance(ev.get("jobSeq"), int) and ev.get("jobId"):
            job_seqs[ev["jobId"]] = max(job_seqs.get(ev["jobId"], 0), ev["jobSeq"])
    finished: list[dict[str, Any]] = []
    active: list[dict[str, Any]] = []
    for job_id, doc in (data.get("jobs") or {}).items():
        doc = {**doc, "id": job_id, "jobSeq": job_seqs.get(job_id, 0), "lease": None}
        (finished if doc.get("status") in _TERMINAL else active).append(doc)
    finished.sort(key=lambda d: (d.get("createdAt", 0), d["id"]))
    segments = []
    if finished:
        archive.write_segment(tmp / "jobs", 1, finished)
        segments.append(1)
    (tmp / "jobs").mkdir(exist_ok=True)
    (tmp / "datasets").mkdir()
    files = {}
    for ds_id, doc in (data.get("datasets") or {}).items():
        name = f"{ds_id}.0.json"
        snapshot.write_json(tmp / "datasets" / name, {**doc, "id": ds_id})
        files[ds_id] = name
    fsync_dir(tmp / "datasets")
    wal = RecordLog(tmp / "log")
    wal.discover()
    wal.open_for_append(epoch)
    record = 0
    chunks = []
    for ev in events:
        record += 1
        kind = "l" if ev.get("type") == "job_log" else "e"
        chunks.append(encode(record, ev["seq"], ev.get("jobSeq") if kind == "e" else None, kind, ev.get("jobId"), "",
                             wire.dumps(ev)))  # fmt: skip
    if chunks:
        wal.write(b"".join(chunks), record, max(base, events[-1]["seq"]), 0)
    wal.close()
    fsync_dir(tmp / "log")
    expires = wire.now_ms() + 24 * 3600 * 1000
    idem = {k: {**v, "expiresAt": expires} for k, v in (data.get("idempotency") or {}).items()}
    head = max(base, events[-1]["seq"]) if events else base
    snap = {
        snapshot.KEY: 2,
        "record": record,
        "seq": head,
        "epoch": epoch,
        "createdAt": wire.now_ms(),
        "meta": {k: v for k, v in meta.items() if k not in ("schema", "seqCeiling")},
        "idem": idem,
        "active": active,
        "dead": {},
        "jobSegments": segments,
        "datasets": files,
        "migratedFrom": 1,
    }
    snapshot.write_json(tmp / "snapshot.json", snap)
    atomic_write(tmp / "run.json", wire.dumps({"bootId": "", "clean": True, "seqCeiling": max(ceiling, head)}).encode())
    fsync_dir(tmp)
    faults.point("migrate-copied")
    for name in (*NEW_DIRS, "run.json"):
        os.replace(tmp / name, root / name)
    fsync_dir(root)
    os.replace(tmp / "snapshot.json", root / "snapshot.json")  # the switch
    fsync_dir(root)
    faults.point("migrate-switched")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "migrated the store in %s from schema 1 to 2: %d jobs, %d datasets, %d events kept (epoch %s, seq %d) in %.1f s",
        root, len(finished) + len(active), len(files), len(events), epoch, head, time.monotonic() - started,
    )  # fmt: skip


def _backup_old(root: Path) -> None:
    present = [name for name in OLD_FILES if (root / name).exists()]
    if not present:
        return
    backup = root / f"backup-schema1-{time.strftime('%Y%m%d-%H%M%S')}"
    existing = sorted(root.glob("backup-schema1-*"))
    if existing:  # finishing a move a crash interrupted: the same backup
        backup = existing[-1]
    backup.mkdir(exist_ok=True)
    for name in present:
        os.replace(root / name, backup / name)
    fsync_dir(root)
    log.warning(
        "the schema-1 files (%s) are kept in %s; to roll back, stop mangwale, move them back and remove "
        "snapshot.json, run.json, log/, jobs/ and datasets/ (docs/storage.md)",
        ", ".join(present), backup,
    )  # fmt: skip
