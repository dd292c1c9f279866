"""Tests for mangwale_cli.datafile."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from mangwale_cli.datafile import (
    DataFileError,
    detect_format,
    load_sample_examples,
    parse_examples,
)


def _raises(data: bytes | str, fmt: str | None = None, filename: str | None = None) -> DataFileError:
    """Parse ``data`` expecting a DataFileError and return it."""
    with pytest.raises(DataFileError) as info:
        parse_examples(data, filename=filename, fmt=fmt)
    return info.value


# ---------------------------------------------------------------- JSONL


def test_jsonl_basic_with_entities_and_blank_lines() -> None:
    """JSONL lines parse, blank lines are skipped and entities are kept."""
    data = (
        '{"text": "order pizza", "intent": "order_food", '
        '"entities": [{"start": 6, "end": 11, "value": "pizza", "entity": "dish"}]}\n'
        "\n   \n"
        '{"text": "  hi  ", "intent": " greet "}\n'
    )
    assert parse_examples(data, filename="x.jsonl") == [
        {
            "text": "order pizza",
            "intent": "order_food",
            "entities": [{"start": 6, "end": 11, "value": "pizza", "entity": "dish"}],
        },
        {"text": "hi", "intent": "greet"},
    ]


def test_jsonl_bytes_with_bom_and_ndjson_extension() -> None:
    """UTF-8 bytes with a BOM and a .ndjson name parse as JSONL."""
    data = '\ufeff{"text": "héllo", "intent": "greet"}\n'.encode("utf-8")
    assert parse_examples(data, filename="d.ndjson") == [{"text": "héllo", "intent": "greet"}]


def test_jsonl_empty_entities_list_omitted() -> None:
    """An empty entities list is not included in the output."""
    out = parse_examples('{"text": "a", "intent": "b", "entities": []}', fmt="jsonl")
    assert out == [{"text": "a", "intent": "b"}]


def test_jsonl_entity_offsets_shift_with_leading_whitespace() -> None:
    """Entity offsets are adjusted when leading whitespace is stripped from text."""
    obj = {
        "text": "  get sushi",
        "intent": "order_food",
        "entities": [{"start": 6, "end": 11, "value": "sushi", "entity": "cuisine"}],
    }
    (ex,) = parse_examples(json.dumps(obj), fmt="jsonl")
    ent = ex["entities"][0]
    assert ex["text"][ent["start"] : ent["end"]] == "sushi"


def test_jsonl_invalid_json_names_line() -> None:
    """Malformed JSON reports the offending line number."""
    err = _raises('{"text": "a", "intent": "b"}\n{"text": oops}\n', fmt="jsonl")
    assert err.line == 2
    assert "invalid JSON" in str(err) and "line 2" in str(err)
    assert "\n" not in str(err)


def test_jsonl_not_an_object() -> None:
    """A JSONL line holding a non-object value is rejected."""
    err = _raises('["text", "intent"]\n', fmt="jsonl")
    assert err.line == 1 and "object" in err.message


def test_jsonl_missing_text() -> None:
    """A record without text is rejected."""
    err = _raises('{"intent": "greet"}', fmt="jsonl")
    assert err.line == 1 and "missing 'text'" in err.message


def test_jsonl_missing_intent() -> None:
    """A record without intent is rejected."""
    err = _raises('{"text": "hi"}\n{"text": "yo"}', fmt="jsonl")
    assert err.line == 1 and "missing 'intent'" in err.message


def test_jsonl_empty_text_and_intent() -> None:
    """Whitespace-only text or intent counts as empty."""
    assert "empty 'text'" in _raises('{"text": "   ", "intent": "a"}', fmt="jsonl").message
    assert "empty 'intent'" in _raises('{"text": "a", "intent": ""}', fmt="jsonl").message


def test_jsonl_non_string_values() -> None:
    """Non-string text or intent values are rejected."""
    assert "'text' must be a string" in _raises('{"text": 5, "intent": "a"}', fmt="jsonl").message
    assert "'intent' must be a string" in _raises('{"text": "a", "intent": ["x"]}', fmt="jsonl").message


@pytest.mark.parametrize("const", ["NaN", "Infinity", "-Infinity"])
def test_jsonl_rejects_nan_and_infinity(const: str) -> None:
    """Non-standard JSON constants are rejected as invalid JSON."""
    err = _raises(f'{{"text": "a", "intent": "b", "score": {const}}}', fmt="jsonl")
    assert err.line == 1 and "invalid JSON" in err.message and const in err.message


def test_entity_span_out_of_range() -> None:
    """Entity spans beyond the text length are rejected."""
    obj = {"text": "hi", "intent": "a", "entities": [{"start": 0, "end": 5, "value": "hi", "entity": "x"}]}
    err = _raises(json.dumps(obj), fmt="jsonl")
    assert err.line == 1 and "out of range" in err.message


def test_entity_negative_or_inverted_span() -> None:
    """Negative and empty/inverted spans are rejected as out of range."""
    for start, end in ((-1, 1), (2, 1), (1, 1)):
        obj = {"text": "hello", "intent": "a", "entities": [{"start": start, "end": end, "value": "h", "entity": "x"}]}
        assert "out of range" in _raises(json.dumps(obj), fmt="jsonl").message


def test_entity_value_mismatch() -> None:
    """An entity whose value differs from text[start:end] is rejected."""
    obj = {"text": "order pizza", "intent": "a", "entities": [{"start": 0, "end": 5, "value": "pizza", "entity": "dish"}]}
    err = _raises(json.dumps(obj), fmt="jsonl")
    assert "does not match" in err.message and "'order'" in err.message


def test_entity_malformed_fields() -> None:
    """Entities that are not objects or lack integer offsets are rejected."""
    bad = [
        {"text": "a", "intent": "b", "entities": "x"},
        {"text": "a", "intent": "b", "entities": ["x"]},
        {"text": "a", "intent": "b", "entities": [{"start": "0", "end": 1, "value": "a", "entity": "e"}]},
        {"text": "a", "intent": "b", "entities": [{"start": 0, "end": 1, "value": "a"}]},
        {"text": "a", "intent": "b", "entities": [{"start": 0, "end": 1, "value": 1, "entity": "e"}]},
    ]
    for obj in bad:
        assert _raises(json.dumps(obj), fmt="jsonl").line == 1


# ---------------------------------------------------------------- JSON array


def test_json_array() -> None:
    """A JSON array of objects parses, including entities."""
    data = json.dumps(
        [
            {"text": "hi", "intent": "greet"},
            {"text": "track A1", "intent": "track_order",
             "entities": [{"start": 6, "end": 8, "value": "A1", "entity": "order_id"}]},
        ]
    )
    out = parse_examples(data, filename="data.json")
    assert out[0] == {"text": "hi", "intent": "greet"}
    assert out[1]["entities"][0]["value"] == "A1"


def test_json_record_errors_name_record_number() -> None:
    """Errors in a JSON array report the 1-based record number."""
    err = _raises('[{"text": "a", "intent": "b"}, 3]', fmt="json")
    assert err.line == 2 and "object" in err.message


def test_json_not_an_array() -> None:
    """A top-level JSON object is rejected for the json format."""
    err = _raises('{"text": "a", "intent": "b"}', fmt="json")
    assert "array" in err.message


def test_json_invalid_and_nan() -> None:
    """Invalid JSON and NaN constants are rejected in JSON arrays."""
    assert "invalid JSON" in _raises('[{"text": "a",', fmt="json").message
    assert "NaN" in _raises('[{"text": "a", "intent": "b", "x": NaN}]', fmt="json").message


def test_json_empty_array() -> None:
    """An empty JSON array has no examples."""
    assert "no examples" in _raises("[]", fmt="json").message


def test_a_csv_header_alone_is_named_as_such() -> None:
    """A CSV with its header and no row says so, not "empty file" (it is not empty)."""
    message = _raises("text,intent\n", fmt="csv").message
    assert message == "no examples found: the file has only a header line"


# ---------------------------------------------------------------- CSV


def test_csv_basic_quoted_fields_and_extra_columns() -> None:
    """CSV parses quoted commas and newlines and ignores extra columns."""
    data = 'id,text,intent,notes\n1,"hello, there",greet,x\n2,"two\nlines",thanks,y\n'
    assert parse_examples(data, filename="d.csv") == [
        {"text": "hello, there", "intent": "greet"},
        {"text": "two\nlines", "intent": "thanks"},
    ]


def test_csv_category_alias() -> None:
    """The 'category' column is accepted as the intent."""
    data = "flags,instruction,category,intent_x,text\nB,x,CANCEL_ORDER,,  cancel it please \n"
    assert parse_examples(data, fmt="csv") == [{"text": "cancel it please", "intent": "CANCEL_ORDER"}]


def test_csv_label_alias_bom_and_crlf() -> None:
    """'label' is accepted, a UTF-8 BOM is dropped and CRLF line ends work."""
    data = "\ufefftext,label\r\nhi,greet\r\n\r\nbye,goodbye\r\n".encode("utf-8")
    assert parse_examples(data, filename="d.CSV") == [
        {"text": "hi", "intent": "greet"},
        {"text": "bye", "intent": "goodbye"},
    ]


def test_csv_missing_columns_names_found() -> None:
    """A CSV header without required columns names the columns found."""
    err = _raises("utterance,label\nhi,greet\n", fmt="csv")
    assert err.line == 1
    assert "text" in err.message and "'utterance'" in err.message and "'label'" in err.message


def test_csv_missing_intent_column() -> None:
    """A CSV header without any intent column is rejected."""
    err = _raises("text,foo\nhi,x\n", fmt="csv")
    assert "intent" in err.message and "'foo'" in err.message


def test_csv_empty_values_and_short_rows() -> None:
    """Empty text/intent and short rows report their line number."""
    err = _raises("text,intent\nhi,greet\n,thanks\n", fmt="csv")
    assert err.line == 3 and "empty 'text'" in err.message
    err = _raises("text,intent\nhi,greet\nbye, \n", fmt="csv")
    assert err.line == 3 and "empty 'intent'" in err.message
    err = _raises("text,intent\nhi\n", fmt="csv")
    assert err.line == 2


def test_csv_header_only_is_empty() -> None:
    """A CSV with only a header has no examples."""
    assert "no examples" in _raises("text,intent\n", fmt="csv").message


# ---------------------------------------------------------------- general


@pytest.mark.parametrize("data", ["", "   \n\n", b"", b"\xef\xbb\xbf"])
def test_empty_file(data: bytes | str) -> None:
    """Empty and whitespace-only files are rejected."""
    err = _raises(data, filename="d.jsonl")
    assert err.line is None and "no examples" in err.message


def test_invalid_utf8_and_unknown_format() -> None:
    """Undecodable bytes and unsupported formats raise DataFileError."""
    assert "UTF-8" in _raises(b"text,intent\n\xff,a\n", fmt="csv").message
    assert "unsupported" in _raises("a", fmt="xml").message


def test_format_detection() -> None:
    """Format comes from the extension, else is sniffed from the content."""
    assert detect_format("", "a.jsonl") == "jsonl"
    assert detect_format("", "a.NDJSON") == "jsonl"
    assert detect_format("", "a.csv") == "csv"
    assert detect_format("", "a.json") == "json"
    assert detect_format('  [{"a": 1}]', "a.txt") == "json"
    assert detect_format('{"a": 1}', None) == "jsonl"
    assert detect_format("text,intent", None) == "csv"
    assert parse_examples('[{"text": "a", "intent": "b"}]') == [{"text": "a", "intent": "b"}]
    assert parse_examples('{"text": "a", "intent": "b"}') == [{"text": "a", "intent": "b"}]
    assert parse_examples("text,category\na,b\n") == [{"text": "a", "intent": "b"}]


def test_error_is_value_error_with_one_line_message() -> None:
    """DataFileError subclasses ValueError and prefixes the line number."""
    err = DataFileError("bad thing", 7)
    assert isinstance(err, ValueError)
    assert (err.line, err.message, str(err)) == (7, "bad thing", "line 7: bad thing")
    assert str(DataFileError("file-level")) == "file-level"


# ---------------------------------------------------------------- sample data


def test_sample_data_shape() -> None:
    """The shipped sample has 20 intents with 39 to 50 distinct utterances each."""
    examples = load_sample_examples()
    assert len(examples) == 917
    counts = Counter(ex["intent"] for ex in examples)
    assert len(counts) == 20
    assert min(counts.values()) >= 39 and max(counts.values()) <= 50
    assert len({ex["text"].lower() for ex in examples}) == 917


def test_sample_data_entities() -> None:
    """Sample entity offsets are valid and at least 80 examples carry entities."""
    examples = load_sample_examples()
    with_entities = [ex for ex in examples if "entities" in ex]
    assert len(with_entities) >= 80
    types = set()
    for ex in with_entities:
        for ent in ex["entities"]:
            assert ex["text"][ent["start"] : ent["end"]] == ent["value"]
            types.add(ent["entity"])
    assert {"dish", "cuisine", "restaurant", "order_id", "address", "coupon_code", "time"} <= types
