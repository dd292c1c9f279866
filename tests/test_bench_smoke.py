"""The ``bench/`` scripts at a tiny size, so they never rot: each runs as a subprocess against its
own real server, exits 0, writes its JSON result, and its accounting adds up
(sent = received + counted losses). Speed is not checked here.

``--target both`` runs each scenario on mangwale and on the Node reference (``bench/node-ref/``):
those tests check that both ran and each one's accounting, and a contract test holds the Node
reference to mangwale's REST and WebSocket shapes. They are skipped only where ``node`` is
missing (the first one installs the reference with ``npm ci``)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load_bench_common() -> Any:
    """bench/common.py under its own name: bench/ is not a package, and putting it on sys.path
    would let its script names shadow modules for every other test."""
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load_bench_common()

needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


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
    res = run_bench("rest.py", tmp_path / "rest.json", "--tool", tool, "--jobs", "3", "--connections", "2",
                    "--warmup", "0", *extra)
    assert res["tool"] == tool
    routes = {r["route"]: r for r in res["results"]}
    assert set(routes) == {"GET /training/jobs", "POST /training/jobs"}
    for r in routes.values():
        assert r["requests"] > 0 and r["errors"] == 0 and r["rps"] > 0
        if tool == "python":
            assert r["requests"] == 20


@pytest.mark.parametrize("bare_server", ["uvicorn-h11", "uvicorn-httptools", "granian"])
def test_rest_bare_auth_and_fsyncs(tmp_path: Path, bare_server: str) -> None:
    """rest.py --bare measures the GET routes again on a bare ASGI app (each server it offers)
    serving mangwale's bytes; mangwale runs with a token; POST reports creates per fsync, and the
    result holds this machine's fsync p50/p99."""
    if bare_server == "granian":
        pytest.importorskip("granian")
    http = "h11" if bare_server == "uvicorn-h11" else "httptools"
    res = run_bench("rest.py", tmp_path / "rest.json", "--tool", "python", "--jobs", "5", "--page", "2",
                    "--connections", "2", "--requests", "12", "--warmup", "0", "--routes", "mix,post",
                    "--bare", "--bare-server", bare_server, "--http", http, timeout=120)
    assert res["auth"] is True and res["http"] == http
    assert res["fsync"]["p50_ms"] > 0 and res["fsync"]["p99_ms"] >= res["fsync"]["p50_ms"]
    post = next(r for r in res["results"] if r["route"] == "POST /training/jobs")
    assert post["errors"] == 0 and post["fsyncs"] > 0 and post["creates_per_fsync"] > 0
    (bare,) = res["bare"]
    assert bare["route"].startswith("GET mix") and bare["requests"] == 12 and bare["errors"] == 0
    assert bare["server"] == bare_server


@pytest.mark.parametrize("tool", ["python", "hyperfine"])
def test_cli_startup(tmp_path: Path, tool: str) -> None:
    """cli_startup.py reports every target row of issue 14 against its target, each command run
    without a failure, and with --importtime where the import time of each mangwale row goes."""
    if tool == "hyperfine" and not shutil.which("hyperfine"):
        pytest.skip("hyperfine not installed")
    extra = ["--importtime", "5", "--importtime-runs", "1"] if tool == "python" else []
    res = run_bench("cli_startup.py", tmp_path / "cli.json", "--runs", "2", "--tool", tool, *extra, timeout=120)
    rows = {r["command"]: r for r in res["results"]}
    targets = {name: (r["target_ms"], r["stretch_ms"]) for name, r in rows.items() if r["target_ms"] is not None}
    assert targets == {"mangwale jobs create simulate -q": (100, 60), "mangwale --help": (100, None),
                       "Tab: mangwale jobs create --": (80, None), "Tab: mangwale ": (80, None)}
    assert {"mangwale --version", "mangwale jobs list"} <= set(rows)
    for r in rows.values():
        assert r["failures"] == 0 and r["runs"] == 2 and r["median_ms"] > 0 and r["cpu_ms"] >= 0, r
        assert (r["verdict"] is None) == (r["target_ms"] is None)
        assert r["verdict"] in (None, "MISSED", "met", "met (stretch missed)", "stretch met")
    tab = rows["Tab: mangwale jobs create --"]["env"]
    assert tab == {"_MANGWALE_COMPLETE": "complete_bash", "COMP_WORDS": "mangwale jobs create --", "COMP_CWORD": "3"}
    if tool == "python":
        for name, r in rows.items():
            if not name.startswith("curl"):
                imp = r["imports"]
                assert len(imp["top_self"]) == 5 and imp["total_self_ms"] > 0, name
                assert any(m["module"] == "typer" for m in imp["top_level"]) or imp["modules"] > 0
        top = {m["module"] for m in rows["mangwale jobs create simulate -q"]["imports"]["top_level"]}
        assert "mangwale_cli.cli.main" in top


