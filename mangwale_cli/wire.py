"""The wire format: the only module that knows JSON field names.

REST bodies, WebSocket/SSE messages and stored documents all use the seed's camelCase shapes
(``jobId``, ``datasetId``, ``createdAt``...). Timestamps are integer milliseconds since the
epoch. Server, client, storage backends and the CLI go through the helpers here.

Messages (server to client) on ``/ws/training`` and ``/training/events``:

* ``connected``      greeting, not logged: ``message``, ``timestamp``, ``headSeq``, ``epoch``
* ``job_created``    logged: ``job`` (the job document)
* ``training_update`` logged: ``jobId``, ``status``, ``progress``, ``message``, ``timestamp``,
  ``attempt`` and, when the trainer reports them, ``metrics`` and ``eta``; ``worker`` when a
  remote worker runs it; ``waitingFor`` while it is queued and no live taker can run it
* ``dataset_update`` logged: ``datasetId``, ``action`` (created/updated/deleted)
* ``job_log``        logged: ``jobId``, ``stream`` (stdout/stderr/trainer), ``line``, ``lineNo``,
  ``attempt``, ``timestamp``; numbered by ``seq`` but not by ``jobSeq``, and kept within its own
  bound so log lines never evict progress from the replay window
* ``job_deleted``    logged: ``jobIds`` (finished jobs deleted or pruned), ``reason``; no
  ``jobSeq`` (it may name many jobs); seed clients ignore it
* ``resync``, ``error``, ``pong``: control messages, not logged

Every logged event carries ``seq`` (global, +1 per event), ``epoch`` (the log's id) and, when
it concerns a job, ``jobSeq`` (+1 per event of that job). See docs/protocol.md.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .jsonin import cut_digits, find_surrogate, not_text

PROTOCOL_VERSION = 1


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


class MsgType:
    CONNECTED = "connected"
    JOB_CREATED = "job_created"
    TRAINING_UPDATE = "training_update"
    DATASET_UPDATE = "dataset_update"
    JOB_LOG = "job_log"
    JOB_DELETED = "job_deleted"
    WORKER_UPDATE = "worker_update"  # live only: no seq, never in the log (docs/protocol.md)
    RESYNC = "resync"
    ERROR = "error"
    PING = "ping"
    PONG = "pong"


LOGGED_TYPES = frozenset(
    {MsgType.JOB_CREATED, MsgType.TRAINING_UPDATE, MsgType.DATASET_UPDATE, MsgType.JOB_LOG, MsgType.JOB_DELETED}
)


def now_ms() -> int:
    return int(time.time() * 1000)


# --- JSON ---------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(text: str | bytes) -> Any:
    """Strict JSON: NaN, Infinity and -Infinity are errors, as in RFC 8259."""
    return json.loads(text, parse_constant=_reject_constant)


def dumps(obj: Any) -> str:
    """Compact JSON; refuses NaN and infinities rather than writing invalid JSON."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def find_non_finite(value: Any, path: str = "") -> str | None:
    """The path of the first NaN or infinite float inside ``value``, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "."
    if isinstance(value, dict):
        for k, v in value.items():
            hit = find_non_finite(v, f"{path}.{k}" if path else str(k))
            if hit:
                return hit
    elif isinstance(value, list):
        for i, v in enumerate(value):
            hit = find_non_finite(v, f"{path}[{i}]")
            if hit:
                return hit
    return None


def show(value: Any, limit: int = 40) -> str:
    """A client's value in an error message, as JSON spells it (NaN, Infinity, null, true), and
    cut short: an error line never carries a 309-digit number or a pasted page."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return f"a JSON array of {len(value)}"
    if value is None or isinstance(value, bool):
        return dumps(value)
    text = cut_digits(repr(value) if isinstance(value, str) else str(value))  # "1000000000…(310 digits)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- request bodies (validated by the server, documented in OpenAPI) -------------------------

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

MAX_TEXT = 2000
MAX_NAME = 200
MAX_EXAMPLES = 100_000  # per dataset; with MAX_TEXT, a body fits server.max_body_size's order
MAX_ENTITIES = 50  # per example
MAX_PARAMS_BYTES = 64 * 1024  # a job's params as JSON (they ride in every job_created event)
MAX_LABELS = 20  # per job and per worker
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:=-]{0,62}")


