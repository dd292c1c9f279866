"""One-shot requests over the standard library's ``http.client``: ``Client``'s direct path.

A one-shot command (``mangwale jobs create -q``) spent more time importing httpx (httpcore, h11,
anyio, idna, certifi, urllib.request: ~50 ms) than sending its request. ``Client`` sends through
``send`` here instead whenever httpx would open a direct connection itself: no proxy named in the
environment, no transport injected (``client.direct_path``). Everything else is shared with the
httpx path and lives in ``client.py``: the URL and its encoded path, the query string's encoding
(``query``, as httpx encodes it), the headers, the JSON body (encoded as httpx encodes it), the
timeout, the TLS context (``client.tls_context``, httpx's own rules) and the mapping of failures
and answers to ``MangwaleError``. ``MANGWALE_HTTP=httpx`` sends every request through httpx.

Each request has its own connection (``Connection: close``): a one-shot command makes one or two,
and a connection the server dropped while idle is never reused.
"""

from __future__ import annotations

import http.client
import json as jsonlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, quote, urlsplit

if TYPE_CHECKING:
    import ssl


class ConnectFailed(OSError):
    """No connection was made: refused, no route, no such host, or the TLS handshake failed
    (httpx's ``ConnectError``)."""


@dataclass(frozen=True)
class SentRequest:
    """What was sent, as ``httpx.Request`` names it (``method``, ``url.path``)."""

    method: str
    url: SplitResult


class Reply:
    """An answer, with the attributes of ``httpx.Response`` that ``Client`` reads."""

    def __init__(self, request: SentRequest, status_code: int, headers: http.client.HTTPMessage, content: bytes) -> None:
        self.request = request
        self.status_code = status_code
        self.headers = headers  # case-insensitive .get(), as httpx.Headers
        self.content = content

    def json(self) -> Any:
        """The body as JSON; ``ValueError`` when it is not (as ``httpx.Response.json``)."""
        return jsonlib.loads(self.content)


def _param(value: Any) -> str:
    """A query value as httpx writes it (``primitive_value_to_str``)."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return ""
    return str(value)


def query(params: Mapping[str, Any] | None) -> str:
    """``params`` as a query string, encoded as httpx encodes it: every reserved character
    percent-encoded, a space as ``+``."""
    if not params:
        return ""
    return "&".join(f"{quote(str(k), safe='')}={quote(_param(v), safe='')}" for k, v in params.items()).replace("%20", "+")


def body_of(json: Any) -> bytes:
    """A JSON request body, byte for byte what httpx sends for ``json=``."""
    return jsonlib.dumps(json, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def send(
    base_url: str,
    method: str,
    path: str,
    *,
    headers: Mapping[str, str],
    timeout: float,
    params: Mapping[str, Any] | None = None,
    json: Any = None,
    context: ssl.SSLContext | None = None,
) -> Reply:
    """Send one request to ``base_url`` + ``path`` and read the whole answer.

    Raises ``ConnectFailed`` when no connection is made, ``TimeoutError`` when ``timeout``
    seconds pass on connecting, sending or any read, and another ``OSError`` or an
    ``http.client.HTTPException`` when the connection fails after it is made.
    """
    qs = query(params)
    url = urlsplit(base_url + path + (f"?{qs}" if qs else ""))
    sent = dict(headers)
    body = None
    if json is not None:
        body = body_of(json)
        sent["Content-Type"] = "application/json"
    sent.setdefault("Accept", "*/*")
    sent["Connection"] = "close"
    conn: http.client.HTTPConnection
    if url.scheme == "https":
        conn = http.client.HTTPSConnection(url.hostname or "", url.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)
    try:
        try:
            conn.connect()
        except TimeoutError:
            raise
        except OSError as exc:
            raise ConnectFailed(exc.strerror or str(exc)) from exc
        conn.request(method, url.path + (f"?{url.query}" if url.query else ""), body=body, headers=sent)
        resp = conn.getresponse()
        return Reply(SentRequest(method, url), resp.status, resp.headers, resp.read())
    finally:
        conn.close()
