"""Entity tags (RFC 9110 section 8.8.3) and ``If-None-Match`` (section 13.1.2) for GET routes.

A tag is a digest of the body's bytes, so it is strong, and two instances that serve the same
bytes (one Redis) give the same tag without agreeing on anything else. ``If-None-Match`` uses
the weak comparison: ``W/"x"`` matches ``"x"``; ``*`` matches any current representation; a list
matches when one of its tags does. A header that does not parse is ignored (a full 200), never
answered with an error.
"""

from __future__ import annotations

from hashlib import blake2b

from starlette.responses import Response


def etag_of(body: bytes) -> str:
    """The strong entity tag of ``body``: 16 bytes of BLAKE2b, in hex, quoted."""
    return '"' + blake2b(body, digest_size=16).hexdigest() + '"'


def parse_tags(header: str) -> list[str] | None:
    """The opaque tags (quotes kept, ``W/`` dropped) of an ``If-None-Match`` value; ``["*"]`` for
    ``*``; None when it does not parse. An opaque tag may hold commas, so this scans rather than
    splits."""
    text = header.strip()
    if text == "*":
        return ["*"]
    tags: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t,":
            i += 1
            continue
        if text.startswith("W/", i):
            i += 2
        if i >= n or text[i] != '"':
            return None
        end = text.find('"', i + 1)
        if end < 0:
            return None
        tags.append(text[i : end + 1])
        i = end + 1
        if i < n and text[i] not in " \t,":
            return None
    return tags or None


def none_match(header: str | None, etag: str) -> bool:
    """True when ``If-None-Match: header`` matches ``etag``: the answer is then 304."""
    if header is None:
        return False
    tags = parse_tags(header)
    if tags is None:
        return False
    if tags == ["*"]:
        return True
    opaque = etag.removeprefix("W/")
    return opaque in tags


def not_modified(etag: str) -> Response:
    """The 304 of a GET whose tag matched: the tag, no body (section 15.4.5)."""
    return Response(status_code=304, headers={"ETag": etag})


def tagged(body: bytes, if_none_match: str | None, headers: dict[str, str] | None = None) -> Response:
    """A JSON 200 of ``body`` with its ``ETag``, or the 304 when ``If-None-Match`` matches it."""
    etag = etag_of(body)
    if none_match(if_none_match, etag):
        return not_modified(etag)
    return Response(body, media_type="application/json", headers={**(headers or {}), "ETag": etag})
