"""What a client hears when its request is wrong, from a real ``mangwale serve``: raw NaN and
infinities in JSON bodies, body limits, bounds with absurd values. Always a 422 (or 400) with
the one error shape, the field named, and mangwale's own words: never pydantic's ("Input
should be ...", "List should have at most ... after validation") and never a 309-digit number.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import ServerProcess

PYDANTIC = ("Input should", "should have at", "after validation", "Value error", "valid dictionary")
HUGE = "1" + "0" * 308  # a 309-digit integer


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    server = ServerProcess.for_module(tmp_path_factory.mktemp("wording"))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client
    server.kill()


@pytest.fixture(scope="module")
def dataset_id(http: httpx.Client) -> str:
    return str(http.get("/training/datasets").json()[0]["id"])


def refused(resp: httpx.Response, field: str | None, *words: str) -> str:
    """``resp`` is a 422 naming ``field`` whose message has ``words`` and no pydantic wording."""
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert list(body) == ["error"] and set(body["error"]) == {"code", "message", "field"}, body
    err = body["error"]
    assert err["field"] == field, err
    message: str = err["message"]
    for phrase in PYDANTIC:
        assert phrase not in message, message
    for word in words:
        assert word in message, message
    assert len(message) < 200, message
    return message


NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e400"]


@pytest.mark.parametrize("raw", NON_FINITE)
def test_raw_non_finite_numbers_in_json_bodies_are_422_naming_the_field(
    http: httpx.Client, dataset_id: str, raw: str
) -> None:
    """NaN, Infinity, -Infinity and 1e400 (which parses as infinity) anywhere in a body: 422,
    the field named, the value spelled as JSON spells it."""
    shown = "NaN" if raw == "NaN" else "-Infinity" if raw.startswith("-") else "Infinity"
    headers = {"Content-Type": "application/json"}
    cases: list[tuple[str, str, str, str | None]] = [
        ("POST", "/training/jobs", f'{{"kind": "simulate", "params": {{"steps": {raw}}}}}', "params.steps"),
        ("POST", "/training/jobs", f'{{"kind": "simulate", "params": {{"a": [1, {{"b": {raw}}}]}}}}', "params.a[1].b"),
        (
            "POST",
            "/training/jobs",
            f'{{"kind": "nlu-train", "datasetId": "{dataset_id}", "params": {{"alpha": {raw}}}}}',
            "params.alpha",
        ),
        (
            "POST",
            "/training/datasets",
            (
                '{"name": "n", "examples": [{"text": "a b", "intent": "x", "entities": '
                f'[{{"start": {raw}, "end": 1, "value": "a", "entity": "e"}}]}}]}}'
            ),
            "examples[0].entities[0].start",
        ),
        ("PUT", f"/training/datasets/{dataset_id}", f'{{"name": {raw}}}', "name"),
        ("POST", "/training/jobs/job-0-x/predict", f'{{"text": {raw}}}', "text"),
    ]
    for method, path, body, field in cases:
        message = refused(http.request(method, path, content=body, headers=headers), field, field)
        assert shown in message or "finite" in message, message
    # A bare number is no request at all: the body is named, with no field to point at.
    message = refused(http.post("/training/jobs", content=raw, headers=headers), None, "request body", "JSON object")
    assert shown in message


def test_body_limits_are_worded_by_mangwale(http: httpx.Client) -> None:
    """Too many examples, too long a name, a blank text: the limit in mangwale's words."""
    many = {"name": "big", "examples": [{"text": "hi", "intent": "greet"}] * 100_001}
    refused(http.post("/training/datasets", json=many), "examples", "100001 items", "at most 100000")
    refused(http.post("/training/datasets", json={"name": "x" * 300}), "name", "300 characters", "at most 200")
    refused(
        http.post("/training/datasets", json={"name": "n", "examples": [{"text": " ", "intent": "x"}]}),
        "examples[0].text",
        "must not be blank",
    )
    refused(http.post("/training/datasets", json={"name": "n", "examples": "no"}), "examples", "must be a JSON array")
    refused(http.post("/training/jobs", json={"datasetId": "x"}), "kind", "kind is required")


def test_absurd_values_are_cut_short(http: httpx.Client) -> None:
    """A 309-digit number (or a 10,000-character string) is shown cut short, never whole."""
    resp = http.post("/training/jobs", content='{"kind": "simulate", "params": {"steps": ' + HUGE + "}}",
                     headers={"Content-Type": "application/json"})
    message = refused(resp, "params.steps", "params.steps must be <= 10000, got 1000000000…(309 digits)")
    assert HUGE not in message
    refused(http.get("/training/jobs", params={"limit": HUGE}), "limit", "limit must be from 1 to 1000")
    long_name = {"kind": "simulate", "params": {"x" * 10_000: 1}}
    message = refused(http.post("/training/jobs", json=long_name), "params." + "x" * 100, "unknown parameter")
    assert "x" * 100 not in message
    resp = http.get("/training/jobs/job-0-x/events", params={"since": "-" + HUGE})
    refused(resp, "since", "since must be >= 0")


