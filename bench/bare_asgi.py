#!/usr/bin/env python3
"""A bare ASGI app: the ceiling of an HTTP server for ``bench/rest.py --bare``.

It answers ``GET <path?query>`` with the bytes in ``$BARE_BODIES`` (a JSON file, ``{"<path?query>":
"<body>"}``, taken from mangwale's own answers), ``GET /healthz`` with ``{}``, anything else with
404. No routing, no middleware, no parsing: what is left is the server (uvicorn with h11 or
httptools, or granian) and the ASGI calls.

    BARE_BODIES=bodies.json python bench/bare_asgi.py --port 8000 --server uvicorn-httptools
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

SERVERS = ("uvicorn-h11", "uvicorn-httptools", "granian")
_HEADERS = [(b"content-type", b"application/json")]


def _load() -> dict[bytes, bytes]:
    path = os.environ.get("BARE_BODIES")
    bodies = {k.encode(): v.encode() for k, v in json.load(open(path)).items()} if path else {}  # noqa: SIM115
    bodies.setdefault(b"/healthz", b"{}")
    return bodies


BODIES = _load()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    qs = scope["query_string"]
    key = scope["path"].encode() + (b"?" + qs if qs else b"")
    body = BODIES.get(key)
    status = 200 if body is not None else 404
    body = body if body is not None else b'{"error":"not found"}'
    await send({"type": "http.response.start", "status": status,
                "headers": [*_HEADERS, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--server", choices=SERVERS, default="uvicorn-h11")
    args = ap.parse_args()
    if args.server == "granian":
        from granian import Granian  # type: ignore[import-not-found]

        Granian("bare_asgi:app", address="127.0.0.1", port=args.port, interface="asgi",  # type: ignore[arg-type]
                log_enabled=False).serve()
        return
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=args.port, http=args.server.split("-")[1], log_level="warning",
                access_log=False, server_header=False, lifespan="on")


if __name__ == "__main__":
    main()