def test_jobs_end_to_end(tmp_path: Path) -> None:
    res = run_bench("jobs.py", tmp_path / "jobs.json", "--jobs", "3")
    assert res["jobs"] == res["jobs_finished"] == 3
    assert res["outcomes"] == {"succeeded": 3}
    assert res["accounting_ok"] and res["lost"] == 0
    assert res["sent"] == res["received"] + res["lost"] > 0


def test_connects(tmp_path: Path) -> None:
    """connects.py opens every connection, the server counts each, and the run reports its times."""
    res = run_bench("connects.py", tmp_path / "connects.json", "--connections", "20", "--concurrency", "5",
                    "--idle", "0.2")
    assert res["target"] == "mangwale"
    assert res["opened"] == res["connections"] == 20 and res["errors"] == 0
    assert res["streams"] >= 20
    assert res["handshake_ms"]["count"] == 20 and res["handshake_ms"]["p99"] > 0
    assert res["wall_s"] > 0 and res["handshakes_per_s"] > 0 and res["rss_idle_bytes"] > 0


# --- the Node reference, side by side ------------------------------------------------------


def assert_both_ran(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    assert res["target"] == "both"
    runs = res["targets"]
    assert set(runs) == {"mangwale", "node"}
    assert {t: r["target"] for t, r in runs.items()} == {"mangwale": "mangwale", "node": "node"}
    assert runs["mangwale"]["server"]["name"] == "mangwale"
    node = runs["node"]["server"]
    assert node["name"] == "node" and node["node"].startswith("v") and set(node["packages"]) == {"express", "ws"}
    assert res["ratio_basis"] == "mangwale / node"
    return runs


@needs_node
def test_fanout_both_accounting(tmp_path: Path) -> None:
    """fanout.py --target both runs the same scenario on mangwale and the Node reference; each
    accounts for every event and the ratios come from the two runs."""
    res = run_bench("fanout.py", tmp_path / "fanout.json", "--target", "both",
                    "--watchers", "5", "--jobs", "2", "--steps", "5", "--step-ms", "20", "--idle", "0.2",
                    "--drain", "3", timeout=90)
    runs = assert_both_ran(res)
    for target, r in runs.items():
        # job_created, running, 5 steps, succeeded for each of the 2 jobs; mangwale's simulate also
        # logs two lines per job (its plan and its end) as job_log events, which count as events
        assert r["events"] == 2 * (10 if target == "mangwale" else 8), (target, r["events"])
        assert r["accounting_ok"], target
        assert r["sent"] == r["received"] + r["lost"] == 5 * r["events"], target
        assert r["lost"] == 0 and r["duplicates"] == 0, target
        assert r["job_statuses"] == ["succeeded"], target
        assert r["latency_ms"]["count"] == r["received"] and r["latency_ms"]["p99"] is not None, target
        assert r["server_delivered"] == r["received"] and r["server_dropped_slow"] == 0, target
        assert r["rss_idle_bytes"] > 0, target
    assert runs["node"]["store"] == "memory"
    assert res["accounting_ok"]
    ratios = res["ratios"]
    assert {"p50", "p99", "deliveries/s", "idle B/conn", "connect s"} <= set(ratios)
    want = runs["mangwale"]["deliveries_per_s"] / runs["node"]["deliveries_per_s"]
    assert ratios["deliveries/s"] == pytest.approx(want)


@needs_node
@pytest.mark.parametrize("tool", ["python", "wrk"])
def test_rest_both(tmp_path: Path, tool: str) -> None:
    """rest.py --target both measures every route on both servers, the list's query forms and
    the creates running beside them included, and gives a ratio per route."""
    if tool == "wrk" and not shutil.which("wrk"):
        pytest.skip("wrk not installed")
    if tool == "python":
        routes_arg, extra = "get,post,cursor,mix", ["--requests", "12", "--warmup", "0"]
    else:  # wrk runs for whole seconds: fewer routes, and the warm-up once
        routes_arg, extra = "post,mix", ["--duration", "1", "--warmup", "1"]
    res = run_bench("rest.py", tmp_path / "rest.json", "--target", "both", "--tool", tool, "--jobs", "5",
                    "--page", "2", "--connections", "2", "--routes", routes_arg, "--creates-per-s", "10",
                    *extra, timeout=120)
    assert res["tool"] == tool
    runs = assert_both_ran(res)
    labels = None
    for target, run in runs.items():
        routes = {r["route"]: r for r in run["results"]}
        labels = labels or set(routes)
        assert set(routes) == labels and len(routes) == len(routes_arg.split(",")), target
        for r in routes.values():
            assert r["requests"] > 0 and r["errors"] == 0 and r["rps"] > 0, (target, r["route"])
            if tool == "python":
                assert r["requests"] == 12
            if r["route"].startswith("GET"):
                assert r["creates"]["created"] > 0 and r["creates"]["errors"] == 0, (target, r["route"])
        assert "POST /training/jobs" in routes
        assert len([r for r in routes.values() if len(r["paths"]) == 3]) == 1  # the mix: page, status, cursor
    assert set(res["ratios"]) == labels
    for rt in res["ratios"].values():
        assert rt["req/s"] is not None and rt["req/s"] > 0


@needs_node
def test_connects_both(tmp_path: Path) -> None:
    """connects.py --target both opens every connection on each server and compares them."""
    res = run_bench("connects.py", tmp_path / "connects.json", "--target", "both", "--connections", "20",
                    "--concurrency", "5", "--idle", "0.2", timeout=90)
    runs = assert_both_ran(res)
    for target, r in runs.items():
        assert r["opened"] == 20 and r["errors"] == 0 and r["streams"] >= 20, target
        assert r["handshake_ms"]["count"] == 20, target
    assert res["ratios"]["wall s"] == pytest.approx(runs["mangwale"]["wall_s"] / runs["node"]["wall_s"])


def _contract(url: str, ws_url: str) -> dict[str, Any]:
    """Drive one server through the seed's flows and note what a client sees (shapes, not values)."""
    seen: dict[str, Any] = {}
    post = {"kind": "simulate", "params": {"steps": 3, "stepMs": 20}}
    with httpx.Client(base_url=url, timeout=10) as http:
        health = http.get("/healthz").json()
        seen["health_keys"] = {"headSeq", "streams", "jobs", "status"} <= set(health)
        r = http.post("/training/datasets", json={"name": "greetings", "examples": [
            {"text": "hi", "intent": "greet"}, {"text": "hello", "intent": "greet"}, {"text": "bye", "intent": "bye"}]})
        seen["dataset_create"] = (r.status_code, sorted(r.json()))
        ds = r.json()
        listed = http.get("/training/datasets").json()
        seen["dataset_list"] = [(sorted(d), d["size"], d["intentCount"]) for d in listed]

        with connect(ws_url, compression=None) as ws:
            hello = json.loads(ws.recv(timeout=10))
            seen["greeting"] = (hello["type"], hello["message"], type(hello["headSeq"]).__name__)
            r = http.post("/training/jobs", json=post)
            job = r.json()
            seen["job_create"] = (r.status_code, sorted(job), job["status"], job["progress"], job["params"])
            events: list[dict[str, Any]] = []
            logged: list[int] = []  # every numbered event (mangwale also logs the job's log lines)
            while not events or events[-1].get("status") != "succeeded":
                ev = json.loads(ws.recv(timeout=10))
                if "seq" in ev:
                    logged.append(ev["seq"])
                if ev.get("type") in ("job_created", "training_update"):
                    events.append(ev)
        seen["events"] = [(e["type"], e.get("status"), e.get("progress")) for e in events]
        seen["seq_consecutive"] = logged == list(range(hello["headSeq"] + 1, hello["headSeq"] + 1 + len(logged)))
        seen["event_timestamps"] = all(isinstance(e["timestamp"], int) for e in events)
        seen["created_job_keys"] = sorted(events[0]["job"])
        seen["update_has"] = all({"jobId", "status", "progress", "message"} <= set(e) for e in events[1:])

        for _ in range(4):
            http.post("/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 0}})
        deadline = time.monotonic() + 10
        while any(j["status"] != "succeeded" for j in http.get("/training/jobs").json()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        everything = [j["id"] for j in http.get("/training/jobs").json()]
        paged: list[str] = []
        cursor = None
        while True:
            r = http.get("/training/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
            paged += [j["id"] for j in r.json()]
            cursor = r.headers.get("X-Next-Cursor")
            if not cursor:
                break
        seen["pages"] = (len(everything), paged == everything)
        seen["status_filter"] = (
            len(http.get("/training/jobs", params={"status": "succeeded"}).json()),
            http.get("/training/jobs", params={"status": "queued,running"}).json(),
        )
        seen["newest_first"] = everything[-1] == job["id"]

        long = http.post("/training/jobs", json={"kind": "simulate", "params": {"steps": 100, "stepMs": 1000}}).json()
        r = http.post(f"/training/jobs/{long['id']}/cancel")
        seen["cancel"] = (r.status_code, r.json()["status"])
        seen["cancel_again"] = http.post(f"/training/jobs/{long['id']}/cancel").status_code
        seen["delete_job"] = http.delete(f"/training/jobs/{long['id']}").status_code
        seen["deleted_job"] = http.get(f"/training/jobs/{long['id']}").status_code
        seen["delete_dataset"] = http.delete(f"/training/datasets/{ds['id']}").status_code

        def error(r: httpx.Response) -> tuple[int, str, str | None]:
            body = r.json()["error"]
            return r.status_code, body["code"], body["field"]

        seen["errors"] = [
            error(http.get("/training/jobs/nope")),
            error(http.get("/training/datasets/nope")),
            error(http.post("/training/jobs", json={"kind": "nope"})),
            error(http.get("/training/jobs", params={"limit": "0"})),
            error(http.get("/training/jobs", params={"status": "bogus"})),
        ]
    return seen


@needs_node
def test_node_ref_speaks_mangwales_api() -> None:
    """The Node reference answers the seed's flows as mangwale does: the same REST paths, JSON
    keys, statuses, error bodies and pages, and the same WebSocket greeting and event sequence
    for a simulate job, so one harness measures both alike."""
    seen = {}
    for target in common.TARGETS:
        with common.make_server(target) as server:
            seen[target] = _contract(server.url, server.ws_url)
    mangwale, node = seen["mangwale"], seen["node"]
    assert node["events"] == [("job_created", None, None), ("training_update", "running", 0),
                              ("training_update", "running", 33.33), ("training_update", "running", 66.67),
                              ("training_update", "running", 99), ("training_update", "succeeded", 100)]
    assert node["seq_consecutive"] and node["pages"] == (5, True)
    for key in mangwale:
        assert node[key] == mangwale[key], key


def test_history_lag_with_watchers(tmp_path: Path) -> None:
    """history.py's lag figure with watchers attached (issue 14's row, at a tiny size)."""
    res = run_bench("history.py", tmp_path / "history.json", "--sizes", "0", "--requests", "5",
                    "--lag-seconds", "1", "--lag-rate", "10", "--lag-watchers", "5", timeout=120)
    row = res["rows"][0]
    assert row["lag_watchers"] == 5 and row["lag_rate"] == 10
    assert row["creates_ok"] == 10
    assert row["lag_ms"] is not None and row["lag_max_ms"] is not None