def check_labels(labels: list[str]) -> list[str]:
    """Labels sorted and deduplicated; ``ValueError`` naming the first bad one."""
    for label in labels:
        if not isinstance(label, str) or not LABEL_RE.fullmatch(label):
            raise ValueError(f"must be labels of letters, digits and _.:=- (up to 63 characters), got {show(label)}")
    return sorted(set(labels))


class EntitySpan(BaseModel):
    model_config = _STRICT
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    value: str = Field(max_length=MAX_TEXT)
    entity: str = Field(min_length=1, max_length=MAX_NAME)


class Example(BaseModel):
    """One labelled utterance. Entity offsets are character offsets into ``text``."""

    model_config = _STRICT
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    intent: str = Field(min_length=1, max_length=MAX_NAME)
    entities: list[EntitySpan] | None = Field(default=None, max_length=MAX_ENTITIES)

    @field_validator("text", "intent")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("entities")
    @classmethod
    def _spans_match(cls, v: list[EntitySpan] | None, info: Any) -> list[EntitySpan] | None:
        text = info.data.get("text")
        if v is None or text is None:
            return v
        for i, span in enumerate(v):
            if span.end <= span.start or span.end > len(text):
                raise ValueError(f"entity {i}: span {span.start}..{span.end} is outside the text")
            if text[span.start : span.end] != span.value:
                raise ValueError(f"entity {i}: value {span.value!r} is not text[{span.start}:{span.end}]")
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class DatasetCreate(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1, max_length=MAX_NAME)
    examples: list[Example] = Field(default_factory=list, max_length=MAX_EXAMPLES)
    description: str | None = Field(default=None, max_length=MAX_TEXT)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return _clean_name(v)


def _clean_name(v: str) -> str:
    v = v.strip()
    if not v:
        raise ValueError("must not be blank")
    if any(ord(c) < 32 for c in v):
        raise ValueError("must not contain control characters")
    return v


class DatasetPatch(BaseModel):
    """``PUT /training/datasets/{id}``: rename and/or replace the examples."""

    model_config = _STRICT
    name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME)
    examples: list[Example] | None = Field(default=None, max_length=MAX_EXAMPLES)
    description: str | None = Field(default=None, max_length=MAX_TEXT)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str | None) -> str | None:
        # "name": null means "keep the name", like an omitted field.
        return None if v is None else _clean_name(v)


class JobCreate(BaseModel):
    model_config = _STRICT
    kind: str = Field(min_length=1, max_length=100)
    dataset_id: str | None = Field(default=None, alias="datasetId", max_length=100)
    agent_id: str | None = Field(default=None, alias="agentId", max_length=200)
    params: dict[str, Any] = Field(default_factory=dict)
    labels: list[str] = Field(default_factory=list, max_length=MAX_LABELS)

    @field_validator("labels")
    @classmethod
    def _labels_ok(cls, v: list[str]) -> list[str]:
        return check_labels(v)

    @field_validator("params")
    @classmethod
    def _params_size(cls, v: dict[str, Any]) -> dict[str, Any]:
        if lone := find_surrogate(v):  # a body parsed by FastAPI, not jsonin.read_json
            raise ValueError("must be text: " + not_text(f"params.{lone[0]}", lone[1]))
        try:
            size = len(dumps(v).encode())
        except ValueError:  # NaN or infinity: the service names the field
            return v
        if size > MAX_PARAMS_BYTES:
            raise ValueError(f"takes {size} bytes as JSON; at most {MAX_PARAMS_BYTES}")
        return v

    def fingerprint(self) -> str:
        """Stable text of the request, to tell a retried POST from a different one."""
        body = self.model_dump(by_alias=True)
        if not body["labels"]:
            del body["labels"]  # keys stored before labels existed keep matching their request
        return dumps(body)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or plain seconds -> seconds; ValueError otherwise."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text[:40]!r} is not a duration (say 30d, 12h, 90m or 45s)")
    return float(m.group(1)) * _UNIT[m.group(2)]


class PruneRequest(BaseModel):
    """``POST /training/jobs/prune``: which finished jobs to delete (admin scope)."""

    model_config = _STRICT
    older_than: str | None = Field(
        default=None, alias="olderThan", max_length=40, description="finished longer ago than this: 30d, 12h, 90m, 45s"
    )
    keep: int | None = Field(default=None, ge=0, description="keep the newest N finished jobs, prune the rest")
    status: list[JobStatus] | None = Field(default=None, max_length=3, description="only these final statuses")
    dry_run: bool = Field(default=False, alias="dryRun", description="say what would be deleted; delete nothing")

    @field_validator("older_than")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v


