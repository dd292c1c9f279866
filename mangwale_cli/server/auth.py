"""Authentication at the door: REST, SSE and the WebSocket handshake, before any route runs.

``required_scope`` is the one table of who may do what; ``AuthMiddleware`` enforces it and
``document`` writes it into the OpenAPI document. With no token configured, everything passes
(the loopback default; ``run.py`` refuses a non-loopback host without tokens).

* REST and SSE: ``Authorization: Bearer <token>``. Missing or unknown -> 401 with
  ``WWW-Authenticate: Bearer``; a token without the scope -> 403. Bodies are the usual
  ``{"error": {...}}``; the request body is never read first.
* WebSocket: the same header, or the subprotocol ``mangwale.bearer.<base64url token>`` that
  browsers offer beside ``mangwale.v1``. A refusal is an HTTP 401/403 answer to the handshake
  (never an accepted connection that is then closed).

Nothing here logs a credential: refusals log the method, path, client address and reason code,
and an accepted request is logged (at debug level) by token name.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.datastructures import Headers
from starlette.websockets import WebSocket

from ..errors import Forbidden, MangwaleError, Unauthorized
from ..tokens import (
    BadCredential,
    Scope,
    TokenSet,
    token_from_authorization,
    token_from_subprotocols,
)
from .limits import ASGIApp, Receive, Send, is_artifact_upload
from .limits import Scope as ASGIScope
from .responses import error_response

log = logging.getLogger("mangwale.auth")

TOKEN_KEY = "mangwale.token"  # scope key: the accepted Token, for handlers that want the name
REALM = 'Bearer realm="mangwale"'


def worker_route_scope() -> Scope:
    """The scope of the routes a remote worker uses to report on a job it holds (the artifact
    upload, ``is_artifact_upload``): ``worker`` (admin allows it too); the lease header fences
    which job. The one place that decides it."""
    return Scope.WORKER


def required_scope(method: str, path: str) -> Scope | None:
    """The scope a request needs; None for public paths (/healthz, the API docs, the dashboard).
    ``/metrics`` needs ``read``: it shows job counts and kinds, which a read token sees anyway,
    so a Prometheus scraper needs no more than that."""
    if path == "/ws/workers" or path.startswith("/workers/"):
        return Scope.WORKER  # a worker's connection, and what the jobs it holds need
    if is_artifact_upload(method, path):
        return worker_route_scope()  # a worker uploads its job's artifacts (the lease header says which)
    if path.startswith("/ws/") or path == "/metrics" or path == "/workers":
        return Scope.READ
    if not path.startswith("/training"):
        return None
    if method in ("GET", "HEAD", "OPTIONS"):
        return Scope.READ
    if method == "POST" and path.endswith("/predict"):  # classifies a text, changes nothing
        return Scope.READ
    if method == "POST" and path == "/training/jobs/prune":  # deletes history in bulk
        return Scope.ADMIN
    return Scope.WRITE


class AuthMiddleware:
    def __init__(self, app: ASGIApp, tokens: TokenSet) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if await admit(self.tokens, scope, receive, send):
            await self.app(scope, receive, send)


async def admit(tokens: TokenSet, scope: ASGIScope, receive: Receive, send: Send) -> bool:
    """True when the request may go on; else it was answered (401/403) and False.

    The WebSocket route calls this itself rather than sit behind the middleware, so an open
    connection does not keep this layer's coroutine frame for its whole life."""
    kind = scope["type"]
    if kind not in ("http", "websocket") or not tokens.enabled:
        return True
    method = scope.get("method", "GET") if kind == "http" else "GET"
    need = required_scope(method, scope["path"])
    if need is None:
        return True
    err = check_token(tokens, scope, need)
    if err is None:
        return True
    client = scope.get("client") or ("-", 0)
    log.info(
        "refused %s %s from %s: %s",
        method if kind == "http" else "WebSocket",
        scope["path"],
        client[0],
        err.code,
    )
    headers = {"WWW-Authenticate": _challenge(err, need)}
    response = error_response(err, headers=headers)
    if kind == "http":
        await response(scope, receive, send)
        return False
    ws = WebSocket(scope, receive, send)
    if "websocket.http.response" in scope.get("extensions", {}):
        await ws.send_denial_response(response)
    else:  # a server without the denial extension: a bare 403 is the best it can say
        await ws.close(code=1008)
    return False


def check_token(tokens: TokenSet, scope: ASGIScope, need: Scope) -> MangwaleError | None:
    headers = Headers(scope=scope)
    try:
        presented = token_from_authorization(headers.get("authorization"))
        if presented is None and scope["type"] == "websocket":
            presented = token_from_subprotocols(scope.get("subprotocols") or ())
    except BadCredential as exc:
        return Unauthorized(str(exc), code="invalid_token")
    if presented is None:
        return Unauthorized(
            "this server requires a token: pass --token or set MANGWALE_TOKEN "
            "(HTTP: Authorization: Bearer <token>)",
            code="missing_token",
        )
    token = tokens.verify(presented)
    if token is None:
        return Unauthorized(
            "the token is not valid on this server (unknown or revoked)", code="invalid_token"
        )
    if not token.allows(need):
        return Forbidden(
            f"token {token.name!r} does not have the {need.value!r} scope this needs",
            code="insufficient_scope",
        )
    scope[TOKEN_KEY] = token
    log.debug("token %s: %s %s", token.name, scope.get("method", "WebSocket"), scope["path"])
    return None


def _challenge(err: MangwaleError, need: Scope) -> str:
    """The ``WWW-Authenticate`` value (RFC 6750 section 3)."""
    if err.code == "missing_token":
        return REALM
    if err.code == "insufficient_scope":
        return f'{REALM}, error="insufficient_scope", scope="{need.value}"'
    return f'{REALM}, error="invalid_token"'


def document(schema: dict[str, Any], tokens: TokenSet) -> None:
    """Add the bearer scheme, each operation's ``security`` and its 401/403 answers to ``schema``
    (only when tokens are configured: otherwise no operation can answer 401)."""
    if not tokens.enabled:
        return
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "an API token (`mangwale tokens create`); scopes: read, write, worker, admin",
    }
    error_ref = {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
    }
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            need = required_scope(method.upper(), path)
            if need is None or not isinstance(op, dict):
                continue
            op["security"] = [{"bearer": []}]
            responses = op.setdefault("responses", {})
            responses.setdefault("401", {"description": "Missing or invalid token", **error_ref})
            responses.setdefault(
                "403", {"description": f"The token lacks the {need.value} scope", **error_ref}
            )
