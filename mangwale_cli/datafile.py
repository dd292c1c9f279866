"""Parsing of NLU intent dataset files (JSONL, CSV, JSON) for upload.

Every supported format is turned into a list of examples of the form
``{"text": str, "intent": str}``, plus ``"entities"`` when an example
carries entity annotations (``[{"start", "end", "value", "entity"}]``).
Problems are reported as :class:`DataFileError` with a one-line message
naming the offending line (or record) number.
"""

from __future__ import annotations

import csv
import io
import json
from importlib import resources
from typing import Any, TypeGuard

from .errors import InvalidInput
from .jsonin import read_json

__all__ = [
    "SUPPORTED_FORMATS",
    "DataFileError",
    "detect_format",
    "load_sample_examples",
    "parse_examples",
]

SUPPORTED_FORMATS: tuple[str, ...] = ("jsonl", "csv", "json")

_EXTENSION_FORMATS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".json": "json",
}

#: CSV header names accepted for the intent column, in order of preference.
_INTENT_COLUMNS: tuple[str, ...] = ("intent", "category", "label")

_SAMPLE_PACKAGE = "mangwale_cli.sample_data"
_SAMPLE_FILE = "food_delivery.jsonl"


class DataFileError(ValueError):
    """A dataset file could not be parsed.

    Attributes:
        line: 1-based line number (JSONL, CSV) or record number (JSON array)
            where the problem was found, or ``None`` for file-level problems.
        message: Description of the problem, without the line prefix.
    """

    def __init__(self, message: str, line: int | None = None) -> None:
        self.line: int | None = line
        self.message: str = message
        text = f"line {line}: {message}" if line is not None else message
        super().__init__(text)


def _reject_constant(name: str) -> Any:
    """Refuse the non-standard JSON constants NaN, Infinity and -Infinity."""
    raise ValueError(f"non-standard JSON constant {name} is not allowed")


def _loads(text: str) -> Any:
    """Decode strict JSON, rejecting NaN/Infinity constants (and numbers too long to read, in
    mangwale's words: ``jsonin``)."""
    try:
        return read_json(text, "the value", parse_constant=_reject_constant)
    except InvalidInput as exc:
        raise ValueError(exc.message) from None


