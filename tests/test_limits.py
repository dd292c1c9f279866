"""Hostile and broken input: body size, dataset and params bounds, WebSocket garbage, floods, caps.

Every refusal is a 4xx JSON error, an ``error`` message or a clean close with a documented code;
never a 500, a traceback in the server log, or harm to the other clients.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from conftest import ServerProcess, wait_for
from fastapi.testclient import TestClient
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.sync.client import ClientConnection, connect

from mangwale_cli.server.app import create_app
from mangwale_cli.server.limits import RateLimit
from mangwale_cli.wire import MAX_EXAMPLES, MAX_PARAMS_BYTES, MAX_TEXT

# --- REST ----------------------------------------------------------------------------------------


@pytest.fixture
def small(settings: Any) -> Iterator[TestClient]:
    """An in-process app whose request bodies may be at most 4 KiB."""
    settings.max_body_size = 4096
    with TestClient(create_app(settings)) as client:
        yield client


def test_body_over_the_limit_is_413_json(small: TestClient) -> None:
    """A body over server.max_body_size gets 413 in the error shape, by Content-Length or while streaming."""
    big = json.dumps({"name": "x" * 5000}).encode()
    for resp in (
        small.post("/training/datasets", content=big, headers={"Content-Type": "application/json"}),
        small.post(
            "/training/datasets",
            content=iter([big[:3000], big[3000:]]),
            headers={"Content-Type": "application/json"},
        ),
    ):
        assert resp.status_code == 413
        assert (
            resp.json()["error"]["code"] == "too_large"
            and "4096" in resp.json()["error"]["message"]
        )
    fits = small.post(
        "/training/datasets",
        json={"name": "ok", "examples": [{"text": "hello there", "intent": "greet"}]},
    )
    assert fits.status_code == 201
    assert small.get("/openapi.json").json()["paths"]["/training/datasets"]["post"]["responses"][
        "413"
    ]


def example(**over: Any) -> dict[str, Any]:
    return {"text": "where is my order", "intent": "track", **over}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {"name": "d", "examples": [{"text": "a", "intent": "b"}] * (MAX_EXAMPLES + 1)},
            "examples",
        ),
        ({"name": "d", "examples": [example(text="x" * (MAX_TEXT + 1))]}, "examples[0].text"),
        ({"name": "d", "examples": [example(intent="i" * 201)]}, "examples[0].intent"),
        (
            {
                "name": "d",
                "examples": [
                    example(entities=[{"start": 0, "end": 5, "value": "where", "entity": "w"}] * 51)
                ],
            },
            "examples[0].entities",
        ),
        ({"name": "n" * 201}, "name"),
        ({"name": "d", "description": "x" * (MAX_TEXT + 1)}, "description"),
        ({"name": "d", "colour": "red"}, "colour"),
    ],
)
def test_dataset_bounds_are_422_naming_the_field(
    api: TestClient, body: dict[str, Any], field: str
) -> None:
    """Too many examples, overlong text, too many entities, unknown fields: 422 naming the field, nothing stored."""
    before = len(api.get("/training/datasets").json())
    resp = api.post("/training/datasets", json=body)
    assert resp.status_code == 422 and resp.json()["error"]["field"] == field
    assert len(api.get("/training/datasets").json()) == before


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"kind":"simulate","params":{"steps":NaN}}', "params.steps"),
        ('{"kind":"simulate","params":{"stepMs":Infinity}}', "params.stepMs"),
        ('{"kind":"simulate","params":{"stepMs":1e400}}', "params.stepMs"),
        ('{"kind":"simulate","params":{"steps":0}}', "params.steps"),
        ('{"kind":"simulate","params":{"steps":1e12}}', "params.steps"),
        ('{"kind":"simulate","params":{"message":"' + "m" * MAX_PARAMS_BYTES + '"}}', "params"),
        ('{"kind":"simulate","priority":9}', "priority"),
    ],
)
def test_job_params_are_bounded_and_finite(api: TestClient, raw: str, field: str) -> None:
    """NaN, infinities, absurd steps, oversized params and unknown fields are 422 naming the field."""
    resp = api.post("/training/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == field
    assert api.get("/training/jobs").json() == []


def test_rate_limit_is_a_token_bucket() -> None:
    """A burst passes at once, then messages pass at the sustained rate; rate 0 means no limit."""
    now = [0.0]
    bucket = RateLimit(rate=5, burst=10, clock=lambda: now[0])
    assert all(bucket.allow() for _ in range(10)) and not bucket.allow()
    now[0] += 1.0
    assert sum(bucket.allow() for _ in range(10)) == 5
    assert all(RateLimit(rate=0, burst=1).allow() for _ in range(1000))


# --- WebSocket against a real server ------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real server: 64 KiB messages, 4 connections, 50-message bursts then 5/s."""
    env = {
        "MANGWALE_WS_MAX_MESSAGE_SIZE": "65536",
        "MANGWALE_WS_MAX_CONNECTIONS": "4",
        "MANGWALE_WS_MESSAGE_RATE": "5",
        "MANGWALE_WS_MESSAGE_BURST": "50",
    }
    srv = ServerProcess(tmp_path_factory.mktemp("limited") / "data", env).start()
    yield srv
    srv.kill()


