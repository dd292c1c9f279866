"""The ``mangwale`` command line: a thin shell over ``Client`` (and ``serve`` over the server).

Each command parses options, makes one client call and hands the result to ``render``. Errors
become one line on stderr and an exit code in ``run`` (see ``errors.ExitCode``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

# httpx's package __init__ imports its own command line (click, rich, pygments: ~20 ms of every
# mangwale command) when those are installed; without it, ``httpx.main`` is a stub. mangwale never
# runs the httpx CLI, so its module is marked absent before httpx is first imported.
if "httpx" not in sys.modules:
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]  # None there makes the import fail, as documented

import typer

from .. import __version__
from ..errors import ExitCode, InvalidInput, MangwaleError
from .tokens import register as register_tokens
from .watch import register as register_watch

if TYPE_CHECKING:
    from ..client import Client

EXIT_CODES_HELP = """Exit codes: 0 ok/succeeded, 1 job failed or request refused, 2 usage error or invalid
input, 3 cancelled, 4 not found, 5 not authorised, 6 timeout, 7 gave up reconnecting,
8 server unreachable."""

app = typer.Typer(
    name="mangwale",
    help="ML training jobs with live progress: run the server, manage datasets and jobs.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
datasets_app = typer.Typer(help="Create, list, show and delete datasets.", no_args_is_help=True, epilog=EXIT_CODES_HELP)
jobs_app = typer.Typer(help="Create, list, show, cancel and delete training jobs.", no_args_is_help=True, epilog=EXIT_CODES_HELP)
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")

UrlOpt = Annotated[
    str | None,
    typer.Option("--url", envvar="MANGWALE_URL", help="server URL [default: http://localhost:8080]"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def _client(url: str | None) -> Client:
    from ..client import Client

    return Client(url)


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
    token: Annotated[
        str | None,
        typer.Option("--token", metavar="TOKEN", help="API token for a server with auth [default: $MANGWALE_TOKEN]", show_default=False),
    ] = None,
) -> None:
    """ML training jobs with live progress."""
    if token and ctx.invoked_subcommand != "serve":  # trainers must not inherit a client's token
        # Every client (REST, watch's WebSocket, logs -f) reads it from here; never logged.
        os.environ["MANGWALE_TOKEN"] = token


# --- serve -------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="address to bind [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="port for REST and WebSocket [default: 8080]")] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="where the store lives [default: $MANGWALE_HOME or ~/.local/share/mangwale]")
    ] = None,
    concurrency: Annotated[int | None, typer.Option(help="jobs run at once [default: 2]")] = None,
    store: Annotated[
        str | None,
        typer.Option("--store", help="tinydb (embedded) or redis://host:6379/0, shared by several instances [default: tinydb]"),
    ] = None,
    processes: Annotated[
        int, typer.Option("--processes", min=1, help="run N instances on this port (needs --store redis://...)")
    ] = 1,
    config: Annotated[Path | None, typer.Option("--config", help="TOML config file [default: DATA_DIR/mangwale.toml]")] = None,
    log_level: Annotated[str | None, typer.Option(help="critical, error, warning, info, debug")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="allow a non-loopback --host with no tokens configured")] = False,
    ssl_certfile: Annotated[Path | None, typer.Option("--ssl-certfile", help="TLS certificate (PEM): serve https and wss")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option("--ssl-keyfile", help="TLS private key (PEM) for --ssl-certfile")] = None,
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
        }
    )
    run_server(settings, processes=processes)


# --- datasets ----------------------------------------------------------------------------------


@datasets_app.command("list")
def datasets_list(url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """List datasets."""
    from . import render

    rows = _client(url).list_datasets()
    render.print_json(rows) if as_json else render.datasets_table(rows)


@datasets_app.command("create")
def datasets_create(
    name: Annotated[str, typer.Argument(help="dataset name")],
    file: Annotated[Path, typer.Option("--file", "-f", help="examples: JSONL, CSV (text,intent or text,category) or a JSON array")],
    fmt: Annotated[str | None, typer.Option("--format", help="jsonl, csv or json [default: from the file name]")] = None,
    description: Annotated[str | None, typer.Option(help="free text")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the new dataset's id")] = False,
    url: UrlOpt = None,
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
    ds = _client(url).create_dataset(name, examples, description)
    if quiet:
        typer.echo(ds["id"])
    elif as_json:
        render.print_json(ds)
    else:
        typer.echo(f"created dataset {ds['id']} ({ds['size']} examples, {ds.get('intentCount', 0)} intents)")


@datasets_app.command("show")
def datasets_show(
    dataset_id: Annotated[str, typer.Argument(help="dataset id")], url: UrlOpt = None, as_json: JsonOpt = False
) -> None:
    """Show a dataset and its intents."""
    from . import render

    ds = _client(url).get_dataset(dataset_id)
    render.print_json(ds) if as_json else render.dataset_detail(ds)


@datasets_app.command("delete")
def datasets_delete(dataset_id: Annotated[str, typer.Argument(help="dataset id")], url: UrlOpt = None) -> None:
    """Delete a dataset (refused while a queued or running job uses it)."""
    _client(url).delete_dataset(dataset_id)
    typer.echo(f"deleted dataset {dataset_id}", err=True)


# --- jobs --------------------------------------------------------------------------------------


def _parse_params(pairs: list[str], raw: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if raw:
        try:
            loaded = json.loads(raw)
        except ValueError as exc:
            raise InvalidInput(f"--params is not valid JSON: {exc}", field="params") from None
        if not isinstance(loaded, dict):
            raise InvalidInput("--params must be a JSON object", field="params")
        params.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--param {pair!r} is not KEY=VALUE", field="param")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def _resolve_dataset(client: Client, ref: str | None) -> str | None:
    """Accept a dataset id or a unique dataset name."""
    if ref is None or ref.startswith("ds-"):
        return ref
    matches = [d["id"] for d in client.list_datasets() if d["name"] == ref]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise InvalidInput(f"several datasets are named {ref!r}; pass an id", field="dataset")
    return ref


@jobs_app.command("create")
def jobs_create(
    kind: Annotated[str, typer.Argument(help="job kind: nlu-train, fine-tune, simulate, ...")],
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="dataset id or name")] = None,
    param: Annotated[list[str], typer.Option("--param", "-p", help="KEY=VALUE (VALUE as JSON if it parses); repeatable")] = [],  # noqa: B006 - typer reads it, nothing mutates it
    params: Annotated[str | None, typer.Option("--params", help="params as a JSON object")] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="agent id")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option("--idempotency-key", envvar="MANGWALE_IDEMPOTENCY_KEY", help="retries with the same key return the first job")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the job id")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="then follow it as `mangwale watch` does and exit with its outcome")] = False,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue a training job."""
    client = _client(url)
    job = client.create_job(
        kind,
        _resolve_dataset(client, dataset),
        params=_parse_params(param, params),
        agent_id=agent,
        idempotency_key=idempotency_key,
    )
    if watch:
        from .watch import Output, run_watch

        typer.echo(f"queued job {job['id']} ({job['kind']})", err=True)
        raise typer.Exit(run_watch(url=client.url, job_ids=[job["id"]], output=Output.json if as_json else None))
    if quiet:
        typer.echo(job["id"])
    elif as_json:
        from . import render  # rich: only when something is rendered

        render.print_json(job)
    else:
        typer.echo(f"queued job {job['id']} ({job['kind']})")


