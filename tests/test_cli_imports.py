"""A one-shot command imports only what it uses (issue 14): what `jobs create -q`, `--help`,
`--version` and a Tab press load, read from ``python -X importtime`` of the console script.

Not timed: each test names the modules that must stay out, so a stray top-level import (the
server, the store, a trainer, rich, pydantic, another noun's commands) fails here, on any
machine, however busy. The numbers are ``bench/cli_startup.py``'s job.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from clitools import fake_server
from conftest import wait_for
from ports import free_port

MANGWALE = str(Path(sys.executable).with_name("mangwale"))

# Never part of a client's one-shot command: the server and what only it uses.
SERVER = {
    "fastapi", "starlette", "uvicorn", "sklearn", "numpy", "scipy", "joblib", "tinydb", "redis",
    "prometheus_client", "websockets", "pydantic", "pydantic_core",
    "mangwale_cli.server", "mangwale_cli.store", "mangwale_cli.runner", "mangwale_cli.trainers",
    "mangwale_cli.service", "mangwale_cli.jobqueue", "mangwale_cli.eventlog", "mangwale_cli.settings",
    "mangwale_cli.wire", "mangwale_cli.follow", "mangwale_cli.nlu", "mangwale_cli.metrics",
}
# A follower's or a renderer's: a command that prints one line does without them.
FOLLOW_AND_RENDER = {
    "rich", "asyncio", "mangwale_cli.cli.watchview", "mangwale_cli.cli.render", "mangwale_cli.cli.results",
    "mangwale_cli.cli.stepsummary",
}
# httpx and what it brings: a direct request goes over the standard library (mangwale_cli.stdhttp).
HTTPX = {"httpx", "httpcore", "h11", "anyio", "certifi", "idna", "urllib.request", "http.cookiejar"}
# What a request needs, which nothing that sends none may load.
HTTP = HTTPX | {"mangwale_cli.client", "mangwale_cli.stdhttp", "http.client", "ssl"}
OTHER_NOUNS = {f"mangwale_cli.cli.{n}" for n in ("serve", "watch", "datasets", "tokens")}

JOB = {"id": "job-1", "kind": "simulate", "status": "queued", "progress": 0, "params": {}}


def imported(args: list[str], **env: str) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """Every module (and each of its parent packages) the console script imports for ``args``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MANGWALE_", "_MANGWALE", "COMP_"))}
    proc = subprocess.run([sys.executable, "-X", "importtime", MANGWALE, *args], env={**full, **env},
                          capture_output=True, text=True, timeout=60, check=False)
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)", proc.stderr, re.MULTILINE)
    assert "typer" in names, proc.stderr[-2000:]  # the measurement works
    mods = {".".join(n.split(".")[: i + 1]) for n in names for i in range(n.count(".") + 1)}
    return mods, proc


def loaded(mods: set[str], forbidden: set[str]) -> set[str]:
    return {f for f in forbidden if f in mods}


@pytest.mark.parametrize("path", ["stdlib", "httpx"])
def test_jobs_create_quiet_imports_only_the_client(path: str) -> None:
    """`jobs create KIND -q` loads typer, the jobs commands and the client: no server code, no
    renderer, no follower, no other noun's module, and no httpx unless it is asked for."""
    def answer(handler: object) -> tuple[int, dict[str, str], bytes]:
        return 201, {"Content-Type": "application/json"}, json.dumps(JOB).encode()

    with fake_server(answer) as (url, seen):
        mods, proc = imported(["jobs", "create", "simulate", "-q", "-p", "steps=1", "--url", url], MANGWALE_HTTP=path)
    assert proc.returncode == 0 and proc.stdout == "job-1\n", proc.stderr[-2000:]
    assert seen == ["POST /training/jobs"]
    assert {"mangwale_cli.cli.jobs", "mangwale_cli.client"} <= mods
    assert not loaded(mods, SERVER | FOLLOW_AND_RENDER | OTHER_NOUNS)
    if path == "stdlib":
        assert "mangwale_cli.stdhttp" in mods
        assert not loaded(mods, HTTPX)
    else:
        assert "httpx" in mods and "mangwale_cli.stdhttp" not in mods


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["jobs", "create", "--help"], ["watch", "--help"]],
                         ids=" ".join)
def test_help_and_version_import_no_client(args: list[str]) -> None:
    """Help and --version send no request: no httpx, no server code, no rich."""
    mods, proc = imported(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not loaded(mods, SERVER | FOLLOW_AND_RENDER | HTTP)
    if args == ["--version"]:  # the version is the root's: no noun is loaded for it
        assert not loaded(mods, {*OTHER_NOUNS, "mangwale_cli.cli.jobs"})


@pytest.mark.parametrize(("words", "want", "nouns"), [
    ("mangwale jobs create --wa", "--watch", {"mangwale_cli.cli.jobs"}),
    ("mangwale watch --la", "--latest", {"mangwale_cli.cli.watch"}),
    ("mangwale ", "jobs", OTHER_NOUNS | {"mangwale_cli.cli.jobs"}),
])
def test_tab_completion_loads_only_the_named_noun(words: str, want: str, nouns: set[str]) -> None:
    """A Tab press, as bash's completion function makes it, answers and loads the noun it
    completes (every noun only at the top level), never the client, the server or rich."""
    env = {"_MANGWALE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}
    mods, proc = imported([], **env)
    assert want in proc.stdout.split(), proc.stdout
    assert not loaded(mods, SERVER | FOLLOW_AND_RENDER | HTTP)
    noun_mods = {m for m in mods if m.removeprefix("mangwale_cli.cli.") in {"serve", "watch", "datasets", "jobs", "tokens"}}
    assert noun_mods == nouns


def test_serve_on_the_embedded_store_never_imports_redis(tmp_path: Path) -> None:
    """`mangwale serve` on the embedded store answers /healthz and runs a job without loading
    the Redis client (about a sixth of its start-up): only a Redis store imports it."""
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("MANGWALE_")}
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", MANGWALE, "serve", "--port", str(port), "--data-dir", str(tmp_path / "d")],
        env={**full, "MANGWALE_HOME": str(tmp_path / "home")}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2)

    def answers() -> bool:
        assert proc.poll() is None, "the server exited"
        try:
            return http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(answers, 20, what="a server started with -X importtime to answer")
        job_id = http.post("/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 0}}).json()["id"]
        wait_for(lambda: http.get(f"/training/jobs/{job_id}").json()["status"] == "succeeded", what="the job to succeed")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        http.close()
    names = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)", err, re.MULTILINE))
    assert "mangwale_cli.server.app" in names and "mangwale_cli.runner" in names, err[-2000:]
    assert not {n for n in names if n == "redis" or n.startswith("redis.") or n == "mangwale_cli.redisqueue"}
