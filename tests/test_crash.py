"""kill -9 of a real server: the record (state and events as one), the job queue and the trainer
processes.

Two kinds of kill. Aimed at a named window through the test-only fault hook
(``MANGWALE_FAULT``, mangwale_cli/faults.py): the process kills itself exactly between two
writes. And S1 of the reliability plan: kills aimed at POSTs in flight and at jobs finishing,
50 rounds here, 500 with ``MANGWALE_SOAK=1`` (``MANGWALE_SOAK_SEED`` replays an earlier run).
After every kill, ``check_record`` checks each invariant of docs/storage.md on what the data
dir holds, before the server starts again.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerProcess, stored, wait_for
from redisserver import RedisServer
from trainingdata import synthetic_examples
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from mangwale_cli.store.tinydb_store import Inspection

TERMINAL = {"succeeded", "failed", "cancelled"}
SOAK = os.environ.get("MANGWALE_SOAK") == "1"
ROUNDS = 500 if SOAK else 50
ROUNDS_PER_DATA_DIR = 25  # a fresh data dir now and then: each round's checks read all of it


class Watcher:
    """Reads a WebSocket in a thread until the connection breaks; keeps every logged event it was
    shown, and can fire a callback when a job is about to finish (to aim a kill at it)."""

    def __init__(self, url: str, on_finishing: Callable[[], None] | None = None) -> None:
        self._stack = ExitStack()
        self.ws = self._stack.enter_context(connect(url, open_timeout=5, max_size=None))
        self.greeting: dict[str, Any] | None = None
        self.shown: dict[int, dict[str, Any]] = {}  # seq -> the event as received
        self.seqs: list[int] = []
        self.first_seq_of: dict[str, int] = {}  # job id -> seq of its job_created
        self.resynced = False
        self.progressing = threading.Event()
        self.on_finishing = on_finishing
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
                    self.shown[m["seq"]] = m
                if m["type"] == "job_created":
                    self.first_seq_of[m["jobId"]] = m["seq"]
                if m["type"] == "training_update" and m["status"] == "running" and m["progress"] > 0:
                    self.progressing.set()
                    if m["progress"] >= 75 and self.on_finishing is not None:
                        hook, self.on_finishing = self.on_finishing, None
                        hook()
        except ConnectionClosed:  # the server was killed
            pass

    def wait_greeting(self) -> dict[str, Any]:
        return wait_for(lambda: self.greeting, what="the connected greeting")

    def join(self) -> None:
        self._thread.join(10)
        assert not self._thread.is_alive()

    def close(self) -> None:
        self._stack.close()
        self._thread.join(5)


class Submitter(threading.Thread):
    """Creates simulate jobs back to back until told to stop or the server disappears."""

    def __init__(self, url: str, steps: int = 4, step_ms: int = 10) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.body = {"kind": "simulate", "params": {"steps": steps, "stepMs": step_ms}}
        self.acked: list[str] = []  # ids of jobs whose POST returned 201
        self.refused: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while not self.halt.is_set():
                try:
                    resp = http.post("/training/jobs", json=self.body)
                except httpx.HTTPError:
                    return
                if resp.status_code == 201:
                    self.acked.append(resp.json()["id"])
                else:
                    self.refused.append(resp.status_code)


def check_record(disk: Inspection, acked: set[str], shown: dict[int, dict[str, Any]], where: str) -> dict[str, int]:
    """Every invariant of the record (docs/storage.md), over the events retention keeps:

    seq has no gap; each job's kept events have jobSeq +1 each, starting at 1 with job_created
    unless trimmed, ending at the job's stored jobSeq; a job stored terminal has exactly one
    terminal update (its last event, same status), a job not terminal has none; every
    acknowledged job exists; every event a client was shown is in the log, unchanged."""
    events = disk.events
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{where}: gap in the log's seqs"
    assert {e["epoch"] for e in events} == {disk.epoch}
    by_job: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        if e["type"] in ("job_created", "training_update"):
            by_job.setdefault(e["jobId"], []).append(e)
    figures = {"jobs": len(disk.jobs), "terminal": 0, "trimmed": 0}
    for job_id, doc in disk.jobs.items():
        evs = by_job.get(job_id, [])
        if not evs:
            figures["trimmed"] += 1
            continue
        numbers = [e["jobSeq"] for e in evs]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), f"{where}: {job_id} jobSeqs {numbers}"
        if numbers[0] == 1:
            assert evs[0]["type"] == "job_created", f"{where}: {job_id} starts with {evs[0]['type']}"
        else:
            figures["trimmed"] += 1
        assert numbers[-1] == doc["jobSeq"], f"{where}: {job_id} stored jobSeq {doc['jobSeq']}, log ends at {numbers[-1]}"
        ends = [e for e in evs if e["type"] == "training_update" and e["status"] in TERMINAL]
        if doc["status"] in TERMINAL:
            figures["terminal"] += 1
            assert len(ends) == 1 and ends[0] is evs[-1], f"{where}: {job_id} {doc['status']} with ends {ends}"
            assert ends[0]["status"] == doc["status"] and ends[0]["progress"] == doc["progress"]
        else:
            assert ends == [], f"{where}: {job_id} is {doc['status']} but the log ended it: {ends}"
    lost = acked - set(disk.jobs)
    assert not lost, f"{where}: acknowledged jobs lost: {sorted(lost)}"
    in_log = {e["seq"]: e for e in events}
    for seq, ev in shown.items():
        assert seq <= disk.head, f"{where}: a client was shown seq {seq}, the log ends at {disk.head}"
        if seq in in_log:
            assert in_log[seq] == ev, f"{where}: seq {seq} was shown as {ev}, the log has {in_log[seq]}"
    return figures


def check_restart(server: ServerProcess, disk: Inspection, acked: set[str], where: str) -> None:
    """After a restart: REST holds what the log held, and numbering goes on at head + 1."""
    server.start()
    check = Watcher(f"{server.ws_url}?since={disk.head}&epoch={disk.epoch}")
    greeting = check.wait_greeting()
    assert greeting["epoch"] == disk.epoch and greeting["headSeq"] >= disk.head, where
    with server.client() as http:
        present = {j["id"] for j in http.get("/training/jobs").json()}
        assert acked <= present, f"{where}: acknowledged jobs missing after restart: {sorted(acked - present)}"
        probe = http.post("/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 0}})
        assert probe.status_code == 201
        wait_for(lambda: check.first_seq_of.get(probe.json()["id"]), what="the probe's job_created")
    check.close()
    assert not check.resynced and check.seqs[0] == disk.head + 1
    assert check.seqs == list(range(disk.head + 1, disk.head + 1 + len(check.seqs))), where


# --- named crash windows -----------------------------------------------------------------------

# Small snapshots, segments and retention, so that every window is reached within a second or two.
SMALL = {
    "MANGWALE_STORE_SNAPSHOT_RECORDS": "40",
    "MANGWALE_STORE_SEGMENT_BYTES": "4096",
    "MANGWALE_EVENTS_RETENTION": "150",
    "MANGWALE_EVENTS_LOG_RETENTION": "20",
    "MANGWALE_RUNNER_CONCURRENCY": "4",
}
WINDOWS = {
    # where the old code saved a state and then published its event: now one line, written...
    "wal-written": 25,
    # ...durable, not yet applied, answered or broadcast
    "wal-synced": 25,
    "snapshot-written": 2,
    "snapshot-renamed": 2,
    "segments-merged": 1,
    "wal-drop": 1,
}


@pytest.mark.parametrize("window", list(WINDOWS))
def test_kill_at_each_crash_window_keeps_the_record_whole(
    server_factory: Callable[..., ServerProcess], window: str
) -> None:
    """The process kills itself (SIGKILL) exactly at a named window under load; the log it leaves
    satisfies every invariant, nothing acknowledged or shown is lost, and start-up goes on."""
    server = server_factory(env={**SMALL, "MANGWALE_FAULT": f"{window}:{WINDOWS[window]}"})
    watcher = Watcher(server.ws_url)
    watcher.wait_greeting()
    submitter = Submitter(server.url)
    submitter.start()
    assert server.proc is not None
    try:
        code = server.proc.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server never reached {window}") from None
    assert code == -9
    submitter.halt.set()
    submitter.join(10)
    watcher.join()
    assert submitter.refused == [], submitter.refused
    acked = set(submitter.acked)
    disk = stored(server.data_dir)
    figures = check_record(disk, acked, watcher.shown, window)
    assert figures["jobs"] >= len(acked) > 0
    del server.env["MANGWALE_FAULT"]
    check_restart(server, disk, acked, window)
    check_record(stored(server.data_dir), acked, {}, f"{window}, after the restart")


# --- aimed kills (S1) ----------------------------------------------------------------------------


@pytest.mark.timeout(60 + 5 * ROUNDS)
def test_kills_aimed_at_posts_and_finishing_jobs_keep_every_invariant(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """S1: kill -9 aimed at POSTs in flight and at jobs finishing, round after round on one data
    dir: every invariant holds before each restart, nothing acknowledged or shown is lost, the
    store always opens, seq is never reused and followers see no gap."""
    seed = int(os.environ.get("MANGWALE_SOAK_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    env = {"MANGWALE_RUNNER_CONCURRENCY": "4", "MANGWALE_STORE_SNAPSHOT_RECORDS": "200"}
    figures = {"rounds": 0, "at_posts": 0, "at_finishing": 0, "acked": 0, "jobs": 0, "terminal": 0}
    server: ServerProcess | None = None
    acked: set[str] = set()

    for rnd in range(ROUNDS):
        if rnd % ROUNDS_PER_DATA_DIR == 0:
            if server is not None:
                server.kill()
            server = server_factory(data_dir=tmp_path / f"data{rnd}", env=env)
            acked = set()
        assert server is not None
        aim = rng.choice(["posts", "finishing"])
        fire = threading.Event()
        watcher = Watcher(server.ws_url, on_finishing=fire.set if aim == "finishing" else None)
        watcher.wait_greeting()
        submitters = [Submitter(server.url) for _ in range(3 if aim == "posts" else 1)]
        for s in submitters:
            s.start()
        if aim == "posts":
            wait_for(lambda ss=submitters: sum(len(s.acked) for s in ss) >= 3, what="POSTs under way")
        else:
            assert fire.wait(10), "no job came near its end"
        time.sleep(rng.uniform(0, 0.03))  # within a few ms of the aim, at a random point of it
        server.kill()
        for s in submitters:
            s.halt.set()
            s.join(10)
            assert s.refused == [], f"round {rnd}: POSTs refused with {s.refused}"
            acked |= set(s.acked)
        watcher.join()
        disk = stored(server.data_dir)
        got = check_record(disk, acked, watcher.shown, f"round {rnd} ({aim})")
        check_restart(server, disk, acked, f"round {rnd} ({aim})")
        figures["rounds"] += 1
        figures[f"at_{aim}"] += 1
        figures["acked"] += sum(len(s.acked) for s in submitters)
        figures["jobs"], figures["terminal"] = got["jobs"], got["terminal"]

    with capsys.disabled():
        print(f"\nS1 aimed kills (seed {seed}): {figures}")
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
    return job_id


def test_job_running_at_kill_is_requeued_and_finishes(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """A job running when the server is kill -9'd runs again after the restart as attempt 2 and succeeds."""
    server = server_factory()
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


