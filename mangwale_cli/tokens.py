"""API tokens: minting, hashing, the ``[auth.tokens]`` table, and the check a credential goes through.

A token is ``mw_`` followed by 43 base64url characters (256 random bits). The server keeps only
its SHA-256 (hex), so the config file is not a secret worth stealing; a presented token is
hashed and compared with every configured hash by ``hmac.compare_digest``.

Config (the server's ``--config`` file, or the file named by ``auth.tokens_file`` /
``$MANGWALE_TOKENS_FILE``, which holds the same ``[auth.tokens]`` table)::

    [auth.tokens]
    ci        = { sha256 = "9f2c...", scopes = ["read", "write"] }
    dashboard = { sha256 = "41d0...", scopes = ["read"] }

Scopes: ``read`` (list, show, watch, SSE, predict), ``write`` (create, change, cancel and delete
jobs and datasets), ``worker`` (a remote worker: take jobs, read what they need, report on
them, upload their artifacts; nothing else) and ``admin`` (every scope). No token configured anywhere means auth is off.

Browsers cannot set headers on a WebSocket, so they offer two subprotocols: ``mangwale.v1`` and
``mangwale.bearer.<the token in base64url without padding>``. The server selects ``mangwale.v1``
and never echoes the token. No module here imports the web framework.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import ConfigError

TOKEN_PREFIX = "mw_"
BEARER_SUBPROTOCOL_PREFIX = "mangwale.bearer."
MAX_TOKEN_LENGTH = 512  # longer credentials are refused unhashed
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class Scope(str, Enum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"
    WORKER = "worker"  # take jobs, read what they need, report on them: nothing else


@dataclass(frozen=True)
class Token:
    """A configured token: its name (for logs and messages), hash and scopes."""

    name: str
    sha256: str
    scopes: frozenset[Scope]

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes


@dataclass(frozen=True)
class TokenSet:
    """Every token the server accepts. Empty: authentication is off."""

    tokens: tuple[Token, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def verify(self, presented: str) -> Token | None:
        """The token ``presented`` matches, or None. Compares against every hash, no early exit."""
        if not presented or len(presented) > MAX_TOKEN_LENGTH:
            return None
        digest = hash_token(presented)
        found = None
        for token in self.tokens:
            if hmac.compare_digest(token.sha256, digest):
                found = token
        return found


# --- minting -------------------------------------------------------------------------------------


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def mint() -> str:
    """A new random token (never stored by mangwale: the caller prints it once)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ConfigError(
            f"token name {name!r} must be 1-64 letters, digits, '-' or '_'", field="name"
        )
    return name


def parse_scopes(
    values: Iterable[str], where: str = "--scope", field: str = "scope"
) -> frozenset[Scope]:
    allowed = ", ".join(s.value for s in Scope)
    out = set()
    for v in values:
        try:
            out.add(Scope(v))
        except ValueError:
            raise ConfigError(
                f"{where}: unknown scope {v!r} (use {allowed})", field=field
            ) from None
    if not out:
        raise ConfigError(f"{where}: give at least one scope ({allowed})", field=field)
    return frozenset(out)


def toml_line(name: str, digest: str, scopes: Iterable[Scope]) -> str:
    """The ``[auth.tokens]`` entry for a token, as ``mangwale tokens create`` prints it."""
    order = [s for s in Scope if s in set(scopes)]
    listed = ", ".join(f'"{s.value}"' for s in order)
    return f'{name} = {{ sha256 = "{digest}", scopes = [{listed}] }}'


# --- WebSocket subprotocol carrier ---------------------------------------------------------------


def bearer_subprotocol(token: str) -> str:
    """``mangwale.bearer.<base64url(token), no padding>``: how a browser offers its token."""
    encoded = base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
    return BEARER_SUBPROTOCOL_PREFIX + encoded


class BadCredential(ValueError):
    """A credential is present but malformed (not base64url, not UTF-8, two of them...)."""


