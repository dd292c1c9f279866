"""The Python client for a mangwale server: REST, errors as ``MangwaleError``.

The CLI is a thin layer over ``Client``. Every method returns decoded wire dicts.
``AsyncClient`` is its asyncio twin for the few calls a live follower (``follow.Follower``)
makes between WebSocket messages; both map transport failures and error bodies the same way.

``Client`` sends on one of two paths. httpx is the client library; it is imported only when a
request takes that path, as it costs a one-shot command more than its request (~50 ms). The
direct path (``stdhttp``: the standard library's http.client) is taken wherever httpx would
connect directly too (``direct_path``): no proxy in the environment (httpx's proxy and NO_PROXY
rules then apply, so they are httpx's own), no transport injected, and not
``MANGWALE_HTTP=httpx``. Both share this module's URL paths, headers, timeout, TLS context
(``tls_context``) and error mapping; the CLI's test suites run on each.
"""

from __future__ import annotations

import http.client
import math
import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Self
from urllib.parse import quote

from . import __version__
from .connection import DEFAULT_URL, check_token, check_url, default_url
from .errors import (
    NO_ROUTE,
    InvalidInput,
    MangwaleError,
    NotFound,
    NotMangwale,
    Unreachable,
    from_response,
    is_error_body,
)

if TYPE_CHECKING:
    import httpx

    from .stdhttp import Reply

    Answer = httpx.Response | Reply

__all__ = ["DEFAULT_URL", "AsyncClient", "Client", "default_url", "non_finite", "seg"]

def seg(value: str) -> str:
    """``value`` as one URL path segment: ``/``, ``?``, ``#`` and spaces encoded, and a ``.`` or
    ``..`` (which a URL would resolve away) as ``%2E``."""
    if value and set(value) <= {"."}:
        return "%2E" * len(value)
    return quote(value, safe="")


def _job(job_id: str) -> str:
    """The path of a job. The server decodes ``%2F`` before routing, so no id it gives holds a
    ``/``, and one that does names no job (not a route the server would answer about). An empty
    id would name the list instead (``/training/jobs/``)."""
    if not job_id:
        raise InvalidInput("the job id is empty: give a job id (mangwale jobs list shows them)", field="jobId")
    if "/" in job_id:
        raise NotFound(f"job {job_id} not found", field="jobId")
    return f"/training/jobs/{seg(job_id)}"


def _dataset(dataset_id: str) -> str:
    """The path of a dataset (see ``_job``)."""
    if not dataset_id:
        raise InvalidInput("the dataset id is empty: give a dataset id or name", field="datasetId")
    if "/" in dataset_id:
        raise NotFound(f"dataset {dataset_id} not found", field="datasetId")
    return f"/training/datasets/{seg(dataset_id)}"


def non_finite(value: Any, path: str = "") -> str | None:
    """The path of the first NaN or infinite float inside ``value`` (JSON has neither), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "."
    if isinstance(value, dict):
        for k, v in value.items():
            if hit := non_finite(v, f"{path}.{k}" if path else str(k)):
                return hit
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if hit := non_finite(v, f"{path}[{i}]"):
                return hit
    return None


def ws_url_for(url: str) -> str:
    """The WebSocket URL of the server at ``url`` (http -> ws, https -> wss)."""
    url = url.rstrip("/")
    if url.startswith("https://"):
        return "wss://" + url[len("https://") :] + "/ws/training"
    return "ws://" + url.removeprefix("http://") + "/ws/training"


def _headers(token: str | None) -> dict[str, str]:
    headers = {"User-Agent": f"mangwale/{__version__}"}
    if token:
        headers["Authorization"] = f"Bearer {check_token(token)}"
    elif os.environ.get("MANGWALE_TOKEN"):
        headers["Authorization"] = f"Bearer {check_token(os.environ['MANGWALE_TOKEN'], 'MANGWALE_TOKEN')}"
    return headers


PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy")


def direct_path(env: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """Whether ``Client`` sends over the standard library (``stdhttp``) rather than httpx: unless
    ``MANGWALE_HTTP=httpx``, or a proxy is named in the environment (any case, as httpx reads
    them), where httpx's own proxy rules decide."""
    env = os.environ if env is None else env
    choice = env.get("MANGWALE_HTTP", "stdlib")
    if choice not in ("stdlib", "httpx"):
        from .errors import ConfigError

        raise ConfigError(f"MANGWALE_HTTP {choice!r} is not stdlib or httpx", field="MANGWALE_HTTP")
    if choice == "httpx":
        return False
    return not any(env.get(v) or env.get(v.upper()) for v in PROXY_VARS)


