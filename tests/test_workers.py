"""Remote workers (``mangwale worker``) against real servers on loopback: routing by labels and
kinds, fenced leases, kill -9, network cuts, server restarts, cancel, SIGTERM hand-back, and the
worker scope. Timings are shrunk through settings (lease, heartbeat, backoff)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerProcess, wait_for
from netproxy import NetProxy, netproxy  # noqa: F401 - a pytest fixture, used by name

LEASE = 2.0  # seconds: runner.lease for these servers
FAST = {"MANGWALE_RUNNER_LEASE": str(LEASE), "MANGWALE_RUNNER_SAMPLE_DATASET": "false"}
WORKER_ENV = {"MANGWALE_BACKOFF_INITIAL": "0.1", "MANGWALE_BACKOFF_MAX": "0.3",
              "MANGWALE_WATCH_PING_INTERVAL": "1", "MANGWALE_WATCH_PING_TIMEOUT": "1"}  # fmt: skip

# A command trainer that reports progress and writes its pid (to find orphans).
TRAINER = """\
import json, os, sys, time
steps = int(os.environ.get("STEPS", "40"))
with open(os.environ["PID_FILE"], "a") as f:
    f.write(f"{os.getpid()}\\n")
for i in range(1, steps + 1):
    time.sleep(0.1)
    print(json.dumps({"progress": 100 * i / steps, "message": f"step {i}/{steps}"}), flush=True)
