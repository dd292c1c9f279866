"""kill -9 of a real server: the store, the event log, the job queue and the trainer processes.

S1 of the reliability plan runs 50 rounds here; ``MANGWALE_SOAK=1`` raises it to 500 (the
nightly figure). ``MANGWALE_SOAK_SEED`` replays the kill offsets of an earlier run.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerProcess, log_head, wait_for
from trainingdata import synthetic_examples
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

TERMINAL = {"succeeded", "failed", "cancelled"}
SOAK = os.environ.get("MANGWALE_SOAK") == "1"
ROUNDS = 500 if SOAK else 50
ROUNDS_PER_DATA_DIR = 25  # a soak starts a fresh data dir now and then so db.json stays small


class Watcher:
    """Reads a WebSocket in a thread until the connection breaks; checks seq is +1 throughout."""

    def __init__(self, url: str) -> None:
        self._stack = ExitStack()
        self.ws = self._stack.enter_context(connect(url, open_timeout=5, max_size=None))
        self.greeting: dict[str, Any] | None = None
        self.seqs: list[int] = []
        self.first_seq_of: dict[str, int] = {}  # job id -> seq of its job_created
        self.resynced = False
        self.progressing = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for text in self.ws:
                m = json.loads(text)
                if m["type"] == "connected":
                    self.greeting = m
                elif m["type"] == "resync":
                    self.resynced = True
                if "seq" in m:
                    self.seqs.append(m["seq"])
                if m["type"] == "job_created":
                    self.first_seq_of[m["jobId"]] = m["seq"]
                if (
                    m["type"] == "training_update"
                    and m["status"] == "running"
                    and m["progress"] > 0
                ):
                    self.progressing.set()
        except ConnectionClosed:  # the server was killed
            pass

    def wait_greeting(self) -> dict[str, Any]:
        return wait_for(lambda: self.greeting, what="the connected greeting")  # type: ignore[no-any-return]

    def join(self) -> None:
        self._thread.join(10)
        assert not self._thread.is_alive()

    def close(self) -> None:
        self._stack.close()
        self._thread.join(5)


class Submitter(threading.Thread):
    """Creates simulate jobs back to back until told to stop or the server disappears."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.acked: list[str] = []  # ids of jobs whose POST returned 201
        self.refused: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while not self.halt.is_set():
                try:
                    resp = http.post(
                        "/training/jobs",
                        json={"kind": "simulate", "params": {"steps": 40, "stepMs": 10}},
                    )
                except httpx.HTTPError:
                    return
                if resp.status_code == 201:
                    self.acked.append(resp.json()["id"])
                else:
                    self.refused.append(resp.status_code)


def stale_temp_files(data_dir: Path, server_pid: int) -> list[Path]:
    """Temp files not being written by the live server (``name.tmp-<pid>``)."""
    return [p for p in data_dir.glob("*.tmp-*") if not p.name.endswith(f".tmp-{server_pid}")]


# --- S1 ----------------------------------------------------------------------------------------


