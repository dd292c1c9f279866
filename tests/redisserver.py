"""A private ``redis-server`` for tests: its own port, its own dir, killed with the test.

Never the machine's shared Redis: a test may kill, pause or wipe its server. Use the
``redis_server`` (per test) or ``redis_server_module`` (per module) fixtures from conftest;
module-scoped users keep tests apart with a key prefix per test.

* ``kill()``: SIGKILL, as a crashed Redis; ``start()`` brings it back on the same port.
* ``restart(wipe=...)``: kill and start again, with its files removed (data lost) or kept
  (only what ``appendonly=True`` persisted survives).
* ``pause()`` / ``resume()``: SIGSTOP / SIGCONT, a hung Redis: connections open, no answers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from ports import free_port

BINARY = "redis-server"
MISSING = "redis-server not installed: the Redis backend tests need it (apt install redis-server)"


def redis_binary() -> str:
    """The redis-server path; skips the test without it, or fails it on CI (CI=true)."""
    path = shutil.which(BINARY)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{MISSING}; CI must install it", pytrace=False)
        pytest.skip(MISSING)
    return path


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, restartable on the same port and dir."""

    def __init__(self, base: Path, *, appendonly: bool = False, binary: str | None = None) -> None:
        self.binary = binary or redis_binary()
        self.dir = Path(base)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def command(self) -> list[str]:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            *persistence,
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                raise AssertionError(f"redis-server on port {self.port} did not start:\n{log}")
            time.sleep(0.01)
        return self

    def ping(self) -> bool:
        """True when the server answers PING with PONG (not while it loads its data)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, and wait until the process is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server must still die
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, wipe: bool = False) -> RedisServer:
        """Kill and start again on the same port; ``wipe`` removes its data files first."""
        self.kill()
        if wipe:
            for path in self.dir.iterdir():
                if path != self.log_path:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        return self.start()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
