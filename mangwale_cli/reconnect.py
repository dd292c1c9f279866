"""When and how soon a follower reconnects: client settings, the backoff generator, and the one
function (``classify``) that decides whether a failure is retried or fatal.

Settings come from the environment, not from the server's settings (they are a client's):
``MANGWALE_BACKOFF_INITIAL`` / ``MANGWALE_BACKOFF_MAX`` (reconnect delays),
``MANGWALE_WATCH_PING_INTERVAL`` / ``MANGWALE_WATCH_PING_TIMEOUT`` (keepalive) and
``MANGWALE_CONNECT_TIMEOUT`` (how long a server never reached is waited for). Bad values fail
loudly with a ``ConfigError`` that names the variable.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import (
    ConfigError,
    Forbidden,
    InvalidInput,
    MangwaleError,
    NotFound,
    NotMangwale,
    Unauthorized,
    Unreachable,
)

_ENV = {
    "backoff_initial": "MANGWALE_BACKOFF_INITIAL",
    "backoff_max": "MANGWALE_BACKOFF_MAX",
    "ping_interval": "MANGWALE_WATCH_PING_INTERVAL",
    "ping_timeout": "MANGWALE_WATCH_PING_TIMEOUT",
    "connect_timeout": "MANGWALE_CONNECT_TIMEOUT",
}


@dataclass(frozen=True)
class FollowSettings:
    """Client-side timings; ``from_env`` reads the ``MANGWALE_*`` variables named in ``_ENV``."""

    backoff_initial: float = 1.0  # first reconnect delay, seconds
    backoff_max: float = 30.0  # the delay doubles up to this
    ping_interval: float = 20.0  # keepalive pings, so a silent network is noticed
    ping_timeout: float = 20.0  # no pong for this long: the connection is dead, reconnect
    # A server never reached in this long is taken for a wrong URL (exit 8); one that was
    # reached and went away is retried by the reconnect rules instead.
    connect_timeout: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FollowSettings:
        env = os.environ if env is None else env
        values: dict[str, float] = {}
        for name, var in _ENV.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"${var} must be a positive number of seconds, got {raw!r}", field=var)
            values[name] = value
        settings = cls(**values)
        if settings.backoff_max < settings.backoff_initial:
            raise ConfigError(
                f"$MANGWALE_BACKOFF_MAX ({settings.backoff_max}) is below $MANGWALE_BACKOFF_INITIAL "
                f"({settings.backoff_initial})",
                field="MANGWALE_BACKOFF_MAX",
            )
        return settings

    def backoff(self) -> Iterator[float]:
        return backoff(self.backoff_initial, self.backoff_max)


def never_reached(url: str, timeout: float, last: str | None = None) -> Unreachable:
    """The error of a client that got no answer from ``url`` within ``--connect-timeout``
    (exit 8): ``watch`` and ``worker`` say it in the same words."""
    tail = f" (last: {last})" if last else ""
    return Unreachable(
        f"cannot reach {url} within {timeout:g} s (--connect-timeout): is `mangwale serve` running there?{tail}"
    )


def backoff(
    initial: float = 1.0,
    maximum: float = 30.0,
    *,
    factor: float = 2.0,
    jitter: float = 0.2,
    rand: Callable[[], float] = random.random,
) -> Iterator[float]:
    """Reconnect delays: ``initial``, doubling, capped at ``maximum``; each one spread by
    +/- ``jitter`` (a fraction) so that clients dropped together do not return together."""
    delay = initial
    while True:
        yield min(maximum, delay * (1 + jitter * (2 * rand() - 1)))
        delay = min(maximum, delay * factor)


RETRYABLE_CLOSE = frozenset({1000, 1001, 1006, 1011, 1012, 1013, 1014, 4408})
FATAL_CLOSE = frozenset({1003, 1007, 1008, 1009, 1010})


def close_code(exc: BaseException) -> int:
    """The close code the server sent (1006 when the connection just died)."""
    rcvd = getattr(exc, "rcvd", None)
    return int(rcvd.code) if rcvd is not None else 1006


def classify(exc: BaseException, server_error: Mapping[str, Any] | None = None) -> MangwaleError | None:
    """The one place that decides what is retried: None for a transient failure (reconnect),
    the fatal ``MangwaleError`` otherwise. Raises ``exc`` itself when it is not a network or
    server answer at all (a bug must not turn into an endless reconnect loop)."""
    from websockets.exceptions import (
        ConnectionClosed,
        InvalidStatus,
        InvalidURI,
        WebSocketException,
    )

    said = (server_error or {}).get("message")
    if isinstance(exc, MangwaleError):
        return exc if isinstance(exc, (Unauthorized, NotFound, InvalidInput)) else None
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        if status in (401, 403):
            cls = Unauthorized if status == 401 else Forbidden
            detail = _error_message(exc.response.body)
            return cls(
                f"the server refused the WebSocket connection (HTTP {status})" + (f": {detail}" if detail else ""),
                status=status,
            )
        if status == 404:
            return NotFound("the server has no WebSocket at /ws/training (HTTP 404): is --url a mangwale server?")
        if 400 <= status < 500 and status not in (408, 429):
            return InvalidInput(f"the server refused the WebSocket connection (HTTP {status})", status=status)
        return None
    if isinstance(exc, InvalidURI):
        return InvalidInput(f"bad server URL: {exc}", field="url")
    if isinstance(exc, ConnectionClosed):
        code = close_code(exc)
        if code in RETRYABLE_CLOSE:
            return None
        if code == 1008:
            return Forbidden(said or "the server refused this connection (close 1008: origin not allowed)")
        if code == 4400 and (server_error or {}).get("code") == "since_in_future":
            return NotFound(said or "since is beyond the newest event", field="since", code="since_in_future")
        if code in FATAL_CLOSE or 4000 <= code < 5000:
            return InvalidInput(said or f"the server closed the connection with {code}", code=f"close_{code}")
        return None
    if isinstance(exc, (OSError, TimeoutError, EOFError, WebSocketException)):
        return None
    raise exc


async def foreign_server(exc: BaseException, rest: Any) -> NotMangwale | None:
    """For a client that has not reached its server yet: the ``NotMangwale`` error (exit 8, at
    once) when ``exc`` shows that what answers at the URL is not mangwale, else None (retried
    until ``--connect-timeout``). A REST answer has been asked about already; a WebSocket
    handshake answered with anything but the upgrade (an HTTP status other than mangwale's own
    401/403, a reply that is not HTTP/1.1) is checked against ``/healthz`` through ``rest``. A proxy's
    502/503/504 is a mangwale not up yet, not another server."""
    from websockets.exceptions import InvalidHandshake, InvalidStatus

    found: NotMangwale | None = None
    if isinstance(exc, NotMangwale):
        found = exc
    elif isinstance(exc, InvalidHandshake) and not (
        # mangwale's own refusal carries its error body; a bare 403 is what a server answers a
        # WebSocket at a path it has no route for (a URL with a stray path, another server).
        isinstance(exc, InvalidStatus) and exc.response.status_code in (401, 403)
        and _error_message(exc.response.body) is not None
    ):
        found = await rest.not_mangwale()
    return found if found is not None and not found.gateway else None


def _error_message(body: bytes | bytearray | None) -> str | None:
    """The ``error.message`` of a JSON error body, if that is what it is."""
    try:
        doc = json.loads(body or b"")
        return str(doc["error"]["message"])
    except (ValueError, TypeError, KeyError):
        return None


def describe_failure(exc: BaseException) -> str:
    """A short reason for the connection indicator ("connection refused", "closed 1012 ...")."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    if isinstance(exc, ConnectionClosed):
        code = close_code(exc)
        if code == 1006:
            return "connection lost"
        reason = exc.rcvd.reason if exc.rcvd is not None else ""
        return f"closed {code}" + (f": {reason}" if reason else "")
    if isinstance(exc, InvalidStatus):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, Unreachable):
        return "server unreachable"
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