"""


class WorkerProcess:
    """A real ``mangwale worker`` process."""

    def __init__(self, url: str, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.url = url
        self.log_path = tmp / f"worker-{time.monotonic_ns()}.log"
        self.args = list(args)
        self.env = {**os.environ, **WORKER_ENV, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []

    def start(self) -> WorkerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mangwale_cli", "worker", "--url", self.url, *self.args],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        threading.Thread(target=self._drain, daemon=True).start()
        wait_for(lambda: "registered with" in self.output() or self._dead(), 20, what="worker to register")
        assert not self._dead(), self.output()
        return self

    def _dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with open(self.log_path, "a") as f:
            for line in self.proc.stderr:
                self.log.append(line)
                f.write(line)

    def output(self) -> str:
        return "".join(self.log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 10) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def make(url: str, *args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        w = WorkerProcess(url, tmp_path, *args, env=env)
        started.append(w)
        return w.start()

    yield make
    for w in started:
        w.kill()


@pytest.fixture
def only_serves(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """``serve --concurrency 0`` on the embedded store: it runs no job itself."""
    return server_factory(env=FAST, args=["--concurrency", "0"])


def create(url: str, kind: str = "simulate", labels: list[str] | None = None, **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": kind, "params": params}
    if labels:
        body["labels"] = labels
    resp = httpx.post(url + "/training/jobs", json=body, timeout=10)
    assert resp.status_code == 201, resp.text
    return resp.json()


def job(url: str, job_id: str) -> dict[str, Any]:
    return httpx.get(f"{url}/training/jobs/{job_id}", timeout=10).json()


def wait_status(url: str, job_id: str, *statuses: str, timeout: float = 30) -> dict[str, Any]:
    return wait_for(lambda: (j := job(url, job_id))["status"] in statuses and j, timeout, 0.05,
                    f"job {job_id} to be {'/'.join(statuses)}")  # fmt: skip


def events(url: str, job_id: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/training/jobs/{job_id}/events", timeout=10).json()


def trainer_config(tmp_path: Path, steps: int = 40) -> tuple[Path, Path]:
    script = tmp_path / "train.py"
    script.write_text(TRAINER)
    pids = tmp_path / "pids.txt"
    config = tmp_path / "worker.toml"
    config.write_text(
        "[trainers.steps]\n"
        f"command = [{json.dumps(sys.executable)}, {json.dumps(str(script))}]\n"
        "requires_dataset = false\n"
        f"env = {{ PID_FILE = {json.dumps(str(pids))}, STEPS = \"{steps}\" }}\n"
    )
    return config, pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# --- routing -------------------------------------------------------------------------------------


def test_routing_by_labels_and_no_head_of_line_blocking(only_serves: ServerProcess, workers: Callable[..., WorkerProcess]) -> None:
    """serve --concurrency 0 with a cpu worker and a gpu worker: each labelled job runs on the
    worker with its labels, an unlabelled one anywhere, and a job no worker can run stays queued
    saying what it waits for, without holding up the jobs queued after it."""
    url = only_serves.url
    stuck = create(url, labels=["tpu"], steps=2, stepMs=10)
    assert stuck["message"] == "waiting for a worker with labels tpu"
    workers(url, "--label", "cpu", "--name", "cpu-box")
    workers(url, "--label", "gpu", "--label", "cuda", "--name", "gpu-box")
    gpu = create(url, labels=["gpu"], steps=3, stepMs=20)
    cpu = create(url, labels=["cpu"], steps=3, stepMs=20)
    anywhere = create(url, steps=3, stepMs=20)
    for j, where in ((gpu, "gpu-box"), (cpu, "cpu-box"), (anywhere, None)):
        done = wait_status(url, j["id"], "succeeded", "failed")
        assert done["status"] == "succeeded", done
        assert done["lease"] is None and (where is None or done["worker"] == where)
        updates = [e for e in events(url, j["id"]) if e["type"] == "training_update"]
        assert updates[-1]["status"] == "succeeded" and updates[-1]["worker"] == done["worker"]
        assert [e["jobSeq"] for e in events(url, j["id"]) if "jobSeq" in e] == list(range(1, done["jobSeq"] + 1))
    assert job(url, stuck["id"])["status"] == "queued"
    shown = subprocess.run([sys.executable, "-m", "mangwale_cli", "jobs", "show", gpu["id"], "--url", url],
                           capture_output=True, text=True, timeout=30, check=False, env={**os.environ, "COLUMNS": "100"})  # fmt: skip
    assert shown.returncode == 0 and "worker    gpu-box" in shown.stdout and "labels    gpu" in shown.stdout, shown
    listed = httpx.get(url + "/workers", timeout=5).json()
    assert sorted(w["name"] for w in listed) == ["cpu-box", "gpu-box"]
    gpu_box = next(w for w in listed if w["name"] == "gpu-box")
    assert gpu_box["labels"] == ["cuda", "gpu"] and "simulate" in gpu_box["kinds"] and gpu_box["state"] == "up"
    assert "python" in gpu_box["versions"] and gpu_box["lastHeartbeat"] > 0


def test_a_kind_only_workers_provide(only_serves: ServerProcess, workers: Callable[..., WorkerProcess], tmp_path: Path) -> None:
    """A [trainers.*] kind from a worker's own config is accepted by POST and listed in
    GET /training/kinds while the worker is registered; its job runs there, in a child process."""
    url = only_serves.url
    refused = httpx.post(url + "/training/jobs", json={"kind": "steps"}, timeout=5)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "unknown_kind"
    config, _ = trainer_config(tmp_path, steps=5)
    workers(url, "--config", str(config), "--name", "cmd-box")
    kinds = [k["kind"] for k in httpx.get(url + "/training/kinds", timeout=5).json()]
    assert "steps" in kinds
    j = create(url, "steps")
    done = wait_status(url, j["id"], "succeeded", "failed")
    assert done["status"] == "succeeded" and done["worker"] == "cmd-box", done
    logs = httpx.get(f"{url}/training/jobs/{j['id']}/logs", timeout=5).json()
    assert logs == [] or all(e["attempt"] == 1 for e in logs)


# --- cancel, SIGTERM, kill -9 ---------------------------------------------------------------------


def test_cancel_reaches_the_worker_within_a_second(only_serves: ServerProcess, workers: Callable[..., WorkerProcess],
                                                   tmp_path: Path) -> None:  # fmt: skip
    """jobs cancel of a job a worker runs: recorded at once, and the trainer's process is gone
    within 1 s."""
    url = only_serves.url
    config, pids = trainer_config(tmp_path, steps=400)
    workers(url, "--config", str(config))
    j = create(url, "steps")
    wait_for(lambda: job(url, j["id"])["progress"] > 0, 20, what="progress")
    pid = int(pids.read_text().split()[0])
    t0 = time.monotonic()
    resp = httpx.post(f"{url}/training/jobs/{j['id']}/cancel", timeout=10)
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    wait_for(lambda: not alive(pid), 1.0, 0.01, "the trainer to be killed")
    elapsed = time.monotonic() - t0
    print(f"cancel -> trainer gone: {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0
    time.sleep(0.3)
    assert job(url, j["id"])["status"] == "cancelled"


def test_sigterm_hands_jobs_back_and_kill_9_leaves_no_trainer(only_serves: ServerProcess,
                                                              workers: Callable[..., WorkerProcess], tmp_path: Path) -> None:  # fmt: skip
    """SIGTERM of a worker re-queues its job at once (not after the lease); the next worker
    takes it, and kill -9 of that one leaves no trainer behind; the job then finishes on a
    third worker as a later attempt, and a watcher sees each event once."""
    url = only_serves.url
    config, pids = trainer_config(tmp_path, steps=30)
    first = workers(url, "--config", str(config), "--name", "first")
    j = create(url, "steps")
    wait_for(lambda: job(url, j["id"])["progress"] > 0, 20, what="progress")
    t0 = time.monotonic()
    assert first.proc is not None
    first.proc.send_signal(signal.SIGTERM)
    back = wait_status(url, j["id"], "queued", timeout=10)
    print(f"SIGTERM -> job re-queued: {(time.monotonic() - t0) * 1000:.0f} ms")
    assert "handed it back" in back["message"]  # not "stopped renewing its lease": it did not wait for it
    assert first.proc.wait(10) == 0
    second = workers(url, "--config", str(config), "--name", "second")
    wait_for(lambda: (x := job(url, j["id"]))["attempt"] == 2 and x["progress"] > 0, 20, what="attempt 2")
    pid = int(pids.read_text().split()[-1])
    assert alive(pid)
    second.kill()
    t_kill = time.monotonic()
    wait_for(lambda: not alive(pid), 5, 0.02, "no orphan trainer after kill -9")
    workers(url, "--config", str(config), "--name", "third")
    wait_for(lambda: job(url, j["id"])["attempt"] == 3, LEASE * 3, 0.05, "attempt 3 after the lease")
    requeued_after = time.monotonic() - t_kill
    print(f"kill -9 -> attempt 3 started: {requeued_after:.2f} s (lease {LEASE} s)")
    done = wait_status(url, j["id"], "succeeded", "failed")
    assert done["status"] == "succeeded" and done["worker"] == "third" and done["attempt"] == 3
    evs = events(url, j["id"])
    assert [e["jobSeq"] for e in evs if "jobSeq" in e] == list(range(1, done["jobSeq"] + 1))
    assert len({e["seq"] for e in evs}) == len(evs)
    assert sum(e["type"] == "training_update" and e["status"] == "succeeded" for e in evs) == 1
    assert not any(alive(int(p)) for p in pids.read_text().split())


# --- leases and fencing at the protocol level ---------------------------------------------------


class FakeWorker:
    """A worker speaking the protocol by hand, to send what a real one would not."""

    def __init__(self, server: ServerProcess, name: str, token: str | None = None, again: FakeWorker | None = None,
                 running: dict[str, int] | None = None) -> None:  # fmt: skip
        from websockets.sync.client import connect

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.ws = connect(f"ws://127.0.0.1:{server.port}/ws/workers", additional_headers=headers).__enter__()
        who = {"id": again.id, "secret": again.registered["secret"]} if again is not None else {}
        self.ws.send(json.dumps({"type": "register", "name": name, "concurrency": 1, "running": running or {},
                                 "kinds": [{"kind": "simulate", "requiresDataset": False}], **who}))  # fmt: skip
        self.registered = self.recv("registered")
        self.id = self.registered["id"]

    def recv(self, kind: str, timeout: float = 10) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(max(0.01, end - time.monotonic())))
            if msg["type"] == kind:
                return msg

    def report(self, job_id: str, token: int, n: int, what: str, **fields: Any) -> dict[str, Any]:
        self.ws.send(json.dumps({"type": "report", "jobId": job_id, "token": token, "n": n, "what": what, **fields}))
        while True:
            msg = json.loads(self.ws.recv(10))
            if msg["type"] in ("ack", "refused", "error"):
                return msg

    def close(self) -> None:
        self.ws.close()


def test_a_stale_workers_late_succeeded_is_refused(only_serves: ServerProcess) -> None:
    """A worker that stops renewing loses its lease: the job is re-queued as the next attempt,
    another worker takes it, and the first one's late succeeded (and any report for a job it
    does not hold, whatever token it names) is refused with 409 and changes nothing."""
    url = only_serves.url
    a = FakeWorker(only_serves, "stale")
    j = create(url, steps=2, stepMs=10)
    offer = a.recv("offer")
    assert offer["job"]["id"] == j["id"] and offer["lease"] == {"holder": f"worker:{a.id}", "token": 1}
    assert a.report(j["id"], 1, 1, "progress", progress=50, message="half")["type"] == "ack"
    assert a.report(j["id"], 1, 1, "progress", progress=50, message="half")["type"] == "ack"  # a resend
    a.close()  # cut off: no more heartbeats
    t0 = time.monotonic()
    requeued = wait_status(url, j["id"], "queued", timeout=LEASE * 3)
    print(f"lease expired -> re-queued: {time.monotonic() - t0:.2f} s (lease {LEASE} s)")
    assert "stopped renewing its lease" in requeued["message"] and requeued["attempt"] == 1
    b = FakeWorker(only_serves, "fresh")
    assert b.recv("offer")["lease"] == {"holder": f"worker:{b.id}", "token": 2}
    a = FakeWorker(only_serves, "stale", again=a, running={j["id"]: 1})  # back, as the same worker
    assert a.registered["running"] == {j["id"]: False}
    late = a.report(j["id"], 1, 2, "finish", status="succeeded", metrics={"accuracy": 1.0})
    assert late["type"] == "refused" and late["status"] == 409 and late["code"] == "stale"
    stolen = a.report(j["id"], 2, 3, "finish", status="succeeded")  # the right token, not its lease
    assert stolen["type"] == "refused" and stolen["status"] == 409
    assert job(url, j["id"])["status"] == "running"
    assert b.report(j["id"], 2, 1, "finish", status="succeeded", metrics={"steps": 2})["type"] == "ack"
    done = job(url, j["id"])
    assert done["status"] == "succeeded" and done["worker"] == "fresh" and done["metrics"] == {"steps": 2}
    updates = [e for e in events(url, j["id"]) if e["type"] == "training_update"]
    assert [u["progress"] for u in updates if u["attempt"] == 1 and u["status"] == "running"] == [0, 50]
    assert sum(u["status"] == "succeeded" for u in updates) == 1
    a.close()
    b.close()


# --- network cuts and server restarts --------------------------------------------------------------


def test_a_cut_shorter_than_the_lease_loses_nothing(server_factory: Callable[..., ServerProcess],
                                                    workers: Callable[..., WorkerProcess],
                                                    netproxy: Callable[[int], NetProxy]) -> None:  # noqa: F811 - the fixture imported above  # fmt: skip
    """While the link is dead for less than the lease, the worker holds its reports; after it
    reconnects they arrive once each, in order, and the job finishes as attempt 1."""
    server = server_factory(env={**FAST, "MANGWALE_RUNNER_LEASE": "5"}, args=["--concurrency", "0"])
    proxy = netproxy(server.port)
    workers(proxy.url)
    j = create(server.url, steps=40, stepMs=50)
    wait_for(lambda: job(server.url, j["id"])["progress"] >= 10, 20, what="progress")
    proxy.blackhole()
    time.sleep(1.5)
    proxy.cut()
    proxy.restore()
    done = wait_status(server.url, j["id"], "succeeded", "failed", "queued")
    assert done["status"] == "succeeded" and done["attempt"] == 1, done
    updates = [e for e in events(server.url, j["id"]) if e["type"] == "training_update"]
    progress = [u["progress"] for u in updates if u["status"] == "running"]
    assert progress == sorted(progress) and len(progress) == len(set(progress)), progress
    assert progress[-1] >= 97  # every step arrived: 2.5 %, 5 %, ... (the last report says 99)
    assert len(progress) == 41  # the start, then one per step
    logs = httpx.get(f"{server.url}/training/jobs/{j['id']}/logs", timeout=5).json()
    assert [e["lineNo"] for e in logs] == list(range(1, len(logs) + 1))


def test_a_cut_longer_than_the_lease_requeues_the_job(only_serves: ServerProcess, workers: Callable[..., WorkerProcess],
                                                      netproxy: Callable[[int], NetProxy]) -> None:  # noqa: F811 - the fixture imported above  # fmt: skip
    """A worker cut off for longer than the lease stops its trainer; the server re-queues the job
    as the next attempt, which runs (here, on the same worker once it is back) to the end."""
    proxy = netproxy(only_serves.port)
    workers(proxy.url, "--name", "far")
    url = only_serves.url
    j = create(url, steps=60, stepMs=50)
    wait_for(lambda: job(url, j["id"])["progress"] > 0, 20, what="progress")
    proxy.blackhole()
    requeued = wait_status(url, j["id"], "queued", timeout=LEASE * 3)
    assert "stopped renewing its lease during attempt 1" in requeued["message"]
    proxy.cut()
    proxy.restore()
    done = wait_status(url, j["id"], "succeeded", "failed")
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    finals = [e for e in events(url, j["id"]) if e["type"] == "training_update" and e["status"] == "succeeded"]
    assert len(finals) == 1 and finals[0]["attempt"] == 2


def test_a_server_restart_does_not_stop_remote_training(only_serves: ServerProcess, workers: Callable[..., WorkerProcess],
                                                        tmp_path: Path) -> None:  # fmt: skip
    """SIGTERM and then kill -9 of the server while a worker trains: start-up leaves the job to
    its worker, which reconnects and carries on; it succeeds as attempt 1."""
    only_serves.stop()
    only_serves.env["MANGWALE_RUNNER_LEASE"] = "8"  # longer than a restart takes on a busy machine
    only_serves.start()
    url = only_serves.url
    config, pids = trainer_config(tmp_path, steps=60)
    workers(url, "--config", str(config))
    j = create(url, "steps")
    wait_for(lambda: job(url, j["id"])["progress"] > 0, 20, what="progress")
    pid = int(pids.read_text().split()[0])
    assert only_serves.stop() == 0
    only_serves.start()
    assert job(url, j["id"])["status"] == "running"
    wait_for(lambda: job(url, j["id"])["progress"] > 20, 20, what="progress after the restart")
    only_serves.restart()  # kill -9
    done = wait_status(url, j["id"], "succeeded", "failed", "queued")
    assert done["status"] == "succeeded" and done["attempt"] == 1, done
    assert pids.read_text().split() == [str(pid)]  # the one trainer ran throughout


LOGGING_TRAINER = """\
import json, os, time
steps = int(os.environ.get("STEPS", "40"))
for i in range(1, steps + 1):
    time.sleep(0.05)
    print(f"working on step {i}", flush=True)
    print(json.dumps({"progress": 100 * i / steps, "message": f"step {i}/{steps}"}), flush=True)
