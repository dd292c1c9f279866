"""Entity tags and 304s on the GET routes, and the body cache behind the hot ones: a client sees
its own write in its next read, and the cache stays bounded."""

from __future__ import annotations

import pytest
from conftest import wait_for
from starlette.testclient import TestClient

from mangwale_cli.server.bodycache import BodyCache, Entry
from mangwale_cli.server.etag import etag_of, none_match, parse_tags

JOB = {"kind": "simulate", "params": {"steps": 1, "stepMs": 0}}


@pytest.mark.parametrize(
    ("header", "tags"),
    [
        ('"a"', ['"a"']),
        ('W/"a"', ['"a"']),
        ('"a", W/"b" ,"c"', ['"a"', '"b"', '"c"']),
        ('"a,b", "c"', ['"a,b"', '"c"']),
        ("*", ["*"]),
        (" * ", ["*"]),
        ("a", None),
        ('"a', None),
        ('"a"b', None),
        ("", None),
        ('W/ "a"', None),
    ],
)
def test_if_none_match_parses_as_rfc_9110_says(header: str, tags: list[str] | None) -> None:
    """If-None-Match is `*` or a list of (weak or strong) tags; an opaque tag may hold a comma;
    anything else does not parse."""
    assert parse_tags(header) == tags


def test_if_none_match_compares_weakly() -> None:
    """A weak tag matches its strong twin, `*` matches anything, a list matches by any member, a
    header that does not parse matches nothing."""
    tag = etag_of(b"[]")
    assert tag.startswith('"') and tag.endswith('"') and tag == etag_of(b"[]") != etag_of(b"[1]")
    assert none_match(tag, tag) and none_match("W/" + tag, tag) and none_match("*", tag)
    assert none_match(f'"x", {tag}', tag) and not none_match('"x", "y"', tag)
    assert not none_match(None, tag) and not none_match(tag[:-1], tag)


def test_body_cache_is_bounded_and_dropped_by_a_new_head() -> None:
    """At most max_entries bodies and max_bytes bytes, least recently used out first; a new head
    drops every entry; an entry rendered for an older head is not kept."""
    cache = BodyCache(max_entries=3, max_bytes=100)
    e = Entry(b"x" * 10, '"t"', [])
    assert cache.get("h1", "a") is None
    for key in "abc":
        cache.put("h1", key, e)
    assert cache.get("h1", "a") is e
    cache.put("h1", "d", e)  # evicts b, the least recently used
    assert cache.get("h1", "b") is None and len(cache) == 3
    cache.put("h1", "big", Entry(b"x" * 90, '"u"', []))
    assert cache.size <= 100 and cache.get("h1", "big") is not None
    assert cache.get("h2", "big") is None and len(cache) == 0
    cache.put("h1", "a", e)
    assert len(cache) == 0


def test_job_list_etag_and_304_and_own_create_seen(api: TestClient) -> None:
    """GET /training/jobs has an ETag; If-None-Match with it (strong, weak, in a list, or *) is a
    304 without a body; a create changes the list and its tag at once."""
    job = api.post("/training/jobs", json=JOB).json()
    wait_for(lambda: api.get(f"/training/jobs/{job['id']}").json()["status"] == "succeeded")
    first = api.get("/training/jobs?limit=5")
    tag = first.headers["etag"]
    for header in (tag, "W/" + tag, f'"nope", {tag}', "*"):
        r = api.get("/training/jobs?limit=5", headers={"If-None-Match": header})
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == tag
    assert api.get("/training/jobs?limit=5", headers={"If-None-Match": '"nope"'}).json() == first.json()
    created = api.post("/training/jobs", json=JOB).json()
    after = api.get("/training/jobs?limit=5", headers={"If-None-Match": tag})
    assert after.status_code == 200 and after.json()[0]["id"] == created["id"]
    assert after.headers["etag"] != tag


def test_every_create_is_in_the_next_list(api: TestClient) -> None:
    """Each create is in the list read right after it, on every cached query form."""
    for _ in range(5):
        job = api.post("/training/jobs", json=JOB).json()
        for query in ("", "?limit=3", "?status=queued,running,succeeded&limit=3"):
            assert job["id"] in [j["id"] for j in api.get("/training/jobs" + query).json()]


def test_job_etag_and_304(api: TestClient) -> None:
    """GET /training/jobs/{id} has an ETag and answers 304 to it; an unknown job is still 404."""
    job = api.post("/training/jobs", json=JOB).json()
    wait_for(lambda: api.get(f"/training/jobs/{job['id']}").json()["status"] == "succeeded")
    r = api.get(f"/training/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["id"] == job["id"]
    r2 = api.get(f"/training/jobs/{job['id']}", headers={"If-None-Match": r.headers["etag"]})
    assert r2.status_code == 304 and r2.content == b"" and r2.headers["etag"] == r.headers["etag"]
    missing = api.get("/training/jobs/job-nope", headers={"If-None-Match": "*"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_dataset_routes_etag_and_304(api: TestClient) -> None:
    """GET /training/datasets and /training/datasets/{id} have ETags and answer 304 to them; a
    change to the dataset changes both tags."""
    ds = api.post("/training/datasets", json={"name": "d", "examples": [{"text": "hi", "intent": "greet"}]}).json()
    for path in ("/training/datasets", f"/training/datasets/{ds['id']}"):
        tag = api.get(path).headers["etag"]
        r = api.get(path, headers={"If-None-Match": tag})
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == tag
    tags = {p: api.get(p).headers["etag"] for p in ("/training/datasets", f"/training/datasets/{ds['id']}")}
    api.put(f"/training/datasets/{ds['id']}", json={"name": "renamed"})
    for path, tag in tags.items():
        assert api.get(path, headers={"If-None-Match": tag}).status_code == 200


def test_cached_list_keeps_cors_and_metrics(api: TestClient) -> None:
    """A list served from the cache carries what the middlewares add: Vary: Origin without an
    Origin, the CORS headers with an allowed one; and each is counted in /metrics by its route."""
    api.get("/training/jobs?limit=2")
    plain = api.get("/training/jobs?limit=2")
    assert plain.headers["vary"] == "Origin" and "access-control-allow-origin" not in plain.headers
    cors = api.get("/training/jobs?limit=2", headers={"Origin": "http://localhost:3000"})
    assert cors.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "ETag" in cors.headers["access-control-expose-headers"]
    assert cors.content == plain.content
    text = api.get("/metrics").text
    line = next(ln for ln in text.splitlines()
                if ln.startswith("mangwale_http_request_duration_seconds_count") and 'route="/training/jobs"' in ln
                and 'method="GET"' in ln and 'status="200"' in ln)
    assert float(line.rsplit(" ", 1)[1]) >= 3
