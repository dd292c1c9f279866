"""The FastAPI application: translates HTTP to calls on ``Service`` and errors to JSON bodies.

Every error leaves as ``{"error": {"code", "message", "field"}}`` with a 4xx status (or 503);
an unexpected exception is logged and answered with a 500 in the same shape, never a traceback.
"""

from __future__ import annotations

import logging
import re
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .. import __version__, wire
from ..errors import MangwaleError
from ..service import Service
from ..settings import Settings

log = logging.getLogger("mangwale.server")


class JSONOut(Response):
    """JSON rendered by the wire module (compact, strict, UTF-8)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        if isinstance(content, (bytes, str)):
            return content.encode() if isinstance(content, str) else content
        return wire.dumps(content).encode()


def error_response(err: MangwaleError, headers: dict[str, str] | None = None) -> JSONOut:
    return JSONOut(err.to_body(), status_code=err.status, headers=headers)


def _field_from_loc(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def _validation_error(exc: RequestValidationError) -> MangwaleError:
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return MangwaleError(
            f"request body is not valid JSON: {ctx.get('error', first.get('msg'))}",
            code="invalid_json",
            status=400,
        )
    field = _field_from_loc(first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing" and field:
        msg = f"{field} is required"
    elif first.get("type") == "extra_forbidden" and field:
        msg = f"unknown field {field}"
    elif field:
        msg = f"{field}: {msg}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return MangwaleError(msg, field=field, code="invalid", status=422)


def origin_regex(settings: Settings) -> str:
    return "^(?:" + "|".join(f"(?:{p})" for p in settings.allowed_origins) + ")$"


def create_app(settings: Settings, service: Service | None = None) -> FastAPI:
    """Build the app. With ``service`` given, its lifecycle belongs to the caller."""
    owned = service is None
    svc = service or Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owned:
            await svc.start()
        try:
            yield
        finally:
            if owned:
                await svc.stop()

    app = FastAPI(
        title="mangwale",
        version=__version__,
        description="Training jobs with live progress: REST, WebSocket (/ws/training) and SSE.",
        lifespan=lifespan,
        default_response_class=JSONOut,
    )
    app.state.service = svc
    app.state.settings = settings
    app.state.origin_re = re.compile(origin_regex(settings))

    app.add_middleware(
        CORSMiddleware,
        allow_origin_regex=origin_regex(settings),
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["X-Next-Cursor", "Link", "Idempotent-Replayed"],
    )

    @app.exception_handler(MangwaleError)
    async def _mangwale_error(request: Request, exc: MangwaleError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        err = MangwaleError(message, code=code, status=exc.status_code)
        return error_response(err, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        err = MangwaleError("internal error; see the server log", code="internal", status=500)
        return error_response(err)

    from . import routes, stream

    app.include_router(routes.router)
    app.include_router(stream.router)
    return app