"""


def test_a_report_resent_after_a_restart_is_written_once(server_factory: Callable[..., ServerProcess],
                                                         workers: Callable[..., WorkerProcess], tmp_path: Path) -> None:  # fmt: skip
    """The server dies (kill -9, a crash point) right after writing a worker's report and before
    acknowledging it. The worker sends that report again to the restarted server, which knows it
    from the job record (or the log line) and acknowledges it without writing it twice: every
    progress update and every log line of the job is there once."""
    server = server_factory(env={**FAST, "MANGWALE_RUNNER_LEASE": "8", "MANGWALE_FAULT": "worker-report-written:12"},
                            args=["--concurrency", "0"])  # fmt: skip
    script = tmp_path / "train.py"
    script.write_text(LOGGING_TRAINER)
    config = tmp_path / "worker.toml"
    config.write_text(f"[trainers.steps]\ncommand = [{json.dumps(sys.executable)}, {json.dumps(str(script))}]\n"
                      "requires_dataset = false\nenv = { STEPS = \"30\" }\n")  # fmt: skip
    workers(server.url, "--config", str(config))
    j = create(server.url, "steps")
    assert server.proc is not None
    assert server.proc.wait(30) == -9  # the 12th report was written, its ack never sent
    del server.env["MANGWALE_FAULT"]
    server.start()
    done = wait_status(server.url, j["id"], "succeeded", "failed", timeout=60)
    assert done["status"] == "succeeded" and done["attempt"] == 1, done
    steps = [e["message"] for e in events(server.url, j["id"]) if e["type"] == "training_update" and e["status"] == "running"
             and e.get("message", "").startswith("step ")]  # fmt: skip
    assert steps == [f"step {i}/30" for i in range(1, 31)], steps
    lines = [e["line"] for e in httpx.get(f"{server.url}/training/jobs/{j['id']}/logs", timeout=10).json()]
    assert lines == [f"working on step {i}" for i in range(1, 31)], lines


# --- the worker scope ------------------------------------------------------------------------------


def test_the_worker_scope_takes_jobs_and_nothing_else(server_factory: Callable[..., ServerProcess],
                                                      workers: Callable[..., WorkerProcess], tmp_path: Path) -> None:  # fmt: skip
    """A worker token runs jobs through /ws/workers and reads what its jobs need, and is refused
    (403) everywhere else: listing and creating jobs, the event stream, datasets; a read or
    write token cannot act as a worker; a worker asking for a dataset of a job it does not hold
    gets 409."""
    from tokentools import new_token, write_config
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    keys = {"box": new_token(), "ci": new_token()}
    cfg = write_config(tmp_path / "auth.toml", {"box": (keys["box"], ["worker"]), "ci": (keys["ci"], ["read", "write"])})
    server = server_factory(env=FAST, args=["--concurrency", "0", "--config", str(cfg)])
    url = server.url
    box = {"Authorization": f"Bearer {keys['box']}"}
    ci = {"Authorization": f"Bearer {keys['ci']}"}
    for method, path in (("GET", "/training/jobs"), ("POST", "/training/jobs"), ("GET", "/training/datasets"),
                         ("GET", "/training/events"), ("GET", "/workers"), ("GET", "/metrics"),
                         ("POST", "/training/jobs/prune")):  # fmt: skip
        resp = httpx.request(method, url + path, headers=box, json={}, timeout=5)
        assert resp.status_code == 403, (method, path, resp.status_code)
        assert resp.json()["error"]["code"] == "insufficient_scope"
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{server.port}/ws/training", additional_headers=box).__enter__()
    assert refused.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{server.port}/ws/workers", additional_headers=ci).__enter__()
    assert refused.value.response.status_code == 403
    assert httpx.get(url + "/workers", headers=ci, timeout=5).status_code == 200

    ds = httpx.post(url + "/training/datasets", headers=ci, timeout=5,
                    json={"name": "d", "examples": [{"text": "hi", "intent": "greet"}]}).json()  # fmt: skip
    other = httpx.post(url + "/training/jobs", headers=ci, json={"kind": "simulate", "datasetId": ds["id"]}, timeout=5).json()
    fake = FakeWorker(server, "probe", token=keys["box"])
    offer = fake.recv("offer")
    assert offer["job"]["id"] == other["id"]
    secret = {"X-Mangwale-Worker-Secret": fake.registered["secret"], **box}
    got = httpx.get(f"{url}/workers/{fake.id}/jobs/{other['id']}/dataset", headers=secret, timeout=5)
    assert got.status_code == 200 and got.json()["id"] == ds["id"]
    assert fake.report(other["id"], 1, 1, "finish", status="succeeded")["type"] == "ack"
    after = httpx.get(f"{url}/workers/{fake.id}/jobs/{other['id']}/dataset", headers=secret, timeout=5)
    assert after.status_code == 409 and after.json()["error"]["code"] == "stale"
    wrong = httpx.get(f"{url}/workers/{fake.id}/jobs/{other['id']}/dataset", timeout=5,
                      headers={**box, "X-Mangwale-Worker-Secret": "0" * 64})  # fmt: skip
    assert wrong.status_code == 401
    fake.close()

    workers(url, "--token", keys["box"], "--name", "scoped")
    j = httpx.post(url + "/training/jobs", headers=ci, json={"kind": "simulate", "params": {"steps": 2, "stepMs": 10}},
                   timeout=5).json()  # fmt: skip
    done = wait_for(lambda: (x := httpx.get(f"{url}/training/jobs/{j['id']}", headers=ci, timeout=5).json())["status"]
                    == "succeeded" and x, 20, what="the job to succeed")  # fmt: skip
    assert done["worker"] == "scoped"


# --- two Redis instances -----------------------------------------------------------------------------


def test_redis_killing_the_instance_that_handed_the_job_out(server_factory: Callable[..., ServerProcess],
                                                            redis_server: Any, workers: Callable[..., WorkerProcess],
                                                            netproxy: Callable[[int], NetProxy], tmp_path: Path) -> None:  # noqa: F811 - the fixture imported above  # fmt: skip
    """Two instances on one Redis, neither running jobs itself; a gpu worker reaches them through
    a proxy (a load balancer). kill -9 of the instance that handed out its job does not disturb
    the worker: it reconnects through the balancer to the other instance and the job succeeds
    as attempt 1; a job for labels no worker has stays queued meanwhile, and the next gpu job runs."""
    env = {**FAST, "MANGWALE_RUNNER_LEASE": "4", "MANGWALE_STORE_TIMEOUT": "1"}
    a, b = (server_factory(data_dir=tmp_path / "shared", env=env, args=["--store", redis_server.url, "--concurrency", "0"])
            for _ in range(2))  # fmt: skip
    balancer = netproxy(a.port)
    config, pids = trainer_config(tmp_path, steps=50)
    workers(balancer.url, "--label", "gpu", "--config", str(config), "--name", "gpu-box")
    stuck = create(a.url, "steps", labels=["tpu"])
    j = create(b.url, "steps", labels=["gpu"])
    wait_for(lambda: job(b.url, j["id"])["progress"] > 0, 20, what="progress")
    assert job(b.url, j["id"])["worker"] == "gpu-box"
    a.kill()
    balancer.target = ("127.0.0.1", b.port)
    balancer.cut()
    done = wait_status(b.url, j["id"], "succeeded", "failed", "queued", timeout=40)
    assert done["status"] == "succeeded" and done["attempt"] == 1, done
    assert len(pids.read_text().split()) == 1
    evs = events(b.url, j["id"])
    assert [e["jobSeq"] for e in evs if "jobSeq" in e] == list(range(1, done["jobSeq"] + 1))
    nxt = create(b.url, "steps", labels=["gpu"])
    assert wait_status(b.url, nxt["id"], "succeeded", "failed")["status"] == "succeeded"
    assert job(b.url, stuck["id"])["status"] == "queued"


def test_redis_queue_entries_go_when_only_workers_run_jobs(server_factory: Callable[..., ServerProcess],
                                                          redis_server: Any, workers: Callable[..., WorkerProcess],
                                                          tmp_path: Path) -> None:  # fmt: skip
    """Every instance at --concurrency 0 on Redis: no runner ever reads the job queue. The entry of
    each job a worker starts, and of a job cancelled while queued, is deleted as it goes, so the
    stream, its index and the queue depth do not grow with every job ever created; the entry of
    a job still waiting for a taker stays."""
    import redis

    a = server_factory(data_dir=tmp_path / "a", env=FAST, args=["--store", redis_server.url, "--concurrency", "0"])
    config, _ = trainer_config(tmp_path, steps=2)
    workers(a.url, "--config", str(config))
    ran = [create(a.url, "steps")["id"] for _ in range(4)]
    for job_id in ran:
        assert wait_status(a.url, job_id, "succeeded", "failed")["status"] == "succeeded"
    cancelled = create(a.url, "steps", labels=["tpu"])
    assert httpx.post(f"{a.url}/training/jobs/{cancelled['id']}/cancel", timeout=10).json()["status"] == "cancelled"
    waiting = create(a.url, "steps", labels=["tpu"])
    r = redis.Redis.from_url(redis_server.url)
    try:
        assert r.xlen("mangwale:queue") == 1
        assert r.hgetall("mangwale:queue:entries").keys() == {waiting["id"].encode()}
    finally:
        r.close()
    metrics = httpx.get(f"{a.url}/metrics", timeout=10).text
    wait_for(lambda: "mangwale_runner_queue_jobs 1.0" in httpx.get(f"{a.url}/metrics", timeout=10).text, 10,
             what=f"the queue gauge to say 1: {[m for m in metrics.splitlines() if 'queue' in m]}")  # fmt: skip


def test_the_dispatcher_wakes_for_creates_requeues_and_ends_not_progress() -> None:
    """Each dispatch pass reads the whole queue, so a running job's progress (many a second) must
    not wake it; a create, a re-queue or an end must."""
    import asyncio
    from types import SimpleNamespace

    from mangwale_cli.eventlog import Record
    from mangwale_cli.wire import Job, JobStatus, dumps, job_created, job_log, training_update
    from mangwale_cli.workers import WorkerHub

    def woken(event: dict[str, Any], is_log: bool = False) -> bool:
        hub = SimpleNamespace(_wake=asyncio.Event())
        WorkerHub._on_events(hub, [Record(1, "job-1", None if is_log else 1, dumps(event), is_log)])  # type: ignore[arg-type]  # a namespace holding the one attribute _on_events uses stands in for the hub
        return hub._wake.is_set()

    job = Job(id="job-1", kind="simulate", dataset_id=None, message='said "status":"queued"')
    assert woken(job_created(job))
    for status in JobStatus:
        job.status = status
        assert woken(training_update(job)) is (status is not JobStatus.RUNNING), status
    assert not woken(job_log("job-1", "stdout", "x", 1, 1), is_log=True)


def test_dashboard_has_a_workers_panel(api: Any) -> None:
    """The dashboard ships a workers panel that reads GET /workers; with no worker the list is empty."""
    assert 'id="workers-card"' in api.get("/").text
    assert "api.workers()" in api.get("/static/workers.js").text
    assert api.get("/workers").json() == []


def test_watch_names_the_worker() -> None:
    """watch's step text says which worker runs a job ("on gpu-box: ..."), and nothing for a local run."""
    from mangwale_cli.cli.watchview import step_text
    from mangwale_cli.followitems import JobView

    v = JobView("job-1")
    v.apply_event({"type": "training_update", "status": "running", "progress": 40, "message": "step 4/10",
                   "attempt": 1, "worker": "gpu-box", "timestamp": 1})  # fmt: skip
    assert step_text(v) == "on gpu-box: step 4/10"
    v.apply_event({"type": "training_update", "status": "running", "progress": 10, "message": "step 1/10",
                   "attempt": 2, "worker": "cpu-box", "timestamp": 2})  # fmt: skip
    assert step_text(v) == "attempt 2 on cpu-box: step 1/10"
    v.apply_event({"type": "training_update", "status": "running", "progress": 10, "message": "step 1/10",
                   "attempt": 3, "timestamp": 3})  # fmt: skip
    assert step_text(v) == "attempt 3: step 1/10"