def tls_context() -> ssl.SSLContext:
    """The context that verifies an https server, on both paths: httpx's default (its
    ``create_ssl_context``): $SSL_CERT_FILE, else $SSL_CERT_DIR, else certifi's CA bundle."""
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def _verify(url: str) -> ssl.SSLContext:
    """TLS verification for ``url``. Loading every CA certificate costs a one-shot command
    ~40 ms, and a plain-http server never uses it: there, an empty context stands in. Should
    anything ever lead to TLS with it (a TLS proxy from the environment), it trusts no CA and
    so fails closed."""
    if url.startswith("http://"):
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return tls_context()


def _transport_error(url: str, method: str, path: str, exc: Exception) -> Unreachable:
    """The error for a request that got no answer, on either path."""
    from .stdhttp import ConnectFailed

    connect, timeout = isinstance(exc, ConnectFailed), isinstance(exc, TimeoutError)
    if not (connect or timeout) and type(exc).__module__.startswith("httpx"):
        import httpx

        connect, timeout = isinstance(exc, httpx.ConnectError), isinstance(exc, httpx.TimeoutException)
    if connect:
        return Unreachable(
            f"cannot connect to {url}: is `mangwale serve` running there? (set --url or MANGWALE_URL)"
        )
    if timeout:
        return Unreachable(f"{url} did not answer {method} {path} in time")
    return Unreachable(f"{method} {url}{path} failed: {exc}")


class _Foreign(Exception):
    """An answer no mangwale server gives: an error without mangwale's error body, or a body
    that is not JSON. The client then asks ``/healthz`` who is there (only on this path)."""

    def __init__(self, resp: Answer, error: MangwaleError) -> None:
        super().__init__(error.message)
        self.resp = resp
        self.error = error


def _error_of(resp: Answer) -> tuple[MangwaleError, bool]:
    """The error an answer of 400 or more describes, and whether it is in mangwale's error body."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    return from_response(resp.status_code, body), is_error_body(body)


def _checked(resp: Answer) -> Answer:
    if _is_redirect(resp):
        # mangwale never redirects, and neither path follows one: an http:// URL of an https
        # site, a login page, a path of another server's.
        raise _Foreign(resp, MangwaleError(f"HTTP {resp.status_code}"))
    if resp.status_code >= 400:
        error, ours = _error_of(resp)
        if not ours or error.code == NO_ROUTE:
            # No route: mangwale answered, but perhaps at a wrong path of the URL, which
            # /healthz (at the same path) tells apart from a route an older server lacks.
            raise _Foreign(resp, error)
        raise error
    return resp


def _is_redirect(resp: Answer) -> bool:
    return 300 <= resp.status_code < 400


def _is_health(resp: Answer) -> bool:
    """Whether a ``/healthz`` answer is mangwale's."""
    try:
        doc = resp.json()
    except ValueError:
        return False
    return resp.status_code == 200 and isinstance(doc, dict) and {"version", "headSeq"} <= doc.keys()


def _not_mangwale(url: str, foreign: _Foreign) -> NotMangwale:
    resp = foreign.resp
    req = resp.request
    server = resp.headers.get("server")
    if foreign.error.code == NO_ROUTE:
        return NotMangwale(
            f"{url} is not the root of a mangwale server (it has no {req.method} {req.url.path}):"
            " give http://HOST:PORT, without a path, in --url / MANGWALE_URL",
            answered=resp.status_code,
        )
    if _is_redirect(resp):
        location = resp.headers.get("location")
        said = f"HTTP {resp.status_code}, a redirect" + (f" to {location[:80]}" if location else "")
    elif resp.status_code >= 400:
        said = f"HTTP {resp.status_code}"
    else:
        said = "something that is not JSON"
    return NotMangwale(
        f"{url} does not look like a mangwale server ({req.method} {req.url.path} answered {said}"
        + (f"; server: {server[:40]}" if server else "")
        + "): check --url / MANGWALE_URL",
        answered=resp.status_code,
    )


