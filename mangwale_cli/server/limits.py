"""Limits on what a client can make the server hold: request bodies, message rates, stuck sockets.

* ``BodyLimit`` answers 413 (JSON) for a request body over ``server.max_body_size``: at once when
  ``Content-Length`` says so, else as soon as the streamed body passes the limit.
* ``RateLimit`` is a per-connection token bucket for WebSocket client messages
  (``websocket.message_rate`` / ``websocket.message_burst``; the connection closes with 4429).
* ``ExposeTransport`` puts the connection's asyncio transport in the WebSocket scope
  (``scope[TRANSPORT_KEY]``). A close frame cannot reach a peer that stopped reading, and
  ``transport.close()`` waits for the unsent bytes forever, so ``stream.py`` uses it to see
  whether its close frame left and to ``abort()`` the socket when it did not. With uvicorn's
  ``websockets-sansio`` protocol it also puts the protocol object there (``PROTOCOL_KEY``), so the
  fan-out can write pre-built frames to the socket (``stream.DirectFrames``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from ..errors import PayloadTooLarge
from .responses import error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TRANSPORT_KEY = "mangwale.transport"
PROTOCOL_KEY = "mangwale.ws_protocol"  # uvicorn's websockets-sansio protocol object, when it is that


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (server.max_body_size)"


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 before the route reads them whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    err = PayloadTooLarge(_too_large(self.max_bytes), field="body")
                    await error_response(err, headers={"Connection": "close"})(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI lets an HTTPException out of its body reading; app.py renders it.
                    raise HTTPException(413, detail=_too_large(self.max_bytes))
            return message

        await self.app(scope, limited, send)


class ExposeTransport:
    """Give WebSocket handlers the asyncio transport under ``scope[TRANSPORT_KEY]`` (uvicorn only;
    elsewhere, e.g. the in-process test client, the key is absent and handlers fall back)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            expose_transport(scope, send)
        await self.app(scope, receive, send)


def expose_transport(scope: Scope, send: Send) -> None:
    """What ``ExposeTransport`` does, for a WebSocket endpoint that calls it itself."""
    # uvicorn's ``send`` is a bound method of its protocol object, which owns the transport.
    owner = getattr(send, "__self__", None)
    transport = getattr(owner, "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        scope[TRANSPORT_KEY] = transport
        if _is_sansio(owner):
            scope[PROTOCOL_KEY] = owner


def _is_sansio(owner: object) -> bool:
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    except ImportError:  # pragma: no cover - another uvicorn layout: the generic path is used
        return False
    return isinstance(owner, WebSocketsSansIOProtocol)


class RateLimit:
    """A token bucket: ``burst`` messages at once, then ``rate`` per second. ``rate`` 0 = no limit."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(max(1, burst))
        self.clock = clock
        self.tokens = self.burst
        self.at = clock()

    def allow(self) -> bool:
        if self.rate <= 0:
            return True
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
