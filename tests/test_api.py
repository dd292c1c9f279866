"""In-process tests of the REST API, the WebSocket and the SSE stream (TestClient, no sockets).

Jobs use the ``simulate`` kind with millisecond steps; a job meant to stay running uses a step
of a minute and is cancelled or left to the shutdown. Every wait is on a condition: REST state
through ``wait_for``, WebSocket messages through ``recv`` with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from conftest import stored, wait_for
from starlette.testclient import TestClient, WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

JSON_HEADERS = {"content-type": "application/json"}
FAST = {"steps": 3, "stepMs": 5}
SLOW = {"steps": 2, "stepMs": 60_000}  # stays running until cancelled or shut down
TERMINAL = {"succeeded", "failed", "cancelled"}
EXAMPLES = [
    {
        "text": "order pizza",
        "intent": "order_food",
        "entities": [{"start": 6, "end": 11, "value": "pizza", "entity": "dish"}],
    },
    {"text": "hello there", "intent": "greet"},
]

Msg = dict[str, Any]


# --- helpers ------------------------------------------------------------------------------


def recv(ws: WebSocketTestSession, timeout: float = 10.0) -> Msg:
    """The next WebSocket message as JSON; fails instead of hanging when none comes in time.

    TestClient's own ``receive_json`` blocks forever, so this reads the session's queue
    through its portal with a deadline. A close frame raises ``WebSocketDisconnect``.
    """

    async def get() -> Any:
        with anyio.fail_after(timeout):
            return await ws._send_rx.receive()

    try:
        message = ws.portal.call(get)
    except TimeoutError:
        raise AssertionError(f"no WebSocket message within {timeout}s") from None
    ws._raise_on_close(message)
    return json.loads(message["text"])


def recv_until(
    ws: WebSocketTestSession, done: Callable[[Msg], bool], timeout: float = 10.0
) -> list[Msg]:
    """Messages up to and including the first one for which ``done`` is true."""
    deadline = time.monotonic() + timeout
    out: list[Msg] = []
    while True:
        msg = recv(ws, max(0.01, deadline - time.monotonic()))
        out.append(msg)
        if done(msg):
            return out


@contextlib.contextmanager
def ws_connect(
    api: TestClient, query: str = "", **kw: Any
) -> Iterator[tuple[WebSocketTestSession, Msg]]:
    """A /ws/training session and its ``connected`` greeting."""
    with api.websocket_connect("/ws/training" + (f"?{query}" if query else ""), **kw) as ws:
        hello = recv(ws)
        assert hello["type"] == "connected", hello
        yield ws, hello


def is_final(job_id: str) -> Callable[[Msg], bool]:
    return lambda m: (
        m.get("type") == "training_update" and m["jobId"] == job_id and m["status"] in TERMINAL
    )


def is_dataset(dataset_id: str, action: str) -> Callable[[Msg], bool]:
    return lambda m: (
        m.get("type") == "dataset_update" and m["datasetId"] == dataset_id and m["action"] == action
    )


def create_job(api: TestClient, params: dict[str, Any] | None = None, **body: Any) -> Msg:
    r = api.post(
        "/training/jobs",
        json={"kind": "simulate", "params": FAST if params is None else params, **body},
    )
    assert r.status_code == 201, r.text
    return r.json()


def create_dataset(api: TestClient, name: str = "ds", examples: list[Msg] | None = None) -> Msg:
    r = api.post(
        "/training/datasets",
        json={"name": name, "examples": EXAMPLES if examples is None else examples},
    )
    assert r.status_code == 201, r.text
    return r.json()


def get_job(api: TestClient, job_id: str) -> Msg:
    r = api.get(f"/training/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_status(api: TestClient, job_id: str, *statuses: str, timeout: float = 10.0) -> Msg:
    def check() -> Msg | None:
        job = get_job(api, job_id)
        return job if job["status"] in statuses else None

    what = f"job {job_id} to be {'/'.join(statuses)}"
    return wait_for(check, timeout, what=what)


def wait_running(api: TestClient, job_id: str) -> None:
    """Wait until the job's ``running`` update is logged (it follows the durable save)."""

    def logged() -> bool:
        events = api.get(f"/training/jobs/{job_id}/events").json()
        return any(e.get("status") == "running" for e in events)

    wait_for(logged, what=f"job {job_id}'s running update")


def wait_logged_end(api: TestClient, job_id: str) -> list[Msg]:
    """Wait until the job's final update is in the event log; return the job's events.

    REST shows a new status as soon as it is set, the event follows the durable save.
    """

    def events() -> list[Msg] | None:
        got: list[Msg] = api.get(f"/training/jobs/{job_id}/events").json()
        return got if got and got[-1].get("status") in TERMINAL else None

    return wait_for(events, what=f"job {job_id}'s final update")


def snapshot(api: TestClient) -> tuple[dict[str, int], list[str], int]:
    """Job counts, dataset ids and the event head: what a rejected request must not change."""
    health = api.get("/healthz").json()
    datasets = sorted(d["id"] for d in api.get("/training/datasets").json())
    return health["jobs"], datasets, health["headSeq"]


