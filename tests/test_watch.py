"""``mangwale watch`` as users run it: a real CLI process against a real ``mangwale serve``.

Covers kill -9 restarts of the server, network faults through a TCP proxy, a client further
behind than the log (resync), the exit-code contract, what the tty view draws under tmux, and
the exact plain, GitHub Actions and JSON transcripts. Timings are shrunk through the client's
MANGWALE_BACKOFF_* / MANGWALE_WATCH_PING_* settings; conditions are waited for, never slept on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, free_port, wait_for
from netproxy import NetProxy, netproxy  # noqa: F401 - a pytest fixture, used by name

SOAK = os.environ.get("MANGWALE_SOAK") == "1"
KILL_ROUNDS = 20 if SOAK else 3

CLIENT_ENV = {
    "MANGWALE_BACKOFF_INITIAL": "0.05",
    "MANGWALE_BACKOFF_MAX": "0.2",
    "MANGWALE_WATCH_PING_INTERVAL": "0.5",
    "MANGWALE_WATCH_PING_TIMEOUT": "1",
}


def client_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **CLIENT_ENV, **extra}
    for var in ("MANGWALE_URL", "GITHUB_ACTIONS"):
        if var not in extra:
            env.pop(var, None)
    return env


def mangwale(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mangwale_cli", *args],
        env=env or client_env(), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
    )


class Watch:
    """A ``mangwale watch`` process whose output lines are collected as they arrive."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mangwale_cli", "watch", *args],
            env=env or client_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self.out)]

    def events(self) -> list[dict[str, Any]]:
        return [d for d in self.json_lines() if "seq" in d]

    def stderr(self) -> str:
        return "\n".join(self.err)

    def wait_exit(self, timeout: float = 30) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"watch did not exit in {timeout}s; stderr:\n{self.stderr()}") from None
        for t in self._readers:
            t.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def watches() -> Any:
    """Start ``Watch`` processes; any still running at the end is killed."""
    made: list[Watch] = []

    def make(*args: str, env: dict[str, str] | None = None) -> Watch:
        w = Watch(*args, env=env)
        made.append(w)
        return w

    yield make
    for w in made:
        w.kill()


def create_job(server: ServerProcess, **params: Any) -> str:
    with server.client() as c:
        r = c.post("/training/jobs", json={"kind": "simulate", "params": params})
        r.raise_for_status()
        return str(r.json()["id"])


def get_job(server: ServerProcess, job_id: str) -> dict[str, Any]:
    with server.client() as c:
        return c.get(f"/training/jobs/{job_id}").json()


def server_events(server: ServerProcess, job_id: str) -> list[dict[str, Any]]:
    with server.client() as c:
        return c.get(f"/training/jobs/{job_id}/events", params={"since": 0}).json()


def finished(server: ServerProcess, job_id: str) -> bool:
    return get_job(server, job_id)["status"] in ("succeeded", "failed", "cancelled")


def error_lines(stderr: str) -> list[str]:
    """stderr without the connection and resync notices (what is left must be the one error line)."""
    return [line for line in stderr.splitlines() if not line.startswith(("mangwale: connection: ", "mangwale: resync "))]


ONE_SLOT = ["--concurrency", "1"]


def blocked_job(server: ServerProcess, **params: Any) -> tuple[str, Callable[[], None]]:
    """A job that waits behind a blocker on a one-slot server (``ONE_SLOT``) until ``release()``
    cancels the blocker: a watch started on a busy machine, however slowly, is live before the
    job runs, so a test never finds the job already over."""
    blocker = create_job(server, steps=10_000, stepMs=100)
    job = create_job(server, **params)

    def release() -> None:
        with server.client() as c:
            c.post(f"/training/jobs/{blocker}/cancel").raise_for_status()

    return job, release


def watched_before_it_runs(server: ServerProcess, watches: Any, *args: str, url: str | None = None,
                           env: dict[str, str] | None = None, **params: Any) -> tuple[str, Watch]:
    """``blocked_job``, with a watch (``args``) that is live before the job runs."""
    job, release = blocked_job(server, **params)
    w = watches(job, *args, "--url", url or server.url, env=env)
    wait_for(lambda: "connection: live" in w.stderr() and w.out, 20, what="watch to be live")
    release()
    return job, w


def assert_complete_transcript(w: Watch, server: ServerProcess, job_id: str) -> list[dict[str, Any]]:
    """watch printed every event of the job the server logged, each once, in order."""
    events = w.events()
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), f"duplicates or disorder: {seqs}"
    states = [e for e in events if e["type"] != "job_log"]  # log lines have a seq, no jobSeq
    assert [e["jobSeq"] for e in states] == list(range(1, len(states) + 1)), "jobSeq has a gap"
    assert seqs == [e["seq"] for e in server_events(server, job_id)]
    assert {e["jobId"] for e in events} == {job_id}
    return events


