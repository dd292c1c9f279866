"""What the client commands share: the ``--url`` / ``--token`` / ``--json`` options, the exit-code
epilog, and the ``Client`` a command gets from its flags.

Only typer and the standard library load here: httpx comes with the first request.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import EXIT_CODES

if TYPE_CHECKING:
    from ..client import Client
    from ..connection import ClientSettings

# "\b" keeps click from re-wrapping the lines: one code a line, as in the README's table.
EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(f"  {int(c):<4} {text}" for c, text in EXIT_CODES.items())

URL_HELP = "server URL, http://HOST:PORT; before or after the command [env: MANGWALE_URL; default: http://localhost:8080]"
TOKEN_HELP = "API token for a server with auth; before or after the command [env: MANGWALE_TOKEN]"
UrlOpt = Annotated[str | None, typer.Option("--url", metavar="URL", help=URL_HELP, show_default=False)]
TokenOpt = Annotated[str | None, typer.Option("--token", metavar="TOKEN", help=TOKEN_HELP, show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
JobArg = Annotated[str, typer.Argument(metavar="JOB_ID", help="job id", show_default=False)]
DatasetArg = Annotated[str, typer.Argument(metavar="DATASET", help="dataset id or name", show_default=False)]
ConnectTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--connect-timeout", metavar="S",
        help="exit 8 if the server has not answered once within S seconds (a wrong --url) [default: $MANGWALE_CONNECT_TIMEOUT or 30]",
        show_default=False,
    ),
]


def check_connect_timeout(value: float | None) -> float | None:
    """``--connect-timeout`` as given (None: the environment's or the default), or a usage error."""
    from ..errors import InvalidInput

    if value is not None and not value > 0:
        raise InvalidInput(f"--connect-timeout must be a positive number of seconds, got {value:g}", field="connect-timeout")
    return value


class Before:
    """``--url`` / ``--token`` given before the command (``mangwale --url X jobs list``)."""

    url: str | None = None
    token: str | None = None


def settings_for(url: str | None, token: str | None) -> ClientSettings:
    """The command's flag, then the one before the command, then MANGWALE_URL / MANGWALE_TOKEN,
    then the default; a bad URL or token is a usage error naming where it came from."""
    from ..connection import ClientSettings

    settings = ClientSettings.load(url or Before.url, token or Before.token)
    if token or Before.token:
        # The in-process followers (--watch, logs -f) build their own clients from the env.
        os.environ["MANGWALE_TOKEN"] = settings.token or ""
    return settings


def client_for(url: str | None, token: str | None) -> Client:
    """The ``Client`` a command's ``--url`` / ``--token`` (and what ``settings_for`` falls back
    to) name."""
    from ..client import Client

    settings = settings_for(url, token)
    return Client(settings.url, token=settings.token)