class Bystander:
    """A well-behaved client that pings every 0.2 s and records its pong round trips and events."""

    def __init__(self, url: str) -> None:
        self._stack = ExitStack()
        self.ws = self._stack.enter_context(connect(url, open_timeout=5))
        assert json.loads(self.ws.recv())["type"] == "connected"
        self.rtts: list[float] = []
        self.events: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                sent = time.monotonic()
                self.ws.send('{"type":"ping"}')
                while True:
                    msg = json.loads(self.ws.recv(timeout=5))
                    if msg["type"] == "pong":
                        self.rtts.append(time.monotonic() - sent)
                        break
                    self.events.append(msg)
                self._stop.wait(0.2)
        except BaseException as exc:  # noqa: BLE001 - reported by close()
            self.error = exc

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._stack.close()
        assert self.error is None, f"the bystander was affected: {self.error!r}"


def closed_with(
    ws: ClientConnection, timeout: float = 5
) -> tuple[int | None, list[dict[str, Any]]]:
    """Read until the server closes; the close code and the messages seen before it."""
    seen = []
    try:
        while True:
            seen.append(json.loads(ws.recv(timeout=timeout)))
    except ConnectionClosed as exc:
        return (exc.rcvd.code if exc.rcvd else None), seen


def send_raw_frames(ws: ClientConnection, *frames: Frame) -> None:
    """Send frames in one write, bypassing the client API (text that is not UTF-8, a flood that
    must not wait for the server between messages)."""
    with ws.protocol_mutex:
        for frame in frames:
            ws.protocol.send_frame(frame)
        data = ws.protocol.data_to_send()
    ws.socket.sendall(b"".join(data))


