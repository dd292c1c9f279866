"""The ``mangwale`` command line: a thin shell over ``Client`` (and ``serve`` over the server).

This module is the root: the options before the command and ``run``, the one place errors become
one line on stderr and an exit code (see ``errors.ExitCode``). Each noun has its module
(``serve``, ``watch``, ``datasets``, ``jobs``, ``tokens``), imported only when it is named
(``lazy.RootGroup``): a one-shot command loads its own code and no other's. Each command parses
options, makes one client call and hands the result to ``render``.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, NoReturn

# httpx's package __init__ imports its own command line (click, rich, pygments: ~20 ms of every
# mangwale command) when those are installed; without it, ``httpx.main`` is a stub. mangwale never
# runs the httpx CLI, so its module is marked absent before httpx is first imported.
if "httpx" not in sys.modules:
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]  # None there makes the import fail, as documented

import typer

from .. import __version__
from ..errors import ExitCode, MangwaleError
from .lazy import RootGroup
from .options import EXIT_CODES_HELP, Before, TokenOpt, UrlOpt

app = typer.Typer(
    cls=RootGroup,
    name="mangwale",
    help="ML training jobs with live progress: run the server, manage datasets and jobs.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mangwale {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """ML training jobs with live progress.

    --url and --token go before the command or after it (the one after wins); then
    MANGWALE_URL and MANGWALE_TOKEN; then http://localhost:8080 and no token.
    MANGWALE_DEBUG=1 adds the traceback to the line an unexpected error prints.
    """
    Before.url, Before.token = url, token
    if ctx.invoked_subcommand == "serve":  # trainers must not inherit a client's token
        return
    if url or token:
        from ..connection import check_token, check_url

        url = check_url(url, "--url") if url else None
        token = check_token(token, "--token") if token else None
    # `watch` reads its --url and the token from the environment: one given before the command
    # goes there, above MANGWALE_URL / MANGWALE_TOKEN and below watch's own --url. Never logged.
    if url:
        os.environ["MANGWALE_URL"] = url
    if token:
        os.environ["MANGWALE_TOKEN"] = token


# --- entry point -------------------------------------------------------------------------------


def run() -> None:
    """Console-script entry: run the app; every way out is an exit code of ``ExitCode``.

    A mangwale error or a usage error is one line on stderr. Anything else is a bug: one line
    that says so (the traceback with MANGWALE_DEBUG=1), never with the token in it.
    """
    secrets = [os.environ.get("MANGWALE_TOKEN", "")]
    try:
        code = typer.main.get_command(app).main(prog_name="mangwale", standalone_mode=False)
    except MangwaleError as exc:
        _fail(exc.message, int(exc.exit_code), secrets)
    except KeyboardInterrupt:
        sys.exit(int(ExitCode.INTERRUPTED))
    except BrokenPipeError:
        sys.exit(int(ExitCode.FAILED))
    except Exception as exc:  # noqa: BLE001 - the last guard: one line instead of a traceback
        _unexpected(exc, secrets)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int, secrets: list[str]) -> NoReturn:
    from . import render  # not at the top: a Tab press must not pay for rich

    render.error_line(_redact(message, secrets))
    sys.exit(code)


def _redact(text: str, secrets: list[str]) -> str:
    for secret in {*secrets, os.environ.get("MANGWALE_TOKEN", "")}:
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _unexpected(exc: Exception, secrets: list[str]) -> NoReturn:
    """Typer's usage errors (one line, exit 2), its Abort (130), or a bug (one line, exit 70)."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "NoArgsIsHelpError" in names:  # `mangwale jobs`: the help, as typer shows it
        exc.show()  # type: ignore[attr-defined]  # click's exception API, duck-typed across typer versions
        sys.exit(int(getattr(exc, "exit_code", ExitCode.USAGE)))
    if "ClickException" in names:  # typer vendors click from 0.26 on: matched by name, not class
        message = exc.format_message()  # type: ignore[attr-defined]  # as above
        ctx = getattr(exc, "ctx", None)
        if "UsageError" in names and ctx is not None:
            message = f"{message.rstrip('.')} (see {ctx.command_path} --help)"
        _fail(message, int(getattr(exc, "exit_code", ExitCode.USAGE)), secrets)
    if "Abort" in names:
        sys.exit(int(ExitCode.INTERRUPTED))
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if os.environ.get("MANGWALE_DEBUG") == "1":
        import traceback

        sys.stderr.write(_redact("".join(traceback.format_exception(exc)), secrets))
    _fail(
        f"unexpected {detail}; this is a bug in mangwale {__version__}, please report it "
        "(MANGWALE_DEBUG=1 shows the traceback)",
        int(ExitCode.INTERNAL),
        secrets,
    )
