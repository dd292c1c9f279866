"""``mangwale watch``: follow jobs live in a terminal, a CI log or a pipe, and exit with their outcome.

The command parses options and hands them to ``follow.Follower``; one of three renderers
(``watchview``: tty, plain, json) shows what it reports, and on GitHub Actions ``stepsummary``
writes the step summary at the end.

Only typer and the standard library are imported at module level: websockets, rich, httpx and
pydantic load inside the command, so ``mangwale --help`` and shell completion stay fast.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import Conflict, InvalidInput, MangwaleError
from .options import ConnectTimeoutOpt, TokenOpt, UrlOpt, check_connect_timeout, settings_for

if TYPE_CHECKING:
    from ..follow import Follower
    from .watchview import Renderer

INTERRUPTED = 130  # Ctrl-C detached; the job keeps running

WATCH_EPILOG = """\b
Exit codes:
  0    every followed job succeeded
  1    a job failed (with several jobs the worst wins: failed, cancelled, succeeded)
  2    usage error
  3    a job was cancelled
  4    job not found, or deleted before it was seen to end (or --since beyond the
       server's newest event)
  5    not authorised (HTTP 401/403, origin refused)
  6    --timeout reached
  7    gave up reconnecting to a server that had answered (--max-retries, --give-up-after)
  8    the server never answered: --connect-timeout passed (or --max-retries,
       --give-up-after ran out first)
  130  Ctrl-C: detached, the job keeps running (unless --cancel-on-interrupt)

\b
Environment:
  MANGWALE_URL                  server URL, as --url
  MANGWALE_TOKEN                bearer token for REST and the WebSocket
  MANGWALE_BACKOFF_INITIAL      first reconnect delay in seconds [1]
  MANGWALE_BACKOFF_MAX          longest reconnect delay in seconds [30]
  MANGWALE_WATCH_PING_INTERVAL  seconds between keepalive pings [20]
  MANGWALE_WATCH_PING_TIMEOUT   seconds without a pong before reconnecting [20]
  MANGWALE_CONNECT_TIMEOUT      as --connect-timeout [30]
  GITHUB_ACTIONS=true           plain output folds jobs into ::group:: and reports ::error::;
                                with GITHUB_STEP_SUMMARY set, a Markdown summary of each job
                                (outcome, duration, final metrics, epoch curve) is appended"""


class Output(str, Enum):
    tty = "tty"
    plain = "plain"
    json = "json"


def watch(
    job_ids: Annotated[list[str] | None, typer.Argument(metavar="JOB_ID", help="ids of the jobs to follow", show_default=False)] = None,
    all_jobs: Annotated[bool, typer.Option("--all", help="follow every job, live from now, until interrupted")] = False,
    latest: Annotated[bool, typer.Option("--latest", help="follow the newest job")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="same as --output json")] = False,
    output: Annotated[
        Output | None, typer.Option("--output", "-o", help="tty, plain or json [default: tty on a terminal, else plain]")
    ] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0, metavar="S", help="stop waiting after S seconds (exit 6)")] = None,
    max_retries: Annotated[
        int | None, typer.Option("--max-retries", min=0, metavar="N", help="give up after N failed reconnects in a row (exit 7) [default: never]")
    ] = None,
    give_up_after: Annotated[
        float | None, typer.Option("--give-up-after", min=0, metavar="S", help="give up after S seconds without a connection (exit 7) [default: never]")
    ] = None,
    connect_timeout: ConnectTimeoutOpt = None,
    cancel_on_interrupt: Annotated[
        bool, typer.Option("--cancel-on-interrupt", help="Ctrl-C cancels the followed jobs instead of detaching")
    ] = False,
    since: Annotated[
        int | None, typer.Option("--since", min=0, metavar="SEQ", help="replay the events after this seq [default: a job's whole history; with --all, now]")
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Follow jobs live until they end, and exit with their outcome.

    With job ids, the output starts at each job's first event, so it holds the whole history,
    and the command exits when all of them have ended. --latest follows the newest job. --all
    follows every job from now on, until Ctrl-C or --timeout. After any disconnect it
    reconnects with backoff and resumes after the last event it showed: nothing is lost or
    shown twice.
    """
    if as_json and output not in (None, Output.json):
        raise InvalidInput("--json and --output are both given and disagree", field="output")
    ids = list(job_ids or [])
    if sum((bool(ids), all_jobs, latest)) != 1:
        raise InvalidInput("name the jobs to follow: JOB_ID ..., --latest or --all (one of them)", field="jobs")
    if cancel_on_interrupt and all_jobs:
        raise InvalidInput("--cancel-on-interrupt needs job ids or --latest, not --all", field="cancel-on-interrupt")
    check_connect_timeout(connect_timeout)
    # As every other command: the flag after the command, the one before it, then the
    # environment, so that a bad URL's error names the one setting it came from.
    settings = settings_for(url, token)
    code = run_watch(
        url=settings.url,
        token=settings.token,
        job_ids=ids,
        all_jobs=all_jobs,
        latest=latest,
        output=Output.json if as_json else output,
        timeout=timeout,
        max_retries=max_retries,
        give_up_after=give_up_after,
        connect_timeout=connect_timeout,
        cancel_on_interrupt=cancel_on_interrupt,
        since=since,
    )
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``watch`` to the ``mangwale`` app."""
    app.command("watch", epilog=WATCH_EPILOG)(watch)


# --- running --------------------------------------------------------------------------------


def default_output() -> Output:
    if sys.stdout.isatty() and os.environ.get("TERM") != "dumb":
        return Output.tty
    return Output.plain


def run_watch(
    *,
    url: str | None,
    token: str | None = None,
    job_ids: list[str],
    all_jobs: bool = False,
    latest: bool = False,
    output: Output | None = None,
    timeout: float | None = None,
    max_retries: int | None = None,
    give_up_after: float | None = None,
    connect_timeout: float | None = None,
    cancel_on_interrupt: bool = False,
    since: int | None = None,
) -> int:
    """Follow, render, and return the exit code (errors raise ``MangwaleError`` as usual)."""
    from ..follow import Follower, FollowSettings
    from .watchview import JsonRenderer, PlainRenderer, TtyRenderer

    follower = Follower(
        url,
        token=token,
        jobs=job_ids,
        all_jobs=all_jobs,
        latest=latest,
        since=since,
        timeout=timeout,
        max_retries=max_retries,
        give_up_after=give_up_after,
        connect_timeout=connect_timeout,
        settings=FollowSettings.from_env(),
    )
    mode = output or default_output()
    view: Renderer
    if mode is Output.tty:
        view = TtyRenderer(follower, forced=output is Output.tty)
    elif mode is Output.json:
        view = JsonRenderer()
    else:
        view = PlainRenderer(github=os.environ.get("GITHUB_ACTIONS") == "true")
    reason = "finished"
    try:
        try:
            import asyncio  # here, not at the top: only a watch pays for it

            outcome = asyncio.run(_follow(follower, view))
        except KeyboardInterrupt:
            reason = "cancelled" if cancel_on_interrupt else "detached"
            view.close(reason)
            code = _interrupted(follower, view, cancel_on_interrupt, token)
        except MangwaleError as exc:
            reason = exc.code
            view.close(reason)
            view.finish(follower, int(exc.exit_code), reason)
            raise
        except BaseException:
            reason = "stopped"
            view.close(reason)
            raise
        else:
            view.close(reason)
            code = int(outcome.exit_code)
            view.finish(follower, code, reason)
    finally:
        if os.environ.get("GITHUB_ACTIONS") == "true" and os.environ.get("GITHUB_STEP_SUMMARY"):
            from .stepsummary import append_step_summary

            append_step_summary(follower, reason, os.environ["GITHUB_STEP_SUMMARY"])
    return code


async def _follow(follower: Follower, view: Renderer) -> Any:
    import asyncio

    ticker = asyncio.create_task(view.tick())
    try:
        return await follower.run(view.handle)
    finally:
        ticker.cancel()


def _interrupted(follower: Follower, view: Renderer, cancel: bool, token: str | None) -> int:
    from ..client import Client
    from ..follow import outcome_code
    from .watchview import stderr_line

    pending = [follower.jobs[j] for j in follower.followed if not follower.jobs[j].terminal]
    if not cancel:
        view.finish(follower, INTERRUPTED, "detached")
        if pending:
            ids = " ".join(v.id for v in pending)
            stderr_line(f"detached; still running on the server: {ids} (follow again: mangwale watch {ids})")
        return INTERRUPTED
    with Client(follower.url, token=token) as client:
        for v in pending:
            try:
                v.apply_doc(client.cancel_job(v.id))
            except Conflict:  # it ended on its own meanwhile
                v.apply_doc(client.get_job(v.id))
    code = int(outcome_code(follower.jobs[j].status for j in follower.followed))
    view.finish(follower, code, "cancelled")
    return code
