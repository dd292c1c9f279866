"""``mangwale datasets``: create, list, show and delete datasets through ``Client``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import InvalidInput
from .command import Command
from .lazy import LazyGroup
from .options import EXIT_CODES_HELP, DatasetArg, JsonOpt, TokenOpt, UrlOpt, client_for

datasets_app = typer.Typer(
    cls=LazyGroup, help="Create, list, show and delete datasets.", no_args_is_help=True, epilog=EXIT_CODES_HELP
)


@datasets_app.command("list", cls=Command)
def datasets_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List datasets."""
    from . import render

    rows = client_for(url, token).list_datasets()
    render.print_json(rows) if as_json else render.datasets_table(rows)


@datasets_app.command("create", cls=Command)
def datasets_create(
    name: Annotated[str, typer.Argument(metavar="NAME", help="dataset name", show_default=False)],
    file: Annotated[
        Path, typer.Option("--file", "-f", metavar="FILE", help="examples: JSONL, CSV (text,intent or text,category) or a JSON array")
    ],
    fmt: Annotated[str | None, typer.Option("--format", metavar="FORMAT", help="jsonl, csv or json [default: from the file name]")] = None,
    description: Annotated[str | None, typer.Option(metavar="TEXT", help="free text")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the new dataset's id")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a dataset from a file of labelled examples."""
    from ..datafile import DataFileError, parse_examples
    from . import render

    try:
        data = file.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {file}: {exc.strerror}", field="file") from None
    try:
        examples = parse_examples(data, filename=file.name, fmt=fmt)
    except DataFileError as exc:
        raise InvalidInput(f"{file}: {exc}", field="file") from None
    ds = client_for(url, token).create_dataset(name, examples, description)
    if quiet:
        typer.echo(ds["id"])
    elif as_json:
        render.print_json(ds)
    else:
        typer.echo(f"created dataset {ds['id']} ({ds['size']} examples, {ds.get('intentCount', 0)} intents)")


@datasets_app.command("show", cls=Command)
def datasets_show(dataset: DatasetArg, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Show a dataset and its intents."""
    from . import render

    client = client_for(url, token)
    ds = client.get_dataset(client.find_dataset(dataset)["id"])
    render.print_json(ds) if as_json else render.dataset_detail(ds)


@datasets_app.command("delete", cls=Command)
def datasets_delete(dataset: DatasetArg, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Delete a dataset (refused while a queued or running job uses it)."""
    client = client_for(url, token)
    ds = client.find_dataset(dataset)
    client.delete_dataset(ds["id"])
    typer.echo(f"deleted dataset {ds['id']} ({ds['name']})", err=True)


def register(root: typer.Typer) -> None:
    """Add ``datasets`` to the ``mangwale`` app."""
    root.add_typer(datasets_app, name="datasets")
