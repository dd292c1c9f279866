"""Live events: the WebSocket at ``/ws/training`` and the SSE stream at ``/training/events``.

Both speak the replay contract in docs/protocol.md: greeting (``connected`` with ``headSeq`` and
``epoch``), then the logged events after ``since`` that match ``jobs``, then live events; or a
``resync`` when the log can no longer fill the gap.

WebSocket close codes: 1001 server going away, 1003 binary frame, 1009 message too big (uvicorn,
``websocket.max_message_size``), 4400 bad query parameters or a ``since`` beyond the head, 4408
the client fell too far behind or stopped reading (resume from the last seq), 4429 too many
messages. Refusals happen before the upgrade, as HTTP answers: 401/403 (auth.py), 403 for a
foreign ``Origin``, 503 when ``websocket.max_connections`` are open.

The handler (uvicorn's task for the connection) receives the client's messages (rate limited).
Live events to a writable socket need no task at all: the bus hands each batch to the
connection's sink (``Connection``), which writes it as WebSocket frames built once per batch for
every such subscriber (server frames are not masked, so the bytes are the same for all), one
``transport.write`` per connection. A pump task exists only while something waits to be sent:
the replay, or the events buffered for a peer whose socket stopped taking data; it sends them
with a deadline per send, then arms the sink again and ends. A subscriber that overflows stops
the pump at once and interrupts the handler; a close frame that cannot leave within
``CLOSE_DEADLINE`` drops the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, WebSocket, WebSocketDisconnect
from starlette.responses import StreamingResponse
from websockets.protocol import State

from .. import wire
from ..errors import InvalidInput, Unavailable
from ..eventlog import Record
from ..events import FutureSince, Subscription
from ..jsonin import MAX_DIGITS, too_long
from ..metrics import Metrics
from ..service import Service
from .auth import admit
from .limits import PROTOCOL_KEY, TRANSPORT_KEY, RateLimit, expose_transport
from .responses import JSONOut

log = logging.getLogger("mangwale.stream")
router = APIRouter()

CLOSE_GOING_AWAY = 1001
REPLAY_CHUNK = 512  # replayed events whose texts are fetched at once (from the log or the stream)
CLOSE_SERVICE_RESTART = 1012  # the shared store went away or lost its data: resume with since
CLOSE_UNSUPPORTED = 1003
CLOSE_BAD_REQUEST = 4400
CLOSE_SLOW_CONSUMER = 4408
CLOSE_RATE_LIMITED = 4429
CLOSE_DEADLINE = 1.0  # seconds a close frame gets to leave before the socket is dropped
SUBPROTOCOL = "mangwale.v1"
_OPEN = State.OPEN


def parse_replay_params(
    since: str | None, epoch: str | None, jobs: str | None
) -> tuple[int | None, str | None, set[str] | None]:
    """Validate the replay query parameters shared by WebSocket and SSE."""
    since_n: int | None = None
    if since not in (None, ""):
        digits = since.strip().lstrip("+-")
        if len(digits) > MAX_DIGITS:  # int() would refuse it in Python's words
            raise InvalidInput(too_long("since", len(digits), digits), field="since")
        try:
            since_n = int(since)
        except ValueError:
            raise InvalidInput(f"since must be a non-negative integer, got {wire.show(since)}", field="since") from None
        if since_n < 0:
            raise InvalidInput(f"since must be a non-negative integer, got {wire.show(since)}", field="since")
    job_set: set[str] | None = None
    if jobs:
        job_set = {j.strip() for j in jobs.split(",") if j.strip()}
        if len(job_set) > 1000:
            raise InvalidInput("jobs lists more than 1000 ids", field="jobs")
    return since_n, (epoch or None), job_set


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # parse_replay_params names the bad field


def same_origin(origin: str, host: str | None) -> bool:
    """A page served by this server (e.g. the dashboard opened at http://host:8080/) may always
    connect: Cross-Site WebSocket Hijacking needs a *foreign* origin."""
    if not host:
        return False
    scheme, sep, rest = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and rest.lower() == host.lower()


# --- WebSocket -------------------------------------------------------------------------------


async def ws_training_asgi(scope: Any, receive: Any, send: Any) -> None:
    """``/ws/training`` as an ASGI app: ``app.App`` calls it without the middleware stack or
    the router. It checks the token (``auth.admit``: 401/403 before the upgrade) and takes the
    transport (``limits.expose_transport``) itself, so an open connection keeps no coroutine
    frame of those layers (idle memory per connection: bench/connects.py)."""
    if await admit(scope["app"].state.tokens, scope, receive, send):
        expose_transport(scope, send)
        await ws_training(WebSocket(scope, receive, send))


async def ws_training(ws: WebSocket) -> None:
    service: Service = ws.app.state.service
    settings = ws.app.state.settings
    # The token (if tokens are configured) was checked before this runs: auth.AuthMiddleware.
    origin = ws.headers.get("origin")
    if origin is not None and not ws.app.state.origin_re.match(origin) and not same_origin(origin, ws.headers.get("host")):
        log.warning("WebSocket refused: origin %s is not allowed", origin)
        await ws.close(code=1008)  # before accept: uvicorn answers HTTP 403
        return
    bus = service.bus
    assert bus is not None
    if len(bus.subscribers) >= settings.ws_max_connections:
        log.warning("WebSocket refused: %d connections (websocket.max_connections)", len(bus.subscribers))
        await _deny(ws, 503, "too_many_connections", "the server has no room for more connections")
        return

    try:
        # A shared event stream may be a moment ahead of this instance (watch resuming through
        # another instance), or unreachable (503: the client retries with backoff).
        await bus.catch_up(_int_or_none(ws.query_params.get("since")))
    except Unavailable as exc:
        await _deny(ws, 503, exc.code or "unavailable", str(exc))
        return

    offered = ws.scope.get("subprotocols") or []
    # Only mangwale.v1 is ever selected: a mangwale.bearer.* offer carries a token, never echoed.
    await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    q = ws.query_params
    try:
        since, epoch, jobs = parse_replay_params(q.get("since"), q.get("epoch"), q.get("jobs"))
        sub = bus.subscribe(since=since, epoch=epoch, jobs=jobs)
    except (InvalidInput, FutureSince) as exc:
        code = "since_in_future" if isinstance(exc, FutureSince) else "bad_request"
        with contextlib.suppress(Exception):
            await ws.send_text(wire.dumps(wire.connected(bus.head, bus.epoch)))
            await ws.send_text(wire.dumps(wire.error_message(code, str(exc))))
        await _close(ws, CLOSE_BAD_REQUEST, code)
        return
    metrics: Metrics = ws.app.state.metrics
    metrics.connections["websocket"] += 1
    try:
        if not await _serve_ws(ws, sub, settings, metrics):
            metrics.dropped["websocket"] += 1
    finally:
        metrics.connections["websocket"] -= 1
        bus.unsubscribe(sub.subscriber)


async def _deny(ws: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse the handshake with an HTTP status and the JSON error body."""
    body = {"error": {"code": code, "message": message, "field": None}}
    await ws.send_denial_response(JSONOut(body, status_code=status))


def _send_deadline(settings: Any) -> float:
    """Seconds one send may wait for the peer to read (its ping timeout: a peer that reads
    nothing for that long would fail keepalive too, if a ping could get past the backlog)."""
    return settings.ws_ping_timeout or 20.0


async def _serve_ws(ws: WebSocket, sub: Subscription, settings: Any, metrics: Metrics) -> bool:
    """Serve one accepted connection; False when it was dropped as a slow consumer (4408).

    This coroutine (uvicorn's task for the connection) receives the client's messages itself;
    a pump task exists only while there is something to send that could not go out at once."""
    deadline = _send_deadline(settings)
    try:
        async with asyncio.timeout(deadline):
            await ws.send_text(wire.dumps(wire.connected(sub.head, sub.epoch)))
            if sub.resync:
                await ws.send_text(wire.dumps(wire.resync(sub.resync, sub.head, sub.epoch)))
    except TimeoutError:
        await _close(ws, CLOSE_SLOW_CONSUMER, "slow consumer", must_leave=True)
        return False
    except (WebSocketDisconnect, RuntimeError, OSError):
        return True
    _release_handshake(ws)
    subscriber = sub.subscriber
    conn = Connection(ws, sub, deadline, metrics.delivered)
    received: tuple[int, str] | None = None
    if not subscriber.overflowed and not subscriber.closed:
        subscriber.on_drop = conn.stop
        if sub.replay or subscriber.buffer:
            conn.start_pump()  # the replay, and what arrived meanwhile; it arms the sink after
        else:
            subscriber.sink = conn
        handler = conn.handler = asyncio.current_task()
        assert handler is not None
        try:
            received = await _receive(ws, RateLimit(settings.ws_message_rate, settings.ws_message_burst))
        except asyncio.CancelledError:
            # conn.stop() interrupts the wait (overflow, close, a failed pump); any other
            # cancellation (the server's) goes on.
            if not conn.interrupted or handler.uncancel() > 0:
                raise
        finally:
            conn.handler = None
            subscriber.on_drop = None
            subscriber.sink = None
            pump = conn.pump
            if pump is not None:
                pump.cancel()
                # asyncio.wait, not gather: gather would re-raise the pump's cancellation in this
                # task, where a server (or anyio's cancel scope in tests) cannot tell it from its own.
                await asyncio.wait({pump})
    failure = conn.failure
    if received is not None:  # the client must be closed (binary frame, flood)
        await _close(ws, *received)
    elif subscriber.overflowed or isinstance(failure, TimeoutError):
        log.info("WebSocket client is not reading (over %d events behind); closing 4408", subscriber.limit)
        await _close(ws, CLOSE_SLOW_CONSUMER, "slow consumer: resume from your last seq", must_leave=True)
        return False
    elif subscriber.closed and subscriber.close_reason:
        await _close(ws, CLOSE_SERVICE_RESTART, f"{subscriber.close_reason}: reconnect and resume")
    elif subscriber.closed:
        await _close(ws, CLOSE_GOING_AWAY, "server shutting down")
    elif isinstance(failure, (RuntimeError, OSError)):
        # uvicorn already closed it (keepalive timeout): make sure the bytes it holds can leave.
        await _close(ws, CLOSE_SLOW_CONSUMER, "slow consumer", must_leave=True)
        return False
    return True


def _release_handshake(ws: WebSocket) -> None:
    """Let go of what only the handshake needed: uvicorn's sansio protocol keeps the parsed
    request and the response (two header maps, ~2.5 KB) for the connection's life, though it
    reads neither again once the response is sent."""
    proto = ws.scope.get(PROTOCOL_KEY)
    if proto is not None and getattr(proto, "handshake_complete", False):
        proto.request = proto.response = None
    # The request's headers and query were read (token, origin, replay parameters) and are not
    # read again: the scope and the WebSocket's caches of them go (~1 KB a connection).
    ws.scope["headers"] = []
    for cached in ("_headers", "_query_params", "_url"):
        ws.__dict__.pop(cached, None)


def text_frame(text: str) -> bytes:
    """``text`` as one unmasked, unfragmented WebSocket text frame (RFC 6455 section 5.2)."""
    data = text.encode()
    n = len(data)
    if n < 126:
        head = struct.pack("!BB", 0x81, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 127, n)
    return head + data


class Connection:
    """One accepted WebSocket's sending side: the ``Subscriber.sink`` while nothing is pending,
    and the pump task, started only when events cannot go out at once (replay, a backed-up peer).

    As a sink it writes a batch to a uvicorn ``websockets-sansio`` connection as frames,
    bypassing the ASGI send path (which only wraps the same bytes per client). It declines
    (returns False, so the subscriber buffers the batch) unless the connection is open and its
    transport below the high water mark, and then starts the pump, which sends the buffer with a
    deadline per send and, once the buffer is empty, arms the sink again and ends. So
    back-pressure, the 4408 drop and closing stay with the pump and uvicorn, and an idle
    connection has no task of its own. Elsewhere (not uvicorn sansio, or compressed frames)
    the sink always declines: every batch goes through the pump.

    The websockets protocol object need not know of these frames: without extensions it keeps
    no state about sent data frames, and uvicorn writes whatever it produces at once, so its
    own frames (pongs, pings, close) never sit queued behind or ahead of ours.
    """

    __slots__ = ("deadline", "delivered", "failure", "handler", "interrupted", "proto", "pump", "sub", "ws")
    _last: tuple[list[Record], bytes] | None = None  # the batch most recently framed, and its bytes

    def __init__(self, ws: WebSocket, sub: Subscription, deadline: float, delivered: dict[str, int]) -> None:
        self.ws = ws
        self.sub = sub
        self.deadline = deadline
        self.delivered = delivered
        proto = ws.scope.get(PROTOCOL_KEY)
        self.proto = None if proto is None or proto.conn.extensions else proto
        self.pump: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None  # what ended the pump, if it failed
        self.handler: asyncio.Task[Any] | None = None  # the task receiving, to interrupt
        self.interrupted = False

    def __call__(self, batch: list[Record]) -> bool:
        proto = self.proto
        if (
            proto is None
            or proto.close_sent
            or proto.disconnected
            or not proto.writable.is_set()
            or proto.transport.is_closing()
            or proto.conn.state is not _OPEN
        ):
            self.start_pump()
            return False
        last = Connection._last
        if last is not None and last[0] is batch:  # every unfiltered subscriber gets the same list
            data = last[1]
        else:
            data = b"".join([text_frame(rec.text) for rec in batch])
            Connection._last = (batch, data)
        proto.transport.write(data)
        self.delivered["websocket"] += len(batch)
        return True

    def start_pump(self) -> None:
        self.sub.subscriber.sink = None  # until the pump is done: nothing may overtake its sends
        if self.pump is None:
            self.pump = asyncio.get_running_loop().create_task(self._pump())

    def stop(self) -> None:
        """Overflow, close, or a failed pump: stop the pump (even one waiting on a stalled peer)
        and interrupt the receiving handler, which then closes the connection."""
        pump = self.pump
        if pump is not None and pump is not asyncio.current_task():
            pump.cancel()
        handler = self.handler
        if handler is not None and not self.interrupted:
            self.interrupted = True
            handler.cancel()

    async def _pump(self) -> None:
        """Send the replay, then the buffer until it is empty, then arm the sink and end. A send
        that waits ``deadline`` seconds for the peer raises ``TimeoutError``. ``delivered``
        counts what was sent (per batch: one addition, not one per event)."""
        ws = self.ws
        subscriber = self.sub.subscriber
        proto = self.proto
        delivered = self.delivered
        loop = asyncio.get_running_loop()
        deadline = self.deadline
        try:
            async with asyncio.timeout(None) as timer:
                replay, self.sub.replay = self.sub.replay, []
                bus = ws.app.state.service.bus
                for i in range(0, len(replay), REPLAY_CHUNK):
                    for text in await bus.texts(replay[i : i + REPLAY_CHUNK]):
                        timer.reschedule(loop.time() + deadline)
                        await ws.send_text(text)
                delivered["websocket"] += len(replay)
                while not subscriber.overflowed and not subscriber.closed:
                    batch = subscriber.buffer
                    if not batch:
                        self.pump = None
                        subscriber.sink = self  # nothing of ours is queued or in flight
                        return
                    subscriber.buffer = []
                    if proto is not None and proto.close_sent:
                        # uvicorn gave up on the peer (keepalive timeout) and closed; its send would
                        # first wait for the socket to drain, which a peer that stopped reading
                        # never lets happen: end now, so the connection is reset (4408 path).
                        raise ConnectionResetError("the connection was closed under the pump")
                    for rec in batch:
                        timer.reschedule(loop.time() + deadline)
                        await ws.send_text(rec.text)
                    delivered["websocket"] += len(batch)
        except Exception as exc:
            if not isinstance(exc, (TimeoutError, WebSocketDisconnect, RuntimeError, OSError)):
                log.exception("WebSocket pump failed")
            self.failure = exc
            self.stop()


async def _close(ws: WebSocket, code: int, reason: str, *, must_leave: bool = False) -> None:
    """Send a close frame; drop the socket if it cannot leave within ``CLOSE_DEADLINE``.

    ``transport.close()`` waits for unsent bytes, so a peer that stopped reading would keep its
    connection (and the buffers) forever: when the frame cannot be written, or with
    ``must_leave`` cannot even leave our buffer, the transport is aborted instead.
    """
    transport = ws.scope.get(TRANSPORT_KEY)
    try:
        async with asyncio.timeout(CLOSE_DEADLINE):
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):  # closed already
                await ws.close(code=code, reason=reason)
            while must_leave and transport is not None and transport.get_write_buffer_size():
                await asyncio.sleep(0.05)
        return
    except TimeoutError:
        pass
    if transport is not None:
        log.info("WebSocket peer is not reading; dropped the connection (close %d could not be sent)", code)
        reset(transport)


