"""``mangwale serve``: bind the port, start the core, run uvicorn until a signal."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

from .. import __version__
from ..errors import ConfigError
from ..settings import Settings

log = logging.getLogger("mangwale")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == 98:
            raise ConfigError(f"port {port} on {host} is already in use; pass --port", field="port") from None
        raise ConfigError(f"cannot bind {host}:{port}: {exc.strerror}", field="host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def _main(settings: Settings, sock: socket.socket) -> None:
    import uvicorn

    from ..service import Service
    from .app import create_app

    service = Service(settings)
    await service.start()
    try:
        app = create_app(settings, service)
        config = uvicorn.Config(
            app,
            ws="websockets-sansio",
            ws_per_message_deflate=False,
            ws_ping_interval=settings.ws_ping_interval or None,
            ws_ping_timeout=settings.ws_ping_timeout or None,
            ws_max_size=settings.ws_max_message_size,
            lifespan="on",
            log_config=None,
            access_log=settings.log_level == "debug",
            timeout_graceful_shutdown=settings.shutdown_grace,
            server_header=False,
        )
        server = uvicorn.Server(config)
        log.info(
            "mangwale %s serving on %s (WebSocket %s), data dir %s",
            __version__,
            settings.http_url,
            settings.ws_url,
            settings.data_dir,
        )
        await server.serve(sockets=[sock])
    finally:
        await service.stop()
        log.info("mangwale stopped")


def serve(settings: Settings) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM."""
    configure_logging(settings.log_level)
    sock = bind(settings.host, settings.port)
    if settings.port == 0:
        settings.port = sock.getsockname()[1]
    asyncio.run(_main(settings, sock))
