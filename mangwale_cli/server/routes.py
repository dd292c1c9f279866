"""REST routes for datasets and jobs (the seed's paths and shapes)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Header, Query, Request
from fastapi.routing import APIRoute
from starlette.responses import FileResponse, Response, StreamingResponse

from .. import wire
from ..errors import InvalidInput, NotFound
from ..service import Service
from ..store.base import Cursor
from ..wire import DatasetCreate, DatasetPatch, JobCreate, JobStatus
from .etag import tagged
from .responses import JSONOut

router = APIRouter()

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": wire.ErrorOut, "description": "Malformed request"},
    404: {"model": wire.ErrorOut, "description": "Not found"},
    409: {"model": wire.ErrorOut, "description": "Conflict"},
    422: {"model": wire.ErrorOut, "description": "Invalid field"},
}


class DirectRoute(APIRoute):
    """A hot route served without FastAPI's per-request parameter solving and response-model
    validation (about half the cost of ``GET /training/jobs``). The OpenAPI document is still
    built from the endpoint's signature and ``response_model``; the endpoint is called with the
    request alone, so it reads and checks its own parameters and must answer exactly what that
    signature documents (tests/test_fuzz.py holds it to the document)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            return await endpoint(request)

        return handler


hot = APIRouter(route_class=DirectRoute)
_INT = re.compile(r"[+-]?[0-9]+")


def svc(request: Request) -> Service:
    return request.app.state.service


@router.get("/healthz", response_model=wire.HealthOut, tags=["meta"])
async def healthz(request: Request) -> Response:
    """Liveness, version, event-log position and job counts."""
    return JSONOut(await svc(request).health())


@router.get("/training/kinds", tags=["jobs"])
async def list_kinds(request: Request) -> Response:
    """Job kinds this server can run, and those only its live workers provide."""
    service = svc(request)
    out = {t.kind: {"kind": t.kind, "description": t.description, "requiresDataset": t.requires_dataset}
           for t in service.trainers.kinds()}  # fmt: skip
    for kind, spec in (await service.hub.all_kinds()).items():
        out.setdefault(kind, {"kind": kind, "description": spec.description, "requiresDataset": spec.requiresDataset})
    return JSONOut([out[k] for k in sorted(out)])


# --- datasets ----------------------------------------------------------------------------------


@router.get("/training/datasets", response_model=list[wire.DatasetSummaryOut], tags=["datasets"])
async def list_datasets(request: Request) -> Response:
    """All datasets, oldest first, without their examples. ``ETag``; ``If-None-Match`` -> 304."""
    body = wire.dumps([d.summary() for d in await svc(request).list_datasets()]).encode()
    return tagged(body, request.headers.get("if-none-match"))


@router.post(
    "/training/datasets",
    status_code=201,
    response_model=wire.DatasetOut,
    responses=ERRORS,
    tags=["datasets"],
)
async def create_dataset(request: Request, body: DatasetCreate) -> Response:
    """Create a dataset from labelled examples; broadcasts ``dataset_update`` (created)."""
    ds = await svc(request).create_dataset(body)
    return JSONOut(ds.to_dict(), status_code=201)


@router.get("/training/datasets/{dataset_id}", response_model=wire.DatasetOut, responses=ERRORS, tags=["datasets"])
async def get_dataset(request: Request, dataset_id: str) -> Response:
    """One dataset with its examples. ``ETag``; ``If-None-Match`` -> 304."""
    body = wire.dumps((await svc(request).get_dataset(dataset_id)).to_dict()).encode()
    return tagged(body, request.headers.get("if-none-match"))


@router.put("/training/datasets/{dataset_id}", response_model=wire.DatasetOut, responses=ERRORS, tags=["datasets"])
async def update_dataset(request: Request, dataset_id: str, body: DatasetPatch) -> Response:
    """Rename a dataset and/or replace its examples; broadcasts ``dataset_update`` (updated)."""
    return JSONOut((await svc(request).update_dataset(dataset_id, body)).to_dict())


@router.delete("/training/datasets/{dataset_id}", status_code=204, responses=ERRORS, tags=["datasets"])
async def delete_dataset(request: Request, dataset_id: str) -> Response:
    """Delete a dataset (409 while a queued or running job uses it)."""
    await svc(request).delete_dataset(dataset_id)
    return Response(status_code=204)


# --- jobs --------------------------------------------------------------------------------------


