"""Limits on what a client can make the server hold: request bodies, message rates, stuck sockets.

* ``BodyLimit`` answers 413 (JSON) for a request body over ``server.max_body_size``: at once when
  ``Content-Length`` says so, else as soon as the streamed body passes the limit. An artifact
  upload streams to disk and has its own bound (``artifacts.max_size``, in the service).
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

import asyncio
import re
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


_UPLOAD = re.compile(r"/training/jobs/[^/]+/artifacts/.+")


def is_artifact_upload(method: str, path: str) -> bool:
    """``PUT /training/jobs/{id}/artifacts/{name}``: a file streamed to disk, bounded by
    ``artifacts.max_size`` in the route instead of ``server.max_body_size``."""
    return method == "PUT" and _UPLOAD.fullmatch(path) is not None


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (server.max_body_size)"


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 before the route reads them whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_artifact_upload(scope.get("method", ""), scope["path"]):
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


HEAD_LIMIT = 16 * 1024  # bytes of a request head: h11's own limit, enforced for httptools too


def limited_httptools(limit: int = HEAD_LIMIT) -> type:
    """uvicorn's httptools protocol with a limit on the request head, which httptools lacks (it
    would buffer a header of any size): past ``limit`` bytes without the end of the head, 400
    and close, as h11 does. Counted per ``data_received`` chunk (at most 256 KiB) while a head is
    being read, so a head is refused within one chunk of the limit."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class LimitedHttpTools(HttpToolsProtocol):
        _head = 0
        _in_head = True
        _discarded = -1  # >= 0 once refused: what came after the 400, read and dropped

        def refuse(self) -> None:
            """The 400, then a lingering close: the write side is shut, and what the client is
            still sending is read and dropped (for up to 2 s or 16 MiB), so the kernel does not
            answer it with a reset that would destroy the 400 before the client reads it."""
            msg = b"Request head too large"
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
                + b"content-length: " + str(len(msg)).encode() + b"\r\nconnection: close\r\n\r\n" + msg
            )
            self._discarded = 0
            if self.transport.can_write_eof():
                self.transport.write_eof()
            asyncio.get_running_loop().call_later(2.0, self.transport.close)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._head = 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True

        def data_received(self, data: bytes) -> None:
            if self._discarded >= 0:
                self._discarded += len(data)
                if self._discarded > 16 << 20:
                    self.transport.close()
                return
            if self._in_head:
                self._head += len(data)
            super().data_received(data)
            if self._in_head and self._head > limit and not self.transport.is_closing():
                self.refuse()

    return LimitedHttpTools
