"""The hot REST routes, dispatched ahead of FastAPI's router: ``GET /training/jobs``,
``GET /training/jobs/{job_id}`` and ``POST /training/jobs``.

``App.__call__`` sends a request that ``match`` names through the same middlewares as every
other request (request timer, CORS, authentication, body limit: ``app.py`` builds one chain of
them for this front), then here, instead of through Starlette's error middleware, the router's
linear match of every route and FastAPI's per-request exit stacks.

* The two GETs answer from ``BodyCache``: a hit is one dict look-up and one ``send`` of bytes
  rendered before, with its ``ETag``; ``If-None-Match`` that matches gets 304. A hit without
  ``Origin`` and with a good token skips the middlewares too (``serve_hit``: it adds what they
  would: ``Vary: Origin``, the timer's observation). A miss renders
  through the route's own endpoint (``routes.py``), so its parameters, errors and headers are
  exactly the documented ones.
* ``POST /training/jobs``: a body that parses and validates goes straight to the service; any
  other request is replayed to FastAPI's own handler for the route inside Starlette's exception
  middleware with the app's handlers, so every error body is the one FastAPI's stack gives.

The routes stay in FastAPI's router too, so the OpenAPI document lists them, and ``GET
/metrics`` labels them by their templates (``scope["route"]`` is the FastAPI route).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.middleware.asyncexitstack import AsyncExitStackMiddleware
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response

from ..errors import InvalidInput, MangwaleError
from ..jsonin import read_json
from ..tokens import Scope as TokenScope
from ..wire import JobCreate
from . import routes
from .auth import AuthMiddleware, check_token
from .bodycache import BodyCache, Entry
from .etag import etag_of, none_match
from .limits import Message, Receive, Scope, Send
from .responses import JSONOut, error_response

log = logging.getLogger("mangwale.server")

HOT_KEY = "mangwale.hot"  # scope key: the handler ``match`` chose
JOBS = "/training/jobs"
JOB_PREFIX = "/training/jobs/"

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


_REPLAYED = {"Idempotent-Replayed": "true"}
_VARY = (b"vary", b"Origin")  # what CORSMiddleware adds to an answer to a request without Origin
_NOT_FAST = frozenset({b"origin", b"content-length", b"transfer-encoding"})


def _replay(body: bytes) -> Receive:
    """A ``receive`` that gives ``body`` again, then waits as a connection would."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # nothing more comes; the server cancels this on disconnect
        return {"type": "http.disconnect"}

    return receive