def assert_error(r: Any, status: int, field: str | None, code: str | None = None) -> Msg:
    """``r`` is ``status`` with the one error shape, naming ``field``."""
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"], body
    err = body["error"]
    assert set(err) == {"code", "message", "field"}, err
    assert isinstance(err["code"], str) and err["code"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["field"] == field, err
    if code is not None:
        assert err["code"] == code, err
    return err


def state_events(events: list[Msg]) -> list[Msg]:
    """The events that change a job or dataset: all but the trainers' ``job_log`` lines (which
    have a seq but no jobSeq)."""
    return [e for e in events if e["type"] != "job_log"]


def check_order(events: list[Msg], epoch: str) -> None:
    """Logged events: seq +1 each, jobSeq +1 per job, progress monotonic within an attempt."""
    assert events, "no events"
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    job_seqs: dict[str, list[int]] = {}
    progress: dict[tuple[str, int], float] = {}
    for e in events:
        assert e["type"] in ("job_created", "training_update", "dataset_update", "job_log"), e
        assert isinstance(e["seq"], int) and e["epoch"] == epoch, e
        assert isinstance(e["timestamp"], int), e
        if e["type"] == "job_log":
            assert "jobSeq" not in e, e
        elif "jobId" in e:
            job_seqs.setdefault(e["jobId"], []).append(e["jobSeq"])
        else:
            assert "jobSeq" not in e, e
        if e["type"] == "training_update":
            key = (e["jobId"], e["attempt"])
            assert e["progress"] >= progress.get(key, 0), f"progress went back: {e}"
            progress[key] = e["progress"]
    for job_id, js in job_seqs.items():
        assert js == list(range(js[0], js[0] + len(js))), (job_id, js)


# --- datasets -----------------------------------------------------------------------------


def test_dataset_list_shape(api: TestClient) -> None:
    """GET /training/datasets is a bare array of summaries: int size and times, no examples."""
    create_dataset(api, "shape")
    rows = api.get("/training/datasets").json()
    assert isinstance(rows, list) and len(rows) == 2  # the sample data set and ours
    for row in rows:
        assert isinstance(row["id"], str) and row["id"]
        assert isinstance(row["name"], str) and row["name"]
        for key in ("size", "createdAt", "updatedAt"):
            assert type(row[key]) is int, (key, row)
        assert "examples" not in row
    ours = next(r for r in rows if r["name"] == "shape")
    assert ours["size"] == 2 and ours["intentCount"] == 2
    assert [r["createdAt"] for r in rows] == sorted(r["createdAt"] for r in rows)


def test_dataset_crud_broadcasts_dataset_updates(api: TestClient) -> None:
    """Create 201, get with examples, PUT rename/replace, DELETE 204; each one is broadcast."""
    with ws_connect(api) as (ws, _):
        r = api.post(
            "/training/datasets",
            json={"name": "  pizza  ", "examples": EXAMPLES, "description": "d"},
        )
        assert r.status_code == 201, r.text
        ds = r.json()
        assert ds["name"] == "pizza" and ds["size"] == 2 and ds["examples"] == EXAMPLES
        assert ds["createdAt"] == ds["updatedAt"]
        created = recv_until(ws, is_dataset(ds["id"], "created"))[-1]
        assert created["seq"] and created["epoch"]

        got = api.get(f"/training/datasets/{ds['id']}").json()
        assert got == ds

        r = api.put(f"/training/datasets/{ds['id']}", json={"name": "renamed"})
        assert r.status_code == 200, r.text
        assert r.json()["name"] == "renamed" and r.json()["examples"] == EXAMPLES
        assert r.json()["updatedAt"] >= ds["updatedAt"]
        recv_until(ws, is_dataset(ds["id"], "updated"))

        r = api.put(
            f"/training/datasets/{ds['id']}",
            json={"examples": [{"text": "bye", "intent": "goodbye"}]},
        )
        assert r.status_code == 200, r.text
        assert r.json()["name"] == "renamed" and r.json()["size"] == 1
        assert api.get(f"/training/datasets/{ds['id']}").json()["examples"] == [
            {"text": "bye", "intent": "goodbye"}
        ]
        recv_until(ws, is_dataset(ds["id"], "updated"))

        r = api.delete(f"/training/datasets/{ds['id']}")
        assert r.status_code == 204 and r.content == b""
        recv_until(ws, is_dataset(ds["id"], "deleted"))
    assert_error(api.get(f"/training/datasets/{ds['id']}"), 404, "datasetId", "not_found")
    assert ds["id"] not in [d["id"] for d in api.get("/training/datasets").json()]


def test_dataset_put_null_name_keeps_the_name(api: TestClient) -> None:
    """PUT with "name": null changes nothing but the other fields (no 500)."""
    ds = create_dataset(api, "keep")
    r = api.put(f"/training/datasets/{ds['id']}", json={"name": None, "description": "new"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "keep" and r.json()["description"] == "new"


def test_dataset_used_by_active_job_cannot_be_deleted(api: TestClient) -> None:
    """DELETE of a dataset is 409 while a running or queued job uses it, 204 once none does."""
    ds = create_dataset(api, "busy")
    running = [create_job(api, SLOW, datasetId=ds["id"]) for _ in range(2)]  # fills both workers
    for job in running:
        wait_status(api, job["id"], "running")
    queued = create_job(api, SLOW, datasetId=ds["id"])
    assert get_job(api, queued["id"])["status"] == "queued"

    err = assert_error(api.delete(f"/training/datasets/{ds['id']}"), 409, "datasetId", "in_use")
    assert running[0]["id"] in err["message"]
    for job in running:
        assert api.post(f"/training/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    err = assert_error(api.delete(f"/training/datasets/{ds['id']}"), 409, "datasetId", "in_use")
    assert queued["id"] in err["message"]
    assert api.post(f"/training/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"

    assert api.delete(f"/training/datasets/{ds['id']}").status_code == 204
    assert api.get(f"/training/datasets/{ds['id']}").status_code == 404


# --- jobs ---------------------------------------------------------------------------------


def test_job_runs_to_success_with_live_updates(api: TestClient) -> None:
    """POST is 201 queued at 0; job_created then training_updates reach succeeded at 100."""
    with ws_connect(api) as (ws, hello):
        job = create_job(api, {"steps": 4, "stepMs": 5})
        assert job["status"] == "queued" and job["progress"] == 0 and job["kind"] == "simulate"
        assert (
            job["attempt"] == 0
            and job["datasetId"] is None
            and job["params"] == {"steps": 4, "stepMs": 5}
        )
        for key in ("createdAt", "updatedAt"):
            assert type(job[key]) is int
        events = recv_until(ws, is_final(job["id"]))
    assert events[0]["type"] == "job_created" and events[0]["jobId"] == job["id"]
    assert events[0]["job"] == job
    assert events[0]["seq"] == hello["headSeq"] + 1
    updates = state_events(events[1:])
    assert all(e["type"] == "training_update" and e["jobId"] == job["id"] for e in updates)
    assert (
        updates[0]["status"] == "running"
        and updates[0]["progress"] == 0
        and updates[0]["attempt"] == 1
    )
    assert [e["status"] for e in updates[1:-1]] == ["running"] * 4
    assert updates[-1]["status"] == "succeeded" and updates[-1]["progress"] == 100
    check_order(events, hello["epoch"])

    done = get_job(api, job["id"])
    assert done["status"] == "succeeded" and done["progress"] == 100 and done["attempt"] == 1
    assert done["metrics"]["steps"] == 4 and done["error"] is None
    assert done["startedAt"] <= done["finishedAt"]


def test_failing_trainer_ends_failed_with_its_error(api: TestClient) -> None:
    """A trainer that raises ends the job failed; the error is on the job and in the update."""
    with ws_connect(api) as (ws, hello):
        job = create_job(api, {"steps": 3, "stepMs": 5, "failAt": 2})
        events = recv_until(ws, is_final(job["id"]))
    last = events[-1]
    assert last["status"] == "failed"
    assert last["error"] == "simulated failure at step 2 of 3"
    assert "simulated failure at step 2 of 3" in last["message"]
    assert last["progress"] < 100
    check_order(events, hello["epoch"])
    failed = get_job(api, job["id"])
    assert failed["status"] == "failed" and failed["error"] == "simulated failure at step 2 of 3"
    assert failed["finishedAt"] is not None


def test_created_job_is_on_disk_when_post_returns(api: TestClient, settings: Any) -> None:
    """When POST /training/jobs answers, the job is in the data dir's log, and so is every
    event a client was sent."""
    job = create_job(api, SLOW)
    assert stored(settings.data_dir).jobs[job["id"]]["status"] in ("queued", "running")
    logged = wait_logged_end(api, create_job(api)["id"])
    on_disk = stored(settings.data_dir).events
    assert all(e in on_disk for e in logged)


def test_list_jobs_newest_first_as_bare_array(api: TestClient) -> None:
    """GET /training/jobs is a bare array, newest first."""
    ids = [create_job(api)["id"] for _ in range(4)]
    r = api.get("/training/jobs")
    assert r.status_code == 200
    rows = r.json()
    assert isinstance(rows, list)
    assert [j["id"] for j in rows] == ids[::-1]
    created = [j["createdAt"] for j in rows]
    assert created == sorted(created, reverse=True) and len(set(created)) == len(created)
    assert "X-Next-Cursor" not in r.headers


def test_list_jobs_status_filter(api: TestClient) -> None:
    """?status= keeps only those statuses, repeated or comma-separated."""
    ok = create_job(api)
    bad = create_job(api, {"steps": 2, "stepMs": 5, "failAt": 1})
    wait_status(api, ok["id"], "succeeded")
    wait_status(api, bad["id"], "failed")
    slow = create_job(api, SLOW)
    wait_status(api, slow["id"], "running")

    def ids(query: str) -> list[str]:
        r = api.get(f"/training/jobs?{query}")
        assert r.status_code == 200, r.text
        return [j["id"] for j in r.json()]

    assert ids("status=succeeded") == [ok["id"]]
    assert ids("status=failed") == [bad["id"]]
    assert ids("status=running") == [slow["id"]]
    assert ids("status=queued") == []
    assert ids("status=succeeded&status=running") == [slow["id"], ok["id"]]
    assert ids("status=succeeded,failed") == [bad["id"], ok["id"]]


def test_list_jobs_pagination_covers_every_job_once(api: TestClient) -> None:
    """limit + X-Next-Cursor pages through every job exactly once, newest first."""
    ids = [create_job(api, SLOW if i % 3 == 0 else FAST)["id"] for i in range(7)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        r = api.get("/training/jobs", params=params)
        assert r.status_code == 200, r.text
        page = [j["id"] for j in r.json()]
        pages += 1
        assert len(page) <= 3
        seen += page
        cursor = r.headers.get("X-Next-Cursor")
        if cursor is None:
            break
        last = r.json()[-1]
        assert cursor == f"{last['createdAt']}.{last['id']}" and 'rel="next"' in r.headers["Link"]
        assert pages < 10
    assert pages == 3
    assert seen == ids[::-1]
    # A job id as the cursor (what servers before positions gave) still pages on from that job.
    older = api.get("/training/jobs", params={"limit": 3, "cursor": ids[4]})
    assert [j["id"] for j in older.json()] == ids[3::-1][:3]


def test_get_job_and_unknown_job(api: TestClient) -> None:
    """GET a job returns it; an unknown id is 404 naming jobId."""
    job = create_job(api, SLOW)
    assert get_job(api, job["id"])["id"] == job["id"]
    assert_error(api.get("/training/jobs/job-nope"), 404, "jobId", "not_found")
    assert_error(api.post("/training/jobs/job-nope/cancel"), 404, "jobId", "not_found")
    assert_error(api.delete("/training/jobs/job-nope"), 404, "jobId", "not_found")


def test_cancel_running_job(api: TestClient) -> None:
    """Cancel of a running job returns it cancelled and broadcasts that; a second cancel is 409."""
    with ws_connect(api) as (ws, hello):
        job = create_job(api, SLOW)
        wait_status(api, job["id"], "running")
        r = api.post(f"/training/jobs/{job['id']}/cancel")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled" and r.json()["finishedAt"] is not None
        events = recv_until(ws, is_final(job["id"]))
    assert events[-1]["status"] == "cancelled"
    check_order(events, hello["epoch"])
    assert get_job(api, job["id"])["status"] == "cancelled"
    assert_error(api.post(f"/training/jobs/{job['id']}/cancel"), 409, "jobId", "finished")


def test_cancel_queued_job_never_starts(api: TestClient) -> None:
    """A queued job cancels at once and is not started when a worker frees up."""
    running = [create_job(api, SLOW) for _ in range(2)]
    for job in running:
        wait_status(api, job["id"], "running")
    queued = create_job(api, SLOW)
    r = api.post(f"/training/jobs/{queued['id']}/cancel")
    assert r.status_code == 200, r.text
    assert (
        r.json()["status"] == "cancelled"
        and r.json()["attempt"] == 0
        and r.json()["startedAt"] is None
    )

    api.post(f"/training/jobs/{running[0]['id']}/cancel")
    later = create_job(
        api
    )  # queued behind the cancelled one, so it runs after the worker skipped it
    wait_status(api, later["id"], "succeeded")
    after = get_job(api, queued["id"])
    assert after["status"] == "cancelled" and after["attempt"] == 0


def test_cancel_right_after_create_always_cancels(api: TestClient) -> None:
    """A cancel sent right after the create returns the job cancelled, even while it starts."""
    for _ in range(15):
        job = create_job(api, SLOW)
        r = api.post(f"/training/jobs/{job['id']}/cancel")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled", r.json()
        assert get_job(api, job["id"])["status"] == "cancelled"


def test_cancel_finished_job_is_conflict(api: TestClient) -> None:
    """Cancel of a succeeded job is 409 and leaves it succeeded."""
    job = create_job(api)
    wait_status(api, job["id"], "succeeded")
    assert_error(api.post(f"/training/jobs/{job['id']}/cancel"), 409, "jobId", "finished")
    assert get_job(api, job["id"])["status"] == "succeeded"


def test_delete_finished_job_and_refuse_active(api: TestClient) -> None:
    """DELETE of a finished job is 204 and it is gone; of a running one 409 and it stays."""
    done = create_job(api)
    wait_status(api, done["id"], "succeeded")
    active = create_job(api, SLOW)
    wait_status(api, active["id"], "running")

    assert_error(api.delete(f"/training/jobs/{active['id']}"), 409, "jobId", "active")
    assert get_job(api, active["id"])["status"] == "running"

    r = api.delete(f"/training/jobs/{done['id']}")
    assert r.status_code == 204 and r.content == b""
    assert api.get(f"/training/jobs/{done['id']}").status_code == 404
    assert [j["id"] for j in api.get("/training/jobs").json()] == [active["id"]]


def test_idempotency_key_replays_the_same_job_and_broadcasts_once(api: TestClient) -> None:
    """A retried POST with the same key and body returns the first job and creates nothing."""
    body = {"kind": "simulate", "params": SLOW}
    headers = {"Idempotency-Key": "retry-me-1"}
    with ws_connect(api) as (ws, _):
        first = api.post("/training/jobs", json=body, headers=headers)
        assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
        again = api.post("/training/jobs", json=body, headers=headers)
        assert again.status_code == 201, again.text
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]
        marker = create_dataset(api, "marker")
        seen = recv_until(ws, is_dataset(marker["id"], "created"))
    created = [m for m in seen if m["type"] == "job_created"]
    assert [m["jobId"] for m in created] == [first.json()["id"]]
    assert len(api.get("/training/jobs").json()) == 1


def test_idempotency_key_with_another_body_is_conflict(api: TestClient) -> None:
    """The same Idempotency-Key with a different body is 409 and creates nothing."""
    headers = {"Idempotency-Key": "retry-me-2"}
    first = api.post("/training/jobs", json={"kind": "simulate", "params": SLOW}, headers=headers)
    assert first.status_code == 201
    wait_running(api, first.json()["id"])
    before = snapshot(api)
    r = api.post("/training/jobs", json={"kind": "simulate", "params": FAST}, headers=headers)
    assert_error(r, 409, "Idempotency-Key", "idempotency_mismatch")
    assert snapshot(api) == before


def test_overlong_idempotency_key_is_rejected(api: TestClient) -> None:
    """An Idempotency-Key over 200 characters is 422 naming the header, and creates nothing."""
    before = snapshot(api)
    r = api.post(
        "/training/jobs", json={"kind": "simulate"}, headers={"Idempotency-Key": "k" * 201}
    )
    assert_error(r, 422, "Idempotency-Key")
    assert snapshot(api) == before


# --- bad input ----------------------------------------------------------------------------

BAD_JOBS = [
    # (raw body, status, field, code or None)
    ('{"kind":', 400, None, "invalid_json"),
    ('{"kind": "simulate",}', 400, None, "invalid_json"),
    ("[]", 422, None, None),
    ('"simulate"', 422, None, None),
    ("{}", 422, "kind", None),
    ('{"kind": 5}', 422, "kind", None),
    ('{"kind": ""}', 422, "kind", None),
    ('{"kind": "nope"}', 422, "kind", "unknown_kind"),
    ('{"kind": "simulate", "params": []}', 422, "params", None),
    ('{"kind": "simulate", "datasetId": 7}', 422, "datasetId", None),
    ('{"kind": "simulate", "datasetId": "ds-nope"}', 404, "datasetId", "unknown_dataset"),
    ('{"kind": "nlu-train"}', 422, "datasetId", None),
    ('{"kind": "simulate", "color": "red"}', 422, "color", None),
    ('{"kind": "simulate", "params": {"color": "red"}}', 422, "params.color", None),
    ('{"kind": "simulate", "params": {"steps": 0}}', 422, "params.steps", None),
    ('{"kind": "simulate", "params": {"steps": 1000000000000}}', 422, "params.steps", None),
    ('{"kind": "simulate", "params": {"steps": "x"}}', 422, "params.steps", None),
    ('{"kind": "simulate", "params": {"steps": 2.5}}', 422, "params.steps", None),
    ('{"kind": "simulate", "params": {"steps": true}}', 422, "params.steps", None),
    ('{"kind": "simulate", "params": {"stepMs": -1}}', 422, "params.stepMs", None),
    ('{"kind": "simulate", "params": {"failAt": 0}}', 422, "params.failAt", None),
    ('{"kind": "simulate", "params": {"stepMs": NaN}}', 422, "params.stepMs", None),
    ('{"kind": "simulate", "params": {"stepMs": Infinity}}', 422, "params.stepMs", None),
    ('{"kind": "simulate", "params": {"stepMs": -Infinity}}', 422, "params.stepMs", None),
    ('{"kind": "simulate", "params": {"steps": 1e400}}', 422, "params.steps", None),
    ('{"kind": "simulate", "params": {"deep": {"x": [1, NaN]}}}', 422, "params.deep.x[1]", None),
    ('{"kind": NaN}', 422, "kind", None),
    ('{"kind": "simulate", "agentId": Infinity}', 422, "agentId", None),
]


@pytest.mark.parametrize(
    ("body", "status", "field", "code"), BAD_JOBS, ids=[b[0] for b in BAD_JOBS]
)
def test_bad_job_request_is_rejected_whole(
    api: TestClient, body: str, status: int, field: str | None, code: str | None
) -> None:
    """A bad POST /training/jobs is a 4xx error naming the field and writes nothing."""
    before = snapshot(api)
    r = api.post("/training/jobs", content=body, headers=JSON_HEADERS)
    assert_error(r, status, field, code)
    assert snapshot(api) == before


def test_nlu_train_on_an_empty_dataset_is_rejected(api: TestClient) -> None:
    """nlu-train needs examples: an empty dataset is 422 empty_dataset on datasetId."""
    empty = create_dataset(api, "empty", examples=[])
    before = snapshot(api)
    r = api.post("/training/jobs", json={"kind": "nlu-train", "datasetId": empty["id"]})
    assert_error(r, 422, "datasetId", "empty_dataset")
    assert snapshot(api) == before


def _example(**kw: Any) -> str:
    return json.dumps({"name": "x", "examples": [{"text": "order pizza", "intent": "order", **kw}]})


BAD_DATASETS = [
    ('{"name": ', 400, None, "invalid_json"),
    ("{}", 422, "name", None),
    ('{"name": ""}', 422, "name", None),
    ('{"name": "   "}', 422, "name", None),
    ('{"name": "a\\u0001b"}', 422, "name", None),
    ('{"name": 5}', 422, "name", None),
    ('{"name": NaN}', 422, "name", None),
    ('{"name": "x", "owner": "me"}', 422, "owner", None),
    ('{"name": "x", "examples": "many"}', 422, "examples", None),
    ('{"name": "x", "examples": [{"text": "hi"}]}', 422, "examples[0].intent", None),
    ('{"name": "x", "examples": [{"text": " ", "intent": "g"}]}', 422, "examples[0].text", None),
    (
        '{"name": "x", "examples": [{"text": "hi", "intent": "g", "score": NaN}]}',
        422,
        "examples[0].score",
        None,
    ),
    (
        _example(entities=[{"start": 6, "end": 50, "value": "pizza", "entity": "dish"}]),
        422,
        "examples[0].entities",
        None,
    ),
    (
        _example(entities=[{"start": 6, "end": 11, "value": "pasta", "entity": "dish"}]),
        422,
        "examples[0].entities",
        None,
    ),
    (
        _example(entities=[{"start": 8, "end": 6, "value": "", "entity": "dish"}]),
        422,
        "examples[0].entities",
        None,
    ),
    (
        _example(entities=[{"start": -1, "end": 5, "value": "order", "entity": "x"}]),
        422,
        "examples[0].entities[0].start",
        None,
    ),
    (
        (
            '{"name": "x", "examples": [{"text": "hi", "intent": "g", '
            '"entities": [{"start": Infinity, "end": 2, "value": "hi", "entity": "e"}]}]}'
        ),
        422,
        "examples[0].entities[0].start",
        None,
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "field", "code"), BAD_DATASETS, ids=[b[0][:60] for b in BAD_DATASETS]
)
def test_bad_dataset_create_is_rejected_whole(
    api: TestClient, body: str, status: int, field: str | None, code: str | None
) -> None:
    """A bad POST /training/datasets is a 4xx error naming the field and writes nothing."""
    before = snapshot(api)
    assert_error(
        api.post("/training/datasets", content=body, headers=JSON_HEADERS), status, field, code
    )
    assert snapshot(api) == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"name": "  "}', "name"),
        ('{"name": "ok", "examples": [{"text": "hi"}]}', "examples[0].intent"),
        ('{"name": "ok", "size": 3}', "size"),
        ('{"description": NaN}', "description"),
    ],
)
def test_bad_dataset_update_changes_nothing(api: TestClient, body: str, field: str) -> None:
    """A bad PUT is 422 naming the field and leaves the dataset as it was."""
    ds = create_dataset(api, "stay")
    before = snapshot(api)
    assert_error(
        api.put(f"/training/datasets/{ds['id']}", content=body, headers=JSON_HEADERS), 422, field
    )
    assert api.get(f"/training/datasets/{ds['id']}").json() == ds
    assert snapshot(api) == before


def test_unknown_dataset_is_404_everywhere(api: TestClient) -> None:
    """GET, PUT and DELETE of an unknown dataset are 404 naming datasetId."""
    assert_error(api.get("/training/datasets/ds-nope"), 404, "datasetId", "not_found")
    assert_error(
        api.put("/training/datasets/ds-nope", json={"name": "x"}), 404, "datasetId", "not_found"
    )
    assert_error(api.delete("/training/datasets/ds-nope"), 404, "datasetId", "not_found")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=bogus", "status"),
        ("status=queued,bogus", "status"),
        ("cursor=job-nope", "cursor"),
        ("limit=0", "limit"),
        ("limit=x", "limit"),
        ("limit=100000", "limit"),
    ],
)
def test_bad_list_query_is_422(api: TestClient, query: str, field: str) -> None:
    """A bad status filter, cursor or limit is 422 naming the parameter."""
    create_job(api, SLOW)
    assert_error(api.get(f"/training/jobs?{query}"), 422, field)