# --- kill -9 ------------------------------------------------------------------------------------

EXPECTED = {"succeeded": 0, "failed": 1, "cancelled": 3}


@pytest.mark.parametrize("outcome", ["succeeded", "failed", "cancelled"])
def test_watch_survives_kill9_restarts(server_factory: Callable[..., ServerProcess], watches: Any, outcome: str) -> None:
    """Through repeated kill -9 restarts, watch --json prints each seq of the job once, in order, and exits with its outcome."""
    server = server_factory(env={"MANGWALE_RUNNER_MAX_ATTEMPTS": str(KILL_ROUNDS + 5)}, args=["--concurrency", "1"])
    params: dict[str, Any] = {"steps": 25, "stepMs": 40}
    if outcome == "failed":
        params["failAt"] = 20
    job, w = watched_before_it_runs(server, watches, "--json", **params)
    for _ in range(KILL_ROUNDS):
        # Timed on the server's log, not on watch's output: a watch that lags (a busy machine)
        # must not let an attempt run to its end before the kill.
        target = len(server_events(server, job)) + 3
        wait_for(lambda t=target: len(server_events(server, job)) >= t, 20, what="the job to make progress")
        server.kill()
        server.start()
    last_attempt = KILL_ROUNDS + 1
    wait_for(lambda: any(e.get("attempt") == last_attempt and e.get("status") == "running" for e in w.events()), 20)
    if outcome == "cancelled":
        with server.client() as c:
            c.post(f"/training/jobs/{job}/cancel").raise_for_status()
    assert w.wait_exit(40) == EXPECTED[outcome], w.stderr()
    events = assert_complete_transcript(w, server, job)
    assert events[-1]["status"] == outcome
    assert sum(e.get("message", "").startswith("re-queued") for e in events) == KILL_ROUNDS
    summary = w.json_lines()[-1]
    assert summary["type"] == "summary" and summary["exitCode"] == EXPECTED[outcome]
    assert summary["jobs"][job]["status"] == outcome and summary["jobs"][job]["attempt"] == last_attempt
    assert "reconnecting in" in w.stderr()


def test_plain_lines_name_the_attempt_after_a_requeue(server_factory: Callable[..., ServerProcess], watches: Any) -> None:
    """A job re-run after a kill -9 of its server goes back to 0 %: every line of the new attempt says "attempt 2"."""
    server = server_factory(args=["--concurrency", "1"])
    job, w = watched_before_it_runs(server, watches, "--output", "plain", steps=30, stepMs=40)
    wait_for(lambda: (d := get_job(server, job))["status"] == "running" and d["progress"] > 0, what="attempt 1 to run")
    server.kill()
    server.start()
    assert w.wait_exit(30) == 0, w.stderr()
    requeued = next(i for i, line in enumerate(w.out) if "re-queued" in line)
    assert re.fullmatch(rf"{job}  queued +\d+%  re-queued: the server stopped during attempt 1", w.out[requeued])
    again = [line for line in w.out[requeued + 1 : -1]]
    assert again and all(re.match(rf"{job}  \w+ +\d+%  attempt 2: ", line) for line in again), again
    assert re.match(rf"finished: {job} succeeded in \S+ \(attempt 2\) ", w.out[-1])


# --- network faults --------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["cut", "reset", "blackhole"])
def test_watch_survives_network_faults(server_factory: Callable[..., ServerProcess], netproxy: Callable[[int], NetProxy], watches: Any, fault: str) -> None:  # noqa: F811 - the fixture imported above
    """A cut, reset or blackholed connection between watch and server: watch reconnects and loses nothing."""
    server = server_factory(args=ONE_SLOT)
    proxy = netproxy(server.port)
    fast_ping = client_env(MANGWALE_WATCH_PING_INTERVAL="0.25", MANGWALE_WATCH_PING_TIMEOUT="0.5")
    # A blackhole is only noticed by the client's keepalive (~1 s here): it needs a longer job.
    job, w = watched_before_it_runs(server, watches, "--json", url=proxy.url, env=fast_ping,
                                    steps=100 if fault == "blackhole" else 40, stepMs=40)
    wait_for(lambda: len(w.out) >= 4, what="watch to be live")
    proxy.blackhole()  # nothing gets through while the job goes on
    if fault == "cut":
        assert proxy.cut() >= 1
    elif fault == "reset":
        assert proxy.reset() >= 1
    # cut/reset: the client sees it at once; blackhole: only its keepalive ping times out.
    wait_for(lambda: "reconnecting in" in w.stderr(), 15, what="watch to notice the dead connection")
    wait_for(lambda: len(server_events(server, job)) >= len(w.events()) + 5, what="events watch has not seen")
    assert not finished(server, job)
    proxy.restore()
    assert w.wait_exit(30) == 0, w.stderr()
    assert_complete_transcript(w, server, job)
    assert w.stderr().count("connection: live") >= 2


