"""Test helpers for the ``mangwale`` command line: run it as a user would (a subprocess, its
output in pipes), check the one-line error contract, and stand up servers that are not mangwale.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(autouse=True, params=["stdlib", "httpx"])
def http_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each test of a module that imports this fixture on both ways ``Client`` sends a
    request: the standard library's http.client and httpx (client.py's docstring)."""
    monkeypatch.setenv("MANGWALE_HTTP", request.param)
    return str(request.param)


def cli(
    *args: str, url: str | None = None, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``mangwale ARGS`` (with MANGWALE_URL=url when given) and capture its output."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("MANGWALE_URL", "MANGWALE_DEBUG")}
    full_env.update({"COLUMNS": "200", **(env or {})})
    if url is not None:
        full_env["MANGWALE_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "mangwale_cli", *args],
        check=False,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def ok(*args: str, url: str | None = None, env: dict[str, str] | None = None) -> str:
    proc = cli(*args, url=url, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


def ok_json(*args: str, url: str) -> Any:
    return json.loads(ok(*args, "--json", url=url))


def error_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert the command failed with ``code`` and exactly one error line; return that line."""
    assert proc.returncode == code, (
        f"exit {proc.returncode} (wanted {code}): {proc.stdout}{proc.stderr}"
    )
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mangwale: error: "), lines[0]
    assert proc.stdout == ""
    return lines[0]


def wait_done(url: str, job_id: str, timeout: float = 20) -> dict[str, Any]:
    return wait_for(
        lambda: (j := ok_json("jobs", "show", job_id, url=url))["status"] in TERMINAL and j,
        timeout=timeout,
        what=f"job {job_id} to finish",
    )


def quick_job(url: str, *params: str) -> str:
    """The id of a new simulate job (1 step, no delay unless ``params`` say otherwise)."""
    args = ["-p", "steps=1", "-p", "stepMs=0", *(a for p in params for a in ("-p", p))]
    return ok("jobs", "create", "simulate", *args, "-q", url=url).strip()


Answer = Callable[[BaseHTTPRequestHandler], tuple[int, dict[str, str], bytes]]


@contextmanager
def fake_server(answer: Answer) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on a free port that answers every request with ``answer(handler)``;
    yields its URL and the raw request lines it received (method and path as sent)."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            seen.append(f"{self.command} {self.path}")
            status, headers, body = answer(self)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def plain_http_server(directory: Path, protocol: str = "HTTP/1.0") -> Iterator[str]:
    """A real ``python -m http.server`` process (what a wrong port often finds) speaking
    ``protocol``, on a port the OS picks; yields its URL. Its banner is printed after the socket
    listens, so the URL is usable as soon as it is read: nothing to poll."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
         "--protocol", protocol, "--directory", str(directory)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        found = re.search(r"port (\d+)", banner)
        assert found, f"http.server said {banner!r}"
        yield f"http://127.0.0.1:{found.group(1)}"
    finally:
        proc.kill()
        proc.wait(10)