@hot.get("/training/jobs", response_model=list[wire.JobOut], responses=ERRORS, tags=["jobs"])
async def list_jobs(
    request: Request,
    # Plain strings: FastAPI would reject "queued,running" before _parse_statuses splits it.
    status: Annotated[
        list[str] | None,
        Query(
            description="only these statuses (queued, running, succeeded, failed, cancelled); "
            "repeat or comma-separate"
        ),
    ] = None,
    limit: Annotated[int | None, Query(ge=1, le=1000, description="page size")] = None,
    cursor: Annotated[str | None, Query(max_length=100, description="X-Next-Cursor of the previous page")] = None,
) -> Response:
    """Jobs, newest first, as a bare JSON array. When more remain, ``X-Next-Cursor`` holds the
    cursor of the next page. ``ETag``; ``If-None-Match`` -> 304 (served by ``hot.py``)."""
    # A DirectRoute: the parameters above document the query; they are read here.
    query = request.query_params
    statuses = _parse_statuses(request)
    limit = _int_param(query.get("limit"), "limit", 1, 1000)
    cursor = query.get("cursor")
    if cursor is not None and len(cursor) > 100:
        raise InvalidInput(f"cursor is {len(cursor)} characters long; at most 100 are allowed", field="cursor")
    jobs = await svc(request).list_jobs(statuses=statuses, limit=limit + 1 if limit else None, cursor=cursor)
    headers = {}
    if limit and len(jobs) > limit:
        jobs = jobs[:limit]
        position = Cursor(jobs[-1].created_at, jobs[-1].id).encode()
        headers["X-Next-Cursor"] = position
        nxt = request.url.include_query_params(cursor=position)
        headers["Link"] = f'<{nxt}>; rel="next"'
    body = wire.dumps([j.to_dict() for j in jobs]).encode()
    return Response(body, media_type="application/json", headers=headers)


def _int_param(raw: str | None, name: str, low: int, high: int) -> int | None:
    """A query integer in [low, high], or None when absent: 422 naming it otherwise."""
    if raw is None:
        return None
    if not _INT.fullmatch(raw):
        raise InvalidInput(f"{name} must be an integer, got {wire.show(raw)}", field=name)
    # Past 24 digits it is out of any range here, and int() refuses past 4,300 digits.
    n = int(raw) if len(raw) <= 25 else None
    if n is None or not low <= n <= high:
        shown = wire.show(raw).strip("'")  # "1000000000…(5000 digits)"
        raise InvalidInput(f"{name} must be from {low} to {high}, got {shown}", field=name)
    return n


def _parse_statuses(request: Request) -> list[JobStatus] | None:
    raw = request.query_params.getlist("status")
    if not raw:
        return None
    out = []
    for chunk in raw:
        for part in chunk.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(JobStatus(part))
            except ValueError:
                allowed = ", ".join(s.value for s in JobStatus)
                raise InvalidInput(f"status {part!r} is not one of {allowed}", field="status") from None
    return out or None


@router.post(
    "/training/jobs",
    status_code=201,
    response_model=wire.JobOut,
    responses=ERRORS,
    tags=["jobs"],
)
async def create_job(
    request: Request,
    body: JobCreate,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", max_length=200, description="retries with the same key return the first job"),
    ] = None,
) -> Response:
    """Queue a training job; broadcasts ``job_created``."""
    job, created = await svc(request).create_job(body, idempotency_key)
    headers = {} if created else {"Idempotent-Replayed": "true"}
    return JSONOut(job.to_dict(), status_code=201, headers=headers)


@router.post("/training/jobs/prune", response_model=wire.PruneOut, responses=ERRORS, tags=["jobs"])
async def prune_jobs(request: Request, body: wire.PruneRequest) -> Response:
    """Delete finished jobs by age and/or count, with their events, logs and files (admin scope).
    Never a queued or running job or the base model of one; broadcasts ``job_deleted``."""
    older = wire.parse_duration(body.older_than) if body.older_than is not None else None
    result = await svc(request).prune(older_than=older, keep=body.keep, statuses=body.status, dry_run=body.dry_run)
    return JSONOut(result)


@router.get("/training/jobs/{job_id}", response_model=wire.JobOut, responses=ERRORS, tags=["jobs"])
async def get_job(request: Request, job_id: str) -> Response:
    """One job. ``ETag``; ``If-None-Match`` -> 304 (served by ``hot.py``)."""
    return JSONOut((await svc(request).get_job(job_id)).to_dict())


@router.post("/training/jobs/{job_id}/cancel", response_model=wire.JobOut, responses=ERRORS, tags=["jobs"])
async def cancel_job(request: Request, job_id: str) -> Response:
    """Cancel a queued or running job (409 when it already finished)."""
    return JSONOut((await svc(request).cancel_job(job_id)).to_dict())


@router.delete("/training/jobs/{job_id}", status_code=204, responses=ERRORS, tags=["jobs"])
async def delete_job(request: Request, job_id: str) -> Response:
    """Delete a finished job and what it stored (409 while queued or running)."""
    await svc(request).delete_job(job_id)
    return Response(status_code=204)


@router.get("/training/jobs/{job_id}/events", response_model=list[wire.EventOut], responses=ERRORS, tags=["events"])
async def job_events(
    request: Request,
    job_id: str,
    since: Annotated[int, Query(ge=0, description="only events with seq > since")] = 0,
) -> Response:
    """The job's logged events still kept by the event log, oldest first."""
    texts = await svc(request).job_events(job_id, since)
    return JSONOut("[" + ",".join(texts) + "]")


