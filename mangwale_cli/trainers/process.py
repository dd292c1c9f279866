"""Run a trainer's CPU-heavy work in a child process and relay its progress.

The child gets two pipes: ``progress`` (child to server: progress reports, then the result or
the error) and ``lifeline`` (server to child, never written). A thread in the child blocks on
the lifeline; when the server dies, even by kill -9, the read ends with EOF and the child exits
at once. So no training process outlives the server by more than a moment.

Children come from a ``forkserver``: each start is a fork of a small, clean process, without the
server's event loop, sockets or threads.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from .base import Reporter

Emit = Any  # callable as emit(progress, message, metrics=..., eta=...); emit.log(line, stream)
Work = Callable[[dict[str, Any], Emit], dict[str, Any] | None]

_ctx: Any = None


def mp_context() -> Any:
    """The forkserver context every child of the server comes from (trainers, predictions)."""
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
    return _ctx


class TrainerCrashed(RuntimeError):
    """The child process died without reporting a result."""


_lifeline_hooks: list[Callable[[], None]] = []


def on_lifeline_lost(hook: Callable[[], None]) -> None:
    """In a child: run ``hook`` before the child exits because the server died (or let go of
    it). A child that started processes of its own uses this to end them; ``os._exit`` skips
    every other cleanup. Hooks run in the lifeline thread."""
    _lifeline_hooks.append(hook)


def _watch_lifeline(lifeline: Connection) -> None:
    try:
        lifeline.recv()
    except (EOFError, OSError):
        pass
    for hook in _lifeline_hooks:
        try:
            hook()
        except Exception:  # noqa: BLE001 - exiting regardless; the next hook still runs
            traceback.print_exc()
    os._exit(70)


def describe_failure(exc: BaseException) -> str:
    """A failed job's error line. An exception written for users (``plain_message = True``, like
    ``nlu.features.TrainingDataError``) is its message; anything else names its class too."""
    if getattr(exc, "plain_message", False):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _child(work: Work, payload: dict[str, Any], progress: Connection, lifeline: Connection) -> None:
    threading.Thread(target=_watch_lifeline, args=(lifeline,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the server's terminal is the server's

    class Emitter:
        def __call__(self, progress_: float, message: str | None = None, **extra: Any) -> None:
            progress.send(("progress", progress_, message, extra))

        def log(self, line: str, stream: str = "trainer") -> None:
            progress.send(("log", stream, line))

    emit = Emitter()
    try:
        result = work(payload, emit)
    except BaseException as exc:  # noqa: BLE001 - report every failure, including SystemExit
        progress.send(("error", describe_failure(exc), traceback.format_exc()))
    else:
        progress.send(("result", result))
    finally:
        progress.close()


async def run_in_process(
    work: Work,
    payload: dict[str, Any],
    reporter: Reporter,
    *,
    kill_grace: float = 3.0,
) -> dict[str, Any] | None:
    """Run ``work(payload, emit)`` in a child; ``emit(progress, message, metrics=..., eta=...)``
    becomes ``reporter.progress``. Cancelling this coroutine terminates the child (SIGTERM,
    then SIGKILL after ``kill_grace`` seconds)."""
    ctx = mp_context()
    prog_r, prog_w = ctx.Pipe(duplex=False)
    life_r, life_w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(work, payload, prog_w, life_r), daemon=True)
    await asyncio.to_thread(proc.start)
    prog_w.close()
    life_r.close()

    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def readable() -> None:
        try:
            while prog_r.poll():
                inbox.put_nowait(prog_r.recv())
        except (EOFError, OSError):
            loop.remove_reader(prog_r.fileno())
            inbox.put_nowait(("eof",))

    loop.add_reader(prog_r.fileno(), readable)
    try:
        while True:
            msg = await inbox.get()
            if msg[0] == "progress":
                _, pct, message, extra = msg
                await reporter.progress(pct, message, metrics=extra.get("metrics"), eta=extra.get("eta"))
            elif msg[0] == "log":
                await reporter.log(msg[1], msg[2])
            elif msg[0] == "result":
                return msg[1]
            elif msg[0] == "error":
                raise RuntimeError(msg[1])
            else:
                await asyncio.to_thread(proc.join, 1.0)
                raise TrainerCrashed(f"training process exited with code {proc.exitcode}")
    finally:
        try:
            loop.remove_reader(prog_r.fileno())
        except (ValueError, OSError):
            pass
        await _stop(proc, kill_grace)
        prog_r.close()
        life_w.close()


async def _stop(proc: Any, grace: float) -> None:
    if proc.exitcode is not None:
        proc.join(0)
        return
    if proc.is_alive():
        proc.terminate()
        await asyncio.shield(asyncio.to_thread(proc.join, grace))
        if proc.is_alive():
            proc.kill()
            await asyncio.shield(asyncio.to_thread(proc.join, 1.0))
