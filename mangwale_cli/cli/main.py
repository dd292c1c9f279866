"""The ``mangwale`` command line: a thin shell over ``Client`` (and ``serve`` over the server).

Each command parses options, makes one client call and hands the result to ``render``. Errors
become one line on stderr and an exit code in ``run`` (see ``errors.ExitCode``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

# httpx's package __init__ imports its own command line (click, rich, pygments: ~20 ms of every
# mangwale command) when those are installed; without it, ``httpx.main`` is a stub. mangwale never
# runs the httpx CLI, so its module is marked absent before httpx is first imported.
if "httpx" not in sys.modules:
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]  # None there makes the import fail, as documented

import typer

from .. import __version__
from ..errors import EXIT_CODES, ExitCode, InvalidInput, MangwaleError
from .command import Command
from .tokens import register as register_tokens
from .watch import register as register_watch
from .workers import register as register_workers

if TYPE_CHECKING:
    from ..client import Client
    from ..connection import ClientSettings

# "\b" keeps click from re-wrapping the lines: one code a line, as in the README's table.
EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(f"  {int(c):<4} {text}" for c, text in EXIT_CODES.items())

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

URL_HELP = "server URL, http://HOST:PORT; before or after the command [env: MANGWALE_URL; default: http://localhost:8080]"
TOKEN_HELP = "API token for a server with auth; before or after the command [env: MANGWALE_TOKEN]"
UrlOpt = Annotated[str | None, typer.Option("--url", metavar="URL", help=URL_HELP, show_default=False)]
TokenOpt = Annotated[str | None, typer.Option("--token", metavar="TOKEN", help=TOKEN_HELP, show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
JobArg = Annotated[str, typer.Argument(metavar="JOB_ID", help="job id", show_default=False)]
DatasetArg = Annotated[str, typer.Argument(metavar="DATASET", help="dataset id or name", show_default=False)]


class _Global:
    """``--url`` / ``--token`` given before the command (``mangwale --url X jobs list``)."""

    url: str | None = None
    token: str | None = None


def _settings(url: str | None, token: str | None) -> ClientSettings:
    """The command's flag, then the one before the command, then MANGWALE_URL / MANGWALE_TOKEN,
    then the default; a bad URL or token is a usage error naming where it came from."""
    from ..connection import ClientSettings

    settings = ClientSettings.load(url or _Global.url, token or _Global.token)
    if token or _Global.token:
        # The in-process followers (--watch, logs -f) build their own clients from the env.
        os.environ["MANGWALE_TOKEN"] = settings.token or ""
    return settings


def _client(url: str | None, token: str | None) -> Client:
    from ..client import Client

    settings = _settings(url, token)
    return Client(settings.url, token=settings.token)


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
    _Global.url, _Global.token = url, token
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


# --- serve -------------------------------------------------------------------------------------


@app.command(cls=Command)
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


# --- datasets ----------------------------------------------------------------------------------


@datasets_app.command("list", cls=Command)
def datasets_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List datasets."""
    from . import render

    rows = _client(url, token).list_datasets()
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
    ds = _client(url, token).create_dataset(name, examples, description)
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

    client = _client(url, token)
    ds = client.get_dataset(client.find_dataset(dataset)["id"])
    render.print_json(ds) if as_json else render.dataset_detail(ds)


