"""``mangwale serve``: run the server. The server, its store and trainers load only when it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .command import Command


def serve(
    host: Annotated[str | None, typer.Option(metavar="HOST", help="address to bind [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(metavar="PORT", help="port for REST and WebSocket [default: 8080]")] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", metavar="DIR", help="where the store lives [default: $MANGWALE_HOME or ~/.local/share/mangwale]")
    ] = None,
    concurrency: Annotated[int | None, typer.Option(metavar="N", help="jobs run at once; 0 runs none and only serves [default: 2]")] = None,
    store: Annotated[
        str | None,
        typer.Option("--store", metavar="STORE", help="tinydb (embedded) or redis://host:6379/0, shared by several instances [default: tinydb]"),
    ] = None,
    processes: Annotated[
        int, typer.Option("--processes", min=1, metavar="N", help="run N instances on this port (needs --store redis://...)")
    ] = 1,
    config: Annotated[Path | None, typer.Option("--config", metavar="FILE", help="TOML config file [default: DATA_DIR/mangwale.toml]")] = None,
    log_level: Annotated[str | None, typer.Option(metavar="LEVEL", help="critical, error, warning, info, debug")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="allow a non-loopback --host with no tokens configured")] = False,
    ssl_certfile: Annotated[Path | None, typer.Option("--ssl-certfile", metavar="FILE", help="TLS certificate (PEM): serve https and wss")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option("--ssl-keyfile", metavar="FILE", help="TLS private key (PEM) for --ssl-certfile")] = None,
    label: Annotated[
        list[str], typer.Option("--label", "-l", metavar="LABEL", help="a label of this server's own runner; repeatable")
    ] = [],  # noqa: B006 - typer reads it, nothing mutates it
) -> None:
    """Run the server: REST API, WebSocket at /ws/training and the job runner, on one port.

    With tokens in [auth.tokens] (see `mangwale tokens create`), every API call needs one.
    A --host other than loopback needs tokens, or --insecure.
    With --store redis://..., several instances (any ports, any machines) share jobs, workers
    and live events.
    """
    from ..server.run import serve as run_server
    from ..settings import load

    settings = load(
        {
            "host": host,
            "port": port,
            "data_dir": data_dir,
            "runner_concurrency": concurrency,
            "store_backend": store,
            "config_file": config,
            "log_level": log_level,
            "insecure": True if insecure else None,
            "ssl_certfile": str(ssl_certfile) if ssl_certfile else None,
            "ssl_keyfile": str(ssl_keyfile) if ssl_keyfile else None,
            "runner_labels": list(label) or None,
        }
    )
    run_server(settings, processes=processes)


def register(root: typer.Typer) -> None:
    """Add ``serve`` to the ``mangwale`` app."""
    root.command(cls=Command)(serve)
