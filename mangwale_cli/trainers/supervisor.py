"""The child side of a command trainer: run the command, speak the progress protocol.

``supervise`` runs in a child process (``process.run_in_process``). It starts the command in
a process group of its own, reads its stdout and stderr line by line (``parse_report`` tells
a progress report from a log line), enforces the timeout, and ends the whole group: SIGTERM,
then SIGKILL after the grace period, when the job is cancelled (the server SIGTERMs this
process), when it times out, and when the server dies (``process.on_lifeline_lost``). Once
the command has exited, whatever it left in its group is killed too, so a job leaves no
process behind.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from .. import wire
from .process import Emit, on_lifeline_lost

TAIL_LINES = 10  # stderr lines quoted in the error of a failed run
TAIL_CHARS = 500  # of each of them
MAX_LINE_BYTES = 64 * 1024  # a longer output line is cut into pieces
DRAIN_SECONDS = 2.0  # output still read after the command exited
POLL_SECONDS = 0.1  # exit polling, where pidfd_open is missing


# --- the progress protocol -----------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """A progress report printed by a command (one stdout line)."""

    progress: float | None
    message: str | None = None
    metrics: dict[str, Any] | None = None
    eta: float | None = None


def parse_report(line: str) -> Report | None:
    """The report a stdout line carries, or None when it is a plain log line.

    A report is a JSON object with a ``progress`` number (0..100) or a ``metrics`` object or
    both; ``message`` (string) and ``eta`` (seconds) are optional. An object that has one of
    those keys with a bad value raises ``ValueError`` saying what is wrong.
    """
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        obj = wire.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or ("progress" not in obj and "metrics" not in obj):
        return None
    progress = obj.get("progress")
    if progress is not None and (
        isinstance(progress, bool)
        or not isinstance(progress, (int, float))
        or not 0 <= progress <= 100
    ):
        raise ValueError(f"progress must be a number from 0 to 100, got {progress!r}")
    metrics = obj.get("metrics")
    if metrics is not None and not isinstance(metrics, dict):
        raise ValueError(f"metrics must be a JSON object, got {metrics!r}")
    if progress is None and metrics is None:
        raise ValueError("a report needs a progress number or a metrics object")
    bad = wire.find_non_finite(metrics)
    if bad:
        raise ValueError(f"metrics.{bad} is not a finite number")
    message = obj.get("message")
    if message is not None and not isinstance(message, str):
        raise ValueError(f"message must be a string, got {message!r}")
    eta = obj.get("eta")
    if eta is not None and (
        isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < float("inf")
    ):
        raise ValueError(f"eta must be a number of seconds >= 0, got {eta!r}")
    return Report(
        progress=None if progress is None else float(progress),
        message=message,
        metrics=metrics,
        eta=None if eta is None else float(eta),
    )


# --- the supervisor ------------------------------------------------------------------------------


def supervise(payload: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """Run the command ``payload`` describes (argv, env, cwd, timeout, killGrace) and relay its
    output through ``emit``; return its outcome (returncode, stopped, metrics, stderrTail)."""
    return _Supervisor(payload, emit).run()


class _Supervisor:
    """Starts the command in its own process group, relays its lines and ends the group.

    The group is only signalled while its leader is unreaped, so its id cannot have been
    reused. ``lock`` orders the lifeline and timer threads against the final reap; the SIGTERM
    handler runs on the main thread and needs no lock.
    """

    def __init__(self, payload: dict[str, Any], emit: Emit) -> None:
        self.argv: list[str] = payload["argv"]
        self.env: dict[str, str] = payload["env"]
        self.cwd: str = payload["cwd"]
        self.timeout: float | None = payload.get("timeout")
        self.grace = float(payload.get("killGrace", 3.0))
        self.emit = emit
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.reaped = False
        self.stop_reason: str | None = None
        self.terminating = False
        self.progress = 0.0
        self.metrics: dict[str, Any] | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)

    def run(self) -> dict[str, Any]:
        signal.signal(signal.SIGTERM, self._on_sigterm)  # the server cancels the job
        on_lifeline_lost(self._server_gone)
        with self.lock:  # the lifeline thread waits until the group exists
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    cwd=self.cwd,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
            except OSError as exc:
                self.reaped = True
                why = exc.strerror or exc
                return {"startError": f"cannot start {self.argv[0]!r} in {self.cwd}: {why}"}
        if self.stop_reason is not None:  # cancelled while it started
            self._terminate()
        try:
            self._pump()
        finally:
            with self.lock:
                self._signal(signal.SIGKILL)  # whatever is left of its group
                self.reaped = True
            code = self.proc.wait()
        return {
            "returncode": code,
            "stopped": self.stop_reason,
            "metrics": self.metrics,
            "stderrTail": list(self.tail),
        }

    # --- stopping -------------------------------------------------------------------------

    def _signal(self, sig: int) -> None:
        if self.proc is None or self.reaped:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _signal_locked(self, sig: int) -> None:
        with self.lock:
            self._signal(sig)

    def _stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._terminate()

    def _terminate(self) -> None:
        """SIGTERM the group now, SIGKILL it after the grace period (from a timer thread, so it
        happens even while the main thread is blocked writing to the server)."""
        if self.proc is None or self.terminating:
            return
        self.terminating = True
        self._signal(signal.SIGTERM)
        timer = threading.Timer(self.grace, self._signal_locked, args=(signal.SIGKILL,))
        timer.daemon = True
        timer.start()

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self._stop("cancelled")

    def _server_gone(self) -> None:
        """Lifeline hook: the server died. End the group before this process exits."""
        with self.lock:
            if self.proc is None or self.reaped:
                return
            self._signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and not self._leader_exited():
            time.sleep(0.02)
        self._signal_locked(signal.SIGKILL)

    def _leader_exited(self) -> bool:
        """Whether the command has exited, without reaping it (its pid keeps the group id)."""
        assert self.proc is not None
        try:
            return (
                os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
            )
        except ChildProcessError:
            return True

    # --- output ---------------------------------------------------------------------------

    def _pump(self) -> None:
        """Relay output until the command has exited and its pipes are drained; enforce the
        timeout on the way."""
        proc = self.proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        partial = {fd: b"" for fd in names}
        sel = selectors.DefaultSelector()
        for fd in names:
            sel.register(fd, selectors.EVENT_READ)
        pidfd: int | None = None
        try:
            pidfd = os.pidfd_open(proc.pid)
            sel.register(pidfd, selectors.EVENT_READ)
        except (AttributeError, OSError):
            pidfd = None
        deadline = time.monotonic() + self.timeout if self.timeout else None
        drain_until: float | None = None
        try:
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline and self.stop_reason is None:
                    self._stop("timeout")
                if drain_until is None and self._leader_exited():
                    self._signal_locked(signal.SIGKILL)  # what it left behind in its group
                    drain_until = now + DRAIN_SECONDS
                    if pidfd is not None:
                        sel.unregister(pidfd)
                if drain_until is not None and (not partial or now >= drain_until):
                    return
                ends = (drain_until, deadline if self.stop_reason is None else None)
                waits = [t - now for t in ends if t is not None]
                if pidfd is None and drain_until is None:
                    waits.append(POLL_SECONDS)
                for key, _ in sel.select(max(0.0, min(waits)) if waits else None):
                    if key.fd == pidfd or key.fd not in partial:
                        continue  # the exit is handled at the top of the loop
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        self._feed(key.fd, names[key.fd], chunk, partial)
                    else:
                        sel.unregister(key.fd)
                        rest = partial.pop(key.fd)
                        if rest:
                            self._line(names[key.fd], rest)
        finally:
            sel.close()
            if pidfd is not None:
                os.close(pidfd)

    def _feed(self, fd: int, stream: str, chunk: bytes, partial: dict[int, bytes]) -> None:
        lines = (partial[fd] + chunk).split(b"\n")
        rest = lines.pop()
        for raw in lines:
            # A long line is cut at the same places whether it came in one read or several.
            for start in range(0, max(len(raw), 1), MAX_LINE_BYTES):
                self._line(stream, raw[start : start + MAX_LINE_BYTES])
        while len(rest) > MAX_LINE_BYTES:
            self._line(stream, rest[:MAX_LINE_BYTES])
            rest = rest[MAX_LINE_BYTES:]
        partial[fd] = rest

    def _line(self, stream: str, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").removesuffix("\r")
        if stream == "stdout":
            try:
                report = parse_report(text)
            except ValueError as exc:
                self.emit.log(text, stream)
                self.emit.log(f"ignored progress report: {exc}", "trainer")
                return
            if report is not None:
                if report.progress is not None:
                    self.progress = report.progress
                if report.metrics is not None:
                    self.metrics = report.metrics
                self.emit(self.progress, report.message, metrics=report.metrics, eta=report.eta)
                return
        else:
            self.tail.append(text[:TAIL_CHARS])
        self.emit.log(text, stream)