def test_validation_wording_keeps_the_error_shape(http: httpx.Client) -> None:
    """Every refusal above keeps code "invalid"; a body that is not JSON is 400 invalid_json."""
    resp = http.post("/training/jobs", content="{nope", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    resp: Any = http.post("/training/jobs", json={"kind": 5})
    assert resp.json()["error"] == {"code": "invalid", "message": "kind must be a string, got 5", "field": "kind"}


PYTHON = ("Exceeds the limit", "set_int_max_str_digits", "Unable to parse", "exceeded maximum size", "codec")
TOO_LONG = "1" + "0" * 4999  # a 5000-digit integer: more than Python reads (4300 digits)


def test_a_number_too_long_to_read_is_422_naming_the_field(http: httpx.Client, dataset_id: str) -> None:
    """A 5000-digit integer in a JSON body or a query: 422 naming the field and its digit count
    in mangwale's words, never a 500 nor Python's "Exceeds the limit (4300 digits)"."""
    headers = {"Content-Type": "application/json"}
    cases = [
        ('{"kind": "simulate", "params": {"steps": NUM}}'.replace("NUM", TOO_LONG), "params.steps"),
        ('{"kind": "simulate", "params": {"steps": -NUM}}'.replace("NUM", TOO_LONG), "params.steps"),
        ('{"kind": "simulate", "params": {"a": [1, {"b": NUM}]}}'.replace("NUM", TOO_LONG), "params.a[1].b"),
        ('{"kind": NUM}'.replace("NUM", TOO_LONG), "kind"),
    ]
    for body, field in cases:
        for extra in ({}, {"Idempotency-Key": "k" * 300}):  # the fast path and FastAPI's
            message = refused(http.post("/training/jobs", content=body, headers={**headers, **extra}), field, field)
            assert "5000 digits" in message and "at most 4300" in message, message
            assert not any(p in message for p in PYTHON), message
    body = '{"name": "n", "examples": [{"text": "a b", "intent": NUM}]}'.replace("NUM", TOO_LONG)
    refused(http.post("/training/datasets", content=body, headers=headers), "examples[0].intent", "5000 digits")
    refused(http.put(f"/training/datasets/{dataset_id}", content='{"name": NUM}'.replace("NUM", TOO_LONG), headers=headers), "name")
    for path in ("/training/jobs/job-0-x/events", "/training/jobs/job-0-x/logs", "/training/events"):
        message = refused(http.get(path, params={"since": TOO_LONG}), "since", "5000 digits")
        assert not any(p in message for p in PYTHON), message
    refused(http.get("/training/jobs", params={"limit": TOO_LONG}), "limit", "from 1 to 1000", "(5000 digits)")


def test_a_float_param_past_what_a_float_holds_is_422(http: httpx.Client) -> None:
    """A 4300-digit integer for a float param (stepMs) is out of bounds (422), not a 500."""
    body = '{"kind": "simulate", "params": {"stepMs": NUM}}'.replace("NUM", TOO_LONG[:4300])
    message = refused(http.post("/training/jobs", content=body, headers={"Content-Type": "application/json"}),
                      "params.stepMs", "must be <= 3600000", "(4300 digits)")  # fmt: skip
    assert len(message) < 100


def test_a_body_that_is_not_utf8_is_400_naming_the_field(http: httpx.Client) -> None:
    """Bytes that are not UTF-8 in a JSON body: 400 invalid_json naming the field whose string
    holds them, in mangwale's words (not Python's codec error, not FastAPI's "error parsing")."""
    headers = {"Content-Type": "application/json"}
    cases = [
        ("/training/jobs", b'{"kind": "simul\xff\xfeate"}', "kind"),
        ("/training/jobs", b'{"kind": "simulate", "params": {"message": "caf\xe9"}}', "params.message"),
        ("/training/datasets", b'{"name": "\xff"}', "name"),
        ("/training/jobs", b'{"kind": \xff}', None),  # not inside a string: the body is named
    ]
    for path, body, field in cases:
        resp = http.post(path, content=body, headers=headers)
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["code"] == "invalid_json" and err["field"] == field, err
        assert "not UTF-8 text" in err["message"] and (field or "the request body") in err["message"], err
        assert not any(p in err["message"] for p in PYTHON) and "error parsing" not in err["message"], err


def test_a_lone_surrogate_is_refused_by_name_and_a_pair_is_text(http: httpx.Client) -> None:
    """``"\\udcff"`` is valid JSON (a \\u escape of half a surrogate pair) but not text: it can
    never be written as UTF-8, so a job param or a dataset name holding one is a 422 naming it,
    on both create paths, never a 500 from the store's writer. An escaped pair (an emoji, as
    ``json.dumps`` writes it) is one character, and is kept."""
    headers = {"Content-Type": "application/json"}
    body = b'{"kind": "simulate", "params": {"steps": 1, "stepMs": 0, "message": "a\\udcffb"}}'
    for extra in ({}, {"Idempotency-Key": "lone-surrogate"}):  # the fast path and FastAPI's
        message = refused(http.post("/training/jobs", content=body, headers={**headers, **extra}), "params")
        assert "params.message holds \\udcff" in message and "surrogate" in message, message
    message = refused(http.post("/training/datasets", content=b'{"name": "a\\ud800", "examples": []}', headers=headers), "name")
    assert message.startswith("name holds \\ud800"), message
    pair = b'{"kind": "simulate", "params": {"steps": 1, "stepMs": 0, "message": "\\ud83d\\ude00"}}'
    resp = http.post("/training/jobs", content=pair, headers=headers)
    assert resp.status_code == 201, resp.text
    assert http.get(f"/training/jobs/{resp.json()['id']}").json()["params"]["message"] == "\U0001f600"