def test_websocket_garbage_gets_an_error_or_a_clean_close(limited: ServerProcess) -> None:
    """Non-JSON, non-object, unknown type: an error message and the socket stays; binary 1003, bad UTF-8 1007,
    oversized 1009 within 100 ms, a flood 4429; a bystander keeps its pongs and events; no traceback is logged."""
    bystander = Bystander(limited.ws_url)
    with connect(limited.ws_url, open_timeout=5, max_size=None) as ws:
        assert json.loads(ws.recv())["type"] == "connected"
        for text, code in (
            ("{nope", "invalid_json"),
            ("[1, 2]", "invalid_message"),
            ('"ping"', "invalid_message"),
            ('{"type": "subscribe"}', "unknown_type"),
            ('{"type": ' + '"x' * 5000 + '"}', "invalid_json"),
            ('{"type": 7}', "unknown_type"),
        ):
            ws.send(text)
            reply = json.loads(ws.recv(timeout=5))
            assert (reply["type"], reply["code"]) == ("error", code)
            ws.send('{"type": "ping"}')
            assert json.loads(ws.recv(timeout=5))["type"] == "pong"
    closes = {}
    for name, act in (
        ("binary", lambda ws: ws.send(b"\x00\x01garbage")),
        ("utf8", lambda ws: send_raw_frames(ws, Frame(Opcode.TEXT, b"\xff\xfe{}"))),
        ("oversized", lambda ws: ws.send("x" * (65536 + 1))),
        ("flood", lambda ws: send_raw_frames(ws, *[Frame(Opcode.TEXT, b'{"type":"ping"}')] * 1000)),
    ):
        with connect(limited.ws_url, open_timeout=5, max_size=None) as ws:
            assert json.loads(ws.recv())["type"] == "connected"
            started = time.monotonic()
            act(ws)
            close_code, seen = closed_with(ws)
            closes[name] = (close_code, time.monotonic() - started, seen)
    assert closes["binary"][0] == 1003 and closes["utf8"][0] == 1007
    assert closes["oversized"][0] == 1009 and closes["oversized"][1] < 0.1, closes["oversized"][:2]
    flood_code, _, seen = closes["flood"]
    assert flood_code == 4429 and 40 <= sum(m["type"] == "pong" for m in seen) <= 60
    assert seen[-1]["code"] == "rate_limited"
    pongs = len(bystander.rtts)
    wait_for(lambda: len(bystander.rtts) > pongs, what="the bystander's next pong")
    with limited.client() as http:  # events still reach the bystander
        job = http.post(
            "/training/jobs", json={"kind": "simulate", "params": {"steps": 2, "stepMs": 1}}
        ).json()["id"]
    wait_for(
        lambda: any(
            e.get("jobId") == job and e.get("status") == "succeeded" for e in list(bystander.events)
        ),
        what="the bystander to see the job finish",
    )
    bystander.close()
    assert max(bystander.rtts) < 1.0
    print(
        f"\nW3 close 1009 after {closes['oversized'][1] * 1000:.1f} ms; W4 flood closed 4429 after "
        f"{closes['flood'][1] * 1000:.0f} ms; bystander pong max {max(bystander.rtts) * 1000:.1f} ms"
    )
    output = limited.output()
    assert "Traceback" not in output and " ERROR " not in output, output[-3000:]


def test_connection_cap_answers_503_at_the_handshake(limited: ServerProcess) -> None:
    """With websocket.max_connections open, the next handshake gets HTTP 503 JSON fast; a freed slot is reusable."""
    with ExitStack() as stack:
        opened = [stack.enter_context(connect(limited.ws_url, open_timeout=5)) for _ in range(4)]
        started = time.monotonic()
        with pytest.raises(InvalidStatus) as info, connect(limited.ws_url, open_timeout=5):
            pass
        took = time.monotonic() - started
        assert info.value.response.status_code == 503 and took < 0.05, took
        assert json.loads(info.value.response.body)["error"]["code"] == "too_many_connections"
        opened.pop().close()
        wait_for(
            lambda: httpx.get(limited.url + "/healthz").json()["streams"] == 3,
            what="the slot to be freed",
        )
        again = stack.enter_context(connect(limited.ws_url, open_timeout=5))
        assert json.loads(again.recv())["type"] == "connected"
        print(f"\nW2 connection over the cap refused with 503 in {took * 1000:.1f} ms")


def test_oversized_request_head_is_refused_and_the_server_lives_on(limited: ServerProcess) -> None:
    """A request head over h11's 16 KiB limit (a 2 MiB header) gets 400 and closes; the server keeps serving."""
    with socket.create_connection(("127.0.0.1", limited.port), timeout=5) as s:
        s.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * 1024 * 1024) + b"\r\n\r\n"
        )
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    assert httpx.get(limited.url + "/healthz").status_code == 200
    assert "Traceback" not in limited.output()
