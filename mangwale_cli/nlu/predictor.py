"""Predictions in a child process, so that scikit-learn and the models never load into the server.

A model needs scikit-learn, numpy and scipy: about 100 MB that the server would otherwise
keep for good after its first ``/predict``. Instead, ``Predictor`` starts one child (from the
trainers' forkserver, ``trainers.process``) on the first prediction, keeps it while predictions
come, and lets it go after ``idle`` seconds without one; its memory goes with it. Repeated
predictions meet a warm child that holds the last few models; the first one after a quiet
spell pays for starting it (about 2 s of CPU, most of it importing scikit-learn and skops).

One pipe carries requests and answers, one exchange at a time. It is also the child's
lifeline: when the server exits, even by kill -9, the child reads end-of-file and exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import OrderedDict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..errors import ModelRefused
from ..trainers.process import describe_failure, mp_context

log = logging.getLogger(__name__)

IDLE_SECONDS = 30.0  # a child without a prediction for this long exits
MODEL_CACHE = 4  # models a child keeps loaded


class PredictorFailed(RuntimeError):
    """The child could not answer: it failed to load the model, or it died."""


def _serve(conn: Connection, cache_size: int) -> None:
    """The child: answer ``("predict", key, model_dir, text)``, ``("audit", path)`` and
    ``("forget", key)`` until the server closes the pipe (or dies). A model refused by
    ``modelfile`` answers ``("refused", message)``: nothing of it was run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the server's terminal is the server's
    from . import modelfile
    from .model import IntentModel

    models: OrderedDict[str, IntentModel] = OrderedDict()
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request[0] == "forget":
            models.pop(request[1], None)
            continue
        try:
            if request[0] == "audit":
                answer: tuple[str, Any] = ("ok", modelfile.audit(Path(request[1])))
            else:
                _, key, directory, text = request
                model = models.get(key)
                if model is None:
                    model = IntentModel.load(Path(directory))
                    models[key] = model
                    while len(models) > cache_size:
                        models.popitem(last=False)
                else:
                    models.move_to_end(key)
                answer = ("ok", model.predict(text))
        except ModelRefused as exc:
            answer = ("refused", str(exc))
        except Exception as exc:  # noqa: BLE001 - the server reports it; the child serves on
            answer = ("error", describe_failure(exc))
        try:
            conn.send(answer)
        except (BrokenPipeError, OSError):
            return

class Predictor:
    """The server's side: ``await predict(key, model_dir, text)``; ``close()`` at shutdown."""

    def __init__(self, idle: float = IDLE_SECONDS, cache_size: int = MODEL_CACHE) -> None:
        self.idle = idle
        self.cache_size = cache_size
        self._proc: Any = None
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._last_used = 0.0
        self._idle_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        """The child's pid while one runs."""
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    async def predict(self, key: str, model_dir: Path, text: str) -> dict[str, Any]:
        """The model in ``model_dir`` (cached in the child as ``key``) on ``text``."""
        # Shielded: a client that goes away mid-exchange must not leave its answer in the pipe
        # for the next request to read.
        return await asyncio.shield(self._exchange(("predict", key, str(model_dir), text)))

    async def audit(self, path: Path) -> dict[str, Any]:
        """Check that ``path`` is a model this server would load (``modelfile.audit``: header,
        versions, skops's type audit; no object is built). ``ModelRefused`` when it is not."""
        return await asyncio.shield(self._exchange(("audit", str(path))))

    async def forget(self, key: str) -> None:
        """Drop a model from the child's cache (its job was deleted)."""
        async with self._lock:
            if self._conn is not None:
                try:
                    self._conn.send(("forget", key))
                except OSError:
                    await self._stop()

    async def close(self) -> None:
        async with self._lock:
            await self._stop()

    async def _exchange(self, request: tuple[Any, ...]) -> dict[str, Any]:
        async with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            conn = await self._ensure()
            try:
                conn.send(request)
                status, body = await asyncio.to_thread(conn.recv)
            except (EOFError, OSError):
                proc = self._proc
                await self._stop()
                code = proc.exitcode if proc is not None else None
                raise PredictorFailed(f"the prediction process exited (code {code})") from None
            finally:
                self._last_used = time.monotonic()
                if self._conn is not None:
                    self._timer = asyncio.get_running_loop().call_later(self.idle, self._idle)
        if status == "refused":
            raise ModelRefused(body)
        if status != "ok":
            raise PredictorFailed(body)
        result: dict[str, Any] = body
        return result

    async def _ensure(self) -> Connection:
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            return self._conn
        await self._stop()
        ctx = mp_context()
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_serve, args=(child, self.cache_size), daemon=True, name="mangwale-predict")
        await asyncio.to_thread(proc.start)
        child.close()
        self._proc, self._conn = proc, parent
        log.info("prediction process %d started", proc.pid)
        return parent

    def _idle(self) -> None:
        self._timer = None
        if self._idle_task is None or self._idle_task.done():
            self._idle_task = asyncio.get_running_loop().create_task(self._stop_if_idle())

    async def _stop_if_idle(self) -> None:
        async with self._lock:
            # A request that came meanwhile has used the child and set a new timer.
            if self._timer is None and time.monotonic() - self._last_used >= self.idle:
                await self._stop()

    async def _stop(self) -> None:
        """Close the pipe (the child exits at end-of-file) and reap the child."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        if conn is not None:
            conn.close()
        if proc is None:
            return
        await asyncio.to_thread(proc.join, 2.0)
        if proc.is_alive():
            proc.kill()
            await asyncio.to_thread(proc.join, 1.0)
        log.info("prediction process %d stopped", proc.pid)