def test_workers_list_states_and_forget_after(api: Any) -> None:
    """GET /workers shows a registered worker as up; once its connection is gone it is lost, and a
    sweep after workers.forget_after drops it. A bad first message closes with 4400; an id the
    server did not issue with 4401."""
    from starlette.websockets import WebSocketDisconnect

    hub = api.app.state.service.hub
    register = {"type": "register", "name": "box", "labels": ["gpu"], "concurrency": 2,
                "kinds": [{"kind": "simulate", "requiresDataset": False}], "versions": {"python": "3"}}  # fmt: skip
    with api.websocket_connect("/ws/workers") as ws:
        ws.send_text(json.dumps(register))
        reg = json.loads(ws.receive_text())
        assert reg["type"] == "registered" and reg["id"].startswith("wk-") and reg["lease"] > reg["heartbeat"] > 0
        (row,) = api.get("/workers").json()
        assert row["id"] == reg["id"] and row["state"] == "up" and row["labels"] == ["gpu"] and row["concurrency"] == 2
        ws.send_text(json.dumps({"type": "heartbeat", "jobs": {"job-x": 1}}))
        assert json.loads(ws.receive_text()) == {"type": "renewed", "jobs": {"job-x": False}}
        ws.send_text("{not json")
        assert json.loads(ws.receive_text())["type"] == "error"
    assert api.get("/workers").json()[0]["state"] == "lost"
    hub.forget_after = 0
    api.portal.call(hub.sweep)
    assert api.get("/workers").json() == []
    with api.websocket_connect("/ws/workers") as ws:
        ws.send_text(json.dumps({"type": "heartbeat"}))
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
            ws.receive_text()
        assert closed.value.code == 4400
    with api.websocket_connect("/ws/workers") as ws:
        ws.send_text(json.dumps({**register, "id": "wk-1-abcdef", "secret": "0" * 64}))
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
            ws.receive_text()
        assert closed.value.code == 4401


