"""Remote workers over HTTP: the WebSocket at ``/ws/workers`` and the REST routes under ``/workers``.

Translation only: messages and requests become calls on ``workers.WorkerHub`` (docs/protocol.md,
"Workers"). The connection's messages are handled one at a time, in order, so a worker's reports
are written in the order it sent them.

Close codes: 4400 a first message that is not a valid ``register``; 4401 an id/secret this
server did not issue. A message that is not valid JSON or not a known type gets an ``error``
message; the connection stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.responses import Response

from .. import wire
from ..errors import InvalidInput, MangwaleError, NotFound, StaleWrite
from ..service import Service
from ..wire import JobStatus
from ..workers import Worker, WorkerHub
from .responses import JSONOut

log = logging.getLogger("mangwale.workers")
router = APIRouter()

REGISTER_TIMEOUT = 10.0  # seconds a new connection has to send its register message
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401


def _hub(service: Service) -> WorkerHub:
    return service.hub


class _Session:
    """What the hub sends on: one connection, one writer at a time."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.lock = asyncio.Lock()

    async def send(self, msg: dict[str, Any]) -> None:
        async with self.lock:
            await self.ws.send_text(wire.dumps(msg))


async def ws_workers_asgi(scope: Any, receive: Any, send: Any) -> None:
    await ws_workers(WebSocket(scope, receive, send))


async def ws_workers(ws: WebSocket) -> None:
    service: Service = ws.app.state.service
    hub = _hub(service)
    offered = ws.scope.get("subprotocols") or []
    await ws.accept(subprotocol=wire.WORKER_SUBPROTOCOL if wire.WORKER_SUBPROTOCOL in offered else None)
    session = _Session(ws)
    try:
        first = await asyncio.wait_for(ws.receive_text(), REGISTER_TIMEOUT)
        msg = wire.WorkerRegister.model_validate(wire.loads(first))
    except (TimeoutError, ValueError, ValidationError, KeyError) as exc:
        with contextlib.suppress(Exception):
            await session.send(wire.error_message("bad_request", f"the first message must be a valid register: {exc}"[:500]))
            await ws.close(CLOSE_BAD_REQUEST)
        return
    except WebSocketDisconnect:
        return
    try:
        worker, reply = await hub.register(session, msg)
    except MangwaleError as exc:
        with contextlib.suppress(Exception):
            await session.send(wire.error_message(exc.code, str(exc)))
            await ws.close(CLOSE_UNAUTHORIZED if exc.status == 401 else 1011)
        return
    try:
        await session.send(reply)
        while True:
            text = await ws.receive_text()
            answer = await _handle(hub, worker, text)
            if answer is not None:
                await session.send(answer)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        hub.disconnect(worker, session)


async def _handle(hub: WorkerHub, worker: Worker, text: str) -> dict[str, Any] | None:
    try:
        msg = wire.loads(text)
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == wire.WorkerMsg.REPORT:
            return await hub.report(worker, wire.WorkerReport.model_validate(msg))
        if kind == wire.WorkerMsg.HEARTBEAT:
            return await hub.heartbeat_from(worker, wire.WorkerHeartbeat.model_validate(msg))
        if kind == wire.WorkerMsg.RELEASE:
            await hub.release(worker, wire.WorkerRelease.model_validate(msg))
            return None
        return wire.error_message("bad_request", f"unknown message type {wire.show(kind)}")
    except (ValueError, ValidationError) as exc:
        return wire.error_message("bad_request", str(exc)[:500])
    except MangwaleError as exc:  # the store is away: the worker keeps the report and sends it again
        return wire.error_message(exc.code, str(exc))


# --- REST --------------------------------------------------------------------------------------


WorkerSecret = Annotated[str, Header(alias="X-Mangwale-Worker-Secret", max_length=200, description="the secret `registered` gave")]


@router.get("/workers", response_model=list[wire.WorkerOut], tags=["workers"])
async def list_workers(request: Request) -> Response:
    """The workers registered with the server (every instance, on Redis): labels, kinds, versions,
    running jobs, last heartbeat (server clock) and state (up, busy, lost; lost ones go after
    workers.forget_after). Changes reach /ws/training as worker_update messages."""
    return JSONOut(await _hub(request.app.state.service).describe_all())


async def _held_job(request: Request, worker_id: str, job_id: str, secret: str) -> tuple[Service, wire.Job]:
    """A job the worker holds now (409 otherwise): what its scope lets it read."""
    service: Service = request.app.state.service
    worker = await _hub(service).worker(worker_id, secret)
    job = await service.get_job(job_id)
    lease = job.lease or {}
    if job.status is not JobStatus.RUNNING or lease.get("holder") != worker.holder:
        raise StaleWrite(f"job {job_id} is not held by worker {worker_id}", stored_status=job.status.value,
                         stored_attempt=job.attempt)  # fmt: skip
    return service, job


@router.get("/workers/{worker_id}/jobs/{job_id}/dataset", response_model=wire.DatasetOut, tags=["workers"])
async def job_dataset(request: Request, worker_id: str, job_id: str, secret: WorkerSecret) -> Response:
    """The dataset of a job this worker holds (409 when it does not hold it)."""
    service, job = await _held_job(request, worker_id, job_id, secret)
    if job.dataset_id is None:
        raise NotFound(f"job {job_id} has no dataset", field="datasetId")
    return JSONOut((await service.get_dataset(job.dataset_id)).to_dict())


@router.get("/workers/{worker_id}/jobs/{job_id}/base-model", tags=["workers"])
async def job_base_model(request: Request, worker_id: str, job_id: str, secret: WorkerSecret) -> Response:
    """The base model of a fine-tune job this worker holds (409 when it does not hold it)."""
    from starlette.responses import FileResponse

    service, job = await _held_job(request, worker_id, job_id, secret)
    base = job.params.get("baseJobId")
    if not isinstance(base, str):
        raise InvalidInput(f"job {job_id} has no params.baseJobId", field="params.baseJobId")
    path = await service.model_path(base)
    return FileResponse(path, media_type="application/octet-stream")