@jobs_app.command("list")
def jobs_list(
    status: Annotated[list[str], typer.Option("--status", "-s", help="only this status; repeatable")] = [],  # noqa: B006 - typer reads it, nothing mutates it
    limit: Annotated[int, typer.Option(help="at most this many jobs", min=1, max=1000)] = 50,
    cursor: Annotated[str | None, typer.Option(help="continue after this job id (the next-page cursor)")] = None,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    from . import render

    rows, nxt = _client(url).list_jobs(statuses=status or None, limit=limit, cursor=cursor)
    if as_json:
        render.print_json(rows)
    else:
        render.jobs_table(rows)
        if nxt:
            typer.echo(f"more: --cursor {nxt}", err=True)


@jobs_app.command("show")
def jobs_show(job_id: Annotated[str, typer.Argument(help="job id")], url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """Show one job."""
    from . import render

    job = _client(url).get_job(job_id)
    render.print_json(job) if as_json else render.job_detail(job)


@jobs_app.command("cancel")
def jobs_cancel(job_id: Annotated[str, typer.Argument(help="job id")], url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """Cancel a queued or running job."""
    from . import render

    job = _client(url).cancel_job(job_id)
    render.print_json(job) if as_json else typer.echo(f"job {job['id']} {job['status']}")


@jobs_app.command("delete")
def jobs_delete(job_id: Annotated[str, typer.Argument(help="job id")], url: UrlOpt = None) -> None:
    """Delete a finished job and what it stored."""
    _client(url).delete_job(job_id)
    typer.echo(f"deleted job {job_id}", err=True)


@jobs_app.command("prune")
def jobs_prune(
    older_than: Annotated[str | None, typer.Option("--older-than", metavar="AGE", help="finished longer ago than AGE: 30d, 12h, 90m, 45s")] = None,
    keep: Annotated[int | None, typer.Option("--keep", min=0, metavar="N", help="keep the newest N finished jobs")] = None,
    status: Annotated[list[str] | None, typer.Option("--status", metavar="STATUS", help="only succeeded, failed or cancelled jobs (repeatable)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be deleted; delete nothing")] = False,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete finished jobs by age and/or count, with their events, logs and files (admin token).

    Queued and running jobs, and the base model of a queued or running fine-tune, are never
    pruned. Watchers and the dashboard are told (job_deleted).
    """
    from . import render

    if older_than is None and keep is None:
        raise InvalidInput("say which jobs to prune: --older-than AGE and/or --keep N", field="older-than")
    if older_than is not None:
        from ..wire import parse_duration

        try:
            parse_duration(older_than)
        except ValueError as exc:
            raise InvalidInput(f"--older-than: {exc}", field="older-than") from None
    result = _client(url).prune_jobs(older_than=older_than, keep=keep, statuses=status, dry_run=dry_run)
    if as_json:
        render.print_json(result)
        return
    for job_id in result["deleted"]:
        typer.echo(job_id)
    verb = "would delete" if result["dryRun"] else "deleted"
    kept = f"; kept {len(result['kept'])} base model(s) of active fine-tunes" if result["kept"] else ""
    typer.echo(f"{verb} {result['count']} finished job(s){kept}", err=True)


@jobs_app.command("kinds")
def jobs_kinds(url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """List the job kinds the server can run."""
    from . import render

    rows = _client(url).list_kinds()
    if as_json:
        render.print_json(rows)
    else:
        for k in rows:
            typer.echo(f"{k['kind']:<16} {k['description']}")


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(help="job id")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines until the job ends, then exit with its outcome")] = False,
    url: UrlOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line (lineNo, stream, line, attempt, timestamp)")] = False,
) -> None:
    """Print a job's log lines.

    The lines are its command's stdout and stderr, and the trainer's notes. stdout lines go
    to stdout; stderr and trainer lines go to stderr, as `docker logs` does. With -f, new
    lines follow live until the job ends; the exit code is then the job's outcome
    (0 succeeded, 1 failed, 3 cancelled).
    """
    from . import results

    if not follow:
        results.log_lines(_client(url).job_logs(job_id), as_json)
        return
    import asyncio

    from ..follow import outcome_code
    from ..logs import follow_logs

    view = asyncio.run(follow_logs(url, job_id, lambda entry: results.log_lines([entry], as_json)))
    raise typer.Exit(int(outcome_code([view.status])))


@jobs_app.command("metrics")
def jobs_metrics(job_id: Annotated[str, typer.Argument(help="job id")], url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """Show a job's training curve.

    One row per metrics report (e.g. loss and valAccuracy per epoch), one column per metric.
    """
    from . import render, results

    points = _client(url).job_metrics(job_id)
    render.print_json(points) if as_json else results.metrics_table(points)


@jobs_app.command("predict")
def jobs_predict(
    job_id: Annotated[str, typer.Argument(help="id of a succeeded nlu-train or fine-tune job")],
    text: Annotated[str, typer.Argument(help="the utterance to classify")],
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Classify a text with a job's model.

    Prints the intent, its confidence, the entities found and the runners-up.
    """
    from . import results

    results.prediction(_client(url).predict(job_id, text), as_json)


@jobs_app.command("artifact")
def jobs_artifact(
    job_id: Annotated[str, typer.Argument(help="id of a succeeded nlu-train or fine-tune job")],
    output: Annotated[Path, typer.Option("--output", "-o", help="file to write (replaced only once the download is complete)")],
    url: UrlOpt = None,
) -> None:
    """Download a job's trained model.

    The file is a joblib dump of mangwale_cli.nlu.model.IntentModel (joblib.load reads it).
    """
    size = _client(url).download_artifact(job_id, output)
    typer.echo(f"saved the model of {job_id} to {output} ({size} bytes)", err=True)


register_watch(app)
register_tokens(app)


# --- entry point -------------------------------------------------------------------------------


def run() -> None:
    """Console-script entry: run the app, turning mangwale errors into one line + exit code."""
    try:
        app()
    except MangwaleError as exc:
        from . import render  # not at the top: a Tab press must not pay for rich

        render.error_line(exc.message)
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(int(ExitCode.FAILED))