# --- connecting: a wrong URL, a refused token, a server that went away ------------------------------


def run_worker(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **WORKER_ENV, **(env or {})}
    full.pop("MANGWALE_URL", None)
    return subprocess.run([sys.executable, "-m", "mangwale_cli", "worker", *args], env=full, capture_output=True,
                          text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)  # fmt: skip


def test_a_worker_that_never_reaches_its_server_exits_8() -> None:
    """Nothing listens at --url: the worker exits 8 once --connect-timeout (or
    MANGWALE_CONNECT_TIMEOUT) has passed, with one line on stderr and no traceback."""
    from ports import free_port

    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = run_worker("--url", url, "--connect-timeout", "1")
    elapsed = time.monotonic() - t0
    assert r.returncode == 8, r.stderr
    assert r.stderr == (f"mangwale: error: cannot reach {url} within 1 s (--connect-timeout): "
                        "is `mangwale serve` running there? (last: connection refused)\n")  # fmt: skip
    assert elapsed < 10, elapsed  # 1 s of trying plus the interpreter's start-up (default: 30 s)
    r = run_worker("--url", url, env={"MANGWALE_CONNECT_TIMEOUT": "0.5"})
    assert r.returncode == 8 and r.stderr.count("\n") == 1 and "within 0.5 s" in r.stderr, r.stderr


