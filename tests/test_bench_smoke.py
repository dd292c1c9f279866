"""The ``bench/`` scripts at a tiny size, so they never rot: each runs as a subprocess against its
own real server, exits 0, writes its JSON result, and its accounting adds up
(sent = received + counted losses). Speed is not checked here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, out: Path, *args: str, timeout: float = 30) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--out", str(out), *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert out.is_file(), proc.stdout
    return json.loads(out.read_text())


def test_fanout_accounting(tmp_path: Path) -> None:
    res = run_bench("fanout.py", tmp_path / "fanout.json",
                    "--watchers", "5", "--steps", "5", "--step-ms", "20", "--idle", "0.2", "--drain", "3")
    assert res["watchers"] == 5
    assert res["accounting_ok"]
    assert res["sent"] == res["received"] + res["lost"]
    assert res["sent"] == 5 * res["events"] > 0
    assert res["latency_ms"]["count"] == res["received"]
    assert res["latency_ms"]["p99"] is not None
    assert res["rss_idle_bytes"] > 0 and "server_cpu" in res and "client_cpu" in res
    # The server's /metrics saw the same run: every event received was counted as delivered.
    assert res["server_dropped_slow"] == 0
    assert res["server_delivered"] == res["received"]


def test_fanout_through_redis_accounting(tmp_path: Path, redis_server: Any) -> None:
    """The same fan-out run with the server on a (private) Redis store; its keys are removed after."""
    import redis

    res = run_bench("fanout.py", tmp_path / "fanout.json", "--store", redis_server.url,
                    "--watchers", "5", "--steps", "5", "--step-ms", "20", "--idle", "0.2", "--drain", "3")
    assert res["store"] == "redis" and res["accounting_ok"]
    assert res["sent"] == res["received"] + res["lost"] == 5 * res["events"] > 0
    assert res["server_delivered"] == res["received"]
    assert redis.Redis.from_url(redis_server.url).dbsize() == 0


def test_fanout_stalled_accounting(tmp_path: Path) -> None:
    """The slow-consumer scenario adds up: healthy and stalled watchers each account for every
    event (sent = received + lost), and a stalled watcher cannot make a healthy one lose any."""
    res = run_bench("fanout.py", tmp_path / "stalled.json",
                    "--watchers", "4", "--stalled", "2", "--duration", "0.2", "--step-ms", "20",
                    "--idle", "0.2", "--drain", "3")
    assert res["accounting_ok"]
    assert res["sent"] == res["received"] + res["lost"] == 4 * res["events"] > 0
    assert res["lost"] == 0
    stalled = res["stalled"]
    assert stalled["clients"] == 2
    assert stalled["sent"] == stalled["received"] + stalled["lost"] == 2 * res["events"]
    assert res["rss_max_bytes"] >= res["rss_idle_bytes"] > 0 and res["rss_samples"]


def test_fanout_websockets_client(tmp_path: Path) -> None:
    """``--client websockets`` (the library's client) still runs and adds up."""
    res = run_bench("fanout.py", tmp_path / "ws.json", "--client", "websockets",
                    "--watchers", "3", "--steps", "5", "--step-ms", "20", "--idle", "0.2", "--drain", "3")
    assert res["accounting_ok"] and res["lost"] == 0 and res["sent"] == 3 * res["events"] > 0


@pytest.mark.parametrize("tool", ["python", "wrk"])
def test_rest(tmp_path: Path, tool: str) -> None:
    if tool == "wrk" and not shutil.which("wrk"):
        pytest.skip("wrk not installed")
    extra = ["--requests", "20"] if tool == "python" else ["--duration", "1"]
    res = run_bench("rest.py", tmp_path / "rest.json", "--tool", tool, "--jobs", "3", "--connections", "2", *extra)
    assert res["tool"] == tool
    routes = {r["route"]: r for r in res["results"]}
    assert set(routes) == {"GET /training/jobs", "POST /training/jobs"}
    for r in routes.values():
        assert r["requests"] > 0 and r["errors"] == 0 and r["rps"] > 0
        if tool == "python":
            assert r["requests"] == 20


def test_cli_startup(tmp_path: Path) -> None:
    res = run_bench("cli_startup.py", tmp_path / "cli.json", "--runs", "2", "--tool", "python")
    names = {r["command"] for r in res["results"]}
    assert {"mangwale --help", "mangwale jobs list", "mangwale jobs create simulate -q"} <= names
    assert all(r["failures"] == 0 and r["runs"] == 2 and r["median_ms"] > 0 for r in res["results"])


def test_jobs_end_to_end(tmp_path: Path) -> None:
    res = run_bench("jobs.py", tmp_path / "jobs.json", "--jobs", "3")
    assert res["jobs"] == res["jobs_finished"] == 3
    assert res["outcomes"] == {"succeeded": 3}
    assert res["accounting_ok"] and res["lost"] == 0
    assert res["sent"] == res["received"] + res["lost"] > 0