def test_unknown_route_is_404_in_the_error_shape(api: TestClient) -> None:
    """An unknown path is 404 with the same JSON error body, code no_route (a missing job is
    not_found); a wrong method is 405."""
    err = assert_error(api.get("/training/nope"), 404, None, "no_route")
    assert "/training/nope" in err["message"]
    assert_error(api.delete("/training/jobs"), 405, None, "method_not_allowed")


# --- WebSocket ----------------------------------------------------------------------------


def test_ws_greeting_carries_head_and_epoch(api: TestClient) -> None:
    """The connected greeting has headSeq and epoch (as /healthz) and no seq."""
    health = api.get("/healthz").json()
    with ws_connect(api) as (_, hello):
        assert hello["headSeq"] == health["headSeq"] and hello["epoch"] == health["epoch"]
        assert "seq" not in hello and "jobSeq" not in hello
        assert hello["message"] and isinstance(hello["timestamp"], int)


def test_ws_ping_and_bad_messages_keep_the_connection(api: TestClient) -> None:
    """ping gets pong; bad JSON, non-objects and unknown types get an error; the socket lives on."""
    with ws_connect(api) as (ws, _):
        ws.send_text('{"type": "ping"}')
        pong = recv(ws)
        assert pong["type"] == "pong" and "seq" not in pong
        ws.send_text("not json")
        assert recv(ws)["type"] == "error"
        ws.send_text('{"type": NaN}')
        assert recv(ws)["code"] == "invalid_json"
        ws.send_text("[1, 2]")
        assert recv(ws)["code"] == "invalid_message"
        ws.send_text('{"type": "subscribe"}')
        err = recv(ws)
        assert err["type"] == "error" and err["code"] == "unknown_type" and "seq" not in err
        ws.send_text('{"type": "ping"}')
        assert recv(ws)["type"] == "pong"
        ds = create_dataset(api, "still-live")
        assert recv_until(ws, is_dataset(ds["id"], "created"))


