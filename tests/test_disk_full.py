"""A full disk (S6): JSON 507, never a 500; the store keeps the last acknowledged state; recovery
without a restart once space is freed.

The real test mounts a 2 MiB tmpfs as the data dir (the suite runs as root); where mounting is
not permitted it is skipped with the reason, and the unit tests below still cover the two
write paths (store flush, event log append) by failing their writes with ENOSPC.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, wait_for
from fastapi.testclient import TestClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from mangwale_cli.eventlog import FileEventLog, Record
from mangwale_cli.server.app import create_app
from mangwale_cli.store import tinydb_store

TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted afterwards; skipped if this machine does not let us mount."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the disk refuses; return it (delete it to free the space)."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


class Watcher:
    """Collects every WebSocket message in a thread."""

    def __init__(self, url: str) -> None:
        self._stack = ExitStack()
        self.ws = self._stack.enter_context(connect(url, open_timeout=5, max_size=None))
        self.messages: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for text in self.ws:
                self.messages.append(json.loads(text))
        except ConnectionClosed:
            pass

    def close(self) -> None:
        self._stack.close()
        self._thread.join(5)


def test_full_disk_is_507_keeps_acknowledged_state_and_recovers(
    small_disk: Path, server_factory: Callable[..., ServerProcess]
) -> None:
    """Disk full: every write is a JSON 507 (no 500), db.json still holds exactly the acknowledged jobs, a
    running job's watchers get its end once space is freed, and the server recovers without a restart."""
    srv = server_factory(small_disk / "data", env={"MANGWALE_RUNNER_SAMPLE_DATASET": "false"})
    http = srv.client()
    watcher = Watcher(srv.ws_url)
    acked = [
        http.post(
            "/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 1}}
        ).json()["id"]
        for _ in range(3)
    ]
    dataset = http.post(
        "/training/datasets",
        json={"name": "d", "examples": [{"text": "hi there", "intent": "greet"}]},
    ).json()["id"]
    running = http.post(
        "/training/jobs", json={"kind": "simulate", "params": {"steps": 40, "stepMs": 50}}
    ).json()["id"]
    wait_for(
        lambda: http.get(f"/training/jobs/{running}").json()["status"] == "running",
        what="the job to run",
    )
    wait_for(
        lambda: all(http.get(f"/training/jobs/{j}").json()["status"] in TERMINAL for j in acked),
        what="the quick jobs",
    )
    filler = fill(small_disk)

    answers = [
        http.post("/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 1}}),
        http.post(
            "/training/datasets",
            json={"name": "e", "examples": [{"text": "hello you", "intent": "greet"}] * 200},
        ),
        http.put(f"/training/datasets/{dataset}", json={"name": "renamed"}),
        http.delete(f"/training/jobs/{acked[0]}"),
        http.delete(f"/training/datasets/{dataset}"),
        http.post(f"/training/jobs/{running}/cancel"),
    ]
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {507, 503} and 507 in statuses, statuses
    for r in answers:
        assert r.headers["content-type"] == "application/json"
        assert set(r.json()["error"]) == {"code", "message", "field"}
    assert http.get("/healthz").status_code == 200  # reads keep working

    db = json.loads((srv.data_dir / "db.json").read_text())  # parses: the last good write is intact
    assert set(acked) <= set(db["jobs"]) and running in db["jobs"]
    assert db["datasets"][dataset]["name"] == "d" and len(db["datasets"]) == 1
    assert db["jobs"][running]["status"] == "running"  # the cancel was not acknowledged
    assert (
        http.get(f"/training/jobs/{acked[0]}").status_code == 200
    )  # the refused delete did not happen

    filler.unlink()  # space is back: no restart, no new request needed
    wait_for(
        lambda: (
            json.loads((srv.data_dir / "db.json").read_text())["jobs"][running]["status"]
            in TERMINAL
        ),
        what="the store to catch up by itself",
    )
    ends = lambda: [
        m
        for m in list(watcher.messages)
        if m.get("jobId") == running and m.get("status") in TERMINAL
    ]
    wait_for(ends, what="the watcher to see the running job end")
    assert (
        http.post(
            "/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 1}}
        ).status_code
        == 201
    )
    assert http.post("/training/datasets", json={"name": "f", "examples": []}).status_code == 201
    watcher.close()
    seqs = [m["seq"] for m in watcher.messages if "seq" in m]
    assert seqs == list(
        range(seqs[0], seqs[0] + len(seqs))
    )  # nothing lost or torn in the event log
    srv.stop()
    assert "Traceback" not in srv.output() and " 500" not in srv.output()
    srv.start()  # everything written after the outage reopens cleanly, in the same epoch
    assert srv.client().get(f"/training/jobs/{running}").json()["status"] in TERMINAL


def test_store_write_refused_is_507_and_retried_by_itself(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process: when db.json cannot be written (ENOSPC) a POST is 507 and nothing is kept; the pending
    state reaches the disk on its own once writes work again."""
    real = tinydb_store.atomic_write
    refuse = threading.Event()

    def atomic_write(path: Path, data: bytes) -> None:
        if refuse.is_set():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(tinydb_store, "atomic_write", atomic_write)
    with TestClient(create_app(settings)) as api:
        before = api.get("/training/jobs").json()
        refuse.set()
        resp = api.post(
            "/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 1}}
        )
        assert resp.status_code == 507 and resp.json()["error"]["code"] == "insufficient_storage"
        assert api.get("/training/jobs").json() == before
        renamed = api.put(
            f"/training/datasets/{api.get('/training/datasets').json()[0]['id']}",
            json={"name": "x"},
        )
        assert renamed.status_code == 507
        refuse.clear()
        db = settings.data_dir / "db.json"
        wait_for(lambda: b'"sampleLoaded"' in db.read_bytes(), what="db.json to be readable")
        assert (
            api.post(
                "/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 1}}
            ).status_code
            == 201
        )


def test_event_log_append_cut_short_by_a_full_disk_leaves_no_torn_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch the disk takes only half of is cut back off the log, so the retry is not glued to a torn line."""
    elog = FileEventLog(tmp_path / "events.jsonl", retention=100)
    elog.open()

    def rec(seq: int) -> Record:
        return Record(
            seq,
            None,
            None,
            json.dumps({"type": "dataset_update", "seq": seq, "epoch": elog.epoch}),
            False,
        )

    elog.append([rec(1)])
    size = (tmp_path / "events.jsonl").stat().st_size
    real_write = os.write
    calls = {"n": 0}

    def half_then_full(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError):
        elog.append([rec(2), rec(3)])
    monkeypatch.setattr(os, "write", real_write)
    assert (tmp_path / "events.jsonl").stat().st_size == size
    elog.append([rec(2), rec(3)])
    elog.close()
    again = FileEventLog(tmp_path / "events.jsonl", retention=100)
    again.open()
    assert (
        again.head == 3 and [r.seq for r in again.ring] == [1, 2, 3] and again.epoch == elog.epoch
    )
    again.close()
