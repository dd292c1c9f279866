"""``mangwale jobs``: create, list, show, cancel and delete training jobs, and read what they
produced (logs, metrics, predictions, the model), each through one ``Client`` call."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ExitCode, InvalidInput
from .command import Command
from .lazy import LazyGroup
from .options import EXIT_CODES_HELP, JobArg, JsonOpt, TokenOpt, UrlOpt, client_for, settings_for

jobs_app = typer.Typer(
    cls=LazyGroup, help="Create, list, show, cancel and delete training jobs.", no_args_is_help=True, epilog=EXIT_CODES_HELP
)

NOT_FINITE = "is not a finite number (NaN, Infinity and numbers past 1.8e308 have no JSON form)"


def _parse_params(pairs: list[str], raw: str | None) -> dict[str, Any]:
    from ..client import non_finite
    from ..jsonin import find_surrogate, not_text, read_json

    params: dict[str, Any] = {}
    if raw is not None:
        try:
            loaded = read_json(raw, "--params", prefix="params.")
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
            params[key] = read_json(value, f"params.{key}", prefix=f"params.{key}.")
        except ValueError:
            params[key] = value
        if non_finite(params[key]):
            raise InvalidInput(f"-p {pair}: {value} {NOT_FINITE}", field=f"params.{key}")
    if lone := find_surrogate(params):  # a plain -p value with bytes that were not UTF-8
        field = f"params.{lone[0]}"
        raise InvalidInput(not_text(field, lone[1]), field=field)
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
    client = client_for(url, token)
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
    client = client_for(url, token)
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

    job = client_for(url, token).get_job(job_id)
    render.print_json(job) if as_json else render.job_detail(job)


@jobs_app.command("cancel", cls=Command)
def jobs_cancel(job_id: JobArg, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Cancel a queued or running job."""
    from . import render

    job = client_for(url, token).cancel_job(job_id)
    render.print_json(job) if as_json else typer.echo(f"job {job['id']} {job['status']}")


@jobs_app.command("delete", cls=Command)
def jobs_delete(job_id: JobArg, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Delete a finished job and what it stored."""
    client_for(url, token).delete_job(job_id)
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
    result = client_for(url, token).prune_jobs(older_than=older_than, keep=keep, statuses=status, dry_run=dry_run)
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

    rows = client_for(url, token).list_kinds()
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
        results.log_lines(client_for(url, token).job_logs(job_id), as_json)
        return
    import asyncio

    from ..follow import outcome_code
    from ..logs import follow_logs

    settings = settings_for(url, token)
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

    points = client_for(url, token).job_metrics(job_id)
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

    results.prediction(client_for(url, token).predict(job_id, text), as_json)


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
    size = client_for(url, token).download_artifact(job_id, output, overwrite=force)
    typer.echo(f"saved the model of {job_id} to {output} ({size} bytes)", err=True)


@jobs_app.command("artifacts", cls=Command)
def jobs_artifacts(
    job_id: JobArg,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the names")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the files a job left: its model, what a worker uploaded. Fetch one with `jobs download`."""
    from . import render

    rows = client_for(url, token).list_artifacts(job_id)
    if as_json:
        render.print_json(rows)
    elif quiet:
        for row in rows:
            typer.echo(row["name"])
    elif not rows:
        typer.echo(f"job {job_id} has no artifacts", err=True)
    else:
        render.artifacts_table(rows)


@jobs_app.command("download", cls=Command)
def jobs_download(
    job_id: JobArg,
    name: Annotated[str, typer.Argument(metavar="NAME", help="the file's name, as `jobs artifacts` lists it", show_default=False)],
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", metavar="FILE", help="file to write, put in place only once complete; - for stdout [default: ./NAME]", show_default=False),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace FILE if it exists")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no note on stderr once saved")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Download one file of a job (see `jobs artifacts`). An existing FILE is kept (exit 2)
    unless --force; an unknown job or file is exit 4."""
    import sys

    client = client_for(url, token)
    if output == "-":
        client.download_file(job_id, name, sys.stdout.buffer)
        return
    dest = Path(output) if output else Path(name)
    size = client.download_file(job_id, name, dest, overwrite=force)
    if not quiet:
        typer.echo(f"saved {name} of {job_id} to {dest} ({size} bytes)", err=True)


def register(root: typer.Typer) -> None:
    """Add ``jobs`` to the ``mangwale`` app."""
    root.add_typer(jobs_app, name="jobs")
