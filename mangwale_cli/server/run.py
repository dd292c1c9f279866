"""``mangwale serve``: bind the port, start the core, run uvicorn until a signal.

Before binding, the exposure check: a host other than loopback with no token configured is
refused unless ``server.insecure`` (``serve --insecure``). TLS is uvicorn's, with
``server.ssl_certfile`` / ``server.ssl_keyfile``; docs/security.md shows a reverse proxy instead.

On SIGTERM or SIGINT: stop accepting, close every WebSocket with 1001 and end SSE streams
(``stream.close_streams``; uvicorn alone would send 1012), let running requests finish, then
``Service.stop`` re-queues running jobs and flushes the store.

``serve --processes N`` (Redis store only): the port is bound once and N forked processes accept
on it, each a full instance (its own event loop, runner and Redis consumer). The kernel spreads
connections over them; Redis makes them one service. The parent passes signals on and exits
with the first failure.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from .. import __version__
from ..errors import ConfigError
from ..settings import Settings
from ..tokens import is_loopback, load_tokens, redact

log = logging.getLogger("mangwale.serve")


class LogFormatter(logging.Formatter):
    """``2026-11-25 10:31:02.117 INFO    mangwale.runner: job ... succeeded``: the time to the
    millisecond, the level, and the part of the server that speaks, by what it is rather than
    where its code lives: ``mangwale.runner`` for the module ``mangwale_cli.runner``, and
    ``uvicorn`` for uvicorn's general logger, which it calls ``uvicorn.error`` even when it
    only says that it started (``uvicorn.access`` is ``http``)."""

    RENAMED: ClassVar[dict[str, str]] = {"uvicorn.error": "uvicorn", "uvicorn.access": "http"}

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)-7s %(component)s: %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        name = record.name
        record.component = self.RENAMED.get(name) or (  # a field of the format above
            "mangwale." + name.removeprefix("mangwale_cli.") if name.startswith("mangwale_cli.") else name
        )
        return super().format(record)


# What uvicorn says about its own lifecycle, which the banner and "mangwale stopped" already
# say: shown at debug level only.
_UVICORN_CHATTER = (
    "Started server process",
    "Waiting for application startup",
    "Application startup complete",
    "Waiting for application shutdown",
    "Application shutdown complete",
    "Finished server process",
)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter())
    handler.addFilter(redact_credentials)
    handler.addFilter(quiet_client_faults)
    handler.addFilter(quiet_uvicorn_lifecycle)
    logging.basicConfig(level=level.upper(), handlers=[handler])


def quiet_uvicorn_lifecycle(record: logging.LogRecord) -> bool:
    """uvicorn's start-up and shutdown lines, at debug level (they repeat mangwale's own)."""
    if record.name == "uvicorn.error" and record.levelno == logging.INFO and str(record.msg).startswith(_UVICORN_CHATTER):
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return True


def quiet_client_faults(record: logging.LogRecord) -> bool:
    """A client's broken frame is the client's fault, not the server's: uvicorn logs invalid UTF-8
    in a text frame with a traceback; keep it as one warning line (the connection closes 1007)."""
    if record.name == "uvicorn.error" and str(record.msg).startswith("Invalid UTF-8 sequence"):
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "WebSocket client sent invalid UTF-8 in a text frame; closed 1007", None
        record.exc_info, record.exc_text = None, None
    return True


def redact_credentials(record: logging.LogRecord) -> bool:
    """Blank out anything that looks like a credential before a line is written. mangwale itself
    never logs one, but at debug level the WebSocket handshake logger prints every request header
    (Authorization, Sec-WebSocket-Protocol), and a user may paste a token into a URL."""
    message = record.getMessage()
    cleaned = redact(message)
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    return True


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio only turns Nagle off (TCP_NODELAY) for sockets whose proto
    # says TCP; with proto 0 every keep-alive response waited ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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


def check_exposure(settings: Settings) -> None:
    """Refuse settings that would expose the server to others without credentials or TLS files."""
    tokens = load_tokens(settings)
    if not is_loopback(settings.host) and not tokens.enabled:
        if not settings.insecure:
            raise ConfigError(
                f"refusing to serve on {settings.host} with no tokens: anyone who can reach it could read "
                "the data and run jobs. Add tokens (`mangwale tokens create NAME --scope read --scope write`, "
                "see docs/security.md) or pass --insecure",
                field="host",
            )
        log.warning("serving on %s with no tokens (--insecure): anyone who can reach it has full access", settings.host)
    if bool(settings.ssl_certfile) != bool(settings.ssl_keyfile):
        raise ConfigError("TLS needs both server.ssl_certfile and server.ssl_keyfile (--ssl-certfile, --ssl-keyfile)", field="ssl_certfile")
    for name in ("ssl_certfile", "ssl_keyfile"):
        value = getattr(settings, name)
        if value and not os.path.isfile(value):
            raise ConfigError(f"server.{name} {value} is not a file", field=f"server.{name}")


async def _main(settings: Settings, sock: socket.socket) -> None:
    import uvicorn

    from ..service import Service
    from .app import create_app
    from .limits import limited_httptools
    from .stream import close_streams

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            for listener in self.servers:  # stop accepting before telling clients to go elsewhere
                listener.close()
            await close_streams(service, timeout=min(2.0, settings.shutdown_grace or 2.0))
            await super().shutdown(sockets)

    service = Service(settings)
    await service.start()
    # What start-up loaded (the job index, the replay ring) lives as long as the server: move it
    # out of the collector's sight, so no full collection walks it again while requests wait.
    gc.collect()
    gc.freeze()
    # Thousands of connections are thousands of long-lived objects each holding a few hundred
    # more. With the default thresholds (700, 10, 10) a full collection ran every few hundred
    # handshakes and walked them all: 120-420 ms pauses while 5,000 clients connected
    # (bench/connects.py), every open socket waiting. Fewer young collections and full ones
    # only after 1,000 middle ones (and CPython's own rule: 25 % growth of the old generation)
    # took 5,000 connects from 5-11 s to 2.2-4.5 s, under Node's 3.2 s. Cyclic garbage that
    # outlives two young collections waits longer for a full one: memory, not correctness.
    gc.set_threshold(2000, 10, 1000)
    try:
        app = create_app(settings, service)
        config = uvicorn.Config(
            app,
            # httptools (bench/servers.md: ~1.6x h11's requests/s) has no limit on the request head,
            # and a 2 MiB header must get 400 (test_limits): limits.limited_httptools adds h11's.
            http=limited_httptools() if settings.http == "httptools" else "h11",
            ws="websockets-sansio",
            ws_per_message_deflate=False,
            ws_ping_interval=settings.ws_ping_interval or None,
            ws_ping_timeout=settings.ws_ping_timeout or None,
            ws_max_size=settings.ws_max_message_size,
            lifespan="on",
            log_config=None,
            access_log=settings.log_level == "debug",
            timeout_graceful_shutdown=settings.shutdown_grace,  # type: ignore[arg-type]  # hinted int; an asyncio timeout, a float works
            server_header=False,
            ssl_certfile=settings.ssl_certfile or None,
            ssl_keyfile=settings.ssl_keyfile or None,
        )
        server = Server(config)
        log.info(
            "mangwale %s serving on %s (WebSocket %s), store %s, pid %d",
            __version__,
            settings.http_url,
            settings.ws_url,
            service.describe_store(),
            os.getpid(),
        )
        # uvicorn re-raises the stop signal once it has shut down; with the default handlers that
        # kills the process before ``service.stop()`` below has re-queued jobs and flushed the
        # store. The handlers installed here (restored by uvicorn) turn it into a no-op.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _stop_requested)
        await server.serve(sockets=[sock])
    finally:
        await service.stop()
        log.info("mangwale stopped")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """asyncio's loop, unless ``MANGWALE_LOOP=uvloop`` (and uvloop is installed).

    uvloop is opt-in, not the default: under it, bench/fanout.py's saturated run (1,000
    watchers, 20 jobs x 50 events as fast as they come) had its ``POST /training/jobs`` fail
    with a reset connection, reproducibly, where asyncio's loop passes; not yet understood.
    Measured with it: 5,000 connects no faster than the GC thresholds alone give."""
    if os.environ.get("MANGWALE_LOOP", "asyncio") != "uvloop":
        return None
    try:
        import uvloop  # type: ignore[import-not-found]  # optional, not a dependency
    except ImportError:
        return None
    return uvloop.new_event_loop


def _run(main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main)


def _stop_requested(sig: int, frame: object) -> None:
    log.info("%s received: stopping the job runner", signal.Signals(sig).name)


def serve(settings: Settings, processes: int = 1) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM."""
    configure_logging(settings.log_level)
    for line in settings.warnings:
        log.warning("%s", line)
    check_exposure(settings)
    if processes > 1 and not settings.shared_store:
        raise ConfigError(
            "--processes needs a shared store: pass --store redis://HOST:6379/0 (the embedded store "
            "belongs to one process)",
            field="processes",
        )
    sock = bind(settings.host, settings.port)
    if settings.port == 0:
        settings.port = sock.getsockname()[1]
    if processes > 1:
        sys.exit(_fork_instances(settings, sock, processes))
    _run(_main(settings, sock))
    # Stopped and flushed. Without this the interpreter's last act is a garbage collection of
    # the whole heap (0.6-1.7 s measured here), between a SIGTERM and the exit.
    gc.freeze()


def _fork_instances(settings: Settings, sock: socket.socket, n: int) -> int:
    """Fork ``n`` instances sharing ``sock``; wait for them; the first non-zero exit wins."""
    children: dict[int, int] = {}
    for i in range(n):
        pid = os.fork()
        if pid == 0:  # the child: one instance, named apart from its siblings
            settings.process_index = i + 1
            try:
                _run(_main(settings, sock))
                code = 0
            except BaseException as exc:  # noqa: BLE001 - report and leave the parent to decide
                log.error("instance %d failed: %s", i + 1, exc)
                code = 1
            os._exit(code)
        children[pid] = i + 1
    sock.close()
    log.info("started %d instances on port %d (pids %s)", n, settings.port, " ".join(map(str, children)))

    def forward(sig: int, frame: object) -> None:
        for pid in children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    result = 0
    while children:
        pid, status = os.wait()
        if pid in children:
            children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if code != 0 and result == 0:
                result = code if code > 0 else 1
                forward(signal.SIGTERM, None)  # one failed: stop the rest rather than limp on
    return result