def reset(transport: Any) -> None:
    """Drop a connection at once with a TCP reset. A plain close (even ``abort()``) leaves the
    kernel an orphan socket that keeps trying to deliver its full send buffer to a peer that
    reads nothing; linger 0 discards it, and the peer sees the connection reset."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _receive(ws: WebSocket, limit: RateLimit) -> tuple[int, str] | None:
    """Answer the client's messages until it goes away (None) or must be closed: returns the
    close code and reason (1003 binary frame, 4429 too many messages)."""
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return None
        if not limit.allow():
            log.info("WebSocket client sent more than websocket.message_rate allows; closing 4429")
            with contextlib.suppress(Exception):
                await ws.send_text(
                    wire.dumps(wire.error_message("rate_limited", "too many messages; slow down and reconnect"))
                )
            return CLOSE_RATE_LIMITED, "too many messages"
        text = msg.get("text")
        if text is None:
            return CLOSE_UNSUPPORTED, "binary frames are not supported"
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
            shown = kind if isinstance(kind, str) and len(kind) <= 40 else "?"
            await ws.send_text(
                wire.dumps(wire.error_message("unknown_type", f"unknown message type {shown!r}; send 'ping'"))
            )


async def close_streams(service: Service, timeout: float) -> None:
    """Shutdown, step 1: end every WebSocket (close 1001) and SSE stream, and wait up to
    ``timeout`` for their handlers to send the close. Clients reconnect and resume."""
    bus = service.bus
    if bus is None:
        return
    for sub in list(bus.subscribers):
        sub.close()
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while bus.subscribers and loop.time() < end:
        await asyncio.sleep(0.02)


# --- Server-Sent Events ----------------------------------------------------------------------


def _sse(event: str, data: str, seq: int | None = None) -> bytes:
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


class EventStream(StreamingResponse):
    """``text/event-stream``, so the OpenAPI document says what the SSE route answers."""

    media_type = "text/event-stream"


SSE_EVENT_SCHEMA = {
    "type": "object",
    "description": "one Server-Sent Event: `data` is a wire message as JSON (see docs/protocol.md)",
    "properties": {
        "event": {"type": "string", "enum": [wire.MsgType.CONNECTED, wire.MsgType.RESYNC, *sorted(wire.LOGGED_TYPES),
                                            wire.MsgType.WORKER_UPDATE]},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "id": {"type": "string", "pattern": "^[0-9]+$", "description": "the event's seq (none on a worker_update)"},
        "retry": {"type": "integer", "minimum": 0},
    },
    "additionalProperties": False,
}


@router.get(
    "/training/events",
    tags=["events"],
    response_class=EventStream,
    responses={
        200: {"description": "The event stream", "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}}},
        422: {
            "description": "Bad since, epoch or jobs",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}},
        },
    },
)
async def sse_events(
    request: Request,
    since: Annotated[
        str | None, Query(description="start after this seq when there is no Last-Event-ID (else live only)")
    ] = None,
    epoch: Annotated[str | None, Query(description="epoch the seq belongs to")] = None,
    jobs: Annotated[str | None, Query(description="comma-separated job ids")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Server-Sent Events: ``id`` is the event's seq; ``Last-Event-ID`` resumes after it.

    ``Last-Event-ID`` wins over ``since``: an ``EventSource`` opened with ``?since=0`` sends the
    header on every reconnect, and must resume there, not replay everything again."""
    service: Service = request.app.state.service
    settings = request.app.state.settings
    bus = service.bus
    assert bus is not None
    since_n, epoch_s, job_set = parse_replay_params(last_event_id if last_event_id is not None else since, epoch, jobs)
    await bus.catch_up(since_n)  # Unavailable (503) while a shared event stream is away
    try:
        sub = bus.subscribe(since=since_n, epoch=epoch_s, jobs=job_set)
    except FutureSince as exc:
        raise InvalidInput(str(exc), field="since", code="since_in_future") from None
    keepalive = settings.ws_ping_interval or 30.0
    metrics: Metrics = request.app.state.metrics

    async def body() -> AsyncIterator[bytes]:
        metrics.connections["sse"] += 1
        try:
            yield b"retry: 1000\n\n"
            yield _sse(wire.MsgType.CONNECTED, wire.dumps(wire.connected(sub.head, sub.epoch)))
            if sub.resync:
                yield _sse(wire.MsgType.RESYNC, wire.dumps(wire.resync(sub.resync, sub.head, sub.epoch)))
            for i in range(0, len(sub.replay), REPLAY_CHUNK):
                chunk = sub.replay[i : i + REPLAY_CHUNK]
                texts = await bus.texts(chunk)
                yield b"".join(_sse(_type_of(text), text, rec.seq) for rec, text in zip(chunk, texts, strict=True))
            metrics.delivered["sse"] += len(sub.replay)
            sub.replay = []
            while True:
                try:
                    batch = await asyncio.wait_for(sub.subscriber.get_batch(), keepalive)
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                if not batch:
                    if sub.subscriber.overflowed:
                        metrics.dropped["sse"] += 1
                    return
                # A live-only message (worker_update) has no id: the client's Last-Event-ID stays.
                yield b"".join(_sse(_type_of(r.text), r.text, r.seq if r.logged else None) for r in batch)
                metrics.delivered["sse"] += len(batch)
        finally:
            metrics.connections["sse"] -= 1
            bus.unsubscribe(sub.subscriber)

    return EventStream(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _type_of(text: str) -> str:
    # Every logged event starts with {"type":"..." (wire.* builders put it first).
    start = text.find('"type":"') + 8
    return text[start : text.find('"', start)]
