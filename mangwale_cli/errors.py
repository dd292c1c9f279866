"""Every error mangwale raises on purpose, and the exit code each one maps to.

The tree::

    MangwaleError                    (exit 1)  root; carries code, message, field, HTTP status
    ├── InvalidInput                 (exit 2)  HTTP 400/422: a bad field, bad JSON, bad params
    │   └── PayloadTooLarge          (exit 2)  HTTP 413
    ├── NotFound                     (exit 4)  HTTP 404: unknown dataset, job, route
    ├── Conflict                     (exit 1)  HTTP 409: cancel a finished job, delete a used dataset
    │   ├── StaleWrite               (exit 1)  HTTP 409: a job save lost to a newer one (shared store)
    │   └── ModelRefused             (exit 1)  HTTP 409: a model file of another format/scikit-learn, or a pickle
    ├── Unauthorized                 (exit 5)  HTTP 401
    │   └── Forbidden                (exit 5)  HTTP 403
    ├── Unavailable                  (exit 1)  HTTP 503: the store is failing, the server is full
    │   └── InsufficientStorage      (exit 1)  HTTP 507: the disk is full; nothing was saved
    ├── ServerError                  (exit 1)  HTTP 5xx the server did not explain
    ├── Unreachable                  (exit 8)  client side: no TCP connection to the server
    │   └── NotMangwale              (exit 8)  client side: what answers at the URL is not mangwale
    ├── TimedOut                     (exit 6)  client side: a follower's --timeout was reached
    ├── GaveUp                       (exit 7)  client side: a follower stopped reconnecting
    ├── StoreError                   (exit 1)  start-up: the store is corrupt, locked or too new
    └── ConfigError                  (exit 2)  start-up: a setting has a bad value (--url without http://)

The server turns a ``MangwaleError`` into ``{"error": {"code", "message", "field"}}`` with its
``status``; the client turns that body back into the same class (``from_response``); the CLI
turns it into one line on stderr and ``exit_code``. That round trip is the only error path.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """Exit codes of every client command: ``EXIT_CODES`` says what each means, and is what the
    README's table and ``mangwale --help`` show (a test holds the three together)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    CANCELLED = 3
    NOT_FOUND = 4
    UNAUTHORIZED = 5
    TIMEOUT = 6
    GAVE_UP = 7
    UNREACHABLE = 8
    INTERNAL = 70  # sysexits' EX_SOFTWARE: distinct from 1, which scripts read as "the job failed"
    INTERRUPTED = 130  # 128 + SIGINT, as shells report it


EXIT_CODES: dict[ExitCode, str] = {  # each fits one line of an 80-column `--help`
    ExitCode.OK: "success; the followed job(s) succeeded",
    ExitCode.FAILED: "a followed job failed, or the server refused (conflict, 5xx)",
    ExitCode.USAGE: "usage error: a bad flag, argument, setting (--url) or input",
    ExitCode.CANCELLED: "a followed job was cancelled",
    ExitCode.NOT_FOUND: "not found: a job or dataset (named in a create, or deleted while followed)",
    ExitCode.UNAUTHORIZED: "not authorised (401/403)",
    ExitCode.TIMEOUT: "--timeout reached",
    ExitCode.GAVE_UP: "gave up reconnecting (--max-retries, --give-up-after)",
    ExitCode.UNREACHABLE: "no mangwale server at the URL (watch, worker: within --connect-timeout)",
    ExitCode.INTERNAL: "a bug in mangwale: please report it (MANGWALE_DEBUG=1 for details)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}


class MangwaleError(Exception):
    """Root of mangwale's errors. ``field`` names the bad input, when there is one."""

    status: int = 500
    code: str = "error"
    exit_code: ExitCode = ExitCode.FAILED

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_body(self) -> dict[str, Any]:
        """The JSON error body the server sends."""
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}

    def __str__(self) -> str:
        return self.message