class PruneOut(BaseModel):
    deleted: list[str] = Field(description="the jobs deleted (with dryRun: that would be)")
    count: int
    dryRun: bool
    kept: list[str] = Field(description="matching jobs kept: the base model of a queued or running fine-tune")


class PredictRequest(BaseModel):
    model_config = _STRICT
    text: str = Field(min_length=1, max_length=MAX_TEXT)


class PredictOut(BaseModel):
    jobId: str
    text: str
    intent: str
    confidence: float
    ranking: list[dict[str, Any]]
    entities: list[dict[str, Any]]


# --- artifact upload (docs/protocol.md, "Uploading an artifact") ---------------------------

#: ``PUT /training/jobs/{id}/artifacts/{name}``: the body is the file, streamed.
SHA256_HEADER = "X-Content-SHA256"  # the body's sha256, 64 hex digits
LEASE_HEADER = "X-Mangwale-Lease"  # HOLDER:TOKEN of the job's current lease (Job.lease)
#: an artifact name: a letter or digit, then letters, digits, ``.``, ``_``, ``-``; no path
#: separators, no leading dot, nothing the server keeps itself (``RESERVED_ARTIFACTS``)
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RESERVED_ARTIFACTS = frozenset({"logs.jsonl", "metrics.jsonl"})
#: the model file (audited by the server's model loader at upload: a skops zip of trusted types)
MODEL_ARTIFACT = "model.skops"
#: names that say "pickle": refused whatever they hold (models are skops files)
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle", ".pt", ".pth")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def artifact_name_problem(name: str) -> str | None:
    """Why ``name`` is not an artifact name an upload may use (None: it may)."""
    if not ARTIFACT_NAME.fullmatch(name) or ".." in name:
        return (
            f"artifact name {show(name)} is not allowed: 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no path separators)"
        )
    if name in RESERVED_ARTIFACTS:
        return f"artifact name {name!r} is kept by the server itself"
    return None


def parse_sha256(value: str | None) -> str | None:
    """The lower-case hex digest of an ``X-Content-SHA256`` header, or None when it is malformed."""
    if value is None:
        return None
    value = value.strip().lower()
    return value if _SHA256.fullmatch(value) else None


def parse_lease(value: str | None) -> tuple[str, int] | None:
    """``(holder, token)`` of an ``X-Mangwale-Lease: HOLDER:TOKEN`` header (the holder may hold
    colons: the token is after the last), or None when it is malformed."""
    if not value or ":" not in value:
        return None
    holder, _, token = value.strip().rpartition(":")
    if not holder or not token.isdigit():
        return None
    return holder, int(token)


def format_lease(holder: str, token: int) -> str:
    """The ``X-Mangwale-Lease`` value for a lease (``Job.lease``)."""
    return f"{holder}:{token}"


class ArtifactOut(BaseModel):
    """An artifact stored by ``PUT /training/jobs/{id}/artifacts/{name}``."""

    jobId: str
    name: str
    size: int = Field(description="bytes stored")
    sha256: str = Field(description="hex digest of the stored bytes")


class ArtifactEntryOut(BaseModel):
    """One file of a job, as ``GET /training/jobs/{id}/artifacts`` lists it."""

    name: str
    size: int = Field(description="bytes")
    sha256: str | None = Field(description="hex digest, known for uploaded files (also the download's ETag)")


def artifact_out(job_id: str, name: str, size: int, sha256: str) -> dict[str, Any]:
    return {"jobId": job_id, "name": name, "size": size, "sha256": sha256}


# --- documents ----------------------------------------------------------------------------


