"""The Python client for a mangwale server: REST over httpx, errors as ``MangwaleError``.

The CLI is a thin layer over ``Client``. Every method returns decoded wire dicts.
``AsyncClient`` is its asyncio twin for the few calls a live follower (``follow.Follower``)
makes between WebSocket messages; both map transport failures and error bodies the same way.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any, Self

import httpx

from . import __version__
from .errors import InvalidInput, MangwaleError, Unreachable, from_response

DEFAULT_URL = "http://localhost:8080"


def default_url() -> str:
    return os.environ.get("MANGWALE_URL") or DEFAULT_URL


def ws_url_for(url: str) -> str:
    """The WebSocket URL of the server at ``url`` (http -> ws, https -> wss)."""
    url = url.rstrip("/")
    if url.startswith("https://"):
        return "wss://" + url[len("https://") :] + "/ws/training"
    return "ws://" + url.removeprefix("http://") + "/ws/training"


def _headers(token: str | None) -> dict[str, str]:
    headers = {"User-Agent": f"mangwale/{__version__}"}
    token = token or os.environ.get("MANGWALE_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _verify(url: str) -> ssl.SSLContext | bool:
    """TLS verification for ``url``. httpx builds its default context (loading every CA
    certificate: ~40 ms of a one-shot command) even for a plain-http server, which never uses it;
    there, an empty context stands in. Should anything ever lead to TLS with it (a TLS proxy from
    the environment), it trusts no CA and so fails closed."""
    if url.startswith("http://"):
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return True


def _transport_error(url: str, method: str, path: str, exc: httpx.HTTPError) -> Unreachable:
    if isinstance(exc, httpx.ConnectError):
        return Unreachable(
            f"cannot connect to {url}: is `mangwale serve` running there? (set --url or MANGWALE_URL)"
        )
    if isinstance(exc, httpx.TimeoutException):
        return Unreachable(f"{url} did not answer {method} {path} in time")
    return Unreachable(f"{method} {url}{path} failed: {exc}")


def _checked(resp: httpx.Response) -> httpx.Response:
    if resp.status_code >= 400:
        try:
            body = resp.json()
        except ValueError:
            body = None
        raise from_response(resp.status_code, body)
    return resp


class Client:
    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or default_url()).rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, headers=_headers(token), timeout=timeout, transport=transport, verify=_verify(self.url)
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ws_url(self) -> str:
        return ws_url_for(self.url)

    # --- plumbing ---------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _transport_error(self.url, method, path, exc) from None
        return _checked(resp)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.request(method, path, **kwargs)
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise MangwaleError(f"{method} {path}: the server sent something that is not JSON") from None

    # --- datasets ---------------------------------------------------------------------------

    def list_datasets(self) -> list[dict[str, Any]]:
        return self._json("GET", "/training/datasets")

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._json("GET", f"/training/datasets/{dataset_id}")

    def create_dataset(
        self, name: str, examples: list[dict[str, Any]], description: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "examples": examples}
        if description:
            body["description"] = description
        return self._json("POST", "/training/datasets", json=body)

    def update_dataset(self, dataset_id: str, **changes: Any) -> dict[str, Any]:
        return self._json("PUT", f"/training/datasets/{dataset_id}", json=changes)

    def delete_dataset(self, dataset_id: str) -> None:
        self._json("DELETE", f"/training/datasets/{dataset_id}")

    # --- jobs -------------------------------------------------------------------------------

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
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": kind}
        if dataset_id is not None:
            body["datasetId"] = dataset_id
        if agent_id is not None:
            body["agentId"] = agent_id
        if params:
            body["params"] = params
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
        return resp.json(), resp.headers.get("X-Next-Cursor")

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/training/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/training/jobs/{job_id}/cancel")

    def delete_job(self, job_id: str) -> None:
        self._json("DELETE", f"/training/jobs/{job_id}")

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
        return self._json("GET", f"/training/jobs/{job_id}/events", params={"since": since})

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")

    # --- training output --------------------------------------------------------------------

    def job_logs(self, job_id: str, since: int = 0) -> list[dict[str, Any]]:
        """The job's stored log lines with ``lineNo > since``, oldest first."""
        return self._json("GET", f"/training/jobs/{job_id}/logs", params={"since": since})

    def job_metrics(self, job_id: str) -> list[dict[str, Any]]:
        """Every metrics report of the job (its training curve), oldest first."""
        return self._json("GET", f"/training/jobs/{job_id}/metrics")

    def predict(self, job_id: str, text: str) -> dict[str, Any]:
        """Classify ``text`` with the model of a succeeded nlu-train / fine-tune job."""
        return self._json("POST", f"/training/jobs/{job_id}/predict", json={"text": text})

    def download_artifact(self, job_id: str, dest: Path) -> int:
        """Stream the job's model into ``dest`` and return its size. The bytes go to a temp file
        beside ``dest``, renamed over it only once complete: ``dest`` is never half written."""
        path = f"/training/jobs/{job_id}/artifact"
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
        size = 0
        try:
            with self._http.stream("GET", path) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _checked(resp)
                with open(tmp, "wb") as f:
                    for chunk in resp.iter_bytes():
                        f.write(chunk)
                        size += len(chunk)
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, dest)
        except httpx.HTTPError as exc:
            raise _transport_error(self.url, "GET", path, exc) from None
        except OSError as exc:
            raise InvalidInput(f"cannot write {dest}: {exc.strerror or exc}", field="output") from None
        finally:
            tmp.unlink(missing_ok=True)
        return size


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
        self.url = (url or default_url()).rstrip("/")
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
            resp = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _transport_error(self.url, method, path, exc) from None
        return _checked(resp)

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = await self.request(method, path, **kwargs)
        try:
            return resp.json()
        except ValueError:
            raise MangwaleError(f"{method} {path}: the server sent something that is not JSON") from None

    async def get_job(self, job_id: str) -> dict[str, Any]:
        return await self._json("GET", f"/training/jobs/{job_id}")

    async def list_jobs(self, *, statuses: list[str] | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """The newest jobs first (one page)."""
        params: dict[str, Any] = {}
        if statuses:
            params["status"] = ",".join(statuses)
        if limit:
            params["limit"] = limit
        return await self._json("GET", "/training/jobs", params=params)

    async def job_events(self, job_id: str, since: int = 0) -> list[dict[str, Any]]:
        return await self._json("GET", f"/training/jobs/{job_id}/events", params={"since": since})

    async def job_logs(self, job_id: str, since: int = 0) -> list[dict[str, Any]]:
        return await self._json("GET", f"/training/jobs/{job_id}/logs", params={"since": since})

    async def health(self) -> dict[str, Any]:
        return await self._json("GET", "/healthz")

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        return await self._json("POST", f"/training/jobs/{job_id}/cancel")