@router.get("/training/jobs/{job_id}/logs", responses=ERRORS, tags=["jobs"])
async def job_logs(
    request: Request,
    job_id: str,
    since: Annotated[int, Query(ge=0, description="only lines with lineNo > since")] = 0,
) -> Response:
    """The job's log lines (``lineNo``, ``stream``, ``line``, ``attempt``, ``timestamp``), oldest first."""
    return JSONOut(await svc(request).job_logs(job_id, since))


@router.get("/training/jobs/{job_id}/metrics", responses=ERRORS, tags=["jobs"])
async def job_metrics(request: Request, job_id: str) -> Response:
    """Every metrics report of the job (e.g. loss and valAccuracy per epoch), oldest first."""
    return JSONOut(await svc(request).job_metrics(job_id))


@router.post("/training/jobs/{job_id}/predict", response_model=wire.PredictOut, responses=ERRORS, tags=["models"])
async def predict(request: Request, job_id: str, body: wire.PredictRequest) -> Response:
    """Classify a text with the model of a succeeded nlu-train / fine-tune job."""
    return JSONOut(await svc(request).predict(job_id, body.text))


@router.get(
    "/training/jobs/{job_id}/artifact",
    responses={**ERRORS, 200: {"content": {"application/zip": {}}, "description": "the model (skops)"}},
    response_class=FileResponse,
    tags=["models"],
)
async def download_artifact(request: Request, job_id: str) -> Response:
    """Download the trained model: a skops file (``model.skops``; load it with
    ``mangwale_cli.nlu.model.IntentModel.load`` on a directory holding it). 409
    ``legacy_model`` for a model an older mangwale saved as a pickle: retrain it."""
    path = await svc(request).model_path(job_id)
    return FileResponse(path, media_type="application/zip", filename=f"{job_id}-model.skops")


@router.get("/training/jobs/{job_id}/artifacts", response_model=list[wire.ArtifactEntryOut], responses=ERRORS, tags=["jobs"])
async def list_job_artifacts(request: Request, job_id: str) -> Response:
    """The files a job left (its model, what a worker uploaded), by name, with size and sha256."""
    return JSONOut(await svc(request).job_artifacts(job_id))


@router.get(
    "/training/jobs/{job_id}/artifacts/{name:path}",
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}, "description": "the file"}, 304: {"description": "Not modified"}},
    response_class=FileResponse,
    tags=["jobs"],
)
async def get_job_artifact(request: Request, job_id: str, name: str) -> Response:
    """Download one file of a job, streamed, with its ``Content-Length``; an uploaded file's
    ``ETag`` is its sha256 (``If-None-Match`` -> 304). 404 names ``jobId`` or ``name``."""
    found = await svc(request).artifact_file(job_id, name)
    headers = {}
    if found.sha256 is not None:
        etag = f'"{found.sha256}"'
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers={"etag": etag})
        headers["etag"] = etag
    # Opened here, not when the body is sent: a file deleted meanwhile (its job pruned) is a
    # 404 now, and one deleted while it streams is still read whole through this descriptor.
    try:
        f = await asyncio.to_thread(open, found.path, "rb")
    except FileNotFoundError:
        raise NotFound(f"job {job_id} has no artifact {name!r} any more", field="name", code="unknown_artifact") from None
    size = os.fstat(f.fileno()).st_size
    quoted = quote(found.name)
    disposition = f"attachment; filename*=utf-8''{quoted}" if quoted != found.name else f'attachment; filename="{found.name}"'

    async def body() -> AsyncIterator[bytes]:
        try:
            while chunk := await asyncio.to_thread(f.read, 1 << 20):
                yield chunk
        finally:
            f.close()

    headers |= {"content-length": str(size), "content-disposition": disposition}
    return StreamingResponse(body(), media_type="application/octet-stream", headers=headers)


@router.put(
    "/training/jobs/{job_id}/artifacts/{name:path}",
    status_code=201,
    response_model=wire.ArtifactOut,
    responses={
        **ERRORS,
        413: {"model": wire.ErrorOut, "description": "Larger than artifacts.max_size"},
    },
    openapi_extra={
        "parameters": [
            {"name": wire.SHA256_HEADER, "in": "header", "required": True, "schema": {"type": "string"},
             "description": "sha256 of the body, 64 hex digits"},
            {"name": wire.LEASE_HEADER, "in": "header", "required": True, "schema": {"type": "string"},
             "description": "HOLDER:TOKEN, the job's current lease (its lease field)"},
        ],
        "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    },
    tags=["jobs"],
)
async def upload_artifact(request: Request, job_id: str, name: str) -> Response:
    """Store a file of a running job, streamed (docs/protocol.md, "Uploading an artifact"):
    201 stored; 400 bad name or headers; 409 not the job's live lease, or not running; 413
    over ``artifacts.max_size``; 422 sha256 mismatch, or a pickle / a model this server would
    not load. Nothing is kept unless it answers 201."""
    out = await svc(request).upload_artifact(
        job_id,
        name,
        request.stream(),
        lease=request.headers.get(wire.LEASE_HEADER),
        sha256=request.headers.get(wire.SHA256_HEADER),
        length=request.headers.get("content-length"),
    )
    return JSONOut(out, status_code=201)


__all__ = ["hot", "router"]
