"""The browser dashboard: ``GET /`` is the page, ``GET /static/{name}`` its files.

The page is plain HTML, CSS and JavaScript modules shipped in ``server/static/`` (no build step,
no CDN, works offline). It talks to the same REST API and ``/ws/training`` as every other
client. These routes are left out of the OpenAPI document, which describes the API only.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse, Response

from ..errors import NotFound

router = APIRouter()

STATIC_DIR = Path(__file__).parent / "static"

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

# Same-origin only: the page loads nothing from elsewhere and may not be framed.
# 'self' in connect-src covers ws:/wss: to the same host in current browsers.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A new mangwale version must not run against an old cached app.js.
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=1)
def _assets() -> dict[str, Path]:
    """The servable files by name: a fixed list, so no path from a URL reaches the disk."""
    return {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in MEDIA_TYPES}


def _file(name: str) -> Response:
    path = _assets().get(name)
    if path is None:
        raise NotFound(f"no dashboard file {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


@router.get("/", include_in_schema=False)
async def dashboard_page() -> Response:
    """The training dashboard."""
    return _file("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def dashboard_asset(name: str) -> Response:
    """A file of the dashboard (scripts, stylesheet, icon)."""
    return _file(name)


__all__ = ["router"]