# --- Redis: the same record on two instances ------------------------------------------------------

REDIS_ENV = {"MANGWALE_RUNNER_LEASE": "1.5", "MANGWALE_STORE_TIMEOUT": "1", "MANGWALE_RUNNER_CONCURRENCY": "2"}


_SNAPSHOT = """
local docs, bodies = {}, {}
for _, k in ipairs(redis.call('KEYS', ARGV[1] .. 'job:*')) do docs[#docs + 1] = redis.call('GET', k) end
for _, e in ipairs(redis.call('XRANGE', ARGV[1] .. 'events', '-', '+')) do
  local f = e[2]
  for i = 1, #f, 2 do if f[i] == 'd' then bodies[#bodies + 1] = f[i + 1] end end
end
return {docs, bodies, redis.call('GET', ARGV[1] .. 'epoch') or '', redis.call('GET', ARGV[1] .. 'seq') or '0'}
"""


def redis_record(url: str, prefix: str = "mangwale:") -> Inspection:
    """What a Redis deployment holds (job documents, the event stream), read straight from Redis in
    one script: a consistent picture while instances keep writing."""
    import redis as redis_py

    r = redis_py.Redis.from_url(url)
    try:
        docs, bodies, epoch, head = r.eval(_SNAPSHOT, 0, prefix)
    finally:
        r.close()
    jobs = {doc["id"]: doc for doc in map(json.loads, docs)}
    return Inspection(jobs, {}, {}, [json.loads(b) for b in bodies], epoch.decode(), int(head))


