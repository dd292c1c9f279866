"""JSON as mangwale reads it from a client: a request body on the server, ``--params`` and
``-p KEY=VALUE`` on the command line.

``json.loads`` fails on two kinds of input with words that are Python's, not mangwale's, and
without naming the field: an integer of more than 4,300 digits (Python refuses to read longer
ones, as the time it takes grows with the square of the length) and text that is not UTF-8.
``read_json`` reads them far enough to name the field, and raises an ``InvalidInput`` that says
what is wrong in mangwale's words. Standard library only: the command line loads it too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from .errors import InvalidInput

MAX_DIGITS = 4300  # Python's default sys.get_int_max_str_digits(), which bounds json.loads too

# A run already cut by an older server ("1000...") has lost its length: it is not counted.
_LONG_RUN = re.compile(r"\d{25,}(\.\.\.|…)?")


def cut_digits(text: str) -> str:
    """``text`` with each run of more than 24 digits cut to its first ten and its length, as
    ``1000000000…(310 digits)`` (``1000000000…`` when it was cut already): what any error line,
    the server's or the CLI's, shows of a long number."""
    return _LONG_RUN.sub(lambda m: m.group()[:10] + ("…" if m.group(1) else f"…({len(m.group())} digits)"), text)


def too_long(name: str, digits: int, head: str) -> str:
    """How any refusal of a number of more than ``MAX_DIGITS`` digits reads."""
    return f"{name} is a number of {digits} digits ({head[:10]}…); a number may have at most {MAX_DIGITS}"


def _lenient_int(literal: str) -> int | None:
    """An integer literal, or None past ``MAX_DIGITS`` (while only strings are looked for)."""
    return int(literal) if len(literal.lstrip("-")) <= MAX_DIGITS else None


class _TooLong:
    """Stands in for an integer literal of more than ``MAX_DIGITS`` digits while reading."""

    def __init__(self, literal: str) -> None:
        self.digits = len(literal.lstrip("-"))
        self.head = literal[:10]


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    try:  # a byte that was not UTF-8 shows as itself (\xff)
        raw = key.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate a \u escape wrote
        raw = key.encode("utf-8", "surrogatepass")
    key = raw.decode("utf-8", "backslashreplace")
    return f"{path}.{key}" if path else key


def _find(value: Any, path: str, hit: Callable[[Any], bool]) -> tuple[str, Any] | None:
    """The path and value of the first key or value in ``value`` that is a ``hit``."""
    if hit(value):
        return path, value
    items: Any = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if hit(key):
            return _join(path, key), key
        if found := _find(item, _join(path, key), hit):
            return found
    return None


# What can put a surrogate code point in a parsed string: a \u escape of D800-DFFF (a pair of
# them is one character, which json.loads joins; a lone one stays), or one already in the text
# (a command-line argument holding bytes that were not UTF-8). Only a text that has one of
# these is walked.
_MAY_HOLD_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")


def _surrogate(value: Any) -> bool:
    return isinstance(value, str) and any("\ud800" <= ch <= "\udfff" for ch in value)


def not_text(name: str, value: str) -> str:
    """How any refusal of a string holding a lone surrogate reads (it cannot be stored or sent
    as UTF-8, so it is refused where it comes in, never left to fail a write)."""
    ch = next(ch for ch in value if "\ud800" <= ch <= "\udfff")
    return f"{name} holds \\u{ord(ch):04x}, half of a UTF-16 surrogate pair: not a character; send text only"


def find_surrogate(doc: Any) -> tuple[str, str] | None:
    """The path (``params.a[1]``; "" for ``doc`` itself) and the string of the first key or
    string value in ``doc`` that holds a lone surrogate, or None."""
    return _find(doc, "", _surrogate)


def _bad_bytes(value: Any) -> bool:
    """A string holding a byte that was not UTF-8 (decoded with ``surrogateescape``)."""
    return isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value)


def read_json(
    data: str | bytes,
    what: str = "the request body",
    prefix: str = "",
    parse_constant: Callable[[str], Any] | None = None,
) -> Any:
    """``data`` read as ``json.loads`` reads it (NaN and Infinity included: the caller checks
    for them, to name the field). Bytes may be UTF-8, -16 or -32. An integer of more than ``MAX_DIGITS``
    digits, or bytes that are not text in that encoding, raise ``InvalidInput`` naming the field
    (``prefix`` + its path, e.g. ``params.steps``; ``what`` when it is the whole document).
    Anything else that is not JSON raises ``ValueError`` (``json.JSONDecodeError``), as
    ``json.loads`` does; ``parse_constant`` is ``json.loads``'s (to refuse NaN and Infinity)."""
    if isinstance(data, (bytes, bytearray)):
        encoding = json.detect_encoding(data)
        try:
            text = bytes(data).decode(encoding)
        except UnicodeDecodeError as exc:
            raise _not_text(bytes(data), encoding, exc, what, prefix) from None
    else:
        text = data
    unreadable: list[_TooLong] = []

    def parse_int(literal: str) -> int | _TooLong:
        if len(literal.lstrip("-")) <= MAX_DIGITS:
            return int(literal)
        unreadable.append(_TooLong(literal))
        return unreadable[-1]

    doc = json.loads(text, parse_int=parse_int, parse_constant=parse_constant)
    # Only a document that held such a number is walked (to name its field): the usual
    # request body is read at json.loads's cost. A lone surrogate from a \u escape is valid
    # JSON, not a byte that was not UTF-8: only numbers are looked for here.
    found = _find(doc, "", lambda v: isinstance(v, _TooLong)) if unreadable else None
    if found is not None:
        path, value = found
        field = prefix + path if path else (prefix.rstrip(".") or None)
        raise InvalidInput(too_long(field or what, value.digits, value.head), field=field)
    # A lone surrogate (a \u escape of half a pair) is valid JSON but not text: it cannot be
    # written as UTF-8, by the store or by the client sending it on. Refused here, by name.
    if _MAY_HOLD_SURROGATE.search(text) and (lone := find_surrogate(doc)):
        path, value = lone
        field = prefix + path if path else (prefix.rstrip(".") or None)
        raise InvalidInput(not_text(field or what, value), field=field)
    return doc


def _not_text(data: bytes, encoding: str, exc: UnicodeDecodeError, what: str, prefix: str) -> InvalidInput:
    """The error for bytes that are not ``encoding`` text, naming the field whose string holds
    the first bad byte when the document reads as JSON around it."""
    bad = f"byte 0x{data[exc.start]:02x} at offset {exc.start}"
    field = None
    if encoding.startswith("utf-8"):
        try:
            found = _find(json.loads(data.decode(encoding, "surrogateescape"), parse_int=_lenient_int), "", _bad_bytes)
        except ValueError:
            found = None
        if found is not None and found[0]:
            field = prefix + found[0]
    name = field or what
    return InvalidInput(
        f"{name} is not {encoding.upper().removesuffix('-SIG')} text ({bad}): JSON is sent as UTF-8",
        field=field,
        code="invalid_json",
        status=400,
    )