@datasets_app.command("delete", cls=Command)
def datasets_delete(dataset: DatasetArg, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Delete a dataset (refused while a queued or running job uses it)."""
    client = _client(url, token)
    ds = client.find_dataset(dataset)
    client.delete_dataset(ds["id"])
    typer.echo(f"deleted dataset {ds['id']} ({ds['name']})", err=True)


# --- jobs --------------------------------------------------------------------------------------

NOT_FINITE = "is not a finite number (NaN, Infinity and numbers past 1.8e308 have no JSON form)"


def _parse_params(pairs: list[str], raw: str | None) -> dict[str, Any]:
    from ..client import non_finite

    params: dict[str, Any] = {}
    if raw is not None:
        try:
            loaded = json.loads(raw)
        except ValueError as exc:
            raise InvalidInput(f"--params is not valid JSON: {exc}", field="params") from None
        if not isinstance(loaded, dict):
            raise InvalidInput("--params must be a JSON object, such as '{\"epochs\": 8}'", field="params")
        if bad := non_finite(loaded):
            raise InvalidInput(f"--params: {bad} {NOT_FINITE}", field=f"params.{bad}")
        params.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"-p {pair!r} is not KEY=VALUE", field="param")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
        if non_finite(params[key]):
            raise InvalidInput(f"-p {pair}: {value} {NOT_FINITE}", field=f"params.{key}")
    return params


@jobs_app.command("create", cls=Command)
def jobs_create(
    kind: Annotated[str, typer.Argument(metavar="KIND", help="job kind: nlu-train, fine-tune, simulate, ... (see `jobs kinds`)", show_default=False)],
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", metavar="DATASET", help="dataset id or name")] = None,
    param: Annotated[
        list[str], typer.Option("--param", "-p", metavar="KEY=VALUE", help="a param (VALUE as JSON if it parses); repeatable")
    ] = [],  # noqa: B006 - typer reads it, nothing mutates it
    params: Annotated[str | None, typer.Option("--params", metavar="JSON", help="params as a JSON object")] = None,
    agent: Annotated[str | None, typer.Option("--agent", metavar="AGENT_ID", help="agent id")] = None,
    label: Annotated[
        list[str], typer.Option("--label", "-l", metavar="LABEL", help="run only where the taker has this label; repeatable")
    ] = [],  # noqa: B006 - typer reads it, nothing mutates it
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key", envvar="MANGWALE_IDEMPOTENCY_KEY", metavar="KEY", help="retries with the same key return the first job"
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the job id")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="then follow it as `mangwale watch` does and exit with its outcome")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue a training job."""
    parsed = _parse_params(param, params)
    client = _client(url, token)
    try:
        job = client.create_job(
            kind,
            client.find_dataset(dataset)["id"] if dataset is not None else None,
            params=parsed,
            agent_id=agent,
            idempotency_key=idempotency_key,
            labels=label,
        )
    except InvalidInput as exc:
        if exc.field == "datasetId" and dataset is None:  # the server names its field; say the flag
            raise InvalidInput(f"{exc.message} (give one with -d DATASET)", field="dataset") from None
        raise
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


@jobs_app.command("list", cls=Command)
def jobs_list(
    status: Annotated[
        list[str], typer.Option("--status", "-s", metavar="STATUS", help="only this status (queued, running, succeeded, failed, cancelled); repeatable")
    ] = [],  # noqa: B006 - typer reads it, nothing mutates it
    limit: Annotated[
        int | None, typer.Option(metavar="N", help="at most N jobs, one page [default: 50]", min=1, max=1000, show_default=False)
    ] = None,
    cursor: Annotated[
        str | None, typer.Option(metavar="CURSOR", help="start after this position: the cursor the previous page named")
    ] = None,
    every: Annotated[bool, typer.Option("--all", help="every job, page after page, not one page")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first, one page (--limit) at a time.

    When more jobs remain, a note on stderr names the next page's cursor
    ("mangwale: note: more jobs ...; next page: --cursor CURSOR"); stdout stays the table or,
    with --json, the bare JSON array. --all fetches every page instead.
    """
    from . import render

    if every and limit is not None:
        raise InvalidInput("--all and --limit exclude each other: --all lists every job", field="limit")
    client = _client(url, token)
    nxt = None
    if every:
        rows = client.all_jobs(statuses=status or None, cursor=cursor)
    else:
        rows, nxt = client.list_jobs(statuses=status or None, limit=limit or 50, cursor=cursor)
    render.print_json(rows) if as_json else render.jobs_table(rows)
    if nxt:
        typer.echo(f"mangwale: note: more jobs (--all lists every page); next page: --cursor {nxt}", err=True)


@jobs_app.command("show", cls=Command)
def jobs_show(job_id: JobArg, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Show one job."""
    from . import render

    job = _client(url, token).get_job(job_id)
    render.print_json(job) if as_json else render.job_detail(job)


@jobs_app.command("cancel", cls=Command)
def jobs_cancel(job_id: JobArg, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Cancel a queued or running job."""
    from . import render

    job = _client(url, token).cancel_job(job_id)
    render.print_json(job) if as_json else typer.echo(f"job {job['id']} {job['status']}")


@jobs_app.command("delete", cls=Command)
def jobs_delete(job_id: JobArg, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Delete a finished job and what it stored."""
    _client(url, token).delete_job(job_id)
    typer.echo(f"deleted job {job_id}", err=True)


@jobs_app.command("prune", cls=Command)
def jobs_prune(
    older_than: Annotated[str | None, typer.Option("--older-than", metavar="AGE", help="finished longer ago than AGE: 30d, 12h, 90m, 45s")] = None,
    keep: Annotated[int | None, typer.Option("--keep", min=0, metavar="N", help="keep the newest N finished jobs")] = None,
    status: Annotated[list[str] | None, typer.Option("--status", metavar="STATUS", help="only succeeded, failed or cancelled jobs (repeatable)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be deleted; delete nothing")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
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
    result = _client(url, token).prune_jobs(older_than=older_than, keep=keep, statuses=status, dry_run=dry_run)
    if as_json:
        render.print_json(result)
        return
    for job_id in result["deleted"]:
        typer.echo(job_id)
    verb = "would delete" if result["dryRun"] else "deleted"
    kept = f"; kept {len(result['kept'])} base model(s) of active fine-tunes" if result["kept"] else ""
    typer.echo(f"{verb} {result['count']} finished job(s){kept}", err=True)


@jobs_app.command("kinds", cls=Command)
def jobs_kinds(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List the job kinds the server can run."""
    from . import render

    rows = _client(url, token).list_kinds()
    if as_json:
        render.print_json(rows)
    else:
        for k in rows:
            typer.echo(f"{k['kind']:<16} {k['description']}")


@jobs_app.command("logs", cls=Command)
def jobs_logs(
    job_id: JobArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines until the job ends, then exit with its outcome")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line (lineNo, stream, line, attempt, timestamp)")] = False,
) -> None:
    """Print a job's log lines.

    The lines are its command's stdout and stderr, and the trainer's notes. stdout lines go
    to stdout; stderr and trainer lines go to stderr, as `docker logs` does. With -f, new
    lines follow live until the job ends; the exit code is then the job's outcome
    (0 succeeded, 1 failed, 3 cancelled), and a job that did not succeed says so in one
    last line on stderr.
    """
    from . import results

    if not follow:
        results.log_lines(_client(url, token).job_logs(job_id), as_json)
        return
    import asyncio

    from ..follow import outcome_code
    from ..logs import follow_logs

    settings = _settings(url, token)
    view = asyncio.run(
        follow_logs(settings.url, job_id, lambda entry: results.log_lines([entry], as_json), token=settings.token)
    )
    code = outcome_code([view.status])
    if code is not ExitCode.OK:
        from . import render

        why = view.error or view.message
        said = why and why.strip().lower() != str(view.status).lower()
        render.error_line(f"job {job_id} {view.status}" + (f": {why}" if said else ""))
    raise typer.Exit(int(code))


@jobs_app.command("metrics", cls=Command)
def jobs_metrics(job_id: JobArg, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Show a job's training curve.

    One row per metrics report (e.g. loss and valAccuracy per epoch), one column per metric.
    """
    from . import render, results

    points = _client(url, token).job_metrics(job_id)
    render.print_json(points) if as_json else results.metrics_table(points)


@jobs_app.command("predict", cls=Command)
def jobs_predict(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="id of a succeeded nlu-train or fine-tune job", show_default=False)],
    text: Annotated[str, typer.Argument(metavar="TEXT", help="the utterance to classify", show_default=False)],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Classify a text with a job's model.

    Prints the intent, its confidence, the entities found and the runners-up.
    """
    from . import results

    results.prediction(_client(url, token).predict(job_id, text), as_json)


@jobs_app.command("artifact", cls=Command)
def jobs_artifact(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="id of a succeeded nlu-train or fine-tune job", show_default=False)],
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="FILE", help="file to write (put in place only once the download is complete)")
    ],
    force: Annotated[bool, typer.Option("--force", help="replace FILE if it exists")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Download a job's trained model.

    The file is a skops zip (model.skops): scikit-learn parts plus JSON metadata, never a
    pickle. Load it with mangwale_cli.nlu.model.IntentModel.load on a directory holding it
    as model.skops; skops.io.load reads the parts. An existing FILE is kept (exit 2) unless
    --force.
    """
    size = _client(url, token).download_artifact(job_id, output, overwrite=force)
    typer.echo(f"saved the model of {job_id} to {output} ({size} bytes)", err=True)


register_watch(app)
register_tokens(app)
register_workers(app)


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