def token_from_subprotocols(offered: Iterable[str]) -> str | None:
    """The token carried by a ``mangwale.bearer.*`` subprotocol, or None if none is offered."""
    found = [p for p in offered if p.startswith(BEARER_SUBPROTOCOL_PREFIX)]
    if not found:
        return None
    if len(found) > 1:
        raise BadCredential("more than one mangwale.bearer subprotocol offered")
    encoded = found[0][len(BEARER_SUBPROTOCOL_PREFIX) :]
    if (
        not encoded
        or len(encoded) > MAX_TOKEN_LENGTH * 2
        or not re.fullmatch(r"[A-Za-z0-9_-]+", encoded)
    ):
        raise BadCredential("the mangwale.bearer subprotocol is not base64url")
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCredential("the mangwale.bearer subprotocol is not base64url") from None


def token_from_authorization(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None if there is none."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise BadCredential("the Authorization header is not 'Bearer <token>'")
    return value.strip()


# --- configuration -------------------------------------------------------------------------------


def load_tokens(settings: Any) -> TokenSet:
    """Validate ``[auth]`` of the config (``settings.extra["auth"]``) and the tokens file.

    ``ConfigError`` names the file and the key of the first problem. Reads the tokens file on
    every call: the server calls this once at start-up (a change needs a restart).
    """
    where = str(settings.config_file or "config")
    tokens: dict[str, Token] = {}
    section = settings.extra.get("auth")
    if section is not None:
        if not isinstance(section, Mapping):
            raise ConfigError(f"{where}: auth must be an [auth] table", field="auth")
        _read_section(section, where, tokens)
    if settings.tokens_file:
        path = Path(settings.tokens_file).expanduser()
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"tokens file {path} does not exist", field="auth.tokens_file"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"tokens file {path} cannot be read: {exc}", field="auth.tokens_file"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                f"tokens file {path} is not valid TOML: {exc}", field="auth.tokens_file"
            ) from None
        extra = set(raw) - {"auth"}
        if extra:
            raise ConfigError(
                f"{path}: a tokens file holds only [auth.tokens], not {min(extra)!r}",
                field=min(extra),
            )
        body = raw.get("auth", {})
        if not isinstance(body, dict) or set(body) - {"tokens"}:
            raise ConfigError(f"{path}: a tokens file holds only [auth.tokens]", field="auth")
        _read_section(body, str(path), tokens)
    return TokenSet(tuple(tokens.values()))


def _read_section(section: Mapping[str, Any], where: str, into: dict[str, Token]) -> None:
    for key in section:
        if key != "tokens":
            raise ConfigError(f"{where}: unknown setting auth.{key}", field=f"auth.{key}")
    table = section.get("tokens", {})
    if not isinstance(table, Mapping):
        raise ConfigError(
            f"{where}: auth.tokens must be a table of name = {{ sha256, scopes }}",
            field="auth.tokens",
        )
    for name, entry in table.items():
        key = f"auth.tokens.{name}"
        if not NAME_RE.match(name):
            raise ConfigError(
                f"{where}: {key}: a token name is 1-64 letters, digits, '-' or '_'", field=key
            )
        if name in into:
            raise ConfigError(
                f"{where}: {key} is defined twice (config and tokens file)", field=key
            )
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f'{where}: {key} must be {{ sha256 = "...", scopes = [...] }}', field=key
            )
        unknown = set(entry) - {"sha256", "scopes"}
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {key}.{min(unknown)}",
                field=f"{key}.{min(unknown)}",
            )
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not SHA256_RE.match(digest.lower()):
            raise ConfigError(
                f"{where}: {key}.sha256 must be 64 hex digits (the SHA-256 of the token, as "
                "`mangwale tokens create` prints it), not the token itself",
                field=f"{key}.sha256",
            )
        scopes = entry.get("scopes")
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise ConfigError(
                f'{where}: {key}.scopes must be a list such as ["read", "write"]',
                field=f"{key}.scopes",
            )
        into[name] = Token(
            name, digest.lower(), parse_scopes(scopes, f"{where}: {key}.scopes", f"{key}.scopes")
        )


_SECRETS = (
    (re.compile(r"(?i)\b(bearer\s+)(?!realm=|error=|scope=)[^\s\"',;]+"), r"\1<redacted>"),
    (
        re.compile(re.escape(BEARER_SUBPROTOCOL_PREFIX) + r"[^\s\"',;]+"),
        BEARER_SUBPROTOCOL_PREFIX + "<redacted>",
    ),
    (re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{8,}"), TOKEN_PREFIX + "<redacted>"),
)


def redact(text: str) -> str:
    """``text`` with bearer credentials, bearer subprotocols and mangwale tokens blanked out."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, "localhost")."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
