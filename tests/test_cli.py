"""The ``mangwale`` command line against a real server, run as a subprocess like a user would.

Output contracts checked here: ``--json`` prints parseable JSON on stdout, ``-q`` prints only an
id, and every error is exactly one ``mangwale: error: ...`` line on stderr with the exit code of
``errors.ExitCode``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from clitools import cli, error_line, http_path, ok, ok_json, wait_done  # noqa: F401 - http_path: an autouse fixture, both request paths
from conftest import ServerProcess, free_port


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module: the CLI tests only add to its state."""
    server = ServerProcess.for_module(tmp_path_factory.mktemp("cli"))
    yield server
    server.kill()


# --- datasets ------------------------------------------------------------------------------------


def test_datasets_list_json_includes_the_sample(live: ServerProcess) -> None:
    """`datasets list --json` prints a JSON array that includes the shipped sample data set."""
    rows = ok_json("datasets", "list", url=live.url)
    assert isinstance(rows, list)
    sample = next(d for d in rows if d["name"] == "food-delivery-sample")
    assert sample["size"] > 0 and sample["id"].startswith("ds-")
    assert "examples" not in sample


def test_datasets_create_show_delete_from_jsonl(live: ServerProcess, tmp_path: Path) -> None:
    """`datasets create --file x.jsonl` uploads the examples; `show` lists them; `delete` removes the set."""
    f = tmp_path / "x.jsonl"
    f.write_text(
        '{"text": "where is my order", "intent": "track_order"}\n'
        '{"text": "cancel it", "intent": "cancel_order"}\n'
        '{"text": "I want a refund", "intent": "refund"}\n'
    )
    out = ok("datasets", "create", "jsonl-set", "--file", str(f), url=live.url)
    match = re.search(r"\b(ds-[\w-]+)", out)
    assert match and "3 examples" in out, out
    ds_id = match.group(1)
    shown = ok("datasets", "show", ds_id, url=live.url)
    assert (
        "jsonl-set" in shown and ds_id in shown and "track_order" in shown and "3 examples" in shown
    )
    detail = ok_json("datasets", "show", ds_id, url=live.url)
    assert [e["intent"] for e in detail["examples"]] == ["track_order", "cancel_order", "refund"]
    deleted = cli("datasets", "delete", ds_id, url=live.url)
    assert deleted.returncode == 0 and ds_id in deleted.stderr
    assert ds_id not in {d["id"] for d in ok_json("datasets", "list", url=live.url)}
    gone = error_line(cli("datasets", "show", ds_id, url=live.url), 4)
    assert ds_id in gone


def test_datasets_create_from_csv_quiet_prints_only_the_id(
    live: ServerProcess, tmp_path: Path
) -> None:
    """A CSV with text,category columns uploads; with -q stdout is the new id alone."""
    f = tmp_path / "x.csv"
    f.write_text('text,category\nhello there,greet\n"one, two",count\nbye,farewell\n')
    out = ok("datasets", "create", "csv-set", "--file", str(f), "-q", url=live.url)
    assert re.fullmatch(r"ds-\S+\n", out), repr(out)
    ds = ok_json("datasets", "show", out.strip(), url=live.url)
    assert ds["name"] == "csv-set"
    assert [(e["text"], e["intent"]) for e in ds["examples"]] == [
        ("hello there", "greet"),
        ("one, two", "count"),
        ("bye", "farewell"),
    ]


def test_bad_data_file_names_the_line(live: ServerProcess, tmp_path: Path) -> None:
    """A data file with a broken line exits 2 with one line naming the file and the line number."""
    f = tmp_path / "bad.jsonl"
    f.write_text(
        '{"text": "a", "intent": "x"}\n{"text": "b", "intent": "y"}\n{"text": "c", "intent": \n'
    )
    line = error_line(cli("datasets", "create", "bad", "--file", str(f), url=live.url), 2)
    assert "line 3" in line and str(f) in line
    assert "bad" not in {d["name"] for d in ok_json("datasets", "list", url=live.url)}


# --- jobs ----------------------------------------------------------------------------------------


def test_jobs_create_quiet_prints_only_the_id(live: ServerProcess) -> None:
    """`jobs create simulate -p steps=2 -p stepMs=10 -q` prints just the id; the params reach the job."""
    out = ok("jobs", "create", "simulate", "-p", "steps=2", "-p", "stepMs=10", "-q", url=live.url)
    assert re.fullmatch(r"job-\S+\n", out), repr(out)
    job = wait_done(live.url, out.strip())
    assert job["params"] == {"steps": 2, "stepMs": 10}
    assert job["status"] == "succeeded"