def test_watch_resyncs_when_further_behind_than_the_log(server_factory: Callable[..., ServerProcess], netproxy: Callable[[int], NetProxy], watches: Any) -> None:  # noqa: F811 - the fixture imported above
    """A watcher away longer than the log keeps gets a resync, re-reads the job, and ends with its final state and exit code."""
    server = server_factory(env={"MANGWALE_EVENTS_RETENTION": "10"}, args=ONE_SLOT)
    proxy = netproxy(server.port)
    job, w = watched_before_it_runs(server, watches, "--json", url=proxy.url, steps=80, stepMs=40, failAt=70)
    wait_for(lambda: len(w.events()) >= 3, what="watch to be live")
    proxy.blackhole()
    proxy.cut()
    wait_for(lambda: "reconnecting in" in w.stderr())
    last = w.events()[-1]["seq"]
    # State events only: the log keeps job_log lines within a bound of their own.
    wait_for(lambda: next(e for e in server_events(server, job) if e["type"] != "job_log")["seq"] > last + 3,
             what="the log to drop events watch never saw")
    assert not finished(server, job)
    proxy.restore()
    assert w.wait_exit(30) == 1, w.stderr()
    lines = w.json_lines()
    kinds = [d["type"] for d in lines]
    resync = lines[kinds.index("resync")]
    assert resync["reason"] == "history_trimmed"
    snapshot = lines[kinds.index("resync") + 1]
    assert snapshot["type"] == "snapshot" and snapshot["jobId"] == job and snapshot["reason"] == "resync"
    after = [d["seq"] for d in lines[kinds.index("resync") :] if "seq" in d]
    assert after and min(after) > resync["headSeq"] and after == sorted(set(after))
    assert lines[-1] == {
        "type": "summary",
        "jobs": {job: {**lines[-1]["jobs"][job], "status": "failed"}},
        "exitCode": 1,
        "reason": "finished",
    }
    assert "resync (history_trimmed)" in w.stderr()


# --- deleted jobs ------------------------------------------------------------------------------


def delete_job(server: ServerProcess, job_id: str) -> None:
    with server.client() as c:
        c.delete(f"/training/jobs/{job_id}").raise_for_status()


def cut_until_finished(server: ServerProcess, proxy: NetProxy, w: Watch, job: str) -> None:
    """Cut watch off (connection closed, nothing gets through) and let the job end meanwhile."""
    wait_for(lambda: len(w.out) >= 4, what="watch to be live")
    proxy.blackhole()
    proxy.cut()
    wait_for(lambda: "reconnecting in" in w.stderr(), what="watch to notice the cut")
    wait_for(lambda: finished(server, job), what="the job to end while watch is away")


@pytest.mark.parametrize("output", ["json", "plain"])
def test_job_deleted_while_away_exits_4(server_factory: Callable[..., ServerProcess], netproxy: Callable[[int], NetProxy], watches: Any, output: str) -> None:  # noqa: F811 - the fixture imported above
    """A job that ended and was deleted while watch was away, its last events gone from the log: one line saying so, exit 4; --json ends with a summary whose reason is "deleted"."""
    server = server_factory(env={"MANGWALE_EVENTS_RETENTION": "10"}, args=ONE_SLOT)
    proxy = netproxy(server.port)
    job, w = watched_before_it_runs(server, watches, "--output", output, url=proxy.url, steps=40, stepMs=40)
    cut_until_finished(server, proxy, w, job)
    delete_job(server, job)
    pusher = create_job(server, steps=12, stepMs=1)  # pushes the job's last events out of the log
    wait_for(lambda: finished(server, pusher))
    proxy.restore()
    assert w.wait_exit(30) == 4, w.stderr()
    assert error_lines(w.stderr()) == [f"mangwale: error: job {job} was deleted on the server while watch was away"]
    if output == "json":
        summary = w.json_lines()[-1]
        assert (summary["type"], summary["reason"], summary["exitCode"]) == ("summary", "deleted", 4)
    else:  # the job's lines up to the cut, then nothing: no summary line claiming a state
        assert all(line.startswith(f"{job}  ") for line in w.out), w.out