def redis_instance(server_factory: Callable[..., ServerProcess], url: str, data_dir: Path, **env: str) -> ServerProcess:
    return server_factory(data_dir=data_dir, env={**REDIS_ENV, **env}, args=["--store", url])


def wait_all_ended(server: ServerProcess, timeout: float = 60) -> None:
    with server.client() as http:
        wait_for(lambda: not http.get("/training/jobs", params={"status": "queued,running"}).json(), timeout, 0.1,
                 "every job to end")  # fmt: skip


def test_redis_kill_between_commit_and_reply_keeps_the_record_whole(
    server_factory: Callable[..., ServerProcess], redis_server: Any, tmp_path: Path
) -> None:
    """An instance killed right after a change is in Redis (state and event, one script) but before
    it answered or broadcast it: the record satisfies every invariant, the other instance goes on,
    takes the dead one's jobs over, and every job ends exactly once."""
    a = redis_instance(server_factory, redis_server.url, tmp_path / "a", MANGWALE_FAULT="redis-committed:40")
    b = redis_instance(server_factory, redis_server.url, tmp_path / "b")
    watcher = Watcher(b.ws_url)
    watcher.wait_greeting()
    submitters = [Submitter(a.url), Submitter(b.url)]
    for s in submitters:
        s.start()
    assert a.proc is not None
    try:
        assert a.proc.wait(30) == -9
    except subprocess.TimeoutExpired:
        raise AssertionError("instance A never reached redis-committed") from None
    for s in submitters:
        s.halt.set()
        s.join(10)
    acked = set(submitters[0].acked) | set(submitters[1].acked)
    # B goes on running jobs and the watcher's thread goes on adding what it is shown: take what
    # was shown before reading the record (all of it must be in the record), not a dict that is
    # still growing (iterating it raced the thread, and later events lie past the read's head).
    shown_before = dict(watcher.shown)
    check_record(redis_record(redis_server.url), acked, shown_before, "redis-committed")
    wait_all_ended(b)
    watcher.close()
    figures = check_record(redis_record(redis_server.url), acked, watcher.shown, "redis-committed, all ended")
    assert figures["terminal"] == figures["jobs"] >= len(acked) > 0
    assert watcher.seqs == list(range(watcher.seqs[0], watcher.seqs[0] + len(watcher.seqs)))