def test_ws_events_are_numbered_in_order(api: TestClient) -> None:
    """Across concurrent jobs seq is +1 per event, jobSeq +1 per job, progress never falls."""
    with ws_connect(api) as (ws, hello):
        a = create_job(api, {"steps": 6, "stepMs": 5})
        b = create_job(api, {"steps": 5, "stepMs": 7})
        ds = create_dataset(api, "between")
        c = create_job(api, {"steps": 3, "stepMs": 5, "failAt": 2})
        finals: set[str] = set()

        def all_done(m: Msg) -> bool:
            if m.get("type") == "training_update" and m["status"] in TERMINAL:
                finals.add(m["jobId"])
            return finals == {a["id"], b["id"], c["id"]}

        events = recv_until(ws, all_done)
    assert events[0]["seq"] == hello["headSeq"] + 1
    check_order(events, hello["epoch"])
    for job in (a, b, c):
        mine = [e for e in events if e.get("jobId") == job["id"]]
        assert mine[0]["type"] == "job_created" and mine[0]["jobSeq"] == 1
    assert any(is_dataset(ds["id"], "created")(e) for e in events)


def test_ws_since_replays_exactly_then_continues_live(api: TestClient) -> None:
    """since=N replays the events after N, then live events follow with no gap or duplicate."""
    with ws_connect(api) as (ws, hello):
        job = create_job(api)
        seen = recv_until(ws, is_final(job["id"]))
    n = seen[1]["seq"]
    with ws_connect(api, f"since={n}&epoch={hello['epoch']}") as (ws, hello2):
        head = hello2["headSeq"]
        assert head == seen[-1]["seq"]
        replay = [recv(ws) for _ in range(head - n)]
        assert replay == [e for e in seen if e["seq"] > n]
        ds = create_dataset(api, "live")
        live = recv(ws)
        assert live["seq"] == head + 1 and is_dataset(ds["id"], "created")(live)