def test_job_deleted_while_away_with_its_end_still_in_the_log(server_factory: Callable[..., ServerProcess], netproxy: Callable[[int], NetProxy], watches: Any) -> None:  # noqa: F811 - the fixture imported above
    """A job deleted while watch was away whose last events the log still holds: watch shows them and exits with the job's outcome."""
    server = server_factory(args=ONE_SLOT)
    proxy = netproxy(server.port)
    job, w = watched_before_it_runs(server, watches, "--json", url=proxy.url, steps=40, stepMs=40, failAt=38)
    cut_until_finished(server, proxy, w, job)
    logged = [e["seq"] for e in server_events(server, job)]
    delete_job(server, job)
    proxy.restore()
    assert w.wait_exit(30) == 1, w.stderr()
    assert [e["seq"] for e in w.events()] == logged
    assert w.json_lines()[-1]["jobs"][job]["status"] == "failed"


def test_all_drops_deleted_jobs(server: ServerProcess, watches: Any) -> None:
    """watch --all says when a job it showed is deleted, and forgets it."""
    w = watches("--all", "--output", "plain", "--timeout", "20", "--url", server.url)
    wait_for(lambda: "connection: live" in w.stderr(), what="watch to be live")
    job = create_job(server, steps=2, stepMs=10)
    wait_for(lambda: any(line.startswith(f"{job}  succeeded") for line in w.out), what="the job's end")
    delete_job(server, job)
    wait_for(lambda: f"{job}  deleted on the server" in w.out, what="the deletion")
    w.proc.send_signal(signal.SIGINT)
    assert w.wait_exit(15) == 130, w.stderr()
    assert w.out[-1] == "detached: no jobs seen; exit 130"


# --- exit codes --------------------------------------------------------------------------------


def test_unknown_job_is_one_line_and_exit_4(server: ServerProcess) -> None:
    """Following a job that does not exist prints one line, exit 4, no retries; --json adds only its summary object on stdout."""
    r = mangwale("watch", "job-nope", "--url", server.url)
    assert r.returncode == 4, r.stderr
    assert (r.stdout, r.stderr) == ("", "mangwale: error: job job-nope not found\n")
    r = mangwale("watch", "job-nope", "--json", "--url", server.url)
    assert r.returncode == 4, r.stderr
    assert r.stderr == "mangwale: error: job job-nope not found\n"
    assert json.loads(r.stdout) == {"type": "summary", "jobs": {"job-nope": {"status": None, "progress": 0.0, "attempt": 0, "seconds": None, "error": None, "metrics": None}}, "exitCode": 4, "reason": "not_found"}


def test_since_beyond_head_exits_4(server: ServerProcess) -> None:
    """A --since past the server's newest event is refused (close 4400) and exits 4 without retrying."""
    r = mangwale("watch", "--all", "--since", "100000", "--url", server.url)
    assert r.returncode == 4, r.stderr
    assert "since=100000 is beyond the newest event" in r.stderr
    assert "reconnecting" not in r.stderr


def test_never_reached_server_exits_8_after_connect_timeout() -> None:
    """No server at the URL: watch reports its attempts and exits 8 after --connect-timeout (or MANGWALE_CONNECT_TIMEOUT), in one error line."""
    url = f"http://127.0.0.1:{free_port()}"
    r = mangwale("watch", "job-x", "--connect-timeout", "0.5", "--url", url)
    assert r.returncode == 8, r.stderr
    assert re.search(r"connection: server unreachable; reconnecting in 0\.\d+ s, attempt 1\n", r.stderr)
    assert error_lines(r.stderr) == [
        f"mangwale: error: cannot reach {url} within 0.5 s (--connect-timeout): is `mangwale serve` running there? (last: server unreachable)"
    ]
    assert r.stdout == ""
    r = mangwale("watch", "job-x", "--json", "--url", url, env=client_env(MANGWALE_CONNECT_TIMEOUT="0.3"))
    assert r.returncode == 8 and "within 0.3 s" in r.stderr
    assert json.loads(r.stdout)["reason"] == "unreachable"
    r = mangwale("watch", "job-x", "--url", url, env=client_env(MANGWALE_CONNECT_TIMEOUT="soon"))
    assert r.returncode == 2 and "MANGWALE_CONNECT_TIMEOUT" in r.stderr
    assert mangwale("watch", "job-x", "--connect-timeout", "0", "--url", url).returncode == 2


def test_never_reached_server_exits_8_when_retries_run_out() -> None:
    """--give-up-after and --max-retries against a server never reached end with 8 (unreachable), not 7."""
    url = f"http://127.0.0.1:{free_port()}"
    r = mangwale("watch", "job-x", "--give-up-after", "0.5", "--url", url)
    assert r.returncode == 8, r.stderr
    [line] = error_lines(r.stderr)
    assert re.fullmatch(rf"mangwale: error: gave up: no connection to {url} for 0\.\d s \(server unreachable\)", line)
    r = mangwale("watch", "job-x", "--max-retries", "2", "--url", url)
    assert r.returncode == 8 and "attempt 2" in r.stderr and "attempt 3" not in r.stderr
    assert "gave up after 2 retries" in r.stderr


