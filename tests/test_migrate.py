"""Upgrading a data dir written by the previous release (schema 1: db.json + events.jsonl).

tests/fixtures/schema1 is such a dir, as mangwale 0.1.0 left it after kill -9 (see its README).
A real ``mangwale serve`` migrates a copy once, keeps epoch and seq so watchers resume across the
upgrade, keeps the old files as a backup, and finishes a migration a kill -9 cut short.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, stored, wait_for
from websockets.sync.client import connect

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "schema1"
OLD_EPOCH = "2fc014543625"
OLD_HEAD = 77
KEY_JOB = "job-1796188929628-1f3dfa"  # created with Idempotency-Key fixture-key-1


def schema1_copy(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data, ignore=shutil.ignore_patterns("README.md"))
    return data


def old_state() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    db = json.loads((FIXTURE / "db.json").read_text())
    events = [json.loads(ln) for ln in (FIXTURE / "events.jsonl").read_text().splitlines()[1:]]
    return db, events


def assert_migrated(data: Path, server: ServerProcess) -> None:
    """Everything the old store held is there, with the old epoch and numbering."""
    db, events = old_state()
    backups = list(data.glob("backup-schema1-*"))
    assert len(backups) == 1, backups
    assert (backups[0] / "db.json").read_bytes() == (FIXTURE / "db.json").read_bytes()
    assert (backups[0] / "events.jsonl").read_bytes() == (FIXTURE / "events.jsonl").read_bytes()
    assert not (data / "db.json").exists() and not (data / "events.jsonl").exists()
    assert not (data / "migrate.tmp").exists()
    with server.client() as http:
        health = http.get("/healthz").json()
        assert health["epoch"] == OLD_EPOCH and health["headSeq"] >= OLD_HEAD
        jobs = {j["id"]: j for j in http.get("/training/jobs").json()}
        assert set(jobs) == set(db["jobs"])
        for job_id, old in db["jobs"].items():
            last = max((e["jobSeq"] for e in events if e.get("jobId") == job_id and "jobSeq" in e), default=0)
            if old["status"] in ("succeeded", "failed", "cancelled"):
                assert {**old, "jobSeq": last, "lease": None} == jobs[job_id]
                kept = [e for e in events if e.get("jobId") == job_id]
                assert http.get(f"/training/jobs/{job_id}/events").json() == kept
            else:  # running at the kill: re-queued as the next attempt; numbering goes on
                history = [e for e in http.get(f"/training/jobs/{job_id}/events").json() if "jobSeq" in e]
                assert [e["jobSeq"] for e in history] == list(range(1, len(history) + 1))
                assert len(history) > last or old["status"] == "queued"
        assert [d["id"] for d in http.get("/training/datasets").json()] == list(db["datasets"])
        body = {"kind": "simulate", "params": {"steps": 4, "stepMs": 20}}
        replay = http.post("/training/jobs", json=body, headers={"Idempotency-Key": "fixture-key-1"})
        assert replay.status_code == 201 and replay.json()["id"] == KEY_JOB
        assert replay.headers.get("Idempotent-Replayed") == "true"


def test_a_schema1_store_is_migrated_once_and_watchers_resume_across(
    tmp_path: Path, server_factory: Callable[..., ServerProcess]
) -> None:
    """The old store opens migrated: jobs, datasets, events, idempotency keys, epoch and seq kept;
    the old files are a backup the log names; a client resumes with its old seq and epoch without
    a resync; a restart does not migrate again."""
    data = schema1_copy(tmp_path)
    server = server_factory(data_dir=data, env={"MANGWALE_RUNNER_CONCURRENCY": "1"})
    assert "migrated the store" in server.output() and "backup-schema1-" in server.output()
    assert_migrated(data, server)
    with connect(f"{server.ws_url}?since={OLD_HEAD - 3}&epoch={OLD_EPOCH}", open_timeout=5) as ws:
        hello = json.loads(ws.recv(5))
        first = json.loads(ws.recv(5))
    assert hello["epoch"] == OLD_EPOCH and first["type"] != "resync" and first["seq"] == OLD_HEAD - 2
    server.restart()
    assert_migrated(data, server)
    assert server.output().count("migrated the store") == 1


@pytest.mark.parametrize("window", ["migrate-copied", "migrate-switched"])
def test_a_migration_cut_short_is_finished_on_the_next_start(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], window: str
) -> None:
    """kill -9 halfway through the migration (copied, not switched; or switched, old files not
    yet backed up): the next start finishes it, and nothing is lost or doubled."""
    data = schema1_copy(tmp_path)
    server = server_factory(data_dir=data, env={"MANGWALE_FAULT": window}, start=False)
    server.start(wait=False)
    assert server.proc is not None
    try:
        assert server.proc.wait(20) == -9
    except subprocess.TimeoutExpired:
        server.kill()
        raise AssertionError(f"the server did not die at {window}") from None
    assert (data / "db.json").exists()
    assert (data / "snapshot.json").exists() == (window == "migrate-switched")
    del server.env["MANGWALE_FAULT"]
    server.start()
    assert_migrated(data, server)


def test_the_migrated_log_reads_back_as_the_old_events(tmp_path: Path, server_factory: Callable[..., ServerProcess]) -> None:
    """The kept events are in the new log exactly as clients saw them (a read-only fold of the
    data dir, the way start-up reads it)."""
    data = schema1_copy(tmp_path)
    server = server_factory(data_dir=data, env={"MANGWALE_RUNNER_CONCURRENCY": "1"})
    wait_for(lambda: stored(data).head > OLD_HEAD, what="the re-queue updates to be logged")
    _, events = old_state()
    assert stored(data).events[: len(events)] == events
    server.kill()
