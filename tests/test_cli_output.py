"""What the command line prints: tables that keep ids whole at any width, datasets named by
name or id, the next-page cursor beside a bare JSON array, downloads that never overwrite by
surprise, and usage lines in typer's KIND convention.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clitools import cli, error_line, http_path, ok, ok_json, quick_job, wait_done  # noqa: F401 - http_path: an autouse fixture, both request paths
from conftest import ServerProcess

SAMPLE = "food-delivery-sample"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module, with jobs of two kinds (one on the sample data set)."""
    server = ServerProcess.for_module(tmp_path_factory.mktemp("cli-output"))
    for _ in range(2):
        quick_job(server.url)
    ok("jobs", "create", "nlu-train", "-d", SAMPLE, "-p", "epochs=1", "-q", url=server.url)
    yield server
    server.kill()


def on_a_terminal(args: list[str], columns: int, url: str) -> str:
    """``mangwale ARGS`` with a pseudo-terminal of ``columns`` as stdout; its output, ANSI removed."""
    main, child = pty.openpty()
    env = {**os.environ, "COLUMNS": str(columns), "LINES": "50", "MANGWALE_URL": url, "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "mangwale_cli", *args], stdout=child, stderr=subprocess.PIPE, env=env)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(30)
    os.close(main)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    text = b"".join(chunks).decode().replace("\r\n", "\n")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def whole_ids(text: str, ids: set[str]) -> None:
    """Every id in ``ids`` appears whole within one line of ``text``."""
    lines = text.splitlines()
    for i in ids:
        assert any(i in line for line in lines), f"{i} not whole in:\n{text}"
    assert "…" not in text, text


# --- 4. tables --------------------------------------------------------------------------------


def test_tables_at_80_columns_in_a_pipe_keep_ids_whole_one_row_a_line(live: ServerProcess) -> None:
    """Through a pipe with COLUMNS=80, `jobs list` and `datasets list` print each row on one line, ids whole."""
    jobs = ok_json("jobs", "list", url=live.url)
    text = ok("jobs", "list", url=live.url, env={"COLUMNS": "80"})
    lines = text.splitlines()
    assert len(lines) == 1 + len(jobs), text
    assert [line.split()[0] for line in lines[1:]] == [j["id"] for j in jobs]
    whole_ids(text, {j["id"] for j in jobs} | {j["datasetId"] for j in jobs if j.get("datasetId")})
    datasets = ok_json("datasets", "list", url=live.url)
    text = ok("datasets", "list", url=live.url, env={"COLUMNS": "80"})
    assert [line.split()[0] for line in text.splitlines()[1:]] == [d["id"] for d in datasets]
    whole_ids(text, {d["id"] for d in datasets})
    assert all(line == line.rstrip() for line in text.splitlines())


@pytest.mark.parametrize("columns", [80, 60, 40])
def test_tables_on_a_narrow_terminal_keep_ids_whole(live: ServerProcess, columns: int) -> None:
    """On a terminal of 80, 60 or 40 columns, ids stay whole and lines fit; other columns fold or go."""
    jobs = ok_json("jobs", "list", url=live.url)
    text = on_a_terminal(["jobs", "list"], columns, live.url)
    whole_ids(text, {j["id"] for j in jobs})
    assert max(len(line) for line in text.splitlines()) <= columns, text
    assert "succeeded" in text or "running" in text or "queued" in text
    datasets = ok_json("datasets", "list", url=live.url)
    text = on_a_terminal(["datasets", "list"], columns, live.url)
    whole_ids(text, {d["id"] for d in datasets})
    assert max(len(line) for line in text.splitlines()) <= columns, text


def test_a_message_with_brackets_is_shown_as_written(live: ServerProcess, tmp_path: Path) -> None:
    """A dataset name with [brackets] is printed as is, not taken for rich markup."""
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "hi", "intent": "[bold]greet"}\n{"text": "bye", "intent": "bye"}\n')
    ds = ok("datasets", "create", "[red]set[/red]", "--file", str(f), "-q", url=live.url).strip()
    shown = ok("datasets", "show", ds, url=live.url)
    assert "[red]set[/red]" in shown and "[bold]greet" in shown
    ok("datasets", "delete", ds, url=live.url)


# --- 4. a dataset by name or id ---------------------------------------------------------------


def test_datasets_show_and_delete_take_a_name_or_an_id(live: ServerProcess, tmp_path: Path) -> None:
    """`datasets show NAME` works as `show ID` does; `delete NAME` deletes it; a shared name exits 2 listing the ids."""
    sample = next(d for d in ok_json("datasets", "list", url=live.url) if d["name"] == SAMPLE)
    assert ok_json("datasets", "show", SAMPLE, url=live.url) == ok_json("datasets", "show", sample["id"], url=live.url)
    assert SAMPLE in ok("datasets", "show", SAMPLE, url=live.url)
    f = tmp_path / "twin.jsonl"
    f.write_text('{"text": "hello", "intent": "greet"}\n{"text": "bye", "intent": "bye"}\n')
    a = ok("datasets", "create", "twin", "--file", str(f), "-q", url=live.url).strip()
    b = ok("datasets", "create", "twin", "--file", str(f), "-q", url=live.url).strip()
    for args in (("datasets", "show", "twin"), ("datasets", "delete", "twin"), ("jobs", "create", "nlu-train", "-d", "twin")):
        line = error_line(cli(*args, url=live.url), 2)
        assert a in line and b in line and "twin" in line
    deleted = cli("datasets", "delete", a, url=live.url)
    assert deleted.returncode == 0 and a in deleted.stderr
    deleted = cli("datasets", "delete", "twin", url=live.url)
    assert deleted.returncode == 0 and b in deleted.stderr
    line = error_line(cli("datasets", "show", "twin", url=live.url), 4)
    assert "twin" in line


