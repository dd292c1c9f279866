"""Several real ``mangwale serve`` processes sharing one real ``redis-server`` (``--store redis://``).

Each test starts its own Redis on a free port (``redis_server``) and its instances on free
ports, all on one data dir (in Redis mode it is only a model cache and is not locked). Leases
and timeouts are shrunk through settings so takeovers happen in about a second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerProcess, free_port, wait_for
from netproxy import NetProxy, netproxy  # noqa: F401 - a pytest fixture, used by name
from redisserver import RedisServer
from test_watch import Watch, assert_complete_transcript, client_env, server_events, watches  # noqa: F401 - watches: a pytest fixture, used by name
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

TERMINAL = ("succeeded", "failed", "cancelled")
SOAK = os.environ.get("MANGWALE_SOAK") == "1"  # the kill -9 round runs 10 times instead of once

CLUSTER_ENV = {
    "MANGWALE_RUNNER_LEASE": "1.5",
    "MANGWALE_STORE_TIMEOUT": "1",
    "MANGWALE_RUNNER_CONCURRENCY": "2",
}


@pytest.fixture
def redis_server_persistent(tmp_path: Path) -> Any:
    """A private redis-server with appendonly + appendfsync always: kill -9 loses nothing."""
    server = RedisServer(tmp_path / "redis-aof", appendonly=True).start()
    yield server
    server.kill()


def start_instances(server_factory: Callable[..., ServerProcess], redis_url: str, data_dir: Path, n: int,
                    **env: str) -> list[ServerProcess]:
    """Start ``n`` instances at once (so their start-ups race) and wait until all answer."""
    made = [
        server_factory(data_dir=data_dir, env={**CLUSTER_ENV, **env}, args=["--store", redis_url], start=False)
        for _ in range(n)
    ]
    for s in made:
        s.start(wait=False)
    for s in made:
        s.wait_ready()
    return made


def get(server: ServerProcess, path: str, **params: Any) -> Any:
    with server.client() as c:
        r = c.get(path, params=params)
        r.raise_for_status()
        return r.json()


def create(server: ServerProcess, kind: str = "simulate", **body: Any) -> str:
    with server.client() as c:
        r = c.post("/training/jobs", json={"kind": kind, **body})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


def simulate(server: ServerProcess, **params: Any) -> str:
    return create(server, params=params)


def sse_seqs(server: ServerProcess, job: str, until: int) -> list[int]:
    """The seqs of ``job``'s events from GET /training/events?since=0, read until seq ``until``."""
    seqs: list[int] = []
    with httpx.stream("GET", server.url + "/training/events", params={"since": 0, "jobs": job}, timeout=10) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("id: "):
                seqs.append(int(line[4:]))
                if seqs[-1] >= until:
                    break
    return seqs


def status(server: ServerProcess, job_id: str) -> str:
    return str(get(server, f"/training/jobs/{job_id}")["status"])


def test_instances_share_jobs_events_and_models(
    server_factory: Callable[..., ServerProcess], redis_server: Any, tmp_path: Path
) -> None:
    """Three instances started together: one sample dataset; a model trained by one is served by all."""
    a, b, c = start_instances(server_factory, redis_server.url, tmp_path / "shared", 3)
    for s in (a, b, c):
        assert get(s, "/healthz")["store"] == "redis"
        names = [d["name"] for d in get(s, "/training/datasets")]
        assert names == ["food-delivery-sample"], f"seeded {len(names)} times: {names}"
    dataset = get(a, "/training/datasets")[0]["id"]
    job = create(a, "nlu-train", datasetId=dataset, params={"epochs": 2})
    wait_for(lambda: status(c, job) in TERMINAL, 60, 0.1, "the job to end")
    assert status(b, job) == "succeeded"
    # The same events, in the same global order, through every instance.
    wait_for(lambda: server_events(a, job) == server_events(b, job) == server_events(c, job), 5,
             what="every instance to have read the job's last event")
    # ... and over SSE, from the start of the log, through the third instance.
    events = server_events(a, job)
    logged = [e["seq"] for e in events]
    states = [e for e in events if e["type"] != "job_log"]  # log lines have a seq, no jobSeq
    assert [e["jobSeq"] for e in states] == list(range(1, len(states) + 1)) and len(states) >= 5
    assert sse_seqs(c, job, until=logged[-1]) == logged
    # Whichever instance trained it, every instance predicts with it and serves the same bytes.
    answers = []
    for s in (a, b, c):
        with s.client() as cl:
            # Each instance's first predict starts its predictor child (scikit-learn and skops
            # imports): seconds of CPU, far more on a loaded machine.
            r = cl.post(f"/training/jobs/{job}/predict", json={"text": "where is my order"}, timeout=90)
            assert r.status_code == 200, r.text
            answers.append(r.json()["intent"])
    assert len(set(answers)) == 1
    blobs = []
    for s in (a, c):
        with s.client() as cl:
            r = cl.get(f"/training/jobs/{job}/artifact")
            assert r.status_code == 200
            blobs.append(r.content)
    assert blobs[0] == blobs[1] and len(blobs[0]) > 1000