def test_server_that_went_away_gives_up_with_exit_7(server: ServerProcess, watches: Any) -> None:
    """A server reached once and then gone is retried past --connect-timeout, and --give-up-after ends it with 7."""
    job = create_job(server, steps=1000, stepMs=50)
    # --connect-timeout bounds the first connection (REST + WebSocket) of a watch process that a
    # loaded test machine may start slowly: 1 s, and giving up after 1.5 s without the server still
    # retries past it.
    w = watches(job, "--output", "plain", "--connect-timeout", "1", "--give-up-after", "1.5", "--url", server.url)
    wait_for(lambda: any("Simulating step" in line for line in w.out), 30, what="watch to show progress")
    server.kill()
    assert w.wait_exit(15) == 7, w.stderr()
    assert re.search(r"attempt [3-9]", w.stderr()), w.stderr()  # retried past the connect timeout
    [line] = error_lines(w.stderr())
    assert re.fullmatch(rf"mangwale: error: gave up: no connection to {server.url} for 1\.\d s \(server unreachable\)", line)
    assert re.match(rf"stopped \(gave_up\): {job} running \d+%; exit 7$", w.out[-1])


def test_timeout_exits_6(server: ServerProcess) -> None:
    """--timeout bounds the wait: exit 6, and the summary shows the job still running."""
    job = create_job(server, steps=200, stepMs=50)
    r = mangwale("watch", job, "--timeout", "1", "--output", "plain", "--url", server.url)
    assert r.returncode == 6, r.stderr
    assert "--timeout 1 s reached" in r.stderr
    assert re.search(rf"^stopped \(timeout\): {job} running \d+%; exit 6$", r.stdout, re.MULTILINE)


def test_several_jobs_worst_outcome_wins(server: ServerProcess) -> None:
    """With several jobs, watch waits for all of them and the worst outcome is the exit code."""
    ok = create_job(server, steps=2, stepMs=10)
    bad = create_job(server, steps=4, stepMs=10, failAt=3)
    r = mangwale("watch", ok, bad, "--json", "--url", server.url)
    assert r.returncode == 1, r.stderr
    summary = json.loads(r.stdout.splitlines()[-1])
    assert {j: v["status"] for j, v in summary["jobs"].items()} == {ok: "succeeded", bad: "failed"}


def test_latest_follows_the_newest_job(server: ServerProcess) -> None:
    """--latest follows only the newest job and exits with its outcome."""
    older = create_job(server, steps=1, stepMs=1)
    wait_for(lambda: finished(server, older))
    newest = create_job(server, steps=2, stepMs=10, failAt=2)
    r = mangwale("watch", "--latest", "--json", "--url", server.url)
    assert r.returncode == 1, r.stderr
    assert {json.loads(line).get("jobId") for line in r.stdout.splitlines()[:-1]} == {newest}


def test_usage_errors_exit_2() -> None:
    """No target, two targets, or --json against --output: usage errors (exit 2)."""
    assert mangwale("watch").returncode == 2
    assert mangwale("watch", "job-a", "--all").returncode == 2
    r = mangwale("watch", "job-a", "--json", "--output", "plain")
    assert r.returncode == 2 and "--json and --output" in r.stderr


def test_jobs_create_watch_exits_with_outcome(server: ServerProcess) -> None:
    """`jobs create --watch` is the CI one-liner: create, follow, exit with the job's outcome."""
    r = mangwale("jobs", "create", "simulate", "-p", "steps=2", "-p", "stepMs=10", "--watch", "--json", "--url", server.url)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines[0]["type"] == "job_created" and lines[-1]["exitCode"] == 0
    assert re.match(r"queued job job-\S+ \(simulate\)", r.stderr)
    r = mangwale("jobs", "create", "simulate", "-p", "steps=3", "-p", "stepMs=10", "-p", "failAt=2", "--watch", "--url", server.url)
    assert r.returncode == 1 and "failed" in r.stdout


# --- Ctrl-C ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cancel", [False, True])
def test_ctrl_c_detaches_or_cancels(server: ServerProcess, watches: Any, cancel: bool) -> None:
    """Ctrl-C detaches (exit 130, the job keeps running); with --cancel-on-interrupt it cancels the job (exit 3)."""
    job = create_job(server, steps=1000, stepMs=50)
    w = watches(job, "--output", "plain", "--url", server.url, *(["--cancel-on-interrupt"] if cancel else []))
    wait_for(lambda: any("Simulating step" in line for line in w.out), 30, what="watch to show progress")
    w.proc.send_signal(signal.SIGINT)
    rc = w.wait_exit(15)
    status = get_job(server, job)["status"]
    if cancel:
        assert (rc, status) == (3, "cancelled"), w.stderr()
        assert re.search(rf"^cancelled: {job} cancelled", w.out[-1])
    else:
        assert (rc, status) == (130, "running"), w.stderr()
        assert w.out[-1].startswith(f"detached: {job} running")
        assert f"follow again: mangwale watch {job}" in w.stderr()