@pytest.mark.timeout(90 + 5 * ROUNDS)
def test_kills_aimed_at_one_of_two_redis_instances_keep_every_invariant(
    server_factory: Callable[..., ServerProcess], redis_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """S1 on Redis: two instances; each round kill -9 one of them, aimed at POSTs in flight or at a
    job about to finish, while a watcher on the other follows: every invariant holds in Redis after
    each kill, the watcher sees no gap, and in the end every job ends exactly once."""
    seed = int(os.environ.get("MANGWALE_SOAK_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    servers = [redis_instance(server_factory, redis_server.url, tmp_path / name) for name in "ab"]
    acked: set[str] = set()
    figures = {"rounds": 0, "at_posts": 0, "at_finishing": 0, "acked": 0}
    for rnd in range(ROUNDS):
        victim, survivor = (servers[0], servers[1]) if rnd % 2 == 0 else (servers[1], servers[0])
        aim = rng.choice(["posts", "finishing"])
        fire = threading.Event()
        near_end = Watcher(victim.ws_url, on_finishing=fire.set if aim == "finishing" else None)
        follower = Watcher(survivor.ws_url)
        near_end.wait_greeting()
        follower.wait_greeting()
        submitters = [Submitter(victim.url) for _ in range(2 if aim == "posts" else 1)] + [Submitter(survivor.url)]
        for s in submitters:
            s.start()
        if aim == "posts":
            wait_for(lambda ss=submitters: sum(len(s.acked) for s in ss[:-1]) >= 2, what="POSTs under way")
        else:
            assert fire.wait(10), "no job came near its end"
        time.sleep(rng.uniform(0, 0.03))
        victim.kill()
        for s in submitters:
            s.halt.set()
            s.join(10)
            acked |= set(s.acked)
        near_end.join()
        # Everything committed by now (the kill is done), as a fixed mark: the survivor goes on
        # running jobs, so a head read at every poll keeps moving away from a follower that is a
        # few events behind on a loaded machine (and each read is a whole-record snapshot).
        mark = redis_record(redis_server.url).head
        wait_for(lambda f=follower, m=mark: f.seqs and f.seqs[-1] >= m, what=f"the follower to catch up to seq {mark}")
        follower.close()
        shown = {**near_end.shown, **follower.shown}
        check_record(redis_record(redis_server.url), acked, shown, f"round {rnd} ({aim})")
        assert follower.seqs == list(range(follower.seqs[0], follower.seqs[0] + len(follower.seqs))), f"round {rnd}: gap"
        victim.start()
        figures["rounds"] += 1
        figures[f"at_{aim}"] += 1
        figures["acked"] += sum(len(s.acked) for s in submitters)
    wait_all_ended(servers[0], 120)
    final = check_record(redis_record(redis_server.url), acked, {}, "all ended")
    assert final["terminal"] == final["jobs"]
    with capsys.disabled():
        print(f"\nS1 on two Redis instances (seed {seed}): {figures}, {final}")


@pytest.mark.timeout(240)
def test_kill_9_of_redis_itself_under_load_keeps_every_invariant(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """kill -9 of redis-server (AOF, appendfsync always) while two instances take POSTs and run
    jobs, 3 rounds: after each restart of Redis the instances recover on their own, every
    acknowledged job exists, every event a client was shown is in the stream unchanged, every
    invariant of the record holds; in the end every job has ended exactly once."""
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        servers = [redis_instance(server_factory, redis.url, tmp_path / name) for name in "ab"]
        acked: set[str] = set()
        shown: dict[int, dict[str, Any]] = {}
        for rnd in range(3):
            watchers = [Watcher(s.ws_url) for s in servers]
            for w in watchers:
                w.wait_greeting()
            submitters = [Submitter(s.url) for s in servers for _ in range(2)]
            for sub in submitters:
                sub.start()
            wait_for(lambda ss=submitters: all(len(sub.acked) >= 2 for sub in ss), what="POSTs under way")
            wait_for(lambda ws=watchers: all(w.progressing.is_set() for w in ws), what="jobs running")
            redis.kill()
            for sub in submitters:
                sub.halt.set()
                sub.join(10)
                acked |= set(sub.acked)
            for w in watchers:
                w.join()  # the instance closes its clients (1012) once its reader loses Redis
                shown |= w.shown
            redis.start()
            where = f"round {rnd}, Redis restarted"
            check_record(redis_record(redis.url), acked, shown, where)
            for server in servers:  # recovered: writes go through again, without a restart
                with server.client() as http:
                    def created(h: httpx.Client = http, into: set[str] = acked) -> bool:
                        r = h.post("/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 0}})
                        if r.status_code == 201:
                            into.add(r.json()["id"])
                        return r.status_code == 201

                    wait_for(created, 30, 0.1, f"{server.url} to take writes again ({where})")
            assert all(s.proc is not None and s.proc.poll() is None for s in servers), where
        try:
            wait_all_ended(servers[0], 90)
        except AssertionError:
            stuck = {j: d["status"] for j, d in redis_record(redis.url).jobs.items() if d["status"] not in TERMINAL}
            said = [ln for s in servers for ln in s.output().splitlines() if any(j in ln for j in stuck)]
            raise AssertionError(f"jobs never ended: {stuck}; {queue_state(redis.url)}; logs: {said}") from None
        final = check_record(redis_record(redis.url), acked, shown, "all ended")
        assert final["terminal"] == final["jobs"] >= len(acked) > 0
    finally:
        redis.kill()


def queue_state(url: str, prefix: str = "mangwale:") -> dict[str, Any]:
    """The job queue as Redis holds it (for a failure message)."""
    import redis as redis_py

    from mangwale_cli.store.redis_keys import ENTRIES_SUFFIX, WORKERS_GROUP, RedisKeys

    queue = RedisKeys(prefix).queue
    r = redis_py.Redis.from_url(url, decode_responses=True)
    try:
        return {
            "entries": r.xrange(queue),
            "listed": r.hgetall(queue + ENTRIES_SUFFIX),
            "pending": r.xpending_range(queue, WORKERS_GROUP, "-", "+", 100),
            "groups": r.xinfo_groups(queue),
        }
    finally:
        r.close()


def test_a_corrupt_line_in_the_middle_of_the_log_stops_serve_with_one_line(server: ServerProcess) -> None:
    """`mangwale serve` on a data dir whose log has a bad line with good lines after it (not a
    torn tail) exits 1 with one line on stderr naming the file and the line, no traceback, and
    leaves the log as it was: nothing set aside, nothing rewritten."""
    with server.client() as http:
        for _ in range(4):
            assert http.post("/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 1}}).status_code == 201
    assert server.stop() == 0
    logs = sorted((server.data_dir / "log").glob("*.log"))
    seg = logs[-1]
    lines = seg.read_bytes().splitlines(keepends=True)
    assert len(lines) > 6
    bad = len(lines) // 2
    line = lines[bad - 1]
    lines[bad - 1] = line[:20] + (b"X" if line[20:21] != b"X" else b"Y") + line[21:]  # its checksum fails
    seg.write_bytes(b"".join(lines))
    before = {p.name: p.read_bytes() for p in server.data_dir.rglob("*") if p.is_file() and not p.name.endswith(".lock")}
    env = {k: v for k, v in server.env.items() if k != "MANGWALE_LOG_LEVEL"}  # the default level
    done = subprocess.run(server.command(), env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1, done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1, done.stderr
    assert str(seg) in err[0] and f"line {bad}" in err[0] and "Traceback" not in done.stderr
    after = {p.name: p.read_bytes() for p in server.data_dir.rglob("*") if p.is_file() and not p.name.endswith(".lock")}
    assert after == before