class HotRoutes:
    """The ASGI app at the end of the hot chain; ``match`` decides what comes here."""

    def __init__(self, app: Any, cache: BodyCache) -> None:
        self.app = app
        self.cache = cache
        by_key = {
            (r.path, m): r for r in [*routes.hot.routes, *routes.router.routes] if isinstance(r, APIRoute) for m in r.methods or ()
        }
        self.list_route = by_key[(JOBS, "GET")]
        self.job_route = by_key[(JOBS + "/{job_id}", "GET")]
        self.create_route = by_key[(JOBS, "POST")]
        # FastAPI's handler for the route; the exception middleware gives it the app's handlers
        # (set at start-up, after create_app: looked up per request by the middleware itself).
        self.auth = AuthMiddleware(app, app.state.tokens)  # its check only (serve_hit)
        self.metrics = app.state.metrics
        self.create = ExceptionMiddleware(AsyncExitStackMiddleware(self.create_route.app), handlers=app.exception_handlers)

    def match(self, scope: Scope) -> Handler | None:
        path: str = scope["path"]
        method = scope["method"]
        if path == JOBS:
            if method == "GET":
                scope["route"] = self.list_route
                return self.list_jobs
            if method == "POST":
                scope["route"] = self.create_route
                return self.create_job
            return None
        if method == "GET" and path.startswith(JOB_PREFIX) and "/" not in path[len(JOB_PREFIX) :] and len(path) > len(JOB_PREFIX):
            scope["route"] = self.job_route
            return self.get_job
        return None

    async def serve_hit(self, scope: Scope, send: Send) -> bool:
        """The fast lane of the two GETs: a request with no ``Origin`` and no body whose token
        passes and whose body is cached is answered here, with what the middlewares would have
        added (CORS: ``Vary: Origin``; the request timer's observation), and True. Anything else
        (a CORS request, a refused token, a miss) is False: the caller sends it down the chain."""
        start = time.perf_counter()
        if any(name in _NOT_FAST for name, _ in scope["headers"]):
            return False
        host, if_none_match = _cache_headers(scope)
        if self.auth.tokens.enabled and check_token(self.auth.tokens, scope, TokenScope.READ) is not None:
            return False
        try:
            head = await self.app.state.service.store.head()
        except MangwaleError:  # Redis away: the chain answers it (503), through every middleware
            return False
        entry = self.cache.get(head, (scope["path"], scope["query_string"], host, scope["scheme"]))
        if entry is None:
            return False
        if if_none_match is not None and none_match(if_none_match.decode("latin-1"), entry.etag):
            status = 304
            await send({"type": "http.response.start", "status": 304, "headers": [(b"etag", entry.etag.encode()), _VARY]})
            await send({"type": "http.response.body", "body": b""})
        else:
            status = 200
            await send({"type": "http.response.start", "status": 200, "headers": [*entry.headers, _VARY]})
            await send({"type": "http.response.body", "body": entry.body})
        self.metrics.observe_http(scope["method"], scope["route"].path, status, time.perf_counter() - start)
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler: Handler = scope[HOT_KEY]
        await handler(scope, receive, send)

    async def create_job(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The usual request (a JSON body that validates, a short or no ``Idempotency-Key``)
        straight to the service; anything else, replayed to FastAPI's handler, which words the
        error exactly as the document says (so the two parse alike: ``jsonin.read_json``, which
        takes what ``json.loads`` takes, then the model on the Python value, as FastAPI does;
        what only ``json.loads`` cannot read, the app's error handler rewords with ``read_json``)."""
        scope["app"] = self.app
        content_type = key = None
        for name, value in scope["headers"]:
            if name == b"content-type" and content_type is None:  # the first, as Starlette's Headers
                content_type = value
            elif name == b"idempotency-key" and key is None:
                key = value
        chunks = []
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client left
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        except HTTPException as exc:  # BodyLimit: over server.max_body_size
            headers = getattr(exc, "headers", None)
            await error_response(MangwaleError(str(exc.detail), code="too_large", status=413), headers)(scope, receive, send)
            return
        body = b"".join(chunks)
        job_in = None
        if (content_type is None or content_type.split(b";")[0].strip().lower() == b"application/json") and (
            key is None or len(key) <= 200
        ):
            try:
                job_in = JobCreate.model_validate(read_json(body))
            except (ValueError, ValidationError, InvalidInput):  # InvalidInput: a number too long to read, not UTF-8
                job_in = None
        if job_in is None:
            await self.create(scope, _replay(body), send)
            return
        try:
            job, created = await self.app.state.service.create_job(job_in, key.decode("latin-1") if key else None)
            response: Response = JSONOut(job.to_dict(), status_code=201, headers=None if created else _REPLAYED)
        except MangwaleError as exc:
            response = error_response(exc)
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            response = error_response(MangwaleError("internal error; see the server log", code="internal", status=500))
        await response(scope, receive, send)

    async def list_jobs(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._cached(scope, receive, send, self._render_list)

    async def get_job(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._cached(scope, receive, send, self._render_job)

    async def _render_list(self, request: Request) -> Response:
        return await routes.list_jobs(request)

    async def _render_job(self, request: Request) -> Response:
        return await routes.get_job(request, request.scope["path"][len(JOB_PREFIX) :])

    async def _cached(
        self, scope: Scope, receive: Receive, send: Send, render: Callable[[Request], Awaitable[Response]]
    ) -> None:
        host, if_none_match = _cache_headers(scope)
        try:
            # The head first: a body rendered after it is at least as new as it (bodycache.py).
            head = await self.app.state.service.store.head()
            key = (scope["path"], scope["query_string"], host, scope["scheme"])  # Link names the host
            entry = self.cache.get(head, key)
            if entry is None:
                scope["app"] = self.app
                response = await render(Request(scope, receive))
                body = bytes(response.body)
                etag = etag_of(body)
                entry = Entry(body, etag, [*response.raw_headers, (b"etag", etag.encode())])
                self.cache.put(head, key, entry)
        except MangwaleError as exc:
            await error_response(exc)(scope, receive, send)
            return
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            err = MangwaleError("internal error; see the server log", code="internal", status=500)
            await error_response(err)(scope, receive, send)
            return
        if if_none_match is not None and none_match(if_none_match.decode("latin-1"), entry.etag):
            await send({"type": "http.response.start", "status": 304, "headers": [(b"etag", entry.etag.encode())]})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": entry.headers})
        await send({"type": "http.response.body", "body": entry.body})


def _cache_headers(scope: Scope) -> tuple[bytes | None, bytes | None]:
    """``Host`` (part of a cached body's key: Link names the host) and ``If-None-Match``."""
    host = if_none_match = None
    for name, value in scope["headers"]:
        if name == b"host":
            host = value
        elif name == b"if-none-match":
            if_none_match = value
    return host, if_none_match
