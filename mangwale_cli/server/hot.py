"""The hot REST routes, dispatched ahead of FastAPI's router: ``GET /training/jobs``,
``GET /training/jobs/{job_id}`` and ``POST /training/jobs``.

``App.__call__`` sends a request that ``match`` names through the same middlewares as every
other request (request timer, CORS, authentication, body limit: ``app.py`` builds one chain of
them for this front), then here, instead of through Starlette's error middleware, the router's
linear match of every route and FastAPI's per-request exit stacks.

* The two GETs answer from ``BodyCache``: a hit is one dict look-up and one ``send`` of bytes
  rendered before, with its ``ETag``; ``If-None-Match`` that matches gets 304. A miss renders
  through the route's own endpoint (``routes.py``), so its parameters, errors and headers are
  exactly the documented ones.
* ``POST /training/jobs`` runs FastAPI's own handler for the route (body parsing, validation,
  the ``Idempotency-Key`` header) inside Starlette's exception middleware with the app's
  handlers, so every error body is the one FastAPI's stack gives.

The routes stay in FastAPI's router too, so the OpenAPI document lists them, and ``GET
/metrics`` labels them by their templates (``scope["route"]`` is the FastAPI route).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.middleware.asyncexitstack import AsyncExitStackMiddleware
from fastapi.routing import APIRoute
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response

from ..errors import MangwaleError
from . import routes
from .bodycache import BodyCache, Entry
from .etag import etag_of, none_match
from .limits import Receive, Scope, Send
from .responses import error_response

log = logging.getLogger("mangwale.server")

HOT_KEY = "mangwale.hot"  # scope key: the handler ``match`` chose
JOBS = "/training/jobs"
JOB_PREFIX = "/training/jobs/"

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler: Handler = scope[HOT_KEY]
        await handler(scope, receive, send)

    async def create_job(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self.app
        await self.create(scope, receive, send)

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
        host = if_none_match = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"if-none-match":
                if_none_match = value
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