@dataclass
class Job:
    id: str
    kind: str
    dataset_id: str | None
    agent_id: str | None = None
    status: JobStatus = JobStatus.QUEUED
    progress: float = 0
    message: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0
    created_at: int = 0
    updated_at: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    error: str | None = None
    metrics: dict[str, Any] | None = None
    stalled: bool = False
    job_seq: int = 0  # the jobSeq of the newest event about this job
    lease: dict[str, Any] | None = None  # the current attempt's runner: {"holder", "token"}
    labels: list[str] = field(default_factory=list)  # a taker must have every one of them
    worker: str | None = None  # name of the remote worker of the current or last attempt
    waiting_for: str | None = None  # queued, and no live taker can run it: what it waits for (waiting.py)
    # [attempt, n]: the newest report of a remote worker written into this record, so an
    # instance that gets it again (the worker moved, or the server restarted before its ack)
    # acknowledges it without writing it twice (workers.py).
    report: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "datasetId": self.dataset_id,
            "agentId": self.agent_id,
            "status": self.status.value,
            "progress": self.progress,
            "message": self.message,
            "params": self.params,
            "attempt": self.attempt,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "error": self.error,
            "metrics": self.metrics,
            "stalled": self.stalled,
            "jobSeq": self.job_seq,
            "lease": self.lease,
        }
        # Only when set: documents and events of jobs that use neither keep their old shape.
        if self.labels:
            out["labels"] = self.labels
        if self.worker is not None:
            out["worker"] = self.worker
        if self.waiting_for is not None and self.status is JobStatus.QUEUED:
            out["waitingFor"] = self.waiting_for
        if self.report is not None:
            out["workerReport"] = self.report
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        return cls(
            id=d["id"],
            kind=d["kind"],
            dataset_id=d.get("datasetId"),
            agent_id=d.get("agentId"),
            status=JobStatus(d.get("status", "queued")),
            progress=d.get("progress", 0),
            message=d.get("message"),
            params=d.get("params") or {},
            attempt=d.get("attempt", 0),
            created_at=d.get("createdAt", 0),
            updated_at=d.get("updatedAt", 0),
            started_at=d.get("startedAt"),
            finished_at=d.get("finishedAt"),
            error=d.get("error"),
            metrics=d.get("metrics"),
            stalled=bool(d.get("stalled", False)),
            job_seq=int(d.get("jobSeq") or 0),
            lease=d.get("lease"),
            labels=list(d.get("labels") or []),
            worker=d.get("worker"),
            waiting_for=d.get("waitingFor") if d.get("status", "queued") == "queued" else None,
            report=d.get("workerReport"),
        )


@dataclass
class Dataset:
    id: str
    name: str
    examples: list[dict[str, Any]] = field(default_factory=list)
    description: str | None = None
    created_at: int = 0
    updated_at: int = 0

    @property
    def size(self) -> int:
        return len(self.examples)

    def intents(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for ex in self.examples:
            counts[ex["intent"]] = counts.get(ex["intent"], 0) + 1
        return counts

    def summary(self) -> dict[str, Any]:
        """The list form: no examples."""
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "size": self.size,
            "intentCount": len(self.intents()),
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Dataset:
        return cls(
            id=d["id"],
            name=d["name"],
            examples=d.get("examples") or [],
            description=d.get("description"),
            created_at=d.get("createdAt", 0),
            updated_at=d.get("updatedAt", 0),
        )


# --- response models (for the OpenAPI document) ----------------------------------------------


class JobOut(BaseModel):
    id: str
    kind: str
    datasetId: str | None
    agentId: str | None
    status: JobStatus
    progress: float
    message: str | None
    params: dict[str, Any]
    attempt: int
    createdAt: int
    updatedAt: int
    startedAt: int | None
    finishedAt: int | None
    error: str | None
    metrics: dict[str, Any] | None
    stalled: bool = False
    jobSeq: int = Field(0, description="jobSeq of the newest event about this job (followers wait for it)")
    lease: dict[str, Any] | None = Field(
        None, description="who runs the current attempt: holder (instance or worker) and fencing token"
    )
    labels: list[str] | None = Field(None, description="labels a taker must all have to run the job")
    worker: str | None = Field(None, description="name of the remote worker of the current or last attempt")
    waitingFor: str | None = Field(
        None, description="a queued job no live taker can run: what it waits for (\"waiting for a worker with labels gpu\")"
    )
    workerReport: list[int] | None = Field(
        None, description="[attempt, n]: the newest report of a remote worker written into the record"
    )


class DatasetSummaryOut(BaseModel):
    id: str
    name: str
    description: str | None
    size: int
    intentCount: int
    createdAt: int
    updatedAt: int


class DatasetOut(DatasetSummaryOut):
    examples: list[Example]


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None


class ErrorOut(BaseModel):
    error: ErrorDetail


class EventOut(BaseModel):
    """A logged event: one of job_created, training_update, dataset_update, job_log, job_deleted."""

    model_config = ConfigDict(extra="allow")
    type: Literal["job_created", "training_update", "dataset_update", "job_log", "job_deleted"]
    seq: int
    epoch: str
    timestamp: int
    jobSeq: int | None = None


class HealthOut(BaseModel):
    status: str
    version: str
    epoch: str
    headSeq: int
    jobs: dict[str, int]
    streams: int = Field(description="open WebSocket and SSE subscribers")
    store: str = Field("tinydb", description="'tinydb' (embedded) or 'redis' (shared by several instances)")
    instance: str | None = Field(None, description="Redis store: this instance's name (host:port)")
    running: int | None = Field(None, description="Redis store: jobs this instance is running")
    takeovers: int | None = Field(
        None, description="Redis store: jobs this instance took over from an instance that stopped (re-runs)"
    )


# --- messages -----------------------------------------------------------------------------


def job_created(job: Job) -> dict[str, Any]:
    return {"type": MsgType.JOB_CREATED, "jobId": job.id, "job": job.to_dict(), "timestamp": now_ms()}


def training_update(
    job: Job, *, metrics: dict[str, Any] | None = None, eta: float | None = None
) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "type": MsgType.TRAINING_UPDATE,
        "jobId": job.id,
        "status": job.status.value,
        "progress": job.progress,
        "message": job.message,
        "attempt": job.attempt,
        "timestamp": now_ms(),
    }
    if job.error and job.status is JobStatus.FAILED:
        msg["error"] = job.error
    if metrics:
        msg["metrics"] = metrics
    if eta is not None:
        msg["eta"] = eta
    if job.stalled:
        msg["stalled"] = True
    if job.worker is not None:
        msg["worker"] = job.worker
    if job.waiting_for is not None and job.status is JobStatus.QUEUED:
        msg["waitingFor"] = job.waiting_for
    return msg