def test_a_worker_with_a_bad_url_or_timeout_is_a_usage_error() -> None:
    """--url without a scheme or with another scheme, a --connect-timeout that is not a positive
    number and an unknown --log-level are one usage line and exit 2, as for the other commands."""
    cases = {
        ("--url", "localhost:8080"): "mangwale: error: --url 'localhost:8080' has no scheme: give http://HOST:PORT (did you mean http://localhost:8080?)\n",
        ("--url", "ftp://localhost:8080"): "mangwale: error: --url 'ftp://localhost:8080' is not an http:// or https:// URL: give http://HOST:PORT\n",
        ("--url", "http://127.0.0.1:1", "--connect-timeout", "0"): "mangwale: error: --connect-timeout must be a positive number of seconds, got 0\n",
        ("--url", "http://127.0.0.1:1", "--log-level", "loud"): "mangwale: error: --log-level must be one of critical, error, warning, info, debug, got 'loud'\n",
    }  # fmt: skip
    for args, line in cases.items():
        r = run_worker(*args)
        assert (r.returncode, r.stderr) == (2, line), (args, r.stderr)
    r = run_worker("--url", "http://127.0.0.1:1", env={"MANGWALE_CONNECT_TIMEOUT": "soon"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "MANGWALE_CONNECT_TIMEOUT" in r.stderr, r.stderr


def test_a_worker_with_a_refused_token_exits_5(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """A token the server does not know, or one without the worker scope: exit 5 at once, one line."""
    from tokentools import new_token, write_config

    reader = new_token()
    cfg = write_config(tmp_path / "auth.toml", {"ci": (reader, ["read", "write"])})
    server = server_factory(env=FAST, args=["--concurrency", "0", "--config", str(cfg)])
    for token in (new_token(), reader):
        r = run_worker("--url", server.url, "--token", token, "--connect-timeout", "20")
        assert r.returncode == 5, r.stderr
        [line] = [x for x in r.stderr.splitlines() if "error" in x.lower()]
        assert line.startswith("mangwale: error: the server refused this worker's token (HTTP 40"), r.stderr
        assert "Traceback" not in r.stderr and token not in r.stderr


def test_a_worker_keeps_reconnecting_to_a_server_it_reached(only_serves: ServerProcess,
                                                            workers: Callable[..., WorkerProcess]) -> None:  # fmt: skip
    """Once the server has answered, --connect-timeout no longer applies: a server that goes away
    for longer is waited for ("connection lost"), and the worker runs jobs again once it is back."""
    url = only_serves.url
    w = workers(url, "--connect-timeout", "0.5", "--name", "patient")
    only_serves.kill()
    wait_for(lambda: "connection lost" in w.output(), 10, what="the worker to notice")
    t_lost = time.monotonic()
    wait_for(lambda: time.monotonic() - t_lost > 1.5 and w.output().count("reconnect failed") >= 3, 10,
             what="several failed reconnects past --connect-timeout")  # fmt: skip
    assert w.proc is not None and w.proc.poll() is None, w.output()
    only_serves.start()
    wait_for(lambda: "connected again" in w.output(), 10, what="the worker to reconnect")
    j = create(url, steps=2, stepMs=10)
    done = wait_status(url, j["id"], "succeeded", "failed")
    assert done["status"] == "succeeded" and done["worker"] == "patient", done


# --- what a queued job waits for ---------------------------------------------------------------------


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **WORKER_ENV, "COLUMNS": "120"}
    env.pop("MANGWALE_URL", None)
    return subprocess.run([sys.executable, "-m", "mangwale_cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env=env, stdin=subprocess.DEVNULL)  # fmt: skip


GPU_WAIT = "waiting for a worker with labels gpu"


def test_a_queued_job_says_what_it_waits_for(only_serves: ServerProcess, workers: Callable[..., WorkerProcess],
                                            tmp_path: Path) -> None:  # fmt: skip
    """serve --concurrency 0 and a job labelled gpu: GET, jobs show, and watch (plain lines and
    --json) say it waits for a worker with labels gpu; a gpu worker joins and it runs. When the
    only gpu worker leaves, a queued gpu job says so again, in a training_update; one whose kind
    the next gpu worker does not run says that."""
    url = only_serves.url
    made = cli("jobs", "create", "simulate", "--label", "gpu", "-p", "steps=3", "-p", "stepMs=20", "-q", "--url", url)
    assert made.returncode == 0, made.stderr
    job_id = made.stdout.strip()
    assert job(url, job_id)["waitingFor"] == GPU_WAIT
    shown = cli("jobs", "show", job_id, "--url", url)
    assert shown.returncode == 0 and f"message   {GPU_WAIT}" in shown.stdout and "waits for" not in shown.stdout, shown
    env = {**os.environ, "MANGWALE_URL": url}
    outs = {mode: tmp_path / f"watch-{mode}.out" for mode in ("json", "plain")}
    watchers = {mode: subprocess.Popen([sys.executable, "-m", "mangwale_cli", "watch", job_id, "--output", mode],
                                       stdout=out.open("w"), stderr=subprocess.PIPE, text=True, env=env)
                for mode, out in outs.items()}  # fmt: skip
    wait_for(lambda: all(GPU_WAIT in out.read_text() for out in outs.values()), 20, what="both watches to say it waits")
    config, _ = trainer_config(tmp_path, steps=400)
    gpu = workers(url, "--label", "gpu", "--config", str(config), "--name", "gpu-box")
    for mode, proc in watchers.items():
        assert proc.wait(30) == 0, (mode, proc.stderr.read() if proc.stderr else "")
    lines = [json.loads(line) for line in outs["json"].read_text().splitlines()]
    assert lines[0]["type"] == "job_created" and lines[0]["job"]["waitingFor"] == GPU_WAIT
    assert lines[-1]["type"] == "summary" and lines[-1]["jobs"][job_id]["status"] == "succeeded"
    assert "waitingFor" not in lines[-1]["jobs"][job_id]
    plain = outs["plain"].read_text()
    assert f"{job_id}  queued      0%  created (simulate), {GPU_WAIT}\n" in plain and "succeeded" in plain, plain
    assert "waitingFor" not in job(url, job_id)

    # A gpu worker that is live but busy: nothing to wait for but room. It leaves: now it waits.
    long = create(url, "steps", labels=["gpu"])
    wait_status(url, long["id"], "running")
    nxt = create(url, labels=["gpu"], steps=2, stepMs=10)
    assert "waitingFor" not in job(url, nxt["id"]) and nxt["message"] is None
    assert gpu.terminate() == 0
    wait_for(lambda: job(url, nxt["id"]).get("waitingFor") == GPU_WAIT, 10, what="the job to say it waits again")
    wait_for(lambda: job(url, long["id"]).get("waitingFor") == GPU_WAIT, 10, what="the handed-back job to say it waits")
    shown = cli("jobs", "show", long["id"], "--url", url)  # re-queued: its message says why, a line what it waits for
    assert shown.returncode == 0 and f"waits for  {GPU_WAIT}" in shown.stdout and "handed it back" in shown.stdout, shown
    update = [e for e in events(url, nxt["id"]) if e["type"] == "training_update"][-1]
    assert update["status"] == "queued" and update["waitingFor"] == GPU_WAIT and update["message"] == GPU_WAIT
    workers(url, "--label", "gpu", "--name", "second")
    assert wait_status(url, nxt["id"], "succeeded", "failed")["status"] == "succeeded"
    # The handed-back job of a kind only the first worker ran: a gpu worker is back, not its kind.
    wait_for(lambda: job(url, long["id"]).get("waitingFor") == "waiting for a worker with labels gpu and kind steps", 10,
             what="the steps job to name its kind")  # fmt: skip


def test_a_queued_job_says_what_it_waits_for_on_a_shared_store(server_factory: Callable[..., ServerProcess],
                                                               redis_server: Any, workers: Callable[..., WorkerProcess],
                                                               tmp_path: Path) -> None:  # fmt: skip
    """Two instances on one Redis, a gpu worker connected to one: a gpu job queued through the
    other waits for nothing while that worker is live, busy or not; once it leaves, the job says
    it waits for a worker with labels gpu, through either instance."""
    env = {**FAST, "MANGWALE_STORE_TIMEOUT": "1"}
    a, b = (server_factory(data_dir=tmp_path / "shared", env=env, args=["--store", redis_server.url, "--concurrency", "0"])
            for _ in range(2))  # fmt: skip
    assert create(b.url, labels=["tpu"])["waitingFor"] == "waiting for a worker with labels tpu"
    config, _ = trainer_config(tmp_path, steps=400)
    gpu = workers(a.url, "--label", "gpu", "--config", str(config), "--name", "gpu-box")
    long = create(b.url, "steps", labels=["gpu"])
    wait_status(b.url, long["id"], "running")
    nxt = create(b.url, labels=["gpu"], steps=2, stepMs=10)
    wait_for(lambda: "waitingFor" not in job(b.url, nxt["id"]), 10, what="b to know of a's gpu worker")
    assert gpu.terminate() == 0
    for server in (a, b):
        wait_for(lambda s=server: job(s.url, nxt["id"]).get("waitingFor") == GPU_WAIT, 10, what="the job to say it waits")
    workers(b.url, "--label", "gpu", "--name", "second")
    assert wait_status(a.url, nxt["id"], "succeeded", "failed")["status"] == "succeeded"


def test_watch_says_what_a_requeued_job_waits_for() -> None:
    """watch's step text adds what a queued job waits for to its message, once, and drops it when the job runs."""
    from mangwale_cli.cli.watchview import step_text
    from mangwale_cli.followitems import JobView

    v = JobView("job-1")
    v.apply_doc({"status": "queued", "message": GPU_WAIT, "waitingFor": GPU_WAIT, "attempt": 0})
    assert step_text(v) == GPU_WAIT and v.summary()["waitingFor"] == GPU_WAIT
    v.apply_event({"type": "training_update", "status": "queued", "progress": 0, "attempt": 1, "timestamp": 1,
                   "message": "re-queued: worker gpu-box handed it back", "waitingFor": GPU_WAIT})  # fmt: skip
    assert step_text(v) == f"re-queued: worker gpu-box handed it back; {GPU_WAIT}"
    v.apply_event({"type": "training_update", "status": "running", "progress": 5, "attempt": 2, "timestamp": 2,
                   "message": "step 1/10", "waitingFor": GPU_WAIT})  # fmt: skip
    assert step_text(v) == "attempt 2: step 1/10" and "waitingFor" not in v.summary()


# --- fine-tune on a worker ---------------------------------------------------------------------------


def test_a_worker_runs_nlu_train_then_fine_tune(only_serves: ServerProcess, workers: Callable[..., WorkerProcess]) -> None:
    """A worker advertises fine-tune; it runs nlu-train, then a fine-tune of that model, fetching
    the base model over REST for the job it holds; the server predicts the new intent with the
    model the worker uploaded. Another worker asking for that base model is refused (409)."""
    from trainingdata import TIP_UTTERANCES

    from mangwale_cli.datafile import load_sample_examples

    url = only_serves.url
    box = workers(url, "--name", "nlu-box")
    listed = httpx.get(url + "/workers", timeout=5).json()
    assert "fine-tune" in listed[0]["kinds"]
    examples = load_sample_examples()
    base_ds = httpx.post(url + "/training/datasets", json={"name": "base", "examples": examples}, timeout=10).json()
    base = httpx.post(url + "/training/jobs", json={"kind": "nlu-train", "datasetId": base_ds["id"], "params": {"epochs": 2}},
                      timeout=10).json()  # fmt: skip
    done = wait_status(url, base["id"], "succeeded", "failed", timeout=60)
    assert done["status"] == "succeeded" and done["worker"] == "nlu-box", done
    tips = examples[::3] + [{"text": t, "intent": "tip_driver"} for t in TIP_UTTERANCES]
    ds = httpx.post(url + "/training/datasets", json={"name": "with-tips", "examples": tips}, timeout=10).json()
    tune = httpx.post(url + "/training/jobs", timeout=10,
                      json={"kind": "fine-tune", "datasetId": ds["id"], "params": {"baseJobId": base["id"], "epochs": 2}}).json()  # fmt: skip
    tuned = wait_status(url, tune["id"], "succeeded", "failed", timeout=60)
    assert tuned["status"] == "succeeded" and tuned["worker"] == "nlu-box", tuned
    assert tuned["metrics"]["baseJobId"] == base["id"] and tuned["metrics"]["newIntents"] == ["tip_driver"]
    assert "base model of " + base["id"] + " fetched" in box.output()
    tip = httpx.post(f"{url}/training/jobs/{tune['id']}/predict", json={"text": "please add a tip for my driver"}, timeout=30)
    assert tip.status_code == 200 and tip.json()["intent"] == "tip_driver", tip.text
    fake = FakeWorker(only_serves, "probe")
    refused = httpx.get(f"{url}/workers/{fake.id}/jobs/{tune['id']}/base-model", timeout=5,
                        headers={"X-Mangwale-Worker-Secret": fake.registered["secret"]})  # fmt: skip
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "stale"
    fake.close()


def test_waiting_for_names_what_is_missing() -> None:
    """The labels when no taker has them; the kind too when one has them but does not run it; the kind alone without labels."""
    from mangwale_cli.routing import waiting_for
    from mangwale_cli.wire import Job

    gpu_sim = (frozenset({"gpu"}), frozenset({"simulate"}))
    job = Job("j", "steps", None, labels=["gpu"])
    assert waiting_for(job, []) == GPU_WAIT
    assert waiting_for(job, [(frozenset({"cpu"}), frozenset({"steps"}))]) == GPU_WAIT
    assert waiting_for(job, [gpu_sim]) == "waiting for a worker with labels gpu and kind steps"
    assert waiting_for(Job("j", "steps", None), [gpu_sim]) == "waiting for a worker with kind steps"
    assert waiting_for(Job("j", "simulate", None), [gpu_sim]) is None
