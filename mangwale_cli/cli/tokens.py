"""``mangwale tokens``: mint API tokens for a server's ``[auth.tokens]`` table.

Minting is local (no server is asked): the token is printed once, and mangwale keeps only the
SHA-256 line the operator pastes into the server's config or tokens file.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .command import Command
from .lazy import LazyGroup

tokens_app = typer.Typer(
    cls=LazyGroup,
    help="Mint API tokens for a server's [auth.tokens] table.", no_args_is_help=True
)


@tokens_app.command("create", cls=Command)
def tokens_create(
    name: Annotated[
        str,
        typer.Argument(
            metavar="NAME",
            help="a name for the token (letters, digits, '-', '_'): shown in the server's logs and errors",
            show_default=False,
        ),
    ],
    scope: Annotated[
        list[str],
        typer.Option(
            "--scope",
            "-s",
            metavar="SCOPE",
            help="read (list, show, watch), write (create, cancel, delete), worker (mangwale worker only) or admin (all); repeatable",
        ),
    ] = [],  # noqa: B006 - typer reads it, nothing mutates it
    as_json: Annotated[
        bool, typer.Option("--json", help="print {name, token, sha256, scopes, toml} as JSON")
    ] = False,
) -> None:
    """Mint a token: print it once, and the line to add under [auth.tokens] of the server's config.

    Give the token to the client (MANGWALE_TOKEN or --token). The server stores only its hash;
    restart the server after adding the line. To revoke a token, delete its line and restart.
    """
    from ..tokens import Scope, check_name, hash_token, mint, parse_scopes, toml_line

    check_name(name)
    scopes = parse_scopes(scope)
    token = mint()
    digest = hash_token(token)
    line = toml_line(name, digest, scopes)
    if as_json:
        ordered = [s.value for s in Scope if s in scopes]
        typer.echo(
            json.dumps(
                {"name": name, "token": token, "sha256": digest, "scopes": ordered, "toml": line}
            )
        )
        return
    typer.echo(
        f"Token {name!r} (shown only now; the client passes it as MANGWALE_TOKEN or --token):"
    )
    typer.echo(f"  {token}")
    typer.echo(
        "Add this line under [auth.tokens] in the server's config file (or $MANGWALE_TOKENS_FILE), then restart it:"
    )
    typer.echo(f"  {line}")


def register(app: typer.Typer) -> None:
    """Add ``tokens`` to the ``mangwale`` app."""
    app.add_typer(tokens_app, name="tokens")