# --- 7. the next-page cursor ------------------------------------------------------------------


def test_jobs_list_json_names_the_next_page_on_stderr_and_all_pages_through(live: ServerProcess) -> None:
    """`jobs list --json --limit N` keeps a bare array on stdout and names the cursor on stderr; --all lists every job."""
    everything = ok_json("jobs", "list", "--limit", "1000", url=live.url)
    assert len(everything) >= 3
    pages: list[dict[str, Any]] = []
    cursor: list[str] = []
    while True:
        proc = cli("jobs", "list", "--json", "--limit", "2", *cursor, url=live.url)
        assert proc.returncode == 0, proc.stderr
        page = json.loads(proc.stdout)
        assert isinstance(page, list) and len(page) <= 2
        pages.extend(page)
        notes = proc.stderr.splitlines()
        if not notes:
            break
        assert len(notes) == 1 and notes[0].startswith("mangwale: note: more jobs"), notes
        cursor = ["--cursor", notes[0].split()[-1]]
    assert [j["id"] for j in pages] == [j["id"] for j in everything]
    proc = cli("jobs", "list", "--all", "--json", url=live.url)
    assert proc.returncode == 0 and proc.stderr == ""
    assert [j["id"] for j in json.loads(proc.stdout)] == [j["id"] for j in everything]
    table = cli("jobs", "list", "--limit", "1", url=live.url)
    assert table.stderr.startswith("mangwale: note: more jobs") and "--cursor" in table.stderr


# --- 7. downloads -----------------------------------------------------------------------------


def test_artifact_refuses_to_replace_a_file_without_force(live: ServerProcess, tmp_path: Path) -> None:
    """`jobs artifact -o FILE` exits 2 in one line when FILE exists, and leaves it; --force replaces it."""
    job = next(j for j in ok_json("jobs", "list", url=live.url) if j["kind"] == "nlu-train")
    assert wait_done(live.url, job["id"], timeout=60)["status"] == "succeeded"
    target = tmp_path / "model.skops"
    target.write_text("mine")
    line = error_line(cli("jobs", "artifact", job["id"], "-o", str(target), url=live.url), 2)
    assert str(target) in line and "--force" in line
    assert target.read_text() == "mine"
    assert list(tmp_path.iterdir()) == [target]
    forced = cli("jobs", "artifact", job["id"], "-o", str(target), "--force", url=live.url)
    assert forced.returncode == 0, forced.stderr
    assert target.stat().st_size > 100
    fresh = tmp_path / "new.skops"
    assert cli("jobs", "artifact", job["id"], "-o", str(fresh), url=live.url).returncode == 0
    assert fresh.read_bytes() == target.read_bytes()


# --- 7. usage lines ---------------------------------------------------------------------------


def every_command() -> list[list[str]]:
    from typer.main import get_command

    from mangwale_cli.cli.main import app

    paths: list[list[str]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        paths.append(path)
        if not hasattr(cmd, "list_commands"):
            return
        ctx = cmd.make_context("mangwale", [], resilient_parsing=True)
        for name in cmd.list_commands(ctx):  # commands are built on demand (cli/lazy.py)
            walk(cmd.get_command(ctx, name), [*path, name])

    walk(get_command(app), [])
    return paths


@pytest.mark.parametrize("path", every_command(), ids=lambda p: " ".join(p) or "mangwale")
def test_usage_lines_use_upper_case_metavars(path: list[str]) -> None:
    """Every command's help names its arguments and option values in capitals (KIND, JOB_ID, URL), never {kind} or <str>."""
    from typer.testing import CliRunner

    from mangwale_cli.cli.main import app

    result = CliRunner().invoke(app, [*path, "--help"], prog_name="mangwale", env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    text = result.output
    usage = next(line for line in text.splitlines() if line.startswith("Usage:"))
    assert "{" not in usage, usage
    assert not re.search(r"\{[A-Za-z_]+\}", text), text
    assert not re.search(r"<(str|int|float|path|int range|float range)>", text), text


def test_jobs_show_of_a_requeued_job_names_its_last_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-queued job keeps its last attempt's start and worker: `jobs show` says they are the
    last attempt's and counts no duration while the job waits; a running job's are its own."""
    from rich.console import Console

    from mangwale_cli.cli import render

    def shown(doc: dict[str, Any]) -> dict[str, str]:
        out = Console(width=200, record=True, force_terminal=False)
        monkeypatch.setattr(render, "_out", out)
        render.job_detail(doc)
        rows = (re.match(r"\s*(\S+)\s{2,}(.*?)\s*$", line) for line in out.export_text().splitlines()[1:])
        return {m[1]: m[2] for m in rows if m}

    started = 1_700_000_000_000
    doc = {"id": "job-1", "kind": "simulate", "status": "queued", "progress": 40, "attempt": 1, "worker": "gpu-box",
           "createdAt": started - 1000, "startedAt": started, "finishedAt": None,
           "message": "re-queued: worker gpu-box stopped renewing its lease during attempt 1"}  # fmt: skip
    rows = shown(doc)
    assert rows["worker"] == "gpu-box (last attempt)" and rows["started"].endswith(" (last attempt)"), rows
    assert rows["duration"] == "-", rows
    rows = shown({**doc, "status": "running", "attempt": 2})
    assert rows["worker"] == "gpu-box" and rows["started"][:2] == "20" and "last" not in rows["started"], rows
    assert rows["duration"] != "-", rows
