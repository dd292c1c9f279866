"""The server's own log (stderr of a real ``mangwale serve``): one format, parts named for what
they are."""

from __future__ import annotations

import re

from conftest import ServerProcess, wait_for

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +"
    r"(?P<name>mangwale(\.[a-z_.]+)?|uvicorn|http): \S"
)


def test_log_lines_name_the_part_that_speaks(server: ServerProcess) -> None:
    """Every line is "date time.ms LEVEL name: message"; mangwale's modules are mangwale.*,
    uvicorn is uvicorn (not uvicorn.error), and uvicorn's start-up chatter is gone."""
    with server.client() as http:
        job = http.post("/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 0}}).json()
        wait_for(lambda: "succeeded" in server.output(), what="the job's log line")
    assert server.stop() == 0
    lines = server.output().splitlines()
    names = []
    for line in lines:
        m = LINE.match(line)
        assert m, f"a line out of format: {line!r}"
        names.append(m.group("name"))
    assert "uvicorn.error" not in server.output()
    assert "Started server process" not in server.output() and "Application startup" not in server.output()
    assert any(n == "mangwale.serve" and "serving on" in ln for n, ln in zip(names, lines))
    assert any(n == "mangwale.runner" and f"job {job['id']} succeeded" in ln for n, ln in zip(names, lines))
    assert any(n == "uvicorn" and "Shutting down" in ln for n, ln in zip(names, lines))