def test_jobs_create_resolves_a_dataset_name(live: ServerProcess) -> None:
    """`jobs create nlu-train -d food-delivery-sample` finds the data set by name."""
    sample = next(
        d for d in ok_json("datasets", "list", url=live.url) if d["name"] == "food-delivery-sample"
    )
    job = ok_json("jobs", "create", "nlu-train", "-d", "food-delivery-sample", url=live.url)
    assert (job["kind"], job["datasetId"], job["status"]) == ("nlu-train", sample["id"], "queued")
    out = ok("jobs", "create", "nlu-train", "-d", "food-delivery-sample", url=live.url)
    found = re.search(r"\bjob-[\w-]+", out)
    assert found and "nlu-train" in out, out
    # The module's server runs two jobs at once: two real trainings left running would hold
    # both slots for many seconds and make the next tests' jobs wait behind them.
    for job_id in (job["id"], found.group(0)):
        ok("jobs", "cancel", job_id, url=live.url)


def test_jobs_list_json_is_a_bare_array_newest_first(live: ServerProcess) -> None:
    """`jobs list --json` prints a bare JSON array, newest job first."""
    ids = [
        ok(
            "jobs", "create", "simulate", "-p", "steps=1", "-p", "stepMs=0", "-q", url=live.url
        ).strip()
        for _ in range(3)
    ]
    rows = ok_json("jobs", "list", url=live.url)
    assert isinstance(rows, list)
    listed = [r["id"] for r in rows]
    assert [i for i in listed if i in ids] == ids[::-1]
    created = [r["createdAt"] for r in rows]
    assert created == sorted(created, reverse=True)


def test_jobs_show_json(live: ServerProcess) -> None:
    """`jobs show ID --json` prints the job document; without --json a readable summary."""
    job_id = ok(
        "jobs", "create", "simulate", "-p", "steps=1", "-p", "stepMs=0", "-q", url=live.url
    ).strip()
    job = wait_done(live.url, job_id)
    assert (job["id"], job["kind"], job["status"], job["progress"]) == (
        job_id,
        "simulate",
        "succeeded",
        100,
    )
    assert isinstance(job["createdAt"], int)
    text = ok("jobs", "show", job_id, url=live.url)
    assert job_id in text and "succeeded" in text


def test_cancel_a_finished_job_exits_1(live: ServerProcess) -> None:
    """`jobs cancel` on a finished job exits 1 with one line saying it already finished."""
    job_id = ok(
        "jobs", "create", "simulate", "-p", "steps=1", "-p", "stepMs=0", "-q", url=live.url
    ).strip()
    wait_done(live.url, job_id)
    line = error_line(cli("jobs", "cancel", job_id, url=live.url), 1)
    assert job_id in line and "already succeeded" in line


def test_show_unknown_job_exits_4(live: ServerProcess) -> None:
    """`jobs show job-nope` exits 4 with one line naming the job."""
    line = error_line(cli("jobs", "show", "job-nope", url=live.url), 4)
    assert "job-nope" in line and "not found" in line


def test_unknown_kind_exits_2_naming_the_field(live: ServerProcess) -> None:
    """An unknown job kind exits 2 with one line naming the kind and the known ones."""
    line = error_line(cli("jobs", "create", "bogus-kind", url=live.url), 2)
    assert "kind" in line and "bogus-kind" in line and "simulate" in line


def test_bad_param_exits_2_naming_the_field(live: ServerProcess) -> None:
    """A parameter out of bounds exits 2 with one line naming params.<name>."""
    line = error_line(cli("jobs", "create", "simulate", "-p", "steps=0", url=live.url), 2)
    assert "params.steps" in line


def test_url_flag_overrides_the_environment(live: ServerProcess) -> None:
    """--url wins over MANGWALE_URL."""
    dead = f"http://127.0.0.1:{free_port()}"
    proc = cli("jobs", "list", "--json", "--url", live.url, env={"MANGWALE_URL": dead})
    assert proc.returncode == 0 and isinstance(json.loads(proc.stdout), list)


# --- no server, usage ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["env", "flag"])
def test_unreachable_server_exits_8(how: str) -> None:
    """A closed port exits 8 with one line naming the URL and suggesting `mangwale serve`."""
    url = f"http://127.0.0.1:{free_port()}"
    proc = cli("jobs", "list", url=url) if how == "env" else cli("jobs", "list", "--url", url)
    line = error_line(proc, 8)
    assert url in line and "mangwale serve" in line


def test_version_and_help() -> None:
    """--version prints the version; --help exits 0 and documents the exit codes."""
    from mangwale_cli import __version__

    assert ok("--version") == f"mangwale {__version__}\n"
    top = ok("--help")
    for command in ("serve", "datasets", "jobs"):
        assert command in top
    for text in (top, ok("jobs", "--help"), ok("datasets", "--help")):
        flat = " ".join(text.split())
        assert "Exit codes:" in flat and "4 not found" in flat and "8 no mangwale server" in flat


def test_unknown_command_is_a_usage_error() -> None:
    """A mistyped command exits 2 without a traceback."""
    proc = cli("jobz", "list")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "jobz" in proc.stderr
