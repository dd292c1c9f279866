"""Shared fixtures: an isolated MANGWALE_HOME, in-process apps, real ``mangwale serve`` processes
and private ``redis-server`` processes (tests/redisserver.py).

Timings are shrunk through settings (flush interval, keepalive, backoff), never by skipping
cases. ``wait_for`` polls a condition instead of sleeping and hoping.
"""

from __future__ import annotations

import json
import os
import re
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
from ports import free_port
from redisserver import RedisServer

from mangwale_cli.store.tinydb_store import Inspection, inspect

BANNER = re.compile(r"serving on (http://\S+) ")

# Tests press Ctrl-C (SIGINT) on the CLIs they start. A suite launched with SIGINT ignored (in
# the background of a non-interactive shell, under nohup) hands SIG_IGN down to every child, and
# a CLI that inherits it rightly never sees a Ctrl-C: watch and logs -f then run until killed.
# A handler here is reset to the default in each child at exec, as a terminal would have it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stored(data_dir: Path) -> Inspection:
    """What a data dir's record holds (jobs, datasets, kept events), read as start-up would,
    without changing anything; the server may be running or dead."""
    return inspect(data_dir)


def log_head(data_dir: Path) -> int:
    """The seq of the newest event in a data dir's log (a torn tail is ignored)."""
    return inspect(data_dir).head


def simulate_power_loss(data_dir: Path) -> None:
    """Make the next start see a machine that rebooted while the server ran (what a power loss
    looks like): it must start a new event epoch, as unsynced events may be gone."""
    run = data_dir / "run.json"
    doc = json.loads(run.read_text())
    run.write_text(json.dumps({**doc, "clean": False, "bootId": "another-boot"}))


FAST_ENV = {
    "MANGWALE_EVENTS_FSYNC_INTERVAL": "0.2",
    "MANGWALE_WS_PING_INTERVAL": "2",
    "MANGWALE_WS_PING_TIMEOUT": "2",
    "MANGWALE_SHUTDOWN_GRACE": "2",
    "MANGWALE_RUNNER_KILL_GRACE": "1",
    "MANGWALE_LOG_LEVEL": "info",
}


class ServerProcess:
    """A real ``mangwale serve`` on a fixed free port; restartable on the same data dir."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws/training"
        self.env = {**os.environ, **FAST_ENV, **(env or {})}
        self.env.pop("MANGWALE_URL", None)
        self.args = args or []
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        self._reader: threading.Thread | None = None

    @classmethod
    def for_module(cls, base: Path, args: list[str] | None = None) -> ServerProcess:
        """A started server for a module-scoped fixture. Such fixtures are set up before the
        per-test isolation, so the user's settings are scrubbed here instead."""
        server = cls(base / "data", args=args)
        for var in ("MANGWALE_CONFIG", "MANGWALE_TOKEN", "MANGWALE_DATA_DIR"):
            server.env.pop(var, None)
        server.env["MANGWALE_HOME"] = str(base / "home")
        return server.start()

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mangwale_cli", "serve",
            "--port", str(self.port), "--data-dir", str(self.data_dir), *self.args,
        ]

    def start(self, wait: bool = True) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.command(),
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._drain, args=(self.proc,), daemon=True)
        self._reader.start()
        if wait:
            self.wait_ready()
        return self

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        with open(self.log_path, "a") as f:
            for line in proc.stderr:
                self.log.append(line)
                f.write(line)
                f.flush()

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{''.join(self.log[-30:])}")
            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, 0.05, "server to answer /healthz")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """kill -9, and wait until the process is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        return self.proc.returncode

    def restart(self) -> ServerProcess:
        self.kill()
        return self.start()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)

    def output(self) -> str:
        return "".join(self.log)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own MANGWALE_HOME; no test sees the user's state or MANGWALE_URL."""
    monkeypatch.setenv("MANGWALE_HOME", str(tmp_path_factory.mktemp("home")))
    for var in ("MANGWALE_URL", "MANGWALE_TOKEN", "MANGWALE_CONFIG", "MANGWALE_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real servers; all are killed at the end of the test."""
    started: list[ServerProcess] = []

    def make(data_dir: Path | None = None, env: dict[str, str] | None = None, args: list[str] | None = None,
             start: bool = True) -> ServerProcess:
        s = ServerProcess(data_dir or tmp_path / f"data{len(started)}", env, args)
        started.append(s)
        return s.start() if start else s

    yield make
    for s in started:
        s.kill()


@pytest.fixture
def server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """One real server process on a free port with a fresh data dir."""
    return server_factory()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server for one test (free to kill, pause or wipe); skipped if missing."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def redis_server_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server shared by a module's tests; they keep apart by key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture
def settings(tmp_path: Path) -> Any:
    """Settings for an in-process app with short timings."""
    from mangwale_cli.settings import load

    env = {**FAST_ENV, "MANGWALE_DATA_DIR": str(tmp_path / "inproc")}
    return load({}, env=env)


@pytest.fixture
def api(settings: Any) -> Iterator[Any]:
    """An in-process app behind Starlette's TestClient (REST and WebSocket, lifespan run)."""
    from fastapi.testclient import TestClient

    from mangwale_cli.server.app import create_app

    with TestClient(create_app(settings)) as client:
        yield client