def job_log(job_id: str, stream: str, line: str, line_no: int, attempt: int) -> dict[str, Any]:
    return {
        "type": MsgType.JOB_LOG,
        "jobId": job_id,
        "stream": stream,
        "line": line,
        "lineNo": line_no,
        "attempt": attempt,
        "timestamp": now_ms(),
    }


def job_deleted(job_ids: list[str], reason: str) -> dict[str, Any]:
    return {"type": MsgType.JOB_DELETED, "jobIds": job_ids, "reason": reason, "timestamp": now_ms()}


def dataset_update(dataset_id: str, action: str) -> dict[str, Any]:
    return {
        "type": MsgType.DATASET_UPDATE,
        "datasetId": dataset_id,
        "action": action,
        "timestamp": now_ms(),
    }


def connected(head_seq: int, epoch: str) -> dict[str, Any]:
    return {
        "type": MsgType.CONNECTED,
        "message": "Connected to training updates",
        "timestamp": now_ms(),
        "headSeq": head_seq,
        "epoch": epoch,
        "protocol": PROTOCOL_VERSION,
    }


def resync(reason: str, head_seq: int, epoch: str) -> dict[str, Any]:
    return {
        "type": MsgType.RESYNC,
        "reason": reason,
        "headSeq": head_seq,
        "epoch": epoch,
        "timestamp": now_ms(),
    }


def worker_update(worker: dict[str, Any]) -> dict[str, Any]:
    """A worker registered, changed state, took or finished a job, or was forgotten (``state``
    ``gone``, ``removed`` true). ``worker`` is a ``GET /workers`` row. Not logged: no seq."""
    return {"type": MsgType.WORKER_UPDATE, "workerId": worker["id"], "worker": worker, "timestamp": now_ms()}


def error_message(code: str, message: str) -> dict[str, Any]:
    return {"type": MsgType.ERROR, "code": code, "message": message, "timestamp": now_ms()}


def pong() -> dict[str, Any]:
    return {"type": MsgType.PONG, "timestamp": now_ms()}


def event_job_id(event: dict[str, Any]) -> str | None:
    """The job an event is about, if any."""
    return event.get("jobId")


# --- workers (docs/protocol.md, "Workers") ------------------------------------------------------

WORKER_SUBPROTOCOL = "mangwale.worker.v1"
MAX_KINDS = 200  # kinds one worker may advertise


class WorkerMsg:
    """Message types on ``/ws/workers``: the worker sends REGISTER, HEARTBEAT, REPORT and
    RELEASE; the server sends REGISTERED, OFFER, CANCEL, ACK, REFUSED, RENEWED and ERROR."""

    REGISTER = "register"
    HEARTBEAT = "heartbeat"
    REPORT = "report"
    RELEASE = "release"
    REGISTERED = "registered"
    OFFER = "offer"
    CANCEL = "cancel"
    ACK = "ack"
    REFUSED = "refused"
    RENEWED = "renewed"
    ERROR = "error"


