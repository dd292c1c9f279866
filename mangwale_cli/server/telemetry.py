"""``GET /metrics`` (Prometheus text format) and the ASGI middleware that times REST requests.

The figures themselves live in ``mangwale_cli/metrics.py``; this module only serves them and
feeds it the latency of each HTTP request. With tokens configured, ``/metrics`` needs the
``read`` scope (``auth.required_scope``; docs/security.md).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..metrics import CONTENT_TYPE, Metrics
from .limits import ASGIApp, Message, Receive, Scope, Send

router = APIRouter()
STREAMING_ROUTES = frozenset({"/training/events"})  # open for minutes: not request latency


class MetricsText(Response):
    """The Prometheus text exposition format, version 0.0.4."""

    media_type = "text/plain"


@router.get(
    "/metrics",
    tags=["meta"],
    response_class=MetricsText,
    responses={200: {"description": "Server metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    """Server metrics in the Prometheus text format: connections, events logged and delivered,
    slow clients dropped, queue depths, running jobs, job outcomes and durations, REST latency."""
    m: Metrics = request.app.state.metrics
    return Response(await m.exposition(), media_type=CONTENT_TYPE)


class RequestTimer:
    """Time every HTTP request from the first call to the last byte sent (pure ASGI: Starlette's
    ``BaseHTTPMiddleware`` would add a task and a stream per request). The route label is the
    matched route's template (``/training/jobs/{job_id}``), so the label set stays small."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_timed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            if route not in STREAMING_ROUTES:
                self.metrics.observe_http(scope["method"], route, status, time.perf_counter() - start)