def _not_json(resp: Answer, method: str, path: str) -> _Foreign:
    return _Foreign(resp, MangwaleError(f"{method} {path}: the server sent something that is not JSON"))


class Client:
    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = check_url(url or default_url())
        self.timeout = timeout
        self._headers = _headers(token)
        self._transport = transport
        self._direct = transport is None and direct_path()
        self._httpx: httpx.Client | None = None

    @property
    def _http(self) -> httpx.Client:
        """The httpx client, made (and httpx imported) on first use."""
        if self._httpx is None:
            import httpx

            self._httpx = httpx.Client(
                base_url=self.url, headers=self._headers, timeout=self.timeout, transport=self._transport,
                verify=_verify(self.url),
            )
        return self._httpx

    def close(self) -> None:
        if self._httpx is not None:
            self._httpx.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ws_url(self) -> str:
        return ws_url_for(self.url)

    # --- plumbing ---------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        try:
            return self._request(method, path, **kwargs)
        except _Foreign as foreign:
            raise self._foreign(foreign) from None

    def _send(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None,
        headers: dict[str, str] | None = None, timeout: float | None = None,
    ) -> Answer:
        """One request on this client's path (see the module's docstring); no answer at all is
        ``Unreachable``."""
        timeout = self.timeout if timeout is None else timeout
        if self._direct:
            from .stdhttp import send

            try:
                return send(
                    self.url, method, path, params=params, json=json, headers={**self._headers, **(headers or {})},
                    timeout=timeout, context=tls_context() if self.url.startswith("https://") else None,
                )
            except (OSError, http.client.HTTPException) as exc:
                raise _transport_error(self.url, method, path, exc) from None
        import httpx

        try:
            return self._http.request(method, path, params=params, json=json, headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            raise _transport_error(self.url, method, path, exc) from None

    def _request(self, method: str, path: str, **kwargs: Any) -> Answer:
        return _checked(self._send(method, path, **kwargs))

    def _foreign(self, foreign: _Foreign) -> MangwaleError:
        """The error for an answer no mangwale server gives: ``NotMangwale`` unless ``/healthz``
        says mangwale is there after all (a proxy between answered), then the plain error. A
        redirect is ``NotMangwale`` either way: mangwale never sends one."""
        if _is_redirect(foreign.resp):
            return _not_mangwale(self.url, foreign)
        try:
            mangwale = _is_health(self._send("GET", "/healthz", timeout=5))
        except Unreachable:
            mangwale = False
        return foreign.error if mangwale else _not_mangwale(self.url, foreign)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._request(method, path, **kwargs)
            if resp.status_code == 204 or not resp.content:
                return None
            try:
                return resp.json()
            except ValueError:
                raise _not_json(resp, method, path) from None
        except _Foreign as foreign:
            raise self._foreign(foreign) from None

    # --- datasets ---------------------------------------------------------------------------

    def list_datasets(self) -> list[dict[str, Any]]:
        return self._json("GET", "/training/datasets")

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._json("GET", _dataset(dataset_id))

    def create_dataset(
        self, name: str, examples: list[dict[str, Any]], description: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "examples": examples}
        if description:
            body["description"] = description
        return self._json("POST", "/training/datasets", json=body)

    def find_dataset(self, ref: str) -> dict[str, Any]:
        """The dataset (summary) whose id, else whose name, is ``ref``. ``NotFound`` when none
        matches; ``InvalidInput`` when several datasets share that name, or ``ref`` is empty."""
        _dataset(ref)  # an empty ref names nothing, whatever the server holds
        rows = self.list_datasets()
        for d in rows:
            if d.get("id") == ref:
                return d
        named = [d for d in rows if d.get("name") == ref]
        if len(named) > 1:
            ids = ", ".join(d["id"] for d in named[:5])
            raise InvalidInput(f"{len(named)} datasets are named {ref!r} ({ids}); give the id", field="datasetId")
        if not named:
            raise NotFound(f"dataset {ref} not found (no dataset has that id or name)", field="datasetId")
        return named[0]

    def update_dataset(self, dataset_id: str, **changes: Any) -> dict[str, Any]:
        return self._json("PUT", _dataset(dataset_id), json=changes)

    def delete_dataset(self, dataset_id: str) -> None:
        self._json("DELETE", _dataset(dataset_id))

    # --- jobs -------------------------------------------------------------------------------

    def list_workers(self) -> list[dict[str, Any]]:
        return self._json("GET", "/workers")

    def list_kinds(self) -> list[dict[str, Any]]:
        return self._json("GET", "/training/kinds")

    def create_job(
        self,
        kind: str,
        dataset_id: str | None = None,
        *,
        params: dict[str, Any] | None = None,
        agent_id: str | None = None,
        idempotency_key: str | None = None,
        labels: list[str] | None = None,
    ) -> dict[str, Any]:
        bad = non_finite(params)
        if bad:
            raise InvalidInput(
                f"params.{bad} is not a finite number: JSON has no NaN or Infinity", field=f"params.{bad}"
            )
        body: dict[str, Any] = {"kind": kind}
        if dataset_id is not None:
            body["datasetId"] = dataset_id
        if agent_id is not None:
            body["agentId"] = agent_id
        if params:
            body["params"] = params
        if labels:
            body["labels"] = labels
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/training/jobs", json=body, headers=headers)

    def list_jobs(
        self, *, statuses: list[str] | None = None, limit: int | None = None, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of jobs, newest first, and the cursor of the next page (or None)."""
        params: dict[str, Any] = {}
        if statuses:
            params["status"] = ",".join(statuses)
        if limit:
            params["limit"] = limit
        if cursor:
            params["cursor"] = cursor
        resp = self.request("GET", "/training/jobs", params=params)
        return self._decode(resp, "GET", "/training/jobs"), resp.headers.get("X-Next-Cursor")

    def all_jobs(self, *, statuses: list[str] | None = None, page: int = 1000, cursor: str | None = None) -> list[dict[str, Any]]:
        """Every job (after ``cursor``, if given), newest first, fetched page by page."""
        rows: list[dict[str, Any]] = []
        while True:
            batch, cursor = self.list_jobs(statuses=statuses, limit=page, cursor=cursor)
            rows.extend(batch)
            if not cursor:
                return rows

    def _decode(self, resp: Answer, method: str, path: str) -> Any:
        try:
            return resp.json()
        except ValueError:
            raise self._foreign(_not_json(resp, method, path)) from None

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", _job(job_id))

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"{_job(job_id)}/cancel")

    def delete_job(self, job_id: str) -> None:
        self._json("DELETE", _job(job_id))

    def prune_jobs(
        self, *, older_than: str | None = None, keep: int | None = None, statuses: list[str] | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"dryRun": dry_run}
        if older_than is not None:
            body["olderThan"] = older_than
        if keep is not None:
            body["keep"] = keep
        if statuses:
            body["status"] = statuses
        return self._json("POST", "/training/jobs/prune", json=body)

    def job_events(self, job_id: str, since: int = 0) -> list[dict[str, Any]]:
        return self._json("GET", f"{_job(job_id)}/events", params={"since": since})

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")

    # --- training output --------------------------------------------------------------------

    def job_logs(self, job_id: str, since: int = 0) -> list[dict[str, Any]]:
        """The job's stored log lines with ``lineNo > since``, oldest first."""
        return self._json("GET", f"{_job(job_id)}/logs", params={"since": since})

    def job_metrics(self, job_id: str) -> list[dict[str, Any]]:
        """Every metrics report of the job (its training curve), oldest first."""
        return self._json("GET", f"{_job(job_id)}/metrics")

    def predict(self, job_id: str, text: str) -> dict[str, Any]:
        """Classify ``text`` with the model of a succeeded nlu-train / fine-tune job."""
        return self._json("POST", f"{_job(job_id)}/predict", json={"text": text})

    def download_artifact(self, job_id: str, dest: Path, *, overwrite: bool = False) -> int:
        """Stream the job's model into ``dest`` and return its size. The bytes go to a temp file
        beside ``dest``, moved there only once complete: ``dest`` is never half written. An
        existing ``dest`` is an ``InvalidInput`` unless ``overwrite`` (checked before the
        download, and again, atomically, when the file is put in place)."""
        return self._download(f"{_job(job_id)}/artifact", Path(dest), overwrite)

    def list_artifacts(self, job_id: str) -> list[dict[str, Any]]:
        """The files a job left (``name``, ``size``, ``sha256`` or None), by name."""
        return self._json("GET", f"{_job(job_id)}/artifacts")

    def download_file(self, job_id: str, name: str, dest: Path | BinaryIO, *, overwrite: bool = False) -> int:
        """Stream one file of a job into ``dest`` (a path, written as ``download_artifact`` does,
        or an open binary stream such as stdout) and return its size."""
        if "/" in name:
            raise InvalidInput(f"artifact name {name!r} holds a '/'; artifact names never do", field="name")
        path = f"{_job(job_id)}/artifacts/{seg(name)}"
        if isinstance(dest, (str, Path)):
            return self._download(path, Path(dest), overwrite)
        return self._stream(path, dest)

    def _stream(self, path: str, out: BinaryIO) -> int:
        """GET ``path`` and copy its body to ``out`` as it comes; returns the bytes copied."""
        import httpx  # a download streams: httpx's path, whichever the client's

        size = 0
        try:
            with self._http.stream("GET", path) as resp:
                if resp.status_code >= 300:
                    resp.read()
                    _checked(resp)
                for chunk in resp.iter_bytes():
                    out.write(chunk)
                    size += len(chunk)
                expected = resp.headers.get("content-length")
                if expected is not None and expected.isdigit() and int(expected) != size:
                    raise Unreachable(f"GET {self.url}{path}: the connection closed after {size} of {expected} bytes")
            out.flush()
        except _Foreign as foreign:
            raise self._foreign(foreign) from None
        except httpx.HTTPError as exc:
            raise _transport_error(self.url, "GET", path, exc) from None
        return size

    def _download(self, path: str, dest: Path, overwrite: bool) -> int:
        """GET ``path`` into ``dest``, atomically (see ``download_artifact``)."""
        if not overwrite and (dest.exists() or dest.is_symlink()):
            raise _exists(dest)
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                size = self._stream(path, f)
                os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp, dest)
            else:
                os.link(tmp, dest)  # fails if dest appeared meanwhile, where a rename would replace it
        except FileExistsError:
            raise _exists(dest) from None
        except OSError as exc:
            raise InvalidInput(f"cannot write {dest}: {exc.strerror or exc}", field="output") from None
        finally:
            tmp.unlink(missing_ok=True)
        return size


def _exists(dest: Path) -> InvalidInput:
    return InvalidInput(f"{dest} already exists; pass --force to replace it", field="output")


class AsyncClient:
    """The asyncio twin of ``Client`` for the calls a follower makes while it streams."""

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        import httpx

        self.url = check_url(url or default_url())
        self.headers = _headers(token)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout, transport=transport)

    @property
    def ws_url(self) -> str:
        return ws_url_for(self.url)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._request(method, path, **kwargs)
        except _Foreign as foreign:
            raise await self._foreign(foreign) from None

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        import httpx

        try:
            resp = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _transport_error(self.url, method, path, exc) from None
        return _checked(resp)  # type: ignore[return-value]  # _checked returns what it is given

    async def _foreign(self, foreign: _Foreign) -> MangwaleError:
        """As ``Client._foreign``."""
        import httpx

        if _is_redirect(foreign.resp):
            return _not_mangwale(self.url, foreign)
        try:
            mangwale = _is_health(await self._http.get("/healthz", timeout=5))
        except httpx.HTTPError:
            mangwale = False
        return foreign.error if mangwale else _not_mangwale(self.url, foreign)

    async def not_mangwale(self) -> NotMangwale | None:
        """Who answered a WebSocket handshake with something other than the upgrade: the
        ``NotMangwale`` error when ``/healthz`` is not mangwale's either, None when it is (or
        when nothing answers it now: a server going away, to be retried)."""
        import httpx

        try:
            resp = await self._http.get("/healthz", timeout=5)
        except httpx.HTTPError:
            return None
        if _is_health(resp):
            return None
        return _not_mangwale(self.url, _Foreign(resp, _error_of(resp)[0]))

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = await self._request(method, path, **kwargs)
            try:
                return resp.json()
            except ValueError:
                raise _not_json(resp, method, path) from None
        except _Foreign as foreign:
            raise await self._foreign(foreign) from None

    async def get_job(self, job_id: str) -> dict[str, Any]:
        return await self._json("GET", _job(job_id))

    async def list_jobs(self, *, statuses: list[str] | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """The newest jobs first (one page)."""
        params: dict[str, Any] = {}
        if statuses:
            params["status"] = ",".join(statuses)
        if limit:
            params["limit"] = limit
        return await self._json("GET", "/training/jobs", params=params)

    async def job_events(self, job_id: str, since: int = 0) -> list[dict[str, Any]]:
        return await self._json("GET", f"{_job(job_id)}/events", params={"since": since})

    async def job_logs(self, job_id: str, since: int = 0) -> list[dict[str, Any]]:
        return await self._json("GET", f"{_job(job_id)}/logs", params={"since": since})

    async def health(self) -> dict[str, Any]:
        return await self._json("GET", "/healthz")

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        return await self._json("POST", f"{_job(job_id)}/cancel")

    # --- a remote worker's calls (docs/protocol.md, "Workers") ---------------------------------

    async def worker_dataset(self, worker_id: str, secret: str, job_id: str) -> dict[str, Any]:
        """The dataset of a job this worker holds (409 ``stale`` when it does not)."""
        path = f"/workers/{seg(worker_id)}/jobs/{seg(job_id)}/dataset"
        return await self._json("GET", path, headers={"X-Mangwale-Worker-Secret": secret})

    async def worker_base_model(self, worker_id: str, secret: str, job_id: str, dest: Path) -> int:
        """Stream the base model of a fine-tune job this worker holds into ``dest`` (a temp file
        beside it, renamed in once complete); returns its size. 409 ``stale`` when the worker
        does not hold the job."""
        import httpx

        path = f"/workers/{seg(worker_id)}/jobs/{seg(job_id)}/base-model"
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}-{id(dest)}")
        size = 0
        try:
            async with self._http.stream("GET", path, headers={"X-Mangwale-Worker-Secret": secret}) as resp:
                if resp.status_code >= 300:
                    await resp.aread()
                    _checked(resp)
                with tmp.open("wb") as f:
                    async for chunk in resp.aiter_bytes():
                        f.write(chunk)
                        size += len(chunk)
            os.replace(tmp, dest)
        except _Foreign as foreign:
            raise await self._foreign(foreign) from None
        except httpx.HTTPError as exc:
            raise _transport_error(self.url, "GET", path, exc) from None
        finally:
            tmp.unlink(missing_ok=True)
        return size

    async def upload_artifact(self, job_id: str, name: str, path: Path, *, holder: str, token: int, chunk: int = 1 << 20) -> None:
        """Upload one file of a job this worker holds, as a stream: ``PUT
        /training/jobs/{id}/artifacts/{name}`` with the lease (``X-Mangwale-Lease:
        HOLDER:TOKEN``), the file's sha256 (``X-Content-SHA256``) and its ``Content-Length``.
        The server answers 201, or 400 (bad headers), 409 (not the lease holder), 413 (over
        ``artifacts.max_size``) or 422 (a digest mismatch, or a file it refuses to keep)."""
        import hashlib

        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
                size += len(block)

        async def body() -> Any:
            with path.open("rb") as fh:
                while block := fh.read(chunk):
                    yield block

        headers = {
            "X-Mangwale-Lease": f"{holder}:{token}",
            "X-Content-SHA256": digest.hexdigest(),
            "Content-Length": str(size),
            "Content-Type": "application/octet-stream",
        }
        await self.request("PUT", f"{_job(job_id)}/artifacts/{seg(name)}", content=body(), headers=headers)
