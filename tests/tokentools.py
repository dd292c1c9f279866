"""Test helpers for servers with API tokens: mint tokens, write the config, remember every token.

``MINTED`` holds each token minted in this test session, so a test can grep server logs for all
of them (``test_auth.test_no_token_appears_in_any_server_log``).
"""

from __future__ import annotations

import base64
from pathlib import Path

from mangwale_cli.tokens import hash_token, mint, parse_scopes, toml_line

MINTED: list[str] = []


def new_token() -> str:
    token = mint()
    MINTED.append(token)
    return token


def tokens_table(tokens: dict[str, tuple[str, list[str]]]) -> str:
    """``[auth.tokens]`` for ``{name: (token, scopes)}``."""
    lines = ["[auth.tokens]"]
    for name, (token, scopes) in tokens.items():
        lines.append(toml_line(name, hash_token(token), parse_scopes(scopes)))
    return "\n".join(lines) + "\n"


def write_config(path: Path, tokens: dict[str, tuple[str, list[str]]], extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(extra + tokens_table(tokens))
    return path


def auth_extra(tokens: dict[str, tuple[str, list[str]]]) -> dict[str, object]:
    """``Settings.extra["auth"]`` as ``read_config_file`` would leave it."""
    return {
        "tokens": {
            name: {"sha256": hash_token(token), "scopes": sorted(scopes)}
            for name, (token, scopes) in tokens.items()
        }
    }


def leak_forms(token: str) -> list[str]:
    """How a token could show up in a log: as is, and as a browser's bearer subprotocol."""
    return [token, base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")]
