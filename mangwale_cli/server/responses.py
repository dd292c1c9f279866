"""The JSON responses of the server: ``JSONOut`` for bodies, ``error_response`` for errors.

Every error leaves as ``{"error": {"code", "message", "field"}}`` with the status its
``MangwaleError`` carries. These live apart from ``app.py``, the composition root, so that the
middlewares (``auth.py``, ``limits.py``) and the routers (``routes.py``, ``stream.py``) it
assembles can answer without importing it.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from .. import wire
from ..errors import MangwaleError


class JSONOut(JSONResponse):
    """JSON rendered by the wire module (compact, strict, UTF-8). A ``JSONResponse`` subclass, so
    that FastAPI documents each route's ``response_model`` instead of a bare string."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        if isinstance(content, (bytes, str)):
            return content.encode() if isinstance(content, str) else content
        return wire.dumps(content).encode()


def error_response(err: MangwaleError, headers: dict[str, str] | None = None) -> JSONOut:
    """``err`` as its JSON error body, with its status."""
    return JSONOut(err.to_body(), status_code=err.status, headers=headers)