# --- exact transcripts -------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Replace what differs between runs: ids, epochs, timestamps and durations."""
    text = re.sub(r"job-\d+-[0-9a-f]{6}", "JOB", text)
    text = re.sub(r'"epoch":"[0-9a-f]+"', '"epoch":"E"', text)
    text = re.sub(r'"(timestamp|createdAt|updatedAt|startedAt|finishedAt)":\d+', r'"\1":T', text)
    text = re.sub(r'"seconds":[\d.]+', '"seconds":S', text)
    text = re.sub(r"seconds=[\d.]+", "seconds=S", text)
    text = re.sub(r" in \d+(\.\d+)? s\b", " in N s", text)
    return re.sub(r" in \d+(\.\d+)?s", " in Ns", text)


def finished_job(server: ServerProcess, **params: Any) -> str:
    job = create_job(server, **params)
    wait_for(lambda: finished(server, job), what="the job to end")
    return job


def test_plain_output_exact(server: ServerProcess) -> None:
    """Plain mode: one line per change, the whole history, a summary line; no ANSI codes, notices on stderr."""
    job = finished_job(server, steps=3, stepMs=50)
    r = mangwale("watch", job, "--url", server.url)  # stdout is a pipe: plain by default
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout + r.stderr
    assert normalize(r.stdout) == (
        "JOB  queued      0%  created (simulate)\n"
        "JOB  running     0%  Starting...\n"
        "JOB  running    33%  Simulating step 1/3  (eta 0.1s)\n"
        "JOB  running    67%  Simulating step 2/3  (eta 0.1s)\n"
        "JOB  running    99%  Simulating step 3/3  (eta 0.0s)\n"
        "JOB  succeeded 100%  Training completed\n"
        "finished: JOB succeeded in Ns [steps=3, seconds=S]; exit 0\n"
    )
    assert r.stderr == "mangwale: connection: live\n"


def test_github_actions_output_exact(server: ServerProcess) -> None:
    """With GITHUB_ACTIONS=true the job's lines are folded in ::group:: and a failure becomes ::error::."""
    job = finished_job(server, steps=3, stepMs=20, failAt=2)
    r = mangwale("watch", job, "--output", "plain", "--url", server.url, env=client_env(GITHUB_ACTIONS="true"))
    assert r.returncode == 1, r.stderr
    assert normalize(r.stdout) == (
        "::group::JOB (simulate)\n"
        "JOB  queued      0%  created (simulate)\n"
        "JOB  running     0%  Starting...\n"
        "JOB  running    33%  Simulating step 1/3  (eta 0.0s)\n"
        "JOB  failed     33%  Training failed: simulated failure at step 2 of 3\n"
        "::endgroup::\n"
        "::error title=mangwale job failed::JOB failed: simulated failure at step 2 of 3\n"
        "finished: JOB failed in Ns; exit 1\n"
    )


def test_json_output_exact(server: ServerProcess) -> None:
    """JSON mode: the job's events exactly as the server logged them, then one summary line."""
    job = finished_job(server, steps=2, stepMs=20)
    r = mangwale("watch", job, "--json", "--url", server.url)
    assert r.returncode == 0, r.stderr
    logged = "\n".join(json.dumps(e, separators=(",", ":"), ensure_ascii=False) for e in server_events(server, job))
    assert r.stdout.startswith(logged + "\n")  # byte for byte what the server sent
    # The job document inside job_created belongs to the REST contract (checked byte for byte
    # above); here only its id and params are pinned.
    first, rest = r.stdout.split("\n", 1)
    created = json.loads(first)
    assert (created["job"]["id"], created["job"]["params"]) == (job, {"steps": 2, "stepMs": 20})
    created["job"] = "DOC"
    assert normalize(json.dumps(created, separators=(",", ":")) + "\n" + rest).splitlines() == [
        '{"type":"job_created","jobId":"JOB","job":"DOC","timestamp":T,"seq":2,"epoch":"E","jobSeq":1}',
        '{"type":"training_update","jobId":"JOB","status":"running","progress":0,"message":"Starting...","attempt":1,"timestamp":T,"seq":3,"epoch":"E","jobSeq":2}',
        '{"type":"job_log","jobId":"JOB","stream":"stdout","line":"simulating 2 steps of 20 ms","lineNo":1,"attempt":1,"timestamp":T,"seq":4,"epoch":"E"}',
        '{"type":"training_update","jobId":"JOB","status":"running","progress":50.0,"message":"Simulating step 1/2","attempt":1,"timestamp":T,"eta":0.02,"seq":5,"epoch":"E","jobSeq":3}',
        '{"type":"training_update","jobId":"JOB","status":"running","progress":99.0,"message":"Simulating step 2/2","attempt":1,"timestamp":T,"eta":0.0,"seq":6,"epoch":"E","jobSeq":4}',
        '{"type":"job_log","jobId":"JOB","stream":"stdout","line":"done: 2 steps in N s","lineNo":2,"attempt":1,"timestamp":T,"seq":7,"epoch":"E"}',
        '{"type":"training_update","jobId":"JOB","status":"succeeded","progress":100,"message":"Training completed","attempt":1,"timestamp":T,"metrics":{"steps":2,"seconds":S},"seq":8,"epoch":"E","jobSeq":5}',
        '{"type":"summary","jobs":{"JOB":{"status":"succeeded","progress":100.0,"attempt":1,"seconds":S,"error":null,"metrics":{"steps":2,"seconds":S}}},"exitCode":0,"reason":"finished"}',
    ]


