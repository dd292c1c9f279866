"""The FastAPI application: translates HTTP to calls on ``Service`` and errors to JSON bodies.

Every error leaves as ``{"error": {"code", "message", "field"}}`` (``responses.py``) with a 4xx
status (or 503/507); an unexpected exception is logged and answered with a 500 in the same
shape, never a traceback.

Middleware, outermost first: the request timer (``telemetry.py``, for ``GET /metrics``), CORS,
authentication (``auth.py``), the body size limit and the
transport handle for WebSockets (``limits.py``). The OpenAPI document lists what they answer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .. import __version__, wire
from ..errors import NO_ROUTE, InvalidInput, MangwaleError
from ..jsonin import not_text, read_json, too_long
from ..metrics import Metrics
from ..service import Service
from ..settings import Settings
from ..tokens import Scope, TokenSet, load_tokens
from . import dashboard, routes, stream, telemetry, workers
from .auth import AuthMiddleware, document, required_scope
from .bodycache import BodyCache
from .hot import HOT_KEY, HotRoutes
from .limits import BodyLimit, ExposeTransport
from .responses import JSONOut, error_response
from .telemetry import RequestTimer

log = logging.getLogger("mangwale.server")


class App(FastAPI):
    """FastAPI, with two kinds of requests dispatched ahead of Starlette's stack and the router.

    * The WebSocket endpoints in ``ws_endpoints``: an open connection holds a coroutine frame
      (and FastAPI two ``AsyncExitStack``s) for every layer it passes through, for as long as it
      is open. Of the middlewares, only authentication and the transport handle act on
      WebSockets (the request timer, CORS and the body limit pass them through; FastAPI's
      exception handlers answer HTTP only), so those two are all such a connection goes through.
    * The hot REST routes (``hot.py``): through the same middlewares as the rest, built once
      from ``user_middleware`` (``build_hot_chain``), then straight to their handlers."""

    def build_hot_chain(self) -> None:
        """Wrap ``hot`` in the app's own middlewares, outermost first, as Starlette would."""
        chain: Any = self.hot
        for cls, args, kwargs in reversed(self.user_middleware):
            chain = cls(chain, *args, **kwargs)
        self.hot_chain = chain

    ws_endpoints: dict[str, Any]
    hot: HotRoutes
    hot_chain: Any  # the middlewares of the stack, around ``hot`` (``build_hot_chain``)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            handler = self.hot.match(scope)
            if handler is not None:
                if handler != self.hot.create_job and await self.hot.serve_hit(scope, send):
                    return
                scope[HOT_KEY] = handler
                await self.hot_chain(scope, receive, send)
                return
        elif scope["type"] == "websocket":
            endpoint = self.ws_endpoints.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


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
    first: dict[str, Any] = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return MangwaleError(
            f"request body is not valid JSON: {ctx.get('error', first.get('msg'))}",
            code="invalid_json",
            status=400,
        )
    field = _field_from_loc(first.get("loc", ()))
    msg = describe_invalid(first, field)
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return MangwaleError(msg, field=field, code="invalid", status=422)


_KINDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a JSON object",
    "model_type": "a JSON object",
    "model_attributes_type": "a JSON object",
    "list_type": "a JSON array",
}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def describe_invalid(error: dict[str, Any], field: str | None) -> str:
    """One of pydantic's validation errors, in mangwale's words: what the field must be, and what
    came instead (cut short)."""
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    value = error.get("input")
    name = field or "the request body"
    if kind == "missing":
        return f"{name} is required"
    if kind == "extra_forbidden":
        return f"unknown field {name}"
    if kind in _KINDS:
        return f"{name} must be {_KINDS[kind]}, got {wire.show(value)}"
    if kind == "int_parsing_size":  # past Python's 4,300 digits: a query's since=1000...
        text = str(value).strip()
        return too_long(name, len(text.lstrip("+-")), text)
    if kind == "string_unicode" and isinstance(value, str):  # a lone surrogate, from a \u escape
        return not_text(name, value)
    if kind == "finite_number":
        return f"{name} must be a finite number, got {wire.show(value)}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()), "?")
        return f"{name} must be {_BOUNDS[kind]} {bound}, got {wire.show(value)}"
    if kind == "string_too_short":
        least = ctx.get("min_length", 1)
        return f"{name} must not be empty" if least == 1 else f"{name} must be at least {least} characters long"
    if kind == "string_too_long":
        return f"{name} is {len(value) if isinstance(value, str) else 'too many'} characters long; at most {ctx.get('max_length')} are allowed"
    if kind == "too_long":
        return f"{name} has {ctx.get('actual_length')} items; at most {ctx.get('max_length')} are allowed"
    if kind == "too_short":
        return f"{name} has {ctx.get('actual_length')} items; at least {ctx.get('min_length')} are needed"
    if kind in ("literal_error", "enum"):
        return f"{name} must be one of {ctx.get('expected')}, got {wire.show(value)}"
    if kind == "value_error":
        reason = str(ctx.get("error") or error.get("msg", "")).removeprefix("Value error, ")
        return f"{name} {reason}" if reason.startswith("must") else f"{name}: {reason}"
    return f"{name}: {error.get('msg', 'invalid value')}"  # a kind not worded above


