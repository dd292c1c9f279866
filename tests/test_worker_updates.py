"""Live worker state (``worker_update`` on ``/ws/training`` and SSE, docs/protocol.md "Live-only
messages"): announced on register, take, finish, lost and forget, never for a heartbeat, never
numbered (so replay and resume are unchanged), and, on Redis, seen through every instance."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from clitools import cli
from conftest import ServerProcess, wait_for
from netproxy import NetProxy, netproxy  # noqa: F401 - a pytest fixture, used by name
from test_watch import Watch, watches  # noqa: F401 - watches: a pytest fixture, used by name
from test_workers import FAST, WorkerProcess, create, events, only_serves, wait_status, workers  # noqa: F401 - fixtures, used by name
from websockets.sync.client import ClientConnection, connect

REGISTER = {"type": "register", "name": "box", "labels": ["gpu"], "concurrency": 2,
            "kinds": [{"kind": "simulate", "requiresDataset": False}], "versions": {"python": "3"}}  # fmt: skip


def _ping_pong(ws: Any) -> list[dict[str, Any]]:
    """Everything the server had sent before it answers a ping (TestClient WebSocket)."""
    ws.send_text(json.dumps({"type": "ping"}))
    seen = []
    while (msg := json.loads(ws.receive_text()))["type"] != "pong":
        seen.append(msg)
    return seen


def test_worker_updates_are_live_only_and_heartbeats_say_nothing(api: Any) -> None:
    """A watcher of every job gets worker_update (a GET /workers row, no seq) when a worker
    registers, is lost and is forgotten; a heartbeat sends nothing; a jobs= watcher gets none; a
    resume from the head replays none of them."""
    hub = api.app.state.service.hub
    with api.websocket_connect("/ws/training") as live, api.websocket_connect("/ws/training?jobs=job-x") as one:
        hello = json.loads(live.receive_text())
        json.loads(one.receive_text())
        with api.websocket_connect("/ws/workers") as ws:
            ws.send_text(json.dumps(REGISTER))
            reg = json.loads(ws.receive_text())
            up = json.loads(live.receive_text())
            assert up["type"] == "worker_update" and "seq" not in up and "epoch" not in up
            assert up["workerId"] == reg["id"] and up["worker"]["state"] == "up"
            (row,) = api.get("/workers").json()
            assert {k: v for k, v in up["worker"].items() if k != "lastHeartbeat"} == \
                {k: v for k, v in row.items() if k != "lastHeartbeat"}  # fmt: skip
            for _ in range(3):
                ws.send_text(json.dumps({"type": "heartbeat", "jobs": {}}))
                assert json.loads(ws.receive_text())["type"] == "renewed"
            assert _ping_pong(live) == []  # heartbeats are not announced
        lost = json.loads(live.receive_text())
        assert lost["type"] == "worker_update" and lost["worker"]["state"] == "lost"
        hub.forget_after = 0
        api.portal.call(hub.sweep)
        gone = json.loads(live.receive_text())
        assert gone["worker"]["state"] == "gone" and gone["worker"]["removed"] is True
        assert api.get("/workers").json() == []
        assert _ping_pong(one) == []  # a jobs= subscription is not about workers
    with api.websocket_connect(f"/ws/training?since={hello['headSeq']}&epoch={hello['epoch']}") as again:
        assert json.loads(again.receive_text())["type"] == "connected"
        assert _ping_pong(again) == []  # nothing numbered happened, and updates are not replayed


class Tail:
    """A real WebSocket client of ``/ws/training``, read by a thread: every message it got."""

    def __init__(self, url: str, query: str = "") -> None:
        self.ws: ClientConnection = connect(url.replace("http", "ws", 1) + "/ws/training" + query)
        self.messages: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        wait_for(lambda: self.messages, 10, what="connected")

    def _read(self) -> None:
        try:
            for raw in self.ws:
                self.messages.append(json.loads(raw))
        except Exception:  # noqa: BLE001, S110 - closed at the end of the test
            pass

    def updates(self, worker_id: str | None = None) -> list[dict[str, Any]]:
        return [m["worker"] for m in list(self.messages)
                if m["type"] == "worker_update" and worker_id in (None, m["workerId"])]  # fmt: skip

    def wait_state(self, worker_id: str, state: str, running: int | None = None, timeout: float = 20,
                   after: int = 0) -> dict[str, Any]:  # fmt: skip
        """The newest update of the worker in ``state`` among those after the first ``after``."""

        def seen() -> dict[str, Any] | None:
            for w in reversed(self.updates(worker_id)[after:]):
                if w["state"] == state and (running is None or len(w["running"]) == running):
                    return w
            return None

        return wait_for(seen, timeout, 0.02, f"worker {worker_id} {state} in a worker_update")

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def tails() -> Iterator[Callable[..., Tail]]:
    made: list[Tail] = []

    def make(url: str, query: str = "") -> Tail:
        made.append(Tail(url, query))
        return made[-1]

    yield make
    for t in made:
        t.close()


def _worker_id(server: ServerProcess, name: str) -> str:
    rows = wait_for(lambda: [w for w in httpx.get(server.url + "/workers", timeout=5).json() if w["name"] == name], 20,
                    what=f"worker {name} in GET /workers")  # fmt: skip
    return str(rows[0]["id"])


def test_a_job_on_a_worker_is_announced_busy_then_up_without_numbering(
    only_serves: ServerProcess, workers: Callable[..., WorkerProcess], tails: Callable[..., Tail],  # noqa: F811 - pytest fixtures imported by name, received as parameters
    watches: Callable[..., Watch],  # noqa: F811 - pytest fixtures imported by name, received as parameters
) -> None:
    """A watcher sees the worker register (up), take a job (busy, running it), finish it (up) and
    die (lost); the job's numbered events stay gapless from the watcher's head (worker updates
    use no seq), SSE sends the updates without an id, so Last-Event-ID stays a seq, and
    `watch --all --json` prints the same numbered events and no worker_update."""
    tail = tails(only_serves.url)
    head = tail.messages[0]["headSeq"]
    watch = watches("--all", "--json", "--url", only_serves.url)
    wait_for(lambda: "connection: live" in watch.stderr(), 20, what="watch --all to be live")
    w = workers(only_serves.url, "--name", "solo", "--concurrency", "1")
    wid = _worker_id(only_serves, "solo")
    tail.wait_state(wid, "up", 0)
    sse: list[str] = []

    def read_sse() -> None:
        try:
            with httpx.stream("GET", only_serves.url + "/training/events", timeout=30) as resp:
                sse.extend(resp.iter_lines())  # as the lines arrive
        except httpx.HTTPError:
            pass  # the server is stopped at the end of the test

    threading.Thread(target=read_sse, daemon=True).start()
    wait_for(lambda: any(x.startswith("event: connected") for x in sse), 10, what="SSE connected")
    j = create(only_serves.url, "simulate", steps=3, stepMs=200)
    busy = tail.wait_state(wid, "busy", 1)
    assert busy["running"] == [j["id"]]
    done = wait_status(only_serves.url, j["id"], "succeeded", "failed")
    assert done["status"] == "succeeded"
    tail.wait_state(wid, "up", 0, after=[u["state"] for u in tail.updates(wid)].index("busy"))
    seqs = [m["seq"] for m in tail.messages if "seq" in m]
    assert seqs == list(range(head + 1, head + 1 + len(seqs))) and len(seqs) >= done["jobSeq"]
    assert [e["seq"] for e in events(only_serves.url, j["id"])] == [m["seq"] for m in tail.messages if m.get("jobId") == j["id"]]
    wait_for(lambda: sum(x == "event: worker_update" for x in sse) >= 2, 10, what="worker_update over SSE")
    for i, line in enumerate(sse):
        if line == "event: worker_update":
            assert not sse[i - 1].startswith("id:")  # no id: the resume point stays the last seq
    w.kill()
    tail.wait_state(wid, "lost")
    wait_for(lambda: [e["seq"] for e in watch.events()] == seqs, 10, what="watch --all to print the same events")
    assert [d["type"] for d in watch.json_lines() if d["type"] == "worker_update"] == []


# --- Redis: every instance ---------------------------------------------------------------------


def test_redis_every_instance_lists_and_announces_every_worker(
    server_factory: Callable[..., ServerProcess], redis_server: Any, workers: Callable[..., WorkerProcess],  # noqa: F811 - pytest fixtures imported by name, received as parameters
    tails: Callable[..., Tail], netproxy: Callable[[int], NetProxy], tmp_path: Path,  # noqa: F811 - pytest fixtures imported by name, received as parameters
) -> None:
    """Two instances on one Redis; a worker connects to A through a balancer. B's GET /workers and
    `workers list` show it (connected to A), and B's watchers see it take a job created on B and
    finish it. Moved to B, both instances list it as B has it (A's lost connection does not win),
    and it keeps working; killed, it is lost, then gone after workers.forget_after, everywhere."""
    env = {**FAST, "MANGWALE_STORE_TIMEOUT": "1", "MANGWALE_WORKERS_FORGET_AFTER": "3"}
    a, b = (server_factory(data_dir=tmp_path / "shared", env=env, args=["--store", redis_server.url, "--concurrency", "0"])
            for _ in range(2))  # fmt: skip
    on_b = tails(b.url)
    balancer = netproxy(a.port)
    w = workers(balancer.url, "--name", "remote", "--concurrency", "1", "--label", "gpu")
    wid = _worker_id(b, "remote")
    up = on_b.wait_state(wid, "up", 0)
    assert up["labels"] == ["gpu"]
    (row,) = httpx.get(b.url + "/workers", timeout=5).json()
    a_instance = httpx.get(a.url + "/workers", timeout=5).json()[0]["instance"]
    assert row["id"] == wid and row["state"] == "up" and row["instance"] == a_instance
    listed = cli("workers", "list", "--json", url=b.url)
    assert listed.returncode == 0, listed.stderr
    assert [x["id"] for x in json.loads(listed.stdout)] == [wid]
    j = create(b.url, "simulate", labels=["gpu"], steps=3, stepMs=200)
    assert on_b.wait_state(wid, "busy", 1)["running"] == [j["id"]]
    assert wait_status(b.url, j["id"], "succeeded", "failed")["status"] == "succeeded"
    on_b.wait_state(wid, "up", 0, after=[u["state"] for u in on_b.updates(wid)].index("busy"))

    balancer.target = ("127.0.0.1", b.port)
    balancer.cut()  # the worker reconnects, to B now
    wait_for(lambda: on_b.updates(wid)[-1]["instance"] != a_instance and on_b.updates(wid)[-1]["state"] == "up", 20,
             what="the worker up on B")  # fmt: skip
    b_instance = on_b.updates(wid)[-1]["instance"]
    for server in (a, b):
        assert wait_for(lambda s=server: (x := httpx.get(s.url + "/workers", timeout=5).json()) and x[0]["instance"] == b_instance
                        and x[0]["state"] == "up", 10, what="both instances list it as B has it")  # fmt: skip
    moved = len(on_b.updates(wid))
    j2 = create(a.url, "simulate", labels=["gpu"], steps=3, stepMs=200)
    assert on_b.wait_state(wid, "busy", 1, after=moved)["running"] == [j2["id"]]
    assert wait_status(a.url, j2["id"], "succeeded", "failed")["status"] == "succeeded"
    wait_for(lambda: (u := on_b.updates(wid)[-1])["state"] == "up" and not u["running"], 10, what="up again")
    killed = len(on_b.updates(wid))

    w.kill()
    on_b.wait_state(wid, "lost", after=killed)
    assert wait_for(lambda: httpx.get(a.url + "/workers", timeout=5).json()[0]["state"] == "lost", 10, what="lost on A")
    on_b.wait_state(wid, "gone", timeout=30, after=killed)
    states = [u["state"] for u in on_b.updates(wid)[moved:]]
    assert "gone" not in states[: len(states) - 1 - states[::-1].index("lost")], states  # A forgot only its own copy
    assert {u["instance"] for u in on_b.updates(wid)[moved:]} == {b_instance}
    assert httpx.get(b.url + "/workers", timeout=5).json() == []
    assert httpx.get(a.url + "/workers", timeout=5).json() == []


def test_redis_the_workers_of_a_dead_instance_are_announced_by_another(
    server_factory: Callable[..., ServerProcess], redis_server: Any, workers: Callable[..., WorkerProcess],  # noqa: F811 - pytest fixtures imported by name, received as parameters
    tails: Callable[..., Tail], tmp_path: Path,
) -> None:
    """kill -9 of the instance a worker is connected to leaves nobody there to announce it: B marks
    it lost once its heartbeat is half a lease old, and gone once its row expired, each once."""
    env = {**FAST, "MANGWALE_STORE_TIMEOUT": "1", "MANGWALE_WORKERS_FORGET_AFTER": "2"}
    a, b = (server_factory(data_dir=tmp_path / "shared", env=env, args=["--store", redis_server.url, "--concurrency", "0"])
            for _ in range(2))  # fmt: skip
    on_b = tails(b.url)
    workers(a.url, "--name", "stranded")
    wid = _worker_id(b, "stranded")
    on_b.wait_state(wid, "up")
    a.kill()
    lost = on_b.wait_state(wid, "lost")
    assert lost["instance"] == on_b.updates(wid)[0]["instance"]  # still A's row, marked by B
    assert httpx.get(b.url + "/workers", timeout=5).json()[0]["state"] == "lost"
    on_b.wait_state(wid, "gone", timeout=30)
    assert [u["state"] for u in on_b.updates(wid)] == ["up", "lost", "gone"]
    assert httpx.get(b.url + "/workers", timeout=5).json() == []


def test_redis_board_marks_lost_once_and_a_heartbeat_brings_it_back(redis_server: Any) -> None:
    """On the Redis board, a row whose heartbeat is stale is marked lost by one sweep only (two
    sweeps, one announcement); a heartbeat of its own instance announces it up again, and a
    further heartbeat announces nothing. Every instance's subscribers get each update once."""
    import asyncio

    from redis.asyncio import Redis

    from mangwale_cli.eventlog import EventRing
    from mangwale_cli.events import EventBus
    from mangwale_cli.store.redis_keys import RedisKeys
    from mangwale_cli.workerboard import RedisBoard

    row = {"id": "wk-1", "name": "box", "labels": [], "kinds": ["simulate"], "versions": {}, "concurrency": 1,
           "running": [], "lastHeartbeat": 1, "state": "up", "instance": "a:1"}  # fmt: skip

    async def scenario() -> list[list[str]]:
        clients = [Redis.from_url(redis_server.url) for _ in range(4)]
        keys = RedisKeys("boardtest:")
        buses = [EventBus(EventRing(retention=10)) for _ in range(2)]
        subs = [bus.subscribe().subscriber for bus in buses]
        boards = [RedisBoard(clients[2 * i], clients[2 * i + 1], keys, buses[i], ttl=60, retention=100, block=0.05)
                  for i in range(2)]  # fmt: skip
        for board in boards:
            await board.start()

        async def states(n: int) -> list[list[str]]:
            async with asyncio.timeout(10):
                while min(len(s.buffer) for s in subs) < n:
                    await asyncio.sleep(0.01)
            return [[json.loads(r.text)["worker"]["state"] for r in s.buffer] for s in subs]

        try:
            await boards[0].publish(row)  # lastHeartbeat 1: long silent
            await states(1)
            await asyncio.gather(boards[0].sweep(1000), boards[1].sweep(1000))
            await states(2)
            await boards[0].refresh({**row, "lastHeartbeat": wire_now()})
            await boards[0].refresh({**row, "lastHeartbeat": wire_now()})
            await boards[1].sweep(60_000)
            await boards[0].publish({**row, "state": "busy", "lastHeartbeat": wire_now()})  # a marker: nothing between
            return await states(4)
        finally:
            for board in boards:
                await board.stop()
            for c in clients:
                await c.aclose()

    def wire_now() -> int:
        from mangwale_cli.wire import now_ms

        return now_ms()

    assert asyncio.run(scenario()) == [["up", "lost", "up", "busy"]] * 2