# --- GitHub Actions step summary ---------------------------------------------------------------

EPOCH_TRAINER = """\
import json
for epoch in range(1, 4):
    metrics = {"epoch": epoch, "epochs": 3, "loss": round(1 / epoch, 4), "valAccuracy": round(0.5 + epoch / 10, 2)}
    print(json.dumps({"progress": 30 * epoch, "message": f"epoch {epoch}/3", "metrics": metrics}), flush=True)
"""


def test_github_step_summary(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """Under GITHUB_ACTIONS, watch appends to $GITHUB_STEP_SUMMARY each job's outcome and duration, its final metrics and its epoch curve."""
    (tmp_path / "epochs.py").write_text(EPOCH_TRAINER)
    config = tmp_path / "mangwale.toml"
    config.write_text(f'[trainers.epochs]\ncommand = [{json.dumps(sys.executable)}, "epochs.py"]\nrequires_dataset = false\n')
    server = server_factory(args=["--config", str(config)])
    with server.client() as c:
        ok = c.post("/training/jobs", json={"kind": "epochs"}).json()["id"]
    bad = create_job(server, steps=3, stepMs=10, failAt=2)
    summary = tmp_path / "step-summary.md"
    summary.write_text("earlier step\n")
    env = client_env(GITHUB_ACTIONS="true", GITHUB_STEP_SUMMARY=str(summary))
    r = mangwale("watch", ok, bad, "--json", "--url", server.url, env=env)
    assert r.returncode == 1, r.stderr
    text = re.sub(r"\| \d+(\.\d+)?s \|", "| Ns |", summary.read_text().replace(ok, "OK").replace(bad, "BAD"))
    assert text == (
        "earlier step\n"
        "### mangwale watch: 2 jobs, finished\n"
        "\n"
        "| job | kind | outcome | duration |\n"
        "|---|---|---|---|\n"
        "| `OK` | epochs | ✅ succeeded | Ns |\n"
        "| `BAD` | simulate | ❌ failed | Ns |\n"
        "\n"
        "#### `OK`: final metrics\n"
        "\n"
        "| metric | value |\n"
        "|---|---:|\n"
        "| epoch | 3 |\n"
        "| epochs | 3 |\n"
        "| loss | 0.3333 |\n"
        "| valAccuracy | 0.8 |\n"
        "\n"
        "#### `OK`: epoch curve\n"
        "\n"
        "| epoch | loss | valAccuracy |\n"
        "|---:|---:|---:|\n"
        "| 1 | 1 | 0.6 |\n"
        "| 2 | 0.5 | 0.7 |\n"
        "| 3 | 0.3333 | 0.8 |\n"
        "\n"
        "**`BAD` error:** simulated failure at step 2 of 3\n"
        "\n"
    )
    # Outside GitHub Actions nothing is written.
    r = mangwale("watch", ok, "--url", server.url, env=client_env(GITHUB_STEP_SUMMARY=str(summary)))
    assert r.returncode == 0 and summary.read_text().count("### mangwale watch") == 1


# --- a real terminal ---------------------------------------------------------------------------


class Tmux:
    """A private tmux server (its own socket) running one command in a fixed-size window."""

    def __init__(self, cmd: str, env: dict[str, str], width: int = 120, height: int = 12) -> None:
        self.sock = f"mw-{uuid.uuid4().hex[:8]}"
        subprocess.run(
            ["tmux", "-L", self.sock, "-f", "/dev/null", "new-session", "-d", "-x", str(width), "-y", str(height), cmd],
            env=env, check=True, timeout=10,
        )

    def screen(self) -> str:
        r = subprocess.run(["tmux", "-L", self.sock, "capture-pane", "-p"], capture_output=True, text=True, timeout=10, check=False)
        return r.stdout

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=10, check=False)


needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def row_of(screen: str, job: str) -> str:
    return next((line for line in screen.splitlines() if line.startswith(job + " ")), "")


def tty_env() -> dict[str, str]:
    return client_env(MANGWALE_BACKOFF_INITIAL="1", MANGWALE_BACKOFF_MAX="1", TERM="xterm-256color")


@needs_tmux
def test_tty_view_under_tmux_at_80_columns(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """On an 80-column terminal: a bar per job whose id, status and percent stay whole (the step text gives way), the connection badge, the attempt after a re-run, then the final state."""
    server = server_factory(args=ONE_SLOT)
    job, release = blocked_job(server, steps=25, stepMs=80)
    rc_file = tmp_path / "rc"
    cmd = f"{sys.executable} -m mangwale_cli watch {job} --url {server.url}; echo $? > {rc_file}; sleep 60"
    tmux = Tmux(cmd, tty_env(), width=80)
    try:
        queued = wait_for(lambda: (s := tmux.screen()) and "● live" in s and " queued " in row_of(s, job) and s, 20,
                          what="the queued job")
        assert re.fullmatch(rf"{job} queued +━+ +0% +-", row_of(queued, job).rstrip()), queued
        release()
        running = wait_for(lambda: (s := tmux.screen()) and "eta" in row_of(s, job) and "Simul" in s and s, 20,
                           what="the live view")
        assert "● live" in running and "━" in running
        line = row_of(running, job)
        assert re.fullmatch(rf"{job} running +[━╸╺ ]+ +\d{{1,2}}% Simul\S*( \S+)* +\d\.\ds eta \d\.\ds", line.rstrip()), line
        assert len(line.rstrip()) <= 80
        server.kill()
        down = wait_for(lambda: (s := tmux.screen()) and "reconnecting in" in s and s, 10, what="the reconnect badge")
        assert re.search(r"● reconnecting in [\d.]+ s, attempt \d+", down), down
        server.start()
        again = wait_for(lambda: (s := tmux.screen()) and "attempt 2" in row_of(s, job) and s, 30, what="the second attempt")
        assert re.match(rf"{job} (running|succeeded) +[━╸╺ ]+ +\d{{1,3}}% attempt 2", row_of(again, job))
        wait_for(rc_file.exists, 30, what="watch to exit")
        final = tmux.screen()
        assert final.startswith("● done  ")
        assert re.match(rf"{job} succeeded +━+ 100% attempt 2", row_of(final, job)), final
        assert f"finished: {job} succeeded in" in final
        assert rc_file.read_text().strip() == "0"
    finally:
        tmux.close()


@needs_tmux
def test_tty_ctrl_c_says_detached(server: ServerProcess, tmp_path: Path) -> None:
    """Ctrl-C on a terminal: the badge says the watch detached and the job keeps running, never "done"."""
    job = create_job(server, steps=300, stepMs=50)
    rc_file = tmp_path / "rc"
    cmd = f"{sys.executable} -m mangwale_cli watch {job} --url {server.url}; echo $? > {rc_file}; sleep 60"
    tmux = Tmux(cmd, tty_env(), width=80)
    try:
        wait_for(lambda: "Simul" in row_of(tmux.screen(), job), 20, what="the live view")
        subprocess.run(["tmux", "-L", tmux.sock, "send-keys", "C-c"], check=True, timeout=10)
        wait_for(rc_file.exists, 15, what="watch to exit")
        screen = tmux.screen()
        assert screen.startswith("● detached (the job keeps running)  "), screen
        assert "done" not in screen
        assert re.search(rf"^detached: {job} running \d+%; exit 130$", screen, re.MULTILINE), screen
        assert rc_file.read_text().strip() == "130" and get_job(server, job)["status"] == "running"
    finally:
        tmux.close()


@needs_tmux
def test_tty_unknown_job_is_one_line(server: ServerProcess, tmp_path: Path) -> None:
    """On a terminal, an unknown job prints its one error line and nothing else."""
    rc_file = tmp_path / "rc"
    cmd = f"{sys.executable} -m mangwale_cli watch job-nope --url {server.url}; echo $? > {rc_file}; sleep 60"
    tmux = Tmux(cmd, tty_env(), width=80)
    try:
        wait_for(rc_file.exists, 15, what="watch to exit")
        assert tmux.screen().strip() == "mangwale: error: job job-nope not found"
        assert rc_file.read_text().strip() == "4"
    finally:
        tmux.close()
