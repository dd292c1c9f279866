"""Live events: the WebSocket at ``/ws/training`` and the SSE stream at ``/training/events``.

Both speak the replay contract in docs/protocol.md: greeting (``connected`` with ``headSeq`` and
``epoch``), then the logged events after ``since`` that match ``jobs``, then live events; or a
``resync`` when the log can no longer fill the gap.

WebSocket close codes: 1001 server going away, 1003 binary frame, 4400 bad query parameters or a
``since`` beyond the head, 4408 the client fell too far behind (resume from the last seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, WebSocket, WebSocketDisconnect
from starlette.responses import StreamingResponse

from .. import wire
from ..errors import InvalidInput
from ..events import EventBus, FutureSince, Subscription
from ..service import Service
from .app import JSONOut

log = logging.getLogger("mangwale.stream")
router = APIRouter()

CLOSE_BAD_REQUEST = 4400
CLOSE_SLOW_CONSUMER = 4408
SUBPROTOCOL = "mangwale.v1"


def parse_replay_params(
    since: str | None, epoch: str | None, jobs: str | None
) -> tuple[int | None, str | None, set[str] | None]:
    """Validate the replay query parameters shared by WebSocket and SSE."""
    since_n: int | None = None
    if since not in (None, ""):
        try:
            since_n = int(since)  # type: ignore[arg-type]
        except ValueError:
            raise InvalidInput(f"since must be a non-negative integer, got {since!r}", field="since") from None
        if since_n < 0:
            raise InvalidInput(f"since must be a non-negative integer, got {since!r}", field="since")
    job_set: set[str] | None = None
    if jobs:
        job_set = {j.strip() for j in jobs.split(",") if j.strip()}
        if len(job_set) > 1000:
            raise InvalidInput("jobs lists more than 1000 ids", field="jobs")
    return since_n, (epoch or None), job_set


# --- WebSocket -------------------------------------------------------------------------------


@router.websocket("/ws/training")
async def ws_training(ws: WebSocket) -> None:
    service: Service = ws.app.state.service
    settings = ws.app.state.settings
    origin = ws.headers.get("origin")
    if origin is not None and not ws.app.state.origin_re.match(origin):
        log.warning("WebSocket rejected: origin %s is not allowed", origin)
        await ws.close(code=1008)  # before accept: HTTP 403
        return
    bus = service.bus
    assert bus is not None
    if len(bus.subscribers) >= settings.ws_max_connections:
        err = wire.error_message("too_many_connections", "the server has no room for more connections")
        await ws.send_denial_response(JSONOut({"error": {**err, "field": None}}, status_code=503))
        return

    offered = ws.scope.get("subprotocols") or []
    await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    q = ws.query_params
    try:
        since, epoch, jobs = parse_replay_params(q.get("since"), q.get("epoch"), q.get("jobs"))
        sub = bus.subscribe(since=since, epoch=epoch, jobs=jobs)
    except (InvalidInput, FutureSince) as exc:
        code = "since_in_future" if isinstance(exc, FutureSince) else "bad_request"
        await ws.send_text(wire.dumps(wire.connected(bus.head, bus.epoch)))
        await ws.send_text(wire.dumps(wire.error_message(code, str(exc))))
        await ws.close(code=CLOSE_BAD_REQUEST, reason=code)
        return
    try:
        await _serve_ws(ws, bus, sub)
    finally:
        bus.unsubscribe(sub.subscriber)


async def _serve_ws(ws: WebSocket, bus: EventBus, sub: Subscription) -> None:
    await ws.send_text(wire.dumps(wire.connected(sub.head, sub.epoch)))
    if sub.resync:
        await ws.send_text(wire.dumps(wire.resync(sub.resync, sub.head, sub.epoch)))
    for rec in sub.replay:
        await ws.send_text(rec.text)
    sub.replay = []

    receiver = asyncio.create_task(_receive(ws))
    try:
        while True:
            getter = asyncio.ensure_future(sub.subscriber.get_batch())
            done, _ = await asyncio.wait({getter, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if receiver in done:
                getter.cancel()
                return
            batch = getter.result()
            if not batch:
                if sub.subscriber.overflowed:
                    log.info("WebSocket client fell %d events behind; closing 4408", sub.subscriber.limit)
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(
                            ws.close(code=CLOSE_SLOW_CONSUMER, reason="slow consumer: resume from your last seq"),
                            1.0,
                        )
                else:  # server shutting down
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(ws.close(code=1001, reason="server shutting down"), 1.0)
                return
            for rec in batch:
                await ws.send_text(rec.text)
    except (WebSocketDisconnect, RuntimeError, OSError):
        return
    finally:
        receiver.cancel()


async def _receive(ws: WebSocket) -> None:
    """Answer the client's messages until it goes away."""
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return
        text = msg.get("text")
        if text is None:
            with contextlib.suppress(Exception):
                await ws.close(code=1003, reason="binary frames are not supported")
            return
        try:
            data = wire.loads(text)
        except ValueError:
            await ws.send_text(wire.dumps(wire.error_message("invalid_json", "message is not valid JSON")))
            continue
        if not isinstance(data, dict):
            await ws.send_text(wire.dumps(wire.error_message("invalid_message", "message must be a JSON object")))
            continue
        kind = data.get("type")
        if kind == wire.MsgType.PING:
            await ws.send_text(wire.dumps(wire.pong()))
        else:
            await ws.send_text(
                wire.dumps(wire.error_message("unknown_type", f"unknown message type {kind!r}; send 'ping'"))
            )


# --- Server-Sent Events ----------------------------------------------------------------------


def _sse(event: str, data: str, seq: int | None = None) -> bytes:
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


@router.get("/training/events", tags=["events"])
async def sse_events(
    request: Request,
    since: Annotated[str | None, Query(description="resume after this seq (else Last-Event-ID, else live only)")] = None,
    epoch: Annotated[str | None, Query(description="epoch the seq belongs to")] = None,
    jobs: Annotated[str | None, Query(description="comma-separated job ids")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Server-Sent Events: ``id`` is the event's seq; ``Last-Event-ID`` resumes after it."""
    service: Service = request.app.state.service
    settings = request.app.state.settings
    bus = service.bus
    assert bus is not None
    since_n, epoch_s, job_set = parse_replay_params(since if since is not None else last_event_id, epoch, jobs)
    try:
        sub = bus.subscribe(since=since_n, epoch=epoch_s, jobs=job_set)
    except FutureSince as exc:
        raise InvalidInput(str(exc), field="since", code="since_in_future") from None
    keepalive = settings.ws_ping_interval or 30.0

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"retry: 1000\n\n"
            yield _sse(wire.MsgType.CONNECTED, wire.dumps(wire.connected(sub.head, sub.epoch)))
            if sub.resync:
                yield _sse(wire.MsgType.RESYNC, wire.dumps(wire.resync(sub.resync, sub.head, sub.epoch)))
            for rec in sub.replay:
                yield _sse(_type_of(rec.text), rec.text, rec.seq)
            sub.replay = []
            while True:
                try:
                    batch = await asyncio.wait_for(sub.subscriber.get_batch(), keepalive)
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                if not batch:
                    return
                yield b"".join(_sse(_type_of(r.text), r.text, r.seq) for r in batch)
        finally:
            bus.unsubscribe(sub.subscriber)

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _type_of(text: str) -> str:
    # Every logged event starts with {"type":"..." (wire.* builders put it first).
    start = text.find('"type":"') + 8
    return text[start : text.find('"', start)]
