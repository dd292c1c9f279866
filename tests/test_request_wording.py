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
    message = refused(resp, "params.steps", "params.steps must be <= 10000, got 1000")
    assert HUGE not in message and "..." in message
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
