"""``GET /metrics``: the Prometheus text format parses, and the figures move with what happens
(jobs finishing, events logged and delivered, connections opening and closing, REST latency)."""

from __future__ import annotations

from typing import Any

import httpx
from conftest import ServerProcess, wait_for
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from tokentools import auth_extra, new_token
from websockets.sync.client import connect

from mangwale_cli.server.app import create_app

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(http: httpx.Client | TestClient) -> Samples:
    r = http.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def run_job(http: httpx.Client | TestClient, steps: int) -> dict[str, Any]:
    job = http.post("/training/jobs", json={"kind": "simulate", "params": {"steps": steps, "stepMs": 1}}).json()

    def done() -> dict[str, Any] | None:
        j = http.get(f"/training/jobs/{job['id']}").json()
        return j if j["status"] == "succeeded" else None

    return wait_for(done, 15, what="job to succeed")


def test_metrics_move_on_a_real_server(server: ServerProcess) -> None:
    """After a job runs, a real server's /metrics counts it, its events and an open WebSocket."""
    with server.client() as http:
        before = scrape(http)
        assert value(before, "mangwale_jobs_finished_total", kind="simulate", status="succeeded") == 0
        with connect(server.ws_url, open_timeout=5) as ws:
            ws.recv(timeout=5)  # the greeting: the connection is registered
            during = scrape(http)
            assert value(during, "mangwale_connections", transport="websocket") == 1
            run_job(http, steps=5)
            # The watcher gets job_created + 7 training_updates (queued->running, 5 steps, done).
            for _ in range(7):
                ws.recv(timeout=5)
            after = wait_for(
                lambda: (s := scrape(http))
                and value(s, "mangwale_events_delivered_total", transport="websocket") >= 7
                and s,
                what="deliveries to be counted",
            )
        assert value(after, "mangwale_jobs_finished_total", kind="simulate", status="succeeded") == 1
        assert value(after, "mangwale_job_duration_seconds_count", kind="simulate", status="succeeded") == 1
        assert value(after, "mangwale_events_logged_total") >= value(before, "mangwale_events_logged_total") + 7
        assert value(after, "mangwale_jobs", status="succeeded") == 1
        assert value(after, "mangwale_running_jobs") == 0
        assert value(after, "mangwale_event_head_seq") >= 7
        listed = value(after, "mangwale_http_request_duration_seconds_count",
                       method="POST", route="/training/jobs", status="201")
        assert listed == 1
        gone = wait_for(
            lambda: (s := scrape(http)) and value(s, "mangwale_connections", transport="websocket") == 0 and s,
            what="the closed WebSocket to be uncounted",
        )
        assert value(gone, "mangwale_clients_dropped_slow_total", transport="websocket") == 0


def test_metrics_parse_and_name_every_figure(api: TestClient) -> None:
    """The exposition parses as Prometheus text and holds every documented family."""
    run_job(api, steps=2)
    api.get("/training/jobs/job-nope")
    families = {f.name: f for f in text_string_to_metric_families(api.get("/metrics").text)}
    expected = {
        "mangwale_connections": "gauge",
        "mangwale_events_delivered": "counter",
        "mangwale_clients_dropped_slow": "counter",
        "mangwale_events_logged": "counter",
        "mangwale_subscriber_queue_events": "gauge",
        "mangwale_subscriber_queue_max_events": "gauge",
        "mangwale_runner_queue_jobs": "gauge",
        "mangwale_running_jobs": "gauge",
        "mangwale_jobs": "gauge",
        "mangwale_jobs_finished": "counter",
        "mangwale_job_duration_seconds": "histogram",
        "mangwale_http_request_duration_seconds": "histogram",
        "mangwale_event_loop_lag_seconds": "gauge",
        "mangwale_event_loop_lag_max_seconds": "gauge",
    }
    assert {name: families[name].type for name in expected if name in families} == expected
    routes = {s.labels["route"] for s in families["mangwale_http_request_duration_seconds"].samples}
    # Route templates, not raw paths: one label per route however many ids are asked for.
    assert {"/training/jobs", "/training/jobs/{job_id}"} <= routes
    assert not any("job-" in r for r in routes)


def test_sse_connections_and_deliveries_are_counted(api: TestClient) -> None:
    """An open SSE stream counts as a connection; a job's events it reads count as delivered."""
    with api.stream("GET", "/training/events") as stream:
        lines = stream.iter_lines()
        wait_for(lambda: next(lines).startswith("event: connected"), what="the SSE greeting")
        assert value(scrape(api), "mangwale_connections", transport="sse") == 1
        api.post("/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 1}})
        wait_for(lambda: next(lines).startswith("event: job_created"), what="job_created over SSE")
        assert value(scrape(api), "mangwale_events_delivered_total", transport="sse") >= 1


def test_metrics_need_a_read_token_when_tokens_exist(settings: Any) -> None:
    """With tokens configured, /metrics is 401 without a token, 403 with a write-only one, 200 with read."""
    reader, writer = new_token(), new_token()
    settings.extra = {"auth": auth_extra({"reader": (reader, ["read"]), "writer": (writer, ["write"])})}
    with TestClient(create_app(settings)) as secured:
        assert secured.get("/metrics").status_code == 401
        assert secured.get("/metrics", headers={"Authorization": f"Bearer {writer}"}).status_code == 403
        ok = secured.get("/metrics", headers={"Authorization": f"Bearer {reader}"})
        assert ok.status_code == 200 and "mangwale_events_logged_total" in ok.text
        doc = secured.get("/openapi.json").json()
        assert doc["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]


def test_loop_lag_shows_a_blocked_loop() -> None:
    """The lag probe reports how late the event loop ran: a 150 ms blocking call shows as about
    that much, once; the next scrape window starts from zero, the maximum stays."""
    import asyncio
    import time

    from mangwale_cli.metrics import LAG_TICK, LoopLag

    async def main() -> tuple[float, float, float]:
        lag = LoopLag()
        lag.start()
        await asyncio.sleep(3 * LAG_TICK)
        calm = lag.take_recent()
        time.sleep(0.15)  # noqa: ASYNC251 - blocking the loop on purpose: what a whole-database json.dumps did
        await asyncio.sleep(3 * LAG_TICK)
        blocked = lag.take_recent()
        lag.stop()
        return calm, blocked, lag.worst

    calm, blocked, worst = asyncio.run(main())
    assert calm < 0.1 and 0.1 < blocked < 0.5 and worst == blocked
