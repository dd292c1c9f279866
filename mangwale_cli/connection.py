"""Where a client connects, and with what token: ``ClientSettings``, read from flags, then
``MANGWALE_URL`` / ``MANGWALE_TOKEN``, then the default, each checked at start-up.

Apart from ``client.py`` so that the command line can check ``--url`` / ``--token`` before a
command runs without importing httpx.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ConfigError

DEFAULT_URL = "http://localhost:8080"
URL_SETTING = "the server URL (--url / MANGWALE_URL)"


def default_url() -> str:
    return os.environ.get("MANGWALE_URL") or DEFAULT_URL


def check_url(url: str, setting: str = URL_SETTING) -> str:
    """``url`` without its trailing slash, or a ``ConfigError`` (exit 2) naming ``setting`` and
    showing the form it needs. httpx would take ``localhost:8080`` for scheme ``localhost``."""
    if "://" not in url:
        hint = f" (did you mean http://{url}?)" if url and " " not in url else ""
        raise ConfigError(f"{setting} {url!r} has no scheme: give http://HOST:PORT{hint}", field="url")
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed [ of an IPv6 address
        raise ConfigError(f"{setting} {url!r} is not a URL: give http://HOST:PORT", field="url") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(
            f"{setting} {url!r} is not an http:// or https:// URL: give http://HOST:PORT", field="url"
        )
    try:
        port_ok = parts.hostname is not None and (parts.port is None or parts.port > 0)
    except ValueError:
        port_ok = False
    if not port_ok:
        raise ConfigError(f"{setting} {url!r} has no valid host and port: give http://HOST:PORT", field="url")
    return url.rstrip("/")


def check_token(token: str, setting: str = "the token (--token / MANGWALE_TOKEN)") -> str:
    """``token``, or a ``ConfigError`` that names the setting but never shows the value: an
    HTTP header cannot carry spaces, control or non-ASCII characters."""
    if not all("!" <= ch <= "~" for ch in token):
        raise ConfigError(
            f"{setting} holds a space, control or non-ASCII character; an API token has none", field="token"
        )
    return token


@dataclass(frozen=True)
class ClientSettings:
    """Where a client connects and the token it sends: a flag, then ``MANGWALE_URL`` /
    ``MANGWALE_TOKEN``, then the default. ``load`` checks both and names the setting at fault."""

    url: str = DEFAULT_URL
    token: str | None = None

    @classmethod
    def load(cls, url: str | None = None, token: str | None = None, env: Mapping[str, str] | None = None) -> ClientSettings:
        env = os.environ if env is None else env
        if url:
            url = check_url(url, "--url")
        elif env.get("MANGWALE_URL"):
            url = check_url(env["MANGWALE_URL"], "MANGWALE_URL")
        else:
            url = DEFAULT_URL
        if token:
            token = check_token(token, "--token")
        elif env.get("MANGWALE_TOKEN"):
            token = check_token(env["MANGWALE_TOKEN"], "MANGWALE_TOKEN")
        else:
            token = None
        return cls(url=url, token=token)