class WorkerKind(BaseModel):
    model_config = _STRICT
    kind: str = Field(min_length=1, max_length=100)
    description: str = Field("", max_length=MAX_TEXT)
    requiresDataset: bool = True


class WorkerRegister(BaseModel):
    """A worker's first message: who it is and what it can run. ``id`` and ``secret``: the
    identity an earlier ``registered`` gave it (a reconnect keeps it, so its leases stay its
    own); ``running``: job id -> fencing token of the jobs it still runs."""

    model_config = _STRICT
    type: Literal["register"]
    id: str | None = Field(None, max_length=100)
    secret: str | None = Field(None, max_length=200)
    name: str = Field(min_length=1, max_length=MAX_NAME)
    labels: list[str] = Field(default_factory=list, max_length=MAX_LABELS)
    kinds: list[WorkerKind] = Field(default_factory=list, max_length=MAX_KINDS)
    versions: dict[str, str] = Field(default_factory=dict)
    concurrency: int = Field(1, ge=1, le=1000)
    running: dict[str, int] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _labels_ok(cls, v: list[str]) -> list[str]:
        return check_labels(v)


class WorkerReport(BaseModel):
    """One report of a running attempt, numbered ``n`` (1, 2, ... per attempt) by the worker.
    ``what``: progress (progress, message, metrics, eta), log (stream, line) or finish
    (status, message, error, metrics)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    type: Literal["report"]
    jobId: str = Field(max_length=100)
    token: int
    n: int = Field(ge=1)
    what: Literal["progress", "log", "finish"]
    progress: float | None = None
    message: str | None = Field(None, max_length=MAX_TEXT)
    metrics: dict[str, Any] | None = None
    eta: float | None = None
    stream: str | None = Field(None, max_length=20)
    line: str | None = None
    status: Literal["succeeded", "failed", "cancelled"] | None = None
    error: str | None = None


class WorkerHeartbeat(BaseModel):
    model_config = _STRICT
    type: Literal["heartbeat"]
    jobs: dict[str, int] = Field(default_factory=dict)


class WorkerRelease(BaseModel):
    """Hand a job back at once (the worker is stopping): it is re-queued as is."""

    model_config = _STRICT
    type: Literal["release"]
    jobId: str = Field(max_length=100)
    token: int
    reason: str = Field("the worker stopped", max_length=MAX_TEXT)


def worker_registered(worker_id: str, secret: str, lease: float, heartbeat: float, running: dict[str, bool]) -> dict[str, Any]:
    return {"type": WorkerMsg.REGISTERED, "id": worker_id, "secret": secret, "lease": lease,
            "heartbeat": heartbeat, "running": running}  # fmt: skip


def worker_offer(job: Job, lease_seconds: float) -> dict[str, Any]:
    return {"type": WorkerMsg.OFFER, "job": job.to_dict(), "lease": job.lease, "leaseSeconds": lease_seconds}


def worker_cancel(job_id: str, reason: str) -> dict[str, Any]:
    return {"type": WorkerMsg.CANCEL, "jobId": job_id, "reason": reason}


def worker_ack(job_id: str, n: int) -> dict[str, Any]:
    return {"type": WorkerMsg.ACK, "jobId": job_id, "n": n}


def worker_refused(job_id: str, n: int, message: str) -> dict[str, Any]:
    """A report the store refused (a stale or expired lease): HTTP 409 ``stale``; the worker
    stops that job's trainer."""
    return {"type": WorkerMsg.REFUSED, "jobId": job_id, "n": n, "status": 409, "code": "stale", "message": message}


def worker_renewed(jobs: dict[str, bool]) -> dict[str, Any]:
    return {"type": WorkerMsg.RENEWED, "jobs": jobs}


class WorkerOut(BaseModel):
    id: str
    name: str
    labels: list[str]
    kinds: list[str]
    versions: dict[str, str]
    concurrency: int
    running: list[str] = Field(description="ids of the jobs it runs")
    lastHeartbeat: int = Field(description="ms since the epoch, by the server's clock")
    state: Literal["up", "busy", "lost", "gone"] = Field(description="gone: only in a worker_update, when it is forgotten")
    instance: str | None = Field(default=None, description="the instance it is connected to (or was, when lost)")
    removed: bool | None = Field(default=None, description="true in the worker_update that forgets it")