@pytest.mark.parametrize("round_", range(10 if SOAK else 1))
def test_kill9_instance_mid_run_jobs_are_taken_over(
    server_factory: Callable[..., ServerProcess], redis_server: Any, tmp_path: Path, watches: Any,  # noqa: F811 - the fixture imported above
    round_: int,
) -> None:
    """30 jobs over 3 instances, one killed with -9 mid-run: every job ends, none is lost, re-runs are
    bounded by what the dead instance held, and a watch through a survivor sees every seq once."""
    a, b, c = start_instances(server_factory, redis_server.url, tmp_path / "shared", 3)
    head = get(b, "/healthz")["headSeq"]
    everything = watches("--all", "--since", str(head), "--json", "--url", b.url)
    wait_for(lambda: "connection: live" in everything.stderr(), what="watch --all to be live")
    instances = [a, b, c]
    jobs = [simulate(instances[i % 3], steps=8, stepMs=250) for i in range(30)]
    followed = watches(*jobs[:6], "--json", "--url", c.url)

    wait_for(lambda: get(a, "/healthz")["running"] >= 1, 20, 0.02, "instance A to run a job")
    a.kill()
    t_kill, kill_ms = time.monotonic(), time.time() * 1000

    def all_ended() -> bool:
        return all(j["status"] in TERMINAL for j in get(b, "/training/jobs", limit=100) if j["id"] in jobs)

    wait_for(all_ended, 90, 0.2, "every job to end")
    took = time.monotonic() - t_kill
    listed = {j["id"]: j for j in get(b, "/training/jobs", limit=100)}
    assert set(jobs) <= set(listed), "an acknowledged job was lost"
    assert {listed[j]["status"] for j in jobs} == {"succeeded"}
    reruns = [j for j in jobs if listed[j]["attempt"] > 1]
    takeovers = get(b, "/healthz")["takeovers"] + get(c, "/healthz")["takeovers"]
    # Only what A was running can run twice: at most its concurrency (2), and at least the one seen.
    assert 1 <= len(reruns) == takeovers <= 2, (reruns, takeovers)
    # Taken over once the lease (1.5 s here) ran out and a survivor had a free slot.
    waits = []
    for job in reruns:
        second = next(e for e in server_events(b, job) if e.get("attempt") == 2)
        waits.append((second["timestamp"] - kill_ms) / 1000)
    assert max(waits) < 1.5 + 2.0 + 1.0, waits  # the lease, a job (2 s) freeing a slot, slack
    print(f"\n[cluster] 30 jobs over 3 instances, one killed -9: re-runs {len(reruns)}, taken over after "
          f"{', '.join(f'{w:.2f}' for w in waits)} s (lease 1.5 s); all ended {took:.1f} s after the kill")

    assert followed.wait_exit(60) == 0, followed.stderr()
    everything.kill()
    seqs = [e["seq"] for e in everything.events()]
    assert seqs == list(range(head + 1, head + 1 + len(seqs))), "watch --all saw a gap or a duplicate"
    assert seqs[-1] >= get(b, "/healthz")["headSeq"] - 1
    for job in jobs[:6]:
        mine = [e for e in followed.events() if e["jobId"] == job]
        assert [e["seq"] for e in mine] == [e["seq"] for e in server_events(c, job)]


