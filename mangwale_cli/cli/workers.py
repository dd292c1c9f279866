"""``mangwale worker`` (run jobs for a server from this machine) and ``mangwale workers list``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import InvalidInput
from .command import Command
from .options import ConnectTimeoutOpt, check_connect_timeout

LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
LabelOpt = Annotated[list[str], typer.Option("--label", "-l", metavar="LABEL", help="a label; repeatable")]


def worker(
    url: Annotated[str | None, typer.Option("--url", metavar="URL", help="the server (or $MANGWALE_URL)", show_default=False)] = None,
    token: Annotated[str | None, typer.Option("--token", metavar="TOKEN", help="a token with the worker scope (or $MANGWALE_TOKEN)", show_default=False)] = None,
    label: LabelOpt = [],  # noqa: B006 - typer reads it, nothing mutates it
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, max=1000, metavar="N", help="jobs run at once")] = 1,
    name: Annotated[str | None, typer.Option("--name", metavar="NAME", help="display name [default: the host name]")] = None,
    config: Annotated[Path | None, typer.Option("--config", metavar="FILE", help="TOML file whose [trainers.*] this worker runs too")] = None,
    log_level: Annotated[str, typer.Option("--log-level", metavar="LEVEL", help="critical, error, warning, info, debug")] = "info",
    connect_timeout: ConnectTimeoutOpt = None,
) -> None:
    """Run jobs for a server from this machine: dial out to --url, take the jobs whose labels
    are all among this worker's labels and whose kind it runs, and report on them live.

    It needs no store access: HTTP(S) and one WebSocket. A server never reached within
    --connect-timeout (a wrong --url, a server not started) ends it with exit 8, a refused token
    with exit 5. A worker is long-lived: once the server has answered, a lost connection is
    retried with backoff for as long as it runs ($MANGWALE_BACKOFF_INITIAL,
    $MANGWALE_BACKOFF_MAX). SIGTERM (or Ctrl-C) hands running jobs back to the server at once,
    then it exits.
    """
    import asyncio
    import logging

    from ..worker_agent import WorkerAgent, local_trainers
    from .options import settings_for

    check_connect_timeout(connect_timeout)
    if log_level.upper() not in LOG_LEVELS:
        raise InvalidInput(f"--log-level must be one of {', '.join(LOG_LEVELS).lower()}, got {log_level!r}", field="log-level")
    settings = settings_for(url, token)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    if log_level.upper() != "DEBUG":  # httpx logs every request at INFO: noise, and a 2nd line on an error
        logging.getLogger("httpx").setLevel(logging.WARNING)
    agent = WorkerAgent(settings.url, token=settings.token, labels=label, concurrency=concurrency, name=name,
                        trainers=local_trainers(config), connect_timeout=connect_timeout)  # fmt: skip
    asyncio.run(agent.run())


def workers_list(
    url: Annotated[str | None, typer.Option("--url", metavar="URL", show_default=False, help="the server (or $MANGWALE_URL)")] = None,
    token: Annotated[str | None, typer.Option("--token", metavar="TOKEN", show_default=False, help="API token (or $MANGWALE_TOKEN)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """List the workers registered with the server: labels, kinds, running jobs, last heartbeat, state."""
    import time

    from . import render
    from .options import client_for

    rows = client_for(url, token).list_workers()
    if as_json:
        render.print_json(rows)
        return
    if not rows:
        typer.echo("no workers registered")
        return
    now = time.time() * 1000
    for w in rows:
        ago = max(0.0, (now - w["lastHeartbeat"]) / 1000)
        labels = ",".join(w["labels"]) or "-"
        running = ",".join(w["running"]) or "-"
        typer.echo(f"{w['id']}  {w['name']:<16} {w['state']:<5} labels={labels} kinds={','.join(w['kinds'])} "
                   f"running={len(w['running'])}/{w['concurrency']} {running} heartbeat {ago:.0f}s ago")  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add ``worker`` and ``workers list`` to the ``mangwale`` app."""
    app.command("worker", cls=Command)(worker)
    workers_app = typer.Typer(help="See the workers registered with a server.", no_args_is_help=True)
    workers_app.command("list", cls=Command)(workers_list)
    app.add_typer(workers_app, name="workers")