def test_ws_replay_joins_a_running_job_without_gap(api: TestClient) -> None:
    """Joining mid-job with since=0&jobs=ID gives the job's history once, in order, then live."""
    job = create_job(api, {"steps": 5000, "stepMs": 1})  # progress flows for seconds
    with ws_connect(api) as (ws, _):
        recv_until(ws, lambda m: m.get("type") == "training_update" and m["progress"] > 0)
    with ws_connect(api, f"since=0&jobs={job['id']}") as (ws, hello):
        events = recv_until(ws, lambda m: m["seq"] > hello["headSeq"] + 3)  # replay, then live
        assert api.post(f"/training/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        events += recv_until(ws, is_final(job["id"]))
    states = state_events(events)
    assert [e["jobSeq"] for e in states] == list(range(1, len(states) + 1))
    assert events[0]["type"] == "job_created" and events[-1]["status"] == "cancelled"
    assert any(e["seq"] <= hello["headSeq"] and e["progress"] > 0 for e in states[1:])
    check_order(events, hello["epoch"])
    assert wait_logged_end(api, job["id"]) == events


def test_ws_jobs_filter(api: TestClient) -> None:
    """jobs=ID limits both the replay and the live events to those jobs."""
    a = create_job(api)
    b = create_job(api)
    wait_status(api, a["id"], "succeeded")
    wait_status(api, b["id"], "succeeded")
    with ws_connect(api, f"since=0&jobs={a['id']}") as (ws, _):
        events = recv_until(ws, is_final(a["id"]))
    assert {e["jobId"] for e in events} == {a["id"]}
    assert events[0]["type"] == "job_created" and events[-1]["status"] == "succeeded"

    c = create_job(api, SLOW)
    wait_running(api, c["id"])
    with ws_connect(api, f"jobs={c['id']}") as (ws, _):
        # Everything below is logged before c's cancellation, so a leak would arrive first.
        wait_logged_end(api, create_job(api)["id"])
        create_dataset(api, "filtered-out")
        api.post(f"/training/jobs/{c['id']}/cancel")
        live = recv_until(ws, is_final(c["id"]))
    assert [(e["jobId"], e["status"]) for e in live] == [(c["id"], "cancelled")]

    with ws_connect(api, f"since=0&jobs={a['id']},{c['id']}") as (ws, _):
        events = recv_until(ws, is_final(c["id"]))
    assert {e["jobId"] for e in events} == {a["id"], c["id"]}
    assert events == wait_logged_end(api, a["id"]) + wait_logged_end(api, c["id"])


def test_ws_since_with_another_epoch_gets_resync(api: TestClient) -> None:
    """since with a different epoch gets resync (epoch_changed), then live events."""
    create_job(api)
    with ws_connect(api, "since=1&epoch=not-this-one") as (ws, hello):
        msg = recv(ws)
        assert msg["type"] == "resync" and msg["reason"] == "epoch_changed"
        assert msg["epoch"] == hello["epoch"] and msg["headSeq"] == hello["headSeq"]
        ds = create_dataset(api, "after-resync")
        live = recv_until(ws, is_dataset(ds["id"], "created"))
    assert live[0]["seq"] > hello["headSeq"]


def test_ws_since_beyond_head_errors_and_closes_4400(api: TestClient) -> None:
    """since beyond the head gets connected, an error, then close code 4400."""
    head = api.get("/healthz").json()["headSeq"]
    with api.websocket_connect(f"/ws/training?since={head + 5}") as ws:
        assert recv(ws)["type"] == "connected"
        err = recv(ws)
        assert err["type"] == "error" and err["code"] == "since_in_future"
        with pytest.raises(WebSocketDisconnect) as info:
            recv(ws)
    assert info.value.code == 4400


@pytest.mark.parametrize("since", ["x", "-1", "1.5"])
def test_ws_malformed_since_closes_4400(api: TestClient, since: str) -> None:
    """A since that is not a non-negative integer gets a bad_request error and close 4400."""
    with api.websocket_connect(f"/ws/training?since={since}") as ws:
        assert recv(ws)["type"] == "connected"
        assert recv(ws)["code"] == "bad_request"
        with pytest.raises(WebSocketDisconnect) as info:
            recv(ws)
    assert info.value.code == 4400


def test_job_events_rest_since(api: TestClient) -> None:
    """GET /training/jobs/{id}/events?since=N is the job's events after N as a JSON array."""
    other = create_job(api)
    job = create_job(api)
    wait_logged_end(api, job["id"])
    wait_logged_end(api, other["id"])
    r = api.get(f"/training/jobs/{job['id']}/events")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    events = r.json()
    assert isinstance(events, list) and {e["jobId"] for e in events} == {job["id"]}
    states = state_events(events)
    assert [e["jobSeq"] for e in states] == list(range(1, len(states) + 1))
    assert events[0]["type"] == "job_created" and events[-1]["status"] == "succeeded"
    n = events[1]["seq"]
    assert api.get(f"/training/jobs/{job['id']}/events?since={n}").json() == events[2:]
    assert api.get(f"/training/jobs/{job['id']}/events?since={events[-1]['seq']}").json() == []
    assert_error(api.get(f"/training/jobs/{job['id']}/events?since=-1"), 422, "since")
    assert_error(api.get("/training/jobs/job-nope/events"), 404, "jobId")


def _sse_frames(lines: Iterator[str], count: int) -> list[dict[str, str]]:
    """The first ``count`` SSE frames with an ``event`` field, as dicts of their fields."""
    frames: list[dict[str, str]] = []
    frame: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "event" in frame:
                frames.append(frame)
                if len(frames) == count:
                    return frames
            frame = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            frame[key] = value.removeprefix(" ")
    raise AssertionError(f"stream ended after {len(frames)} frames")


def test_sse_uses_seq_as_id_and_honours_last_event_id(api: TestClient) -> None:
    """SSE sends each event with id = seq; Last-Event-ID (or since) resumes after it."""
    job = create_job(api)
    events = wait_logged_end(api, job["id"])
    n = events[1]["seq"]
    with api.stream("GET", "/training/events", params={"jobs": job["id"], "since": 0}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        frames = _sse_frames(r.iter_lines(), 1 + len(events))
    assert frames[0]["event"] == "connected" and "id" not in frames[0]
    assert [int(f["id"]) for f in frames[1:]] == [e["seq"] for e in events]
    assert [f["event"] for f in frames[1:]] == [e["type"] for e in events]
    assert [json.loads(f["data"]) for f in frames[1:]] == events

    with api.stream(
        "GET", "/training/events", params={"jobs": job["id"]}, headers={"Last-Event-ID": str(n)}
    ) as r:
        frames = _sse_frames(r.iter_lines(), 1 + len(events) - 2)
    assert [int(f["id"]) for f in frames[1:]] == [e["seq"] for e in events[2:]]


def test_sse_last_event_id_wins_over_since(api: TestClient) -> None:
    """An EventSource opened with ?since=0 reconnects with Last-Event-ID: it resumes after that id,
    not from 0 again (the URL keeps since=0 on every reconnect)."""
    job = create_job(api)
    events = wait_logged_end(api, job["id"])
    n = events[-2]["seq"]
    with api.stream(
        "GET", "/training/events", params={"jobs": job["id"], "since": 0}, headers={"Last-Event-ID": str(n)}
    ) as r:
        frames = _sse_frames(r.iter_lines(), 2)
    assert [int(f["id"]) for f in frames[1:]] == [events[-1]["seq"]]


def test_sse_streams_live_events(api: TestClient) -> None:
    """Without since, SSE sends connected then live events only."""
    with api.stream("GET", "/training/events") as r:
        lines = r.iter_lines()
        hello = _sse_frames(lines, 1)[0]
        assert json.loads(hello["data"])["type"] == "connected"
        ds = create_dataset(api, "sse-live")
        live = _sse_frames(lines, 1)[0]
    assert live["event"] == "dataset_update" and json.loads(live["data"])["datasetId"] == ds["id"]
    assert int(live["id"]) == json.loads(hello["data"])["headSeq"] + 1


def test_sse_bad_since_is_422(api: TestClient) -> None:
    """SSE with a malformed or future since is a 422 naming since."""
    assert_error(api.get("/training/events?since=x"), 422, "since")
    head = api.get("/healthz").json()["headSeq"]
    assert_error(api.get(f"/training/events?since={head + 1}"), 422, "since", "since_in_future")


# --- CORS, OpenAPI, health ----------------------------------------------------------------


def test_cors_allows_loopback_origins_only(api: TestClient) -> None:
    """A loopback Origin gets Access-Control-Allow-Origin; a foreign one does not."""
    r = api.get("/training/jobs", headers={"Origin": "http://localhost:3000"})
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "X-Next-Cursor" in r.headers["access-control-expose-headers"]
    r = api.get("/training/jobs", headers={"Origin": "http://127.0.0.1:5173"})
    assert r.headers["access-control-allow-origin"] == "http://127.0.0.1:5173"
    r = api.get("/training/jobs", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = api.get("/training/jobs", headers={"Origin": "http://localhost:3000.evil.example"})
    assert "access-control-allow-origin" not in r.headers

    pre = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    r = api.options("/training/jobs", headers={"Origin": "http://localhost:3000", **pre})
    assert (
        r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    )
    r = api.options("/training/jobs", headers={"Origin": "https://evil.example", **pre})
    assert r.status_code >= 400 and "access-control-allow-origin" not in r.headers


def test_ws_foreign_origin_is_refused(api: TestClient) -> None:
    """A WebSocket from a foreign Origin is refused at the handshake; localhost:3000 is accepted."""
    evil = {"Origin": "https://evil.example"}
    with (
        pytest.raises(WebSocketDisconnect) as info,
        api.websocket_connect("/ws/training", headers=evil),
    ):
        pass
    assert info.value.code == 1008
    with ws_connect(api, headers={"Origin": "http://localhost:3000"}) as (_, hello):
        assert hello["type"] == "connected"


def test_openapi_lists_every_route(api: TestClient) -> None:
    """/openapi.json documents every REST route."""
    doc = api.get("/openapi.json").json()
    expected = {
        "/training/datasets",
        "/training/datasets/{dataset_id}",
        "/training/jobs",
        "/training/jobs/{job_id}",
        "/training/jobs/{job_id}/cancel",
        "/training/jobs/{job_id}/events",
        "/training/events",
        "/healthz",
    }
    assert expected <= set(doc["paths"])
    assert set(doc["paths"]["/training/datasets/{dataset_id}"]) >= {"get", "put", "delete"}
    assert set(doc["paths"]["/training/jobs"]) >= {"get", "post"}
    assert "ErrorOut" in doc["components"]["schemas"]


def test_healthz(api: TestClient) -> None:
    """/healthz reports ok, the epoch, the head seq and job counts per status."""
    body = api.get("/healthz").json()
    assert body["status"] == "ok" and body["epoch"] and type(body["headSeq"]) is int
    assert body["jobs"] == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}


def test_ws_origin_of_the_server_itself_is_admitted(api: TestClient) -> None:
    """A page served by this very server (Origin equal to the Host it called) may open the WebSocket."""
    headers = {"origin": "http://dashboard.example:8080", "host": "dashboard.example:8080"}
    with api.websocket_connect("/ws/training", headers=headers) as ws:
        assert ws.receive_json()["type"] == "connected"
    with (
        pytest.raises(WebSocketDisconnect),
        api.websocket_connect("/ws/training", headers={**headers, "origin": "http://evil.example:8080"}) as ws,
    ):
        ws.receive_json()


def test_an_artifact_deleted_between_lookup_and_send_is_a_404(api: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The download route opens the file before it answers: a file that goes (its job pruned)
    after the lookup found it is a 404 naming ``name``, not a 500 from a send that cannot open it."""
    from mangwale_cli import artifacts

    job = create_job(api, {"steps": 1, "stepMs": 1})
    wait_status(api, job["id"], "succeeded")
    folder = api.app.state.service.store.artifact_dir(job["id"])  # type: ignore[attr-defined]  # store is the Store interface; the in-process app's is the embedded store
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.txt").write_text("accuracy 1.0\n")
    names = [a["name"] for a in api.get(f"/training/jobs/{job['id']}/artifacts").json()]
    assert names == ["report.txt"]
    r = api.get(f"/training/jobs/{job['id']}/artifacts/{names[0]}")
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content) > 0
    find = artifacts.find

    def find_then_lose(root: Any, name: str) -> Any:
        found = find(root, name)
        if found is not None:
            found.path.unlink()
        return found

    monkeypatch.setattr(artifacts, "find", find_then_lose)
    assert_error(api.get(f"/training/jobs/{job['id']}/artifacts/{names[0]}"), 404, "name", "unknown_artifact")