def test_watch_resumes_through_another_instance(
    server_factory: Callable[..., ServerProcess], redis_server: Any, tmp_path: Path,
    netproxy: Callable[[int], NetProxy], watches: Any,  # noqa: F811 - the fixture imported above
) -> None:
    """watch through B (behind a balancer) follows a job; B dies; it resumes through C: no gap, no duplicate."""
    a, b, c = start_instances(server_factory, redis_server.url, tmp_path / "shared", 3)
    balancer = netproxy(b.port)
    job = simulate(a, steps=600, stepMs=50)  # ends when cancelled below, however slow the machine
    w = watches(job, "--json", "--url", balancer.url)
    wait_for(lambda: len(w.events()) >= 4, what="watch to be live")
    b.kill()
    balancer.target = ("127.0.0.1", c.port)  # the balancer's health check moves traffic to C
    balancer.cut()
    wait_for(lambda: "reconnecting in" in w.stderr(), 15, what="watch to reconnect")
    seen = len(w.events())
    wait_for(lambda: len(w.events()) > seen, 30, what="progress through C")
    assert httpx.post(f"{c.url}/training/jobs/{job}/cancel", timeout=30).json()["status"] == "cancelled"
    assert w.wait_exit(60) == 3, w.stderr()  # the job's outcome: cancelled
    assert_complete_transcript(w, c, job)


def test_redis_restart_keeps_everything(
    server_factory: Callable[..., ServerProcess], redis_server_persistent: Any, tmp_path: Path, watches: Any  # noqa: F811 - the fixture imported above
) -> None:
    """Redis killed mid-job: REST answers 503 with a JSON error, watchers reconnect, and once Redis is
    back (with its data) the job goes on to its end and every event reached the watcher once."""
    redis = redis_server_persistent
    a, b = start_instances(server_factory, redis.url, tmp_path / "shared", 2)
    job = simulate(a, steps=600, stepMs=50)  # ends when cancelled below, however slow the machine
    w = watches(job, "--json", "--url", b.url)
    wait_for(lambda: len(w.events()) >= 3, what="watch to be live")
    assert status(b, job) == "running"
    redis.kill()
    t0 = time.monotonic()
    r = httpx.get(b.url + "/training/jobs", timeout=10)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "store_unavailable"
    assert time.monotonic() - t0 < 5
    wait_for(lambda: "reconnecting in" in w.stderr(), 15, what="watch to be told")
    redis.start()
    seen = len(w.events())
    wait_for(lambda: len(w.events()) > seen, 30, 0.1, "progress again after Redis is back")
    assert httpx.post(f"{b.url}/training/jobs/{job}/cancel", timeout=30).json()["status"] == "cancelled"
    assert status(a, job) == "cancelled"
    assert w.wait_exit(60) == 3, w.stderr()
    events = w.events()
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), "a duplicate or disorder"
    assert seqs == [e["seq"] for e in server_events(b, job)], "an event was lost"


def test_redis_losing_its_data_starts_a_new_epoch(
    server_factory: Callable[..., ServerProcess], redis_server: Any, tmp_path: Path
) -> None:
    """Redis restarted empty: the epoch changes, a client resuming with the old one is told to resync,
    and no seq it saw is issued again."""
    (a,) = start_instances(server_factory, redis_server.url, tmp_path / "shared", 1)
    simulate(a, steps=2, stepMs=10)
    before = get(a, "/healthz")
    redis_server.restart(wipe=True)
    wait_for(lambda: _health_epoch(a) not in (None, before["epoch"]), 20, 0.1, "a new epoch")
    simulate(a, steps=2, stepMs=10)
    after = get(a, "/healthz")
    assert after["headSeq"] > before["headSeq"], "a seq was reused in the new epoch"
    url = a.ws_url + f"?since={before['headSeq']}&epoch={before['epoch']}"
    with connect(url, open_timeout=5) as ws:
        first = json.loads(ws.recv(5))
        second = json.loads(ws.recv(5))
    assert first["type"] == "connected" and first["epoch"] == after["epoch"]
    assert second["type"] == "resync" and second["reason"] == "epoch_changed"