@pytest.mark.timeout(60 + 5 * ROUNDS)
def test_kill9_under_load_loses_nothing(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """S1: kill -9 under load: store always opens, no 201 job lost, no temp file left, no seq reused."""
    seed = int(os.environ.get("MANGWALE_SOAK_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    env = {"MANGWALE_RUNNER_CONCURRENCY": "4"}
    figures = {
        "rounds": 0,
        "unreadable": 0,
        "lost": 0,
        "orphan_tmp": 0,
        "tmp_left_by_kill": 0,
        "tmp_planted": 0,
        "acked": 0,
    }
    server: ServerProcess | None = None
    acked: set[str] = set()

    for rnd in range(ROUNDS):
        if rnd % ROUNDS_PER_DATA_DIR == 0:
            if server is not None:
                server.kill()
            server = server_factory(data_dir=tmp_path / f"data{rnd}", env=env)
            acked = set()
        assert server is not None
        watcher = Watcher(server.ws_url)
        epoch = watcher.wait_greeting()["epoch"]
        submitter = Submitter(server.url)
        submitter.start()
        wait_for(
            lambda s=submitter, w=watcher: s.acked and w.progressing.is_set(),
            what="jobs being created and making progress",
        )
        time.sleep(rng.uniform(0.05, 0.4))  # the crash lands at a random moment by design
        server.kill()
        submitter.halt.set()
        submitter.join(10)
        watcher.join()
        assert submitter.refused == [], f"round {rnd}: POSTs refused with {submitter.refused}"
        acked |= set(submitter.acked)
        seen = max(watcher.seqs)
        left = list(server.data_dir.glob("*.tmp-*"))
        figures["tmp_left_by_kill"] += len(left)
        if not left:  # plant what a kill in the middle of a store write leaves behind
            db = (server.data_dir / "db.json").read_bytes()
            (server.data_dir / f"db.json.tmp-{server.pid}").write_bytes(db[: len(db) // 2])
            figures["tmp_planted"] += 1
        head = log_head(server.data_dir / "events.jsonl")
        assert head >= seen, f"round {rnd}: a client saw seq {seen} but the log ends at {head}"

        try:
            server.start()
        except AssertionError:
            figures["unreadable"] += 1
            raise
        orphans = stale_temp_files(server.data_dir, server.pid)
        figures["orphan_tmp"] += len(orphans)
        with server.client() as http:
            present = {j["id"] for j in http.get("/training/jobs").json()}
            lost = acked - present
            figures["lost"] += len(lost)
            assert not orphans, f"round {rnd}: temp files left after start: {orphans}"
            assert not lost, f"round {rnd}: acknowledged jobs lost: {sorted(lost)}"
            # Everything logged after the kill continues the old numbering: head + 1, + 2, ...
            check = Watcher(f"{server.ws_url}?since={head}&epoch={epoch}")
            greeting = check.wait_greeting()
            assert greeting["epoch"] == epoch and greeting["headSeq"] >= head
            probe = http.post(
                "/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 0}}
            )
            assert probe.status_code == 201
            probe_id = probe.json()["id"]
            acked.add(probe_id)
            probe_seq = wait_for(
                lambda c=check, i=probe_id: c.first_seq_of.get(i), what="the probe's job_created"
            )
            check.close()
        assert not check.resynced
        assert probe_seq > seen
        assert check.seqs[0] == head + 1
        assert check.seqs == list(range(head + 1, head + 1 + len(check.seqs)))
        figures["rounds"] += 1
        figures["acked"] += len(submitter.acked)

    with capsys.disabled():
        print(f"\nS1 figures (seed {seed}): {figures}")
    assert figures["unreadable"] == figures["lost"] == figures["orphan_tmp"] == 0
    assert figures["rounds"] == ROUNDS


# --- the job running at the crash ----------------------------------------------------------------


def start_and_crash_mid_job(server: ServerProcess) -> str:
    """Start a simulate job, kill -9 the server while it runs, start the server again."""
    with server.client() as http:
        job_id = http.post(
            "/training/jobs", json={"kind": "simulate", "params": {"steps": 20, "stepMs": 25}}
        ).json()["id"]
        wait_for(
            lambda: http.get(f"/training/jobs/{job_id}").json()["progress"] > 0,
            what="the job to progress",
        )
    server.kill()
    server.start()
    return job_id  # type: ignore[no-any-return]


def test_job_running_at_kill_is_requeued_and_finishes(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """A job running when the server is kill -9'd runs again after the restart as attempt 2 and succeeds."""
    # A long store flush interval makes sure the progress on disk lags what clients were sent.
    server = server_factory(env={"MANGWALE_STORE_FLUSH_INTERVAL": "5"})
    job_id = start_and_crash_mid_job(server)
    with server.client() as http:
        job = wait_for(
            lambda: (j := http.get(f"/training/jobs/{job_id}").json())["status"] in TERMINAL and j,
            what="the re-queued job to finish",
        )
        history = http.get(f"/training/jobs/{job_id}/events").json()
    assert (job["status"], job["attempt"], job["progress"]) == ("succeeded", 2, 100)
    requeued = [e for e in history if e["type"] == "training_update" and e["status"] == "queued"]
    assert len(requeued) == 1
    assert requeued[0]["attempt"] == 1 and "stopped during attempt 1" in requeued[0]["message"]
    last: dict[int, float] = {}
    for e in history:
        if e["type"] == "training_update":
            assert e["progress"] >= last.get(e["attempt"], 0)
            last[e["attempt"]] = e["progress"]
    assert set(last) == {1, 2}


def test_job_running_at_kill_is_abandoned_after_max_attempts(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """With max_attempts 1 a job interrupted by kill -9 ends failed: "abandoned after 1 attempts"."""
    server = server_factory(env={"MANGWALE_RUNNER_MAX_ATTEMPTS": "1"})
    job_id = start_and_crash_mid_job(server)
    with server.client() as http:
        job = http.get(f"/training/jobs/{job_id}").json()
        assert job["status"] == "failed"
        assert job["attempt"] == 1
        assert "abandoned after 1 attempts" in job["error"]
        # and it stays failed: nothing re-runs it
        marker = http.post(
            "/training/jobs", json={"kind": "simulate", "params": {"steps": 3, "stepMs": 10}}
        ).json()
        wait_for(
            lambda: http.get(f"/training/jobs/{marker['id']}").json()["status"] in TERMINAL,
            what="a later job",
        )
        assert http.get(f"/training/jobs/{job_id}").json() == job


# --- trainer processes -----------------------------------------------------------------------------


def read_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, session, start time) of a process from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def all_processes() -> dict[int, tuple[str, int, int, int]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := read_stat(int(entry))) is not None:
            table[int(entry)] = stat
    return table


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every process whose ancestry leads to ``root``."""
    table = all_processes()
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (_, ppid, _, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def alive(pid: int, start: int) -> bool:
    stat = read_stat(pid)
    return stat is not None and stat[3] == start and stat[0] not in ("Z", "X")


def test_no_training_process_outlives_a_killed_server(server: ServerProcess) -> None:
    """kill -9 of the server takes its training processes with it within 5 s."""
    with server.client() as http:
        examples = synthetic_examples(6000)
        ds = http.post("/training/datasets", json={"name": "big", "examples": examples}).json()
        body = {"kind": "nlu-train", "datasetId": ds["id"], "params": {"epochs": 200}}
        job_id = http.post("/training/jobs", json=body).json()["id"]

        def eta_in_epochs() -> float | None:
            events = http.get(f"/training/jobs/{job_id}/events").json()
            return next(
                (e["eta"] for e in reversed(events) if e.get("metrics") and e.get("eta")), None
            )

        eta = wait_for(eta_in_epochs, 20, what="the job's first epoch")
    assert eta > 5, "the job would end on its own before the deadline below"
    children = descendants(server.pid)
    grandchildren = [p for p in children if (st := read_stat(p)) and st[1] != server.pid]
    assert grandchildren, "no training process (a grandchild of the server) is running"
    session = server.pid  # the fixture starts the server in a session of its own
    server.kill()
    wait_for(
        lambda: not any(alive(p, s) for p, s in children.items()),
        5,
        what="the server's children to exit",
    )
    wait_for(
        lambda: (
            not any(st[2] == session and st[0] not in ("Z", "X") for st in all_processes().values())
        ),
        5,
        what="every process of the server's session to exit",
    )
