"""The Python client for a mangwale server: REST over httpx, errors as ``MangwaleError``.

The CLI is a thin layer over this class. Every method returns decoded wire dicts.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from . import __version__
from .errors import MangwaleError, Unreachable, from_response

DEFAULT_URL = "http://localhost:8080"


def default_url() -> str:
    return os.environ.get("MANGWALE_URL") or DEFAULT_URL


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
        headers = {"User-Agent": f"mangwale/{__version__}"}
        token = token or os.environ.get("MANGWALE_TOKEN")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ws_url(self) -> str:
        if self.url.startswith("https://"):
            return "wss://" + self.url[len("https://") :] + "/ws/training"
        return "ws://" + self.url.removeprefix("http://") + "/ws/training"

    # --- plumbing ---------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise Unreachable(
                f"cannot connect to {self.url}: is `mangwale serve` running there? (set --url or MANGWALE_URL)"
            ) from None
        except httpx.TimeoutException:
            raise Unreachable(f"{self.url} did not answer {method} {path} in time") from None
        except httpx.HTTPError as exc:
            raise Unreachable(f"{method} {self.url}{path} failed: {exc}") from None
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = None
            raise from_response(resp.status_code, body)
        return resp

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
        return self._json("GET", "/training/datasets")  # type: ignore[no-any-return]

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._json("GET", f"/training/datasets/{dataset_id}")  # type: ignore[no-any-return]

    def create_dataset(
        self, name: str, examples: list[dict[str, Any]], description: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "examples": examples}
        if description:
            body["description"] = description
        return self._json("POST", "/training/datasets", json=body)  # type: ignore[no-any-return]

    def update_dataset(self, dataset_id: str, **changes: Any) -> dict[str, Any]:
        return self._json("PUT", f"/training/datasets/{dataset_id}", json=changes)  # type: ignore[no-any-return]

    def delete_dataset(self, dataset_id: str) -> None:
        self._json("DELETE", f"/training/datasets/{dataset_id}")

    # --- jobs -------------------------------------------------------------------------------

    def list_kinds(self) -> list[dict[str, Any]]:
        return self._json("GET", "/training/kinds")  # type: ignore[no-any-return]

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
        return self._json("POST", "/training/jobs", json=body, headers=headers)  # type: ignore[no-any-return]

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
        return self._json("GET", f"/training/jobs/{job_id}")  # type: ignore[no-any-return]

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/training/jobs/{job_id}/cancel")  # type: ignore[no-any-return]

    def delete_job(self, job_id: str) -> None:
        self._json("DELETE", f"/training/jobs/{job_id}")

    def job_events(self, job_id: str, since: int = 0) -> list[dict[str, Any]]:
        return self._json("GET", f"/training/jobs/{job_id}/events", params={"since": since})  # type: ignore[no-any-return]

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")  # type: ignore[no-any-return]