def _health_epoch(server: ServerProcess) -> str | None:
    try:
        r = httpx.get(server.url + "/healthz", timeout=2)
    except httpx.HTTPError:
        return None
    return r.json().get("epoch") if r.status_code == 200 else None


@pytest.mark.parametrize("where", ["flag", "env"])
def test_redis_down_at_start_fails_with_one_line(server_factory: Callable[..., ServerProcess], tmp_path: Path, where: str) -> None:
    """serve --store redis://... with nothing listening: exit 1 with one clear line, no traceback."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    args, env = (["--store", url], {}) if where == "flag" else ([], {"MANGWALE_STORE_BACKEND": url})
    s = server_factory(env={**CLUSTER_ENV, **env}, args=args, start=False)
    s.start(wait=False)
    assert s.proc is not None
    assert s.proc.wait(20) == 1
    wait_for(lambda: "unreachable" in s.output() or "Connection refused" in s.output(), 5, what="the error line")
    assert "Traceback" not in s.output()


def test_serve_processes_runs_instances_on_one_port(
    server_factory: Callable[..., ServerProcess], redis_server: Any, tmp_path: Path
) -> None:
    """serve --processes 2: two instances accept on one port, share one queue, and stop on SIGTERM."""
    s = server_factory(data_dir=tmp_path / "shared", env=CLUSTER_ENV, args=["--store", redis_server.url, "--processes", "2"])

    def instances_seen() -> set[str]:
        seen = set()
        for _ in range(40):  # a new connection each time: the kernel hands it to either process
            seen.add(httpx.get(s.url + "/healthz", timeout=2, headers={"Connection": "close"}).json()["instance"])
        return seen if len(seen) == 2 else set()

    names = wait_for(instances_seen, 20, 0.1, "both processes to answer")
    assert all(n.endswith(("/1", "/2")) for n in names), names
    jobs = [simulate(s, steps=2, stepMs=20) for _ in range(6)]
    wait_for(lambda: all(status(s, j) == "succeeded" for j in jobs), 30, 0.1, "the jobs to run")
    assert s.stop() == 0
    assert "Traceback" not in s.output()


def test_processes_need_a_shared_store(server_factory: Callable[..., ServerProcess]) -> None:
    """serve --processes 2 on the embedded store is refused with one line (exit 2, bad usage)."""
    s = server_factory(args=["--processes", "2"], start=False)
    s.start(wait=False)
    assert s.proc is not None
    code = s.proc.wait(20)
    wait_for(lambda: "--processes needs a shared store" in s.output(), 5, what="the error line")
    assert code == 2 and "Traceback" not in s.output()


def test_takeover_after_the_last_attempt_fails_the_job(
    server_factory: Callable[..., ServerProcess], redis_server: Any, tmp_path: Path
) -> None:
    """With runner.max_attempts = 1, a job whose instance dies fails with "abandoned after 1 attempts"."""
    a, b = start_instances(server_factory, redis_server.url, tmp_path / "shared", 2, MANGWALE_RUNNER_MAX_ATTEMPTS="1")
    job = simulate(a, steps=50, stepMs=100)
    wait_for(lambda: get(a, f"/training/jobs/{job}")["status"] == "running", 10, 0.02, "the job to start")
    runner = a if get(a, "/healthz")["running"] else b
    survivor = b if runner is a else a
    runner.kill()
    wait_for(lambda: status(survivor, job) in TERMINAL, 20, 0.1, "the survivor to take the job over")
    final = get(survivor, f"/training/jobs/{job}")
    assert final["status"] == "failed" and final["attempt"] == 1
    assert final["error"] == "abandoned after 1 attempts: the instance running it stopped"
    assert get(survivor, "/healthz")["takeovers"] == 1


def test_hung_instance_loses_its_lease_and_its_late_writes(
    server_factory: Callable[..., ServerProcess], redis_server: Any, tmp_path: Path
) -> None:
    """An instance frozen (SIGSTOP) past its lease: another takes the job over; when the frozen one
    wakes up it stops its copy, and none of its late progress reaches the store or the stream."""
    import signal

    a, b = start_instances(server_factory, redis_server.url, tmp_path / "shared", 2, MANGWALE_RUNNER_CONCURRENCY="1")
    job = simulate(a, steps=40, stepMs=100)
    wait_for(lambda: status(a, job) == "running", 10, 0.02, "the job to start")
    frozen = a if get(a, "/healthz")["running"] else b
    other = b if frozen is a else a
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: get(other, f"/training/jobs/{job}")["attempt"] == 2, 15, 0.1, "the takeover")
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    wait_for(lambda: status(other, job) in TERMINAL, 30, 0.1, "the job to end")
    final = get(other, f"/training/jobs/{job}")
    assert (final["status"], final["attempt"]) == ("succeeded", 2)
    # Its renewal, its queue heartbeat or its next write finds the lease gone, whichever is first.
    wait_for(lambda: any(s in frozen.output() for s in ("stopping this copy", "lost the lease", "was not saved")), 10,
             what="the woken instance to notice it lost the job")
    # After the takeover started attempt 2, no event of attempt 1 was logged.
    events = server_events(other, job)
    start2 = next(e["seq"] for e in events if e.get("attempt") == 2)
    assert all(e.get("attempt") != 1 for e in events if e["seq"] > start2), "a late write of the hung instance got through"
    assert get(frozen, "/healthz")["running"] == 0


def test_an_instance_cut_off_from_redis_past_its_lease_stops_its_copy(
    server_factory: Callable[..., ServerProcess], redis_server: Any, tmp_path: Path,
    netproxy: Callable[[int], NetProxy],  # noqa: F811 - the fixture imported above
) -> None:
    """Redis unreachable from the instance running a job (a cut link, Redis itself fine): its
    trainer keeps running and its reports wait; once the cut outlasts the lease it stops its copy
    as a stale holder and another instance takes the job over; nothing it held gets through."""
    proxy = netproxy(redis_server.port)
    # A lease well above the store timeout (1 s): A's first report after the cut fails after 1 s,
    # while the lease it renewed last is still live, so its reports wait before its lease runs
    # out. With the cluster's 1.5 s lease, a loaded machine could reach that failure after the
    # lease, and A then (rightly) stops its copy at once, with no waiting to see.
    lease = {"MANGWALE_RUNNER_LEASE": "4"}
    a = server_factory(data_dir=tmp_path / "a", env={**CLUSTER_ENV, **lease, "MANGWALE_RUNNER_CONCURRENCY": "1"},
                       args=["--store", f"redis://127.0.0.1:{proxy.port}/0"])  # fmt: skip
    job = simulate(a, steps=600, stepMs=50)
    wait_for(lambda: get(a, f"/training/jobs/{job}")["progress"] > 0, 10, 0.02, "the job to run on A")
    (b,) = start_instances(server_factory, redis_server.url, tmp_path / "b", 1, MANGWALE_RUNNER_CONCURRENCY="1", **lease)
    proxy.blackhole()
    try:
        wait_for(lambda: "its reports wait" in a.output(), 10, 0.05, "A's runner to hold its reports")
        wait_for(lambda: get(b, f"/training/jobs/{job}")["attempt"] == 2, 20, 0.1, "B to take the job over")
        wait_for(lambda: "stopping this copy" in a.output(), 10, 0.05, "A to stop its copy as a stale holder")
    finally:
        proxy.restore()
    httpx.post(f"{b.url}/training/jobs/{job}/cancel", timeout=30)
    wait_for(lambda: status(b, job) in TERMINAL, 30, 0.1, "the job to end")
    events = server_events(b, job)
    start2 = next(e["seq"] for e in events if e.get("attempt") == 2)
    assert all(e.get("attempt") != 1 for e in events if e["seq"] > start2), "a held report of A got through"
    states = [e for e in events if "jobSeq" in e]
    assert [e["jobSeq"] for e in states] == list(range(1, len(states) + 1))
    wait_for(lambda: get(a, "/healthz")["running"] == 0, 10, 0.05, "A to run nothing")


def test_sigterm_hands_running_jobs_to_another_instance_at_once(
    server_factory: Callable[..., ServerProcess], redis_server: Any, tmp_path: Path
) -> None:
    """A stopping instance re-queues its running job at once; another runs it as the next attempt
    well before the lease (set long here) could have run out."""
    a, b = start_instances(server_factory, redis_server.url, tmp_path / "shared", 2, MANGWALE_RUNNER_LEASE="30")
    job = simulate(a, steps=30, stepMs=100)
    wait_for(lambda: status(a, job) == "running", 10, 0.02, "the job to start")
    stopping = a if get(a, "/healthz")["running"] else b
    other = b if stopping is a else a
    t0 = time.monotonic()
    assert stopping.stop() == 0
    wait_for(lambda: get(other, f"/training/jobs/{job}")["attempt"] == 2, 10, 0.05, "the other instance to start it")
    assert time.monotonic() - t0 < 10  # not the 30 s lease
    wait_for(lambda: status(other, job) in TERMINAL, 30, 0.1, "the job to end")
    assert status(other, job) == "succeeded"
    assert get(other, "/healthz")["takeovers"] == 0  # handed over, not taken over


def test_cancel_through_another_instance(
    server_factory: Callable[..., ServerProcess], redis_server: Any, tmp_path: Path
) -> None:
    """A job running on one instance is cancelled through the other: the answer is the job cancelled,
    well before the lease (set long here) could have mattered."""
    a, b = start_instances(server_factory, redis_server.url, tmp_path / "shared", 2, MANGWALE_RUNNER_LEASE="30")
    job = simulate(a, steps=200, stepMs=50)
    wait_for(lambda: status(a, job) == "running", 10, 0.02, "the job to start")
    runner = a if get(a, "/healthz")["running"] else b
    other = b if runner is a else a
    t0 = time.monotonic()
    with other.client() as c:
        r = c.post(f"/training/jobs/{job}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"
    assert time.monotonic() - t0 < 5
    assert status(runner, job) == "cancelled"
    assert get(runner, "/healthz")["running"] == 0


def test_job_created_precedes_its_updates_across_instances(
    server_factory: Callable[..., ServerProcess], redis_server: Any, tmp_path: Path
) -> None:
    """Jobs created on one instance and started by the other a moment later: in the stream every
    job's first event is its job_created (jobSeq 1), jobSeq goes 1, 2, 3... without a gap, and a
    finished job has exactly one terminal update, its last."""
    import redis

    a, b = start_instances(server_factory, redis_server.url, tmp_path / "shared", 2, MANGWALE_RUNNER_CONCURRENCY="4")
    made: dict[str, ServerProcess] = {}
    for i in range(60):
        s = (a, b)[i % 2]
        made[simulate(s, steps=3, stepMs=5)] = s
    wait_for(lambda: all(j["status"] in TERMINAL for j in get(a, "/training/jobs", limit=100)), 60, 0.1,
             "every job to end")  # fmt: skip
    entries = redis.Redis.from_url(redis_server.url).xrange("mangwale:events")
    events = [json.loads(fields[b"d"]) for _id, fields in entries]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    crossed = 0
    for job, creator in made.items():
        mine = [e for e in events if e.get("jobId") == job and e["type"] != "job_log"]
        assert mine[0]["type"] == "job_created", (job, [e["type"] for e in mine])
        assert [e["jobSeq"] for e in mine] == list(range(1, len(mine) + 1)), job
        assert [e.get("status") for e in mine[1:]].count("running") >= 1
        assert [e.get("status") in TERMINAL for e in mine] == [False] * (len(mine) - 1) + [True], job
        other = b if creator is a else a
        crossed += f"job {job} (simulate) started" in other.output()
    # The case that went wrong before: created on one instance, started on the other.
    assert crossed >= 10, crossed
    print(f"\n[cluster] {len(made)} jobs over 2 instances, {crossed} started by the instance that did not "
          f"create them: job_created first and jobSeq without a gap in all {len(made)}")


SIGTERM_ROUNDS = 30


def test_sigterm_stops_a_busy_instance_within_its_grace_every_time(
    server_factory: Callable[..., ServerProcess], redis_server: Any, tmp_path: Path
) -> None:
    """30 rounds: an instance running jobs, with WebSocket watchers, gets SIGTERM while the next ones
    start; every round it exits 0 within shutdown_grace + runner.kill_grace (no worker or stream
    reader left waiting on Redis), and its watchers are told 1001 (going away)."""
    grace, kill_grace = 1.0, 0.5  # the bound: 1.5 s (the defaults are 5 s and 3 s)
    env = {**CLUSTER_ENV, "MANGWALE_SHUTDOWN_GRACE": str(grace), "MANGWALE_RUNNER_KILL_GRACE": str(kill_grace)}

    def spawn() -> ServerProcess:
        s = server_factory(data_dir=tmp_path / "shared", env=env, args=["--store", redis_server.url], start=False)
        return s.start(wait=False)

    ready = [spawn(), spawn(), spawn()]  # start-ups overlap the rounds before them
    took: list[float] = []
    for round_ in range(SIGTERM_ROUNDS):
        current = ready.pop(0)
        current.wait_ready()

        def busy(s: ServerProcess = current) -> bool:  # the others take jobs too: add until this one runs some
            if get(s, "/healthz")["running"] >= 1:
                return True
            simulate(s, steps=40, stepMs=50)
            return False

        wait_for(busy, 15, 0.05, f"round {round_}: the instance to run a job")
        head = get(current, "/healthz")["headSeq"]
        closes: list[int | None] = []
        with ExitStack() as stack:
            watchers = [stack.enter_context(connect(f"{current.ws_url}?since={head}", open_timeout=5)) for _ in range(3)]
            assert current.proc is not None
            t0 = time.monotonic()
            current.proc.send_signal(signal.SIGTERM)
            try:
                code = current.proc.wait(grace + kill_grace + 10)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"round {round_}: still running 11.5 s after SIGTERM:\n{current.output()[-3000:]}") from None
            took.append(time.monotonic() - t0)
            for ws in watchers:
                try:
                    while True:
                        ws.recv(5)
                except ConnectionClosed as exc:
                    closes.append(exc.rcvd.code if exc.rcvd else None)
        assert code == 0, f"round {round_}: exit {code}\n{current.output()[-3000:]}"
        assert took[-1] <= grace + kill_grace, f"round {round_}: {took[-1]:.2f} s after SIGTERM"
        assert closes == [1001] * 3, closes
        assert "Traceback" not in current.output()
        if round_ + len(ready) + 1 < SIGTERM_ROUNDS:
            ready.append(spawn())
    print(f"\n[cluster] SIGTERM x{SIGTERM_ROUNDS} on a busy instance: exit in {min(took):.2f}..{max(took):.2f} s "
          f"(median {sorted(took)[len(took) // 2]:.2f} s; bound {grace + kill_grace:g} s)")


def test_etags_agree_across_instances_and_a_create_is_seen_by_the_other(
    server_factory: Callable[..., ServerProcess], redis_server: Any, tmp_path: Path
) -> None:
    """Two instances on one Redis give the same ETag for the same list and job (and 304 to each
    other's tag); a create answered by one is in the other's next list, under a new tag."""
    a, b = start_instances(server_factory, redis_server.url, tmp_path / "shared", 2)
    job = simulate(a, steps=1, stepMs=0)
    wait_for(lambda: status(b, job) == "succeeded", timeout=30)
    with a.client() as ca, b.client() as cb:
        for path in ("/training/jobs", "/training/jobs?limit=1", f"/training/jobs/{job}"):
            ra, rb = ca.get(path), cb.get(path)
            assert ra.status_code == rb.status_code == 200 and ra.content == rb.content
            assert ra.headers["etag"] == rb.headers["etag"], path
            assert cb.get(path, headers={"If-None-Match": ra.headers["etag"]}).status_code == 304
        tag = ca.get("/training/jobs").headers["etag"]
        for _ in range(5):
            created = create(b)
            r = ca.get("/training/jobs", headers={"If-None-Match": tag})
            assert r.status_code == 200 and created in [j["id"] for j in r.json()]
            tag = r.headers["etag"]