class InvalidInput(MangwaleError):
    status = 422
    code = "invalid"
    exit_code = ExitCode.USAGE


class PayloadTooLarge(InvalidInput):
    status = 413
    code = "too_large"


class NotFound(MangwaleError):
    status = 404
    code = "not_found"
    exit_code = ExitCode.NOT_FOUND


class Conflict(MangwaleError):
    status = 409
    code = "conflict"


class StaleWrite(Conflict):
    """A ``save_job`` refused because the stored job moved past it (see ``Store.save_job``).

    Carries what is stored now, so the loser can tell "another instance retried it" (a higher
    attempt) from "it already finished" (a terminal status).
    """

    code = "stale"

    def __init__(self, message: str, *, stored_status: str, stored_attempt: int, field: str | None = "jobId") -> None:
        super().__init__(message, field=field)
        self.stored_status = stored_status
        self.stored_attempt = stored_attempt


class ModelRefused(Conflict):
    """A model file mangwale will not load: not a skops model, a type outside the trusted list,
    another format version or scikit-learn version, or an old pickle (``model.joblib``).
    Nothing in the file was run. ``plain_message``: a failed job's error is this message."""

    code = "incompatible_model"
    plain_message = True


class Unauthorized(MangwaleError):
    status = 401
    code = "unauthorized"
    exit_code = ExitCode.UNAUTHORIZED


class Forbidden(Unauthorized):
    status = 403
    code = "forbidden"


class Unavailable(MangwaleError):
    status = 503
    code = "unavailable"


class InsufficientStorage(Unavailable):
    """The data dir's disk is full (ENOSPC): the request changed nothing; retry once space is freed."""

    status = 507
    code = "insufficient_storage"


class ServerError(MangwaleError):
    status = 500
    code = "server_error"


class Unreachable(MangwaleError):
    status = 0
    code = "unreachable"
    exit_code = ExitCode.UNREACHABLE


class NotMangwale(Unreachable):
    """Something answers at the URL, but not as a mangwale server does (no mangwale error body,
    and its ``/healthz`` is not mangwale's): a wrong port or path in the URL. ``answered`` is
    the HTTP status it gave; ``gateway`` says whether that was a proxy's 502/503/504, whose
    mangwale behind it may just not be up yet."""

    code = "not_mangwale"

    def __init__(self, message: str, *, answered: int | None = None) -> None:
        super().__init__(message)
        self.answered = answered

    @property
    def gateway(self) -> bool:
        return self.answered in (502, 503, 504)


class TimedOut(MangwaleError):
    """``--timeout`` ran out before the followed jobs ended."""

    status = 0
    code = "timeout"
    exit_code = ExitCode.TIMEOUT


class GaveUp(MangwaleError):
    """A follower stopped reconnecting (``--max-retries`` / ``--give-up-after``)."""

    status = 0
    code = "gave_up"
    exit_code = ExitCode.GAVE_UP


class StoreError(MangwaleError):
    code = "store"


class ConfigError(MangwaleError):
    code = "config"
    exit_code = ExitCode.USAGE


NO_ROUTE = "no_route"  # error.code of a 404 for a path no route has (not a missing job or dataset)

_BY_STATUS: dict[int, type[MangwaleError]] = {
    400: InvalidInput,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidInput,
    503: Unavailable,
    507: InsufficientStorage,
}


def is_error_body(body: Any) -> bool:
    """Whether ``body`` is a mangwale error body (``{"error": {"code", "message", ...}}``)."""
    return isinstance(body, dict) and isinstance(body.get("error"), dict) and "code" in body["error"]


def from_response(status: int, body: Any) -> MangwaleError:
    """Rebuild the error a server described in an HTTP response."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else InvalidInput
    message = f"HTTP {status}"
    field = None
    code = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        message = str(err.get("message") or message)
        field = err.get("field")
        code = err.get("code")
    elif isinstance(body, dict) and "detail" in body:
        message = str(body["detail"])
    return cls(message, field=field, code=code, status=status)