def _decode(data: bytes | str) -> str:
    """Return ``data`` as text, decoding UTF-8 and dropping a leading BOM."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataFileError(
                f"file is not valid UTF-8 (byte offset {exc.start})"
            ) from None
    else:
        text = data
    text = text.removeprefix("\ufeff")
    return text


def detect_format(text: str, filename: str | None = None) -> str:
    """Guess the dataset format from the file name, else from the content.

    ``.jsonl``/``.ndjson`` mean JSONL, ``.csv`` CSV and ``.json`` a JSON
    array. Otherwise content starting with ``[`` is JSON, with ``{`` JSONL,
    and anything else CSV.
    """
    if filename:
        lower = filename.lower()
        for ext, fmt in _EXTENSION_FORMATS.items():
            if lower.endswith(ext):
                return fmt
    head = text.lstrip()
    if head.startswith("["):
        return "json"
    if head.startswith("{"):
        return "jsonl"
    return "csv"


def _field(value: Any, name: str, line: int | None) -> str:
    """Validate a required string field and return it stripped."""
    if value is None:
        raise DataFileError(f"missing '{name}'", line)
    if not isinstance(value, str):
        raise DataFileError(
            f"'{name}' must be a string, got {type(value).__name__}", line
        )
    stripped = value.strip()
    if not stripped:
        raise DataFileError(f"empty '{name}'", line)
    return stripped


def _is_int(value: object) -> TypeGuard[int]:
    """True for real integers (``bool`` excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _entities(value: Any, text: str, line: int | None) -> list[dict[str, Any]]:
    """Validate an ``entities`` list against the (stripped) example text."""
    if not isinstance(value, list):
        raise DataFileError(
            f"'entities' must be a list, got {type(value).__name__}", line
        )
    result: list[dict[str, Any]] = []
    for i, ent in enumerate(value):
        where = f"entity {i}"
        if not isinstance(ent, dict):
            raise DataFileError(
                f"{where} must be an object, got {type(ent).__name__}", line
            )
        start, end = ent.get("start"), ent.get("end")
        if not _is_int(start) or not _is_int(end):
            raise DataFileError(f"{where}: 'start' and 'end' must be integers", line)
        name = ent.get("entity")
        if not isinstance(name, str) or not name.strip():
            raise DataFileError(f"{where}: 'entity' must be a non-empty string", line)
        val = ent.get("value")
        if not isinstance(val, str):
            raise DataFileError(f"{where}: 'value' must be a string", line)
        if not 0 <= start < end <= len(text):
            raise DataFileError(
                f"{where}: span {start}:{end} is out of range for text of "
                f"length {len(text)}",
                line,
            )
        if text[start:end] != val:
            raise DataFileError(
                f"{where}: value {val!r} does not match text[{start}:{end}] "
                f"{text[start:end]!r}",
                line,
            )
        result.append({"start": start, "end": end, "value": val, "entity": name.strip()})
    return result


def _example(obj: Any, line: int | None) -> dict[str, Any]:
    """Validate one decoded JSON record and build the example dict."""
    if not isinstance(obj, dict):
        raise DataFileError(
            f"expected a JSON object, got {type(obj).__name__}", line
        )
    raw_text = obj.get("text")
    text = _field(raw_text, "text", line)
    intent = _field(obj.get("intent"), "intent", line)
    example: dict[str, Any] = {"text": text, "intent": intent}
    entities = obj.get("entities")
    if entities is not None:
        # Offsets refer to the text as given; shift them if stripping removed
        # leading whitespace.
        assert isinstance(raw_text, str)  # _field let only a str through
        shift = len(raw_text) - len(raw_text.lstrip())
        if shift and isinstance(entities, list):
            entities = [
                {**e, "start": e["start"] - shift, "end": e["end"] - shift}
                if isinstance(e, dict) and _is_int(e.get("start")) and _is_int(e.get("end"))
                else e
                for e in entities
            ]
        checked = _entities(entities, text, line)
        if checked:
            example["entities"] = checked
    return example


def _parse_jsonl(text: str) -> list[dict[str, Any]]:
    """Parse JSON Lines: one object per non-blank line."""
    examples: list[dict[str, Any]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = _loads(raw)
        except ValueError as exc:
            raise DataFileError(f"invalid JSON: {_one_line(exc)}", lineno) from None
        examples.append(_example(obj, lineno))
    return examples


def _parse_json(text: str) -> list[dict[str, Any]]:
    """Parse a JSON array of objects; ``line`` is the 1-based record number."""
    try:
        data = _loads(text)
    except json.JSONDecodeError as exc:
        raise DataFileError(f"invalid JSON: {exc.msg}", exc.lineno) from None
    except ValueError as exc:
        raise DataFileError(f"invalid JSON: {_one_line(exc)}") from None
    if not isinstance(data, list):
        raise DataFileError(
            f"expected a JSON array of objects, got {type(data).__name__}"
        )
    return [_example(obj, i) for i, obj in enumerate(data, start=1)]


def _parse_csv(text: str) -> list[dict[str, Any]]:
    """Parse CSV with a header row containing ``text`` and an intent column."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)
        if header is None:
            raise DataFileError("empty file: no examples found")
        columns = [cell.strip().lower() for cell in header]
        text_idx = columns.index("text") if "text" in columns else None
        intent_idx = next(
            (columns.index(c) for c in _INTENT_COLUMNS if c in columns), None
        )
        if text_idx is None or intent_idx is None:
            missing = [
                name
                for name, idx in (("text", text_idx), ("intent", intent_idx))
                if idx is None
            ]
            found = ", ".join(repr(c) for c in columns) or "none"
            hint = (
                " ('category' or 'label' may replace 'intent')"
                if intent_idx is None
                else ""
            )
            raise DataFileError(
                f"CSV header is missing required column(s) {', '.join(missing)}"
                f"{hint}; found: {found}",
                reader.line_num,
            )
        examples: list[dict[str, Any]] = []
        for row in reader:
            lineno = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(text_idx, intent_idx):
                raise DataFileError(
                    f"row has {len(row)} field(s), expected at least "
                    f"{max(text_idx, intent_idx) + 1}",
                    lineno,
                )
            examples.append(
                {
                    "text": _field(row[text_idx], "text", lineno),
                    "intent": _field(row[intent_idx], "intent", lineno),
                }
            )
    except csv.Error as exc:
        raise DataFileError(f"invalid CSV: {_one_line(exc)}", reader.line_num) from None
    return examples


def _one_line(exc: BaseException) -> str:
    """Collapse an exception message onto a single line."""
    return " ".join(str(exc).split())


def parse_examples(
    data: bytes | str, filename: str | None = None, fmt: str | None = None
) -> list[dict[str, Any]]:
    """Parse a dataset file into a list of examples.

    Args:
        data: File contents, as bytes (UTF-8, optional BOM) or text.
        filename: Optional file name, used to infer the format.
        fmt: ``"jsonl"``, ``"csv"`` or ``"json"``; inferred when ``None``.

    Returns:
        A non-empty list of ``{"text", "intent"}`` dicts, with ``"entities"``
        included only for examples that carry entity annotations.

    Raises:
        DataFileError: If the file is empty, malformed or fails validation.
    """
    text = _decode(data)
    if fmt is None:
        fmt = detect_format(text, filename)
    else:
        fmt = fmt.lower()
    if fmt not in SUPPORTED_FORMATS:
        raise DataFileError(
            f"unsupported format {fmt!r}; expected one of {', '.join(SUPPORTED_FORMATS)}"
        )
    if not text.strip():
        raise DataFileError("empty file: no examples found")
    if fmt == "jsonl":
        examples = _parse_jsonl(text)
    elif fmt == "json":
        examples = _parse_json(text)
    else:
        examples = _parse_csv(text)
    if not examples:
        what = "only a header line" if fmt == "csv" else "no example in it"
        raise DataFileError(f"no examples found: the file has {what}")
    return examples


def load_sample_examples() -> list[dict[str, Any]]:
    """Load the bundled food-delivery intent data set (20 intents, 917 examples)."""
    resource = resources.files(_SAMPLE_PACKAGE).joinpath(_SAMPLE_FILE)
    return parse_examples(resource.read_bytes(), filename=_SAMPLE_FILE)