async def _body_problem(request: Request) -> MangwaleError | None:
    """Why ``read_json`` cannot read the request's body (already read by the route, and kept
    by its ``Request``), or None."""
    try:
        read_json(await request.body())
    except InvalidInput as exc:
        return exc
    except (ValueError, RuntimeError):  # a syntax error; or a body no longer there to read
        return None
    return None


def _allowed_methods(request: Request, fallback: str | None) -> str | None:
    """The ``Allow`` of a 405: every method the OpenAPI document lists for this path (FastAPI has
    one route per method, and Starlette names only the first route's)."""
    table = getattr(request.app.state, "allow_table", None)
    if table is None:
        table = [
            (re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(path)) + "$"), sorted(m.upper() for m in item))
            for path, item in request.app.openapi().get("paths", {}).items()
        ]
        request.app.state.allow_table = table
    for pattern, methods in table:
        if pattern.match(request.url.path):
            return ", ".join(methods)
    return fallback


def origin_regex(settings: Settings) -> str:
    return "^(?:" + "|".join(f"(?:{p})" for p in settings.allowed_origins) + ")$"


def create_app(settings: Settings, service: Service | None = None) -> FastAPI:
    """Build the app. With ``service`` given, its lifecycle belongs to the caller."""
    owned = service is None
    svc = service or Service(settings)
    metrics = Metrics()
    if svc.runner is not None:  # started by the caller (``mangwale serve``)
        metrics.attach(svc)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owned:
            await svc.start()
        if svc.runner is not None:
            metrics.attach(svc)
        metrics.lag.start()
        try:
            yield
        finally:
            metrics.lag.stop()
            if owned:
                await svc.stop()

    app = App(
        title="mangwale",
        version=__version__,
        description="Training jobs with live progress: REST, WebSocket (/ws/training) and SSE.",
        lifespan=lifespan,
        default_response_class=JSONOut,
    )
    app.state.service = svc
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.origin_re = re.compile(origin_regex(settings))
    tokens = load_tokens(settings)
    app.state.tokens = tokens

    # add_middleware puts each one outside the previous: CORS ends up outermost, so preflights
    # and the CORS headers of a 401 never depend on a token.
    app.add_middleware(ExposeTransport)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_size)
    app.add_middleware(AuthMiddleware, tokens=tokens)
    app.add_middleware(
        CORSMiddleware,
        allow_origin_regex=origin_regex(settings),
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["X-Next-Cursor", "Link", "Idempotent-Replayed", "ETag"],
    )
    app.add_middleware(RequestTimer, metrics=metrics)

    @app.exception_handler(MangwaleError)
    async def _mangwale_error(request: Request, exc: MangwaleError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI's "There was an error parsing the body": json.loads refused what is not a
        # syntax error (a number of more than 4,300 digits, bytes that are not UTF-8).
        # read_json says which field, in mangwale's words.
        unreadable = exc.status_code == 400 and isinstance(exc.__cause__, ValueError) and await _body_problem(request)
        if unreadable:
            return error_response(unreadable)
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            # A path no route has (not a job or dataset that is missing): its own code, so a
            # client whose URL has a stray path (http://host:8080/api) can say so.
            code, message = NO_ROUTE, f"no route {request.method} {request.url.path}"
        err = MangwaleError(message, code=code, status=exc.status_code)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # every method of the path, not only the first route's
            allow = _allowed_methods(request, (headers or {}).get("Allow"))
            headers = {**(headers or {}), **({"Allow": allow} if allow else {})}
        return error_response(err, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        err = MangwaleError("internal error; see the server log", code="internal", status=500)
        return error_response(err)

    app.include_router(routes.hot)
    app.include_router(routes.router)
    app.include_router(stream.router)
    app.include_router(workers.router)
    app.ws_endpoints = {
        "/ws/training": stream.ws_training_asgi,  # checks the token itself (auth.admit)
        "/ws/workers": AuthMiddleware(workers.ws_workers_asgi, tokens=tokens),
    }
    app.include_router(telemetry.router)
    app.include_router(dashboard.router)
    _document_gate(app, tokens)
    app.state.body_cache = BodyCache()
    app.hot = HotRoutes(app, app.state.body_cache)
    app.build_hot_chain()
    return app


def _document_gate(app: FastAPI, tokens: TokenSet) -> None:
    """Make the OpenAPI document list what the middleware and the store answer too: 401/403
    (``auth.document``), 413 for every request body, 503/507 for every write."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
        for path, item in schema.get("paths", {}).items():
            for method, op in item.items():
                responses = op.setdefault("responses", {})
                if "requestBody" in op:
                    responses.setdefault("413", {"description": "Request body over server.max_body_size", **error})
                if required_scope(method.upper(), path) is Scope.WRITE:
                    responses.setdefault("503", {"description": "The store cannot be written; nothing changed", **error})
                    responses.setdefault("507", {"description": "The disk is full; nothing changed", **error})
        document(schema, tokens)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
