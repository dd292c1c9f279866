"""Every mistake is one line on stderr and a documented exit code: wrong URLs and tokens, names
that match nothing, values JSON cannot carry, servers that are not mangwale, and mangwale's own
bugs. Each test runs the real ``mangwale`` command, against a real ``mangwale serve`` where one is
needed.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest
from clitools import (  # noqa: F401 - http_path: an autouse fixture, both request paths
    cli,
    error_line,
    fake_server,
    http_path,
    ok,
    ok_json,
    plain_http_server,
    quick_job,
    wait_done,
)
from conftest import ServerProcess, free_port, wait_for
from tokentools import new_token, write_config

from mangwale_cli.errors import EXIT_CODES, ExitCode

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module: the tests only add to its state."""
    server = ServerProcess.for_module(tmp_path_factory.mktemp("cli-errors"))
    yield server
    server.kill()


# --- 2. --url and --token, before or after the command ----------------------------------------


def test_url_goes_before_or_after_the_command_flag_then_env(live: ServerProcess) -> None:
    """--url works before and after the command; the one after wins, then the one before, then MANGWALE_URL."""
    dead = f"http://127.0.0.1:{free_port()}"
    assert isinstance(json.loads(ok("--url", live.url, "jobs", "list", "--json")), list)
    assert isinstance(json.loads(ok("jobs", "list", "--json", "--url", live.url)), list)
    # before the command beats the environment
    assert isinstance(json.loads(ok("--url", live.url, "jobs", "list", "--json", url=dead)), list)
    # after the command beats before it
    assert isinstance(json.loads(ok("--url", dead, "jobs", "list", "--json", "--url", live.url)), list)
    line = error_line(cli("--url", live.url, "jobs", "list", "--url", dead), 8)
    assert dead in line
    # watch, too, takes the one before the command
    job = quick_job(live.url)
    wait_done(live.url, job)
    watched = cli("--url", live.url, "watch", job, "--json", url=dead)
    assert watched.returncode == 0, watched.stderr


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """A server that needs a token, and a read+write token for it."""
    base = tmp_path_factory.mktemp("cli-auth")
    token = new_token()
    cfg = write_config(base / "auth.toml", {"ci": (token, ["read", "write"])})
    server = ServerProcess.for_module(base, args=["--config", str(cfg)])
    yield server, token
    server.kill()


def test_token_goes_before_or_after_the_command_flag_then_env(guarded: tuple[ServerProcess, str]) -> None:
    """--token works before and after the command; the one after wins, then the one before, then MANGWALE_TOKEN."""
    srv, token = guarded
    wrong = new_token()
    assert ok("--token", token, "jobs", "list", "--json", url=srv.url).startswith("[")
    assert ok("jobs", "list", "--json", "--token", token, url=srv.url).startswith("[")
    assert ok("--token", token, "jobs", "list", "--json", url=srv.url, env={"MANGWALE_TOKEN": wrong}).startswith("[")
    assert ok("--token", wrong, "jobs", "list", "--json", "--token", token, url=srv.url).startswith("[")
    assert ok("datasets", "list", "--json", url=srv.url, env={"MANGWALE_TOKEN": token}).startswith("[")
    line = error_line(cli("jobs", "list", "--token", wrong, url=srv.url, env={"MANGWALE_TOKEN": token}), 5)
    assert wrong not in line


def test_watch_takes_the_token_after_the_command_too(guarded: tuple[ServerProcess, str]) -> None:
    """`watch JOB --token T` works as `--token T watch JOB` does, and beats MANGWALE_TOKEN; a wrong one is exit 5."""
    srv, token = guarded
    wrong = new_token()
    job = ok("--token", token, "jobs", "create", "simulate", "-p", "steps=1", "-p", "stepMs=0", "-q", url=srv.url).strip()
    for args in (("--token", token, "watch", job), ("watch", job, "--token", token)):
        proc = cli(*args, "--json", url=srv.url, env={"MANGWALE_TOKEN": wrong})
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.splitlines()[-1])["exitCode"] == 0
    line = error_line(cli("watch", job, "--token", wrong, url=srv.url, env={"MANGWALE_TOKEN": token}), 5)
    assert wrong not in line and token not in line


@pytest.mark.parametrize("where", ["--token before", "--token after", "MANGWALE_TOKEN"])
def test_a_token_no_header_can_carry_is_a_usage_error_that_never_shows_it(where: str) -> None:
    """A token with a space or control character exits 2 naming the setting, and the token is not printed."""
    bad = "s3cret-value\nInjected: yes"
    url = f"http://127.0.0.1:{free_port()}"
    if where == "--token before":
        proc = cli("--token", bad, "jobs", "list", url=url)
    elif where == "--token after":
        proc = cli("jobs", "list", "--token", bad, url=url)
    else:
        proc = cli("jobs", "list", url=url, env={"MANGWALE_TOKEN": bad})
    line = error_line(proc, 2)
    assert where.split()[0] in line and "s3cret" not in line


# --- 3. exit codes: the README, --help and the code agree -------------------------------------


def readme_exit_codes() -> dict[int, str]:
    section = (ROOT / "README.md").read_text().split("## The command line", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (.+?) \|$", section, re.MULTILINE)
    return {int(code): text.replace("`", "") for code, text in rows}


def test_exit_codes_agree_in_the_readme_the_help_and_the_code() -> None:
    """The README's exit-code table, `mangwale --help` and errors.EXIT_CODES list the same codes and words."""
    assert readme_exit_codes() == {int(c): text for c, text in EXIT_CODES.items()}
    assert set(EXIT_CODES) == set(ExitCode)
    helps = [ok("--help", env={"COLUMNS": "120"}), ok("jobs", "--help", env={"COLUMNS": "120"})]
    for text in helps:
        for code, meaning in EXIT_CODES.items():
            assert re.search(rf"^\s+{int(code)}\s+{re.escape(meaning)}$", text, re.MULTILINE), (code, text)


def test_a_missing_dataset_or_base_job_in_a_create_exits_4(live: ServerProcess) -> None:
    """`jobs create -d NOPE` and `-p baseJobId=NOPE` exit 4 (not found) with one line naming it."""
    line = error_line(cli("jobs", "create", "simulate", "-d", "no-such-set", url=live.url), 4)
    assert "no-such-set" in line
    line = error_line(cli("jobs", "create", "nlu-train", "-d", "ds-0-nope", url=live.url), 4)
    assert "ds-0-nope" in line
    proc = cli("jobs", "create", "fine-tune", "-d", "food-delivery-sample", "-p", "baseJobId=job-0-nope", url=live.url)
    line = error_line(proc, 4)
    assert "baseJobId" in line and "job-0-nope" in line


def test_a_kind_that_needs_a_dataset_names_the_flag(live: ServerProcess) -> None:
    """`jobs create nlu-train` without -d exits 2 with one line pointing at -d."""
    line = error_line(cli("jobs", "create", "nlu-train", url=live.url), 2)
    assert "-d DATASET" in line


@pytest.mark.parametrize(
    ("bad", "how"),
    [
        ("localhost:8080", "flag after"),
        ("localhost:8080", "flag before"),
        ("localhost:8080", "env"),
        ("127.0.0.1:8080", "env"),
        ("ftp://example.org", "flag before"),
        ("ws://localhost:8080", "env"),
        ("http://", "flag after"),
        ("http://[::1", "flag before"),
    ],
)
@pytest.mark.parametrize("command", [("jobs", "list"), ("watch", "job-1"), ("worker",)], ids=lambda c: " ".join(c))
def test_a_url_without_an_http_scheme_is_a_usage_error(bad: str, how: str, command: tuple[str, ...]) -> None:
    """A URL without http:// or https:// exits 2 with one line naming the one setting it came
    from (--url or MANGWALE_URL, not both) and showing http://HOST:PORT; watch and worker too."""
    if how == "flag after":
        proc = cli(*command, "--url", bad)
    elif how == "flag before":
        proc = cli("--url", bad, *command)
    else:
        proc = cli(*command, url=bad)
    line = error_line(proc, 2)
    named, other = ("MANGWALE_URL", "--url") if how == "env" else ("--url", "MANGWALE_URL")
    assert named in line and other not in line
    assert "http://HOST:PORT" in line and repr(bad) in line


# --- 5. values JSON cannot carry, and the last guard ------------------------------------------


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400", "[1, NaN]"])
def test_a_param_json_cannot_carry_exits_2_in_one_line(value: str) -> None:
    """-p steps=NaN (Infinity, -Infinity, 1e400) exits 2 with one line, before any request."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the check is the client's
    line = error_line(cli("jobs", "create", "simulate", "-p", f"steps={value}", url=url), 2)
    assert "steps" in line and "finite" in line


def test_params_json_with_nan_exits_2_in_one_line() -> None:
    """--params '{"a": {"b": NaN}}' exits 2 with one line naming a.b."""
    url = f"http://127.0.0.1:{free_port()}"
    line = error_line(cli("jobs", "create", "simulate", "--params", '{"a": {"b": NaN}}', url=url), 2)
    assert "a.b" in line and "finite" in line


def _echo_token_as_progress(h: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
    """A server that looks like mangwale but sends a metrics point the CLI cannot read, holding
    the request's bearer token (so the bug's message would carry it)."""
    if h.path == "/healthz":
        return 200, {"Content-Type": "application/json"}, b'{"version": "9", "headSeq": 0}'
    token = h.headers.get("Authorization", "").removeprefix("Bearer ")
    body = json.dumps([{"loss": 0.5, "progress": f"at {token}"}]).encode()
    return 200, {"Content-Type": "application/json"}, body


def test_an_unexpected_error_is_one_line_asking_for_a_report_without_the_token() -> None:
    """A bug is one line (exit 70) saying "please report" and MANGWALE_DEBUG=1; the token never shows."""
    token = "tok-Zq8Jx2mLw9"
    with fake_server(_echo_token_as_progress) as (url, _):
        proc = cli("--token", token, "jobs", "metrics", "job-1", url=url)
        line = error_line(proc, 70)
        assert "please report" in line and "MANGWALE_DEBUG=1" in line and "ValueError" in line
        assert token not in proc.stderr + proc.stdout
        debug = cli("jobs", "metrics", "job-1", url=url, env={"MANGWALE_DEBUG": "1", "MANGWALE_TOKEN": token})
    assert debug.returncode == 70
    assert "Traceback" in debug.stderr and token not in debug.stderr
    assert debug.stderr.splitlines()[-1].startswith("mangwale: error: unexpected ValueError")


def test_ctrl_c_exits_130_and_typer_keeps_its_own_exits(live: ServerProcess) -> None:
    """Ctrl-C in `jobs logs -f` exits 130 without a traceback; `mangwale jobs` shows help (exit 2), --help exits 0."""
    job = quick_job(live.url, "steps=200", "stepMs=100")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mangwale_cli", "jobs", "logs", job, "-f", "--url", live.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: ok_json("jobs", "show", job, url=live.url)["status"] == "running", what="the job to run")
    wait_for(lambda: httpx.get(live.url + "/healthz", timeout=2).json()["streams"] > 0, what="logs -f to connect")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 130 and "Traceback" not in err, err
    ok("jobs", "cancel", job, url=live.url)
    help_proc = cli("jobs")
    assert help_proc.returncode == 2 and "Usage:" in help_proc.stdout + help_proc.stderr
    assert cli("jobs", "list", "--help").returncode == 0


# --- 6. errors that mislead -------------------------------------------------------------------


def _plain_web_server(h: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
    """What http.server answers: HTML 404 for GET, 501 for other methods."""
    status = 404 if h.command == "GET" else 501
    return status, {"Content-Type": "text/html", "Server": "SimpleHTTP/0.6"}, b"<html>nope</html>"


@pytest.mark.parametrize(
    "args",
    [("jobs", "list"), ("jobs", "show", "job-1"), ("jobs", "create", "simulate"), ("datasets", "list")],
    ids=lambda a: " ".join(a),
)
def test_a_server_that_is_not_mangwale_is_named_as_such(args: tuple[str, ...]) -> None:
    """HTTP 404/501 from something else is exit 8 and one line saying the URL does not look like mangwale."""
    with fake_server(_plain_web_server) as (url, seen):
        line = error_line(cli(*args, url=url), 8)
    assert "does not look like a mangwale server" in line and url in line and "HTTP" in line
    assert "GET /healthz" in seen  # asked only once something went wrong


@pytest.mark.parametrize("protocol", ["HTTP/1.0", "HTTP/1.1"], ids=["http1.0", "http1.1"])
@pytest.mark.parametrize("args", [("watch", "job-1"), ("watch", "--all"), ("worker",)], ids=lambda a: " ".join(a))
def test_watch_and_worker_at_a_server_that_is_not_mangwale_exit_8_at_once(
    args: tuple[str, ...], protocol: str, tmp_path: Path
) -> None:
    """`watch` and `worker` at a plain web server (python -m http.server) exit 8 at once with one
    line saying the URL does not look like mangwale: no retrying until --connect-timeout."""
    with plain_http_server(tmp_path, protocol) as url:
        # 10 minutes: a retry loop would make the test time out rather than pass late
        line = error_line(cli(*args, "--connect-timeout", "600", url=url, timeout=60), 8)
    assert "does not look like a mangwale server" in line and url in line


def _redirect_to(target: str) -> Callable[[BaseHTTPRequestHandler], tuple[int, dict[str, str], bytes]]:
    """A server that sends every request on to ``target`` (as an http:// URL of an https site does)."""

    def answer(h: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        return 302, {"Location": target + h.path}, b""

    return answer


@pytest.mark.parametrize(
    "args",
    [("jobs", "list"), ("jobs", "show", "job-1"), ("jobs", "create", "simulate"), ("datasets", "list"), ("watch", "job-1")],
    ids=lambda a: " ".join(a),
)
def test_a_redirect_is_exit_8_in_one_line(live: ServerProcess, args: tuple[str, ...]) -> None:
    """A 3xx answer is exit 8 and one line naming the redirect, never followed (not even to a
    mangwale) nor taken for an empty answer."""
    with fake_server(_redirect_to(live.url)) as (url, _):
        line = error_line(cli(*args, url=url), 8)
    assert "does not look like a mangwale server" in line and "redirect to " + live.url in line


def test_an_artifact_download_that_is_redirected_leaves_no_file(live: ServerProcess, tmp_path: Path) -> None:
    """`jobs artifact -o FILE` answered by a redirect exits 8 and leaves neither FILE nor a part file."""
    dest = tmp_path / "model.skops"
    with fake_server(_redirect_to(live.url)) as (url, _):
        line = error_line(cli("jobs", "artifact", "job-1", "-o", str(dest), url=url), 8)
        error_line(cli("jobs", "download", "job-1", "model.skops", "-o", str(dest), url=url), 8)
    assert "redirect" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [("jobs", "show", ""), ("jobs", "logs", ""), ("jobs", "cancel", ""), ("datasets", "show", ""), ("watch", "")],
    ids=lambda a: " ".join(a[:-1]),
)
def test_an_empty_id_is_a_usage_error(live: ServerProcess, args: tuple[str, ...]) -> None:
    """`jobs show ""` (an unset shell variable) exits 2 with one line, not "not found" nor a bug."""
    line = error_line(cli(*args, url=live.url), 2)
    assert "id is empty" in line


@pytest.mark.parametrize(
    "args",
    [("jobs", "list"), ("jobs", "show", "job-1"), ("datasets", "list"), ("jobs", "create", "simulate"),
     ("watch", "job-1"), ("watch", "--all")],
    ids=lambda a: " ".join(a),
)
def test_a_url_with_a_stray_path_is_exit_8_naming_the_root(live: ServerProcess, args: tuple[str, ...]) -> None:
    """`--url http://host:8080/api`: a mangwale answers, but "no route" (not "job not found",
    exit 4): exit 8 at once, one line saying the URL must be the server's root."""
    line = error_line(cli(*args, url=live.url + "/api"), 8)
    assert f"{live.url}/api is not the root of a mangwale server" in line and "http://HOST:PORT" in line


def test_a_route_a_server_lacks_at_its_root_stays_a_plain_error(live: ServerProcess) -> None:
    """At the root URL, a path no route has is the server's own 404 (an older server than the
    client), named as such: /healthz answered, so it is mangwale, not a wrong URL."""
    with httpx.Client(base_url=live.url) as http:
        body = http.get("/training/nothing-here").json()
    assert body["error"]["code"] == "no_route" and body["error"]["message"] == "no route GET /training/nothing-here"


def test_a_mangwale_error_is_not_taken_for_another_server(live: ServerProcess) -> None:
    """A mangwale 404 stays "not found" (exit 4), without asking /healthz."""
    line = error_line(cli("jobs", "show", "job-nope", url=live.url), 4)
    assert "job-nope" in line and "mangwale server" not in line


def _not_found(h: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"error": {"code": "not_found", "message": "not here", "field": "jobId"}}).encode()
    return 404, {"Content-Type": "application/json"}, body


@pytest.mark.parametrize(
    ("job_id", "sent"),
    [("a b?c#d", "/training/jobs/a%20b%3Fc%23d"), ("..", "/training/jobs/%2E%2E"), ("x%2Fy", "/training/jobs/x%252Fy")],
)
def test_job_ids_are_one_encoded_path_segment(job_id: str, sent: str) -> None:
    """`jobs show "a b?c#d"` asks for that id, encoded, not for `a b` (nor `..` for the parent)."""
    with fake_server(_not_found) as (url, seen):
        error_line(cli("jobs", "show", job_id, url=url), 4)
    assert seen == [f"GET {sent}"]


def test_a_path_in_a_job_id_never_leaves_the_jobs(live: ServerProcess) -> None:
    """`jobs show ../../etc/passwd` is "job ... not found" (exit 4), and no request leaves /training/jobs/."""
    with fake_server(_not_found) as (url, seen):
        error_line(cli("jobs", "show", "../../etc/passwd", url=url), 4)
        error_line(cli("jobs", "logs", "../../etc/passwd", url=url), 4)
    assert all(s.split()[1].startswith("/training/jobs/") for s in seen), seen
    line = error_line(cli("jobs", "show", "../../etc/passwd", url=live.url), 4)
    assert "job ../../etc/passwd not found" in line


def test_a_huge_number_in_an_error_is_cut(live: ServerProcess) -> None:
    """A bound error about a 310-digit value prints a short line, not the number (the server cuts
    long values in its messages; the client cuts what it prints too)."""
    line = error_line(cli("jobs", "create", "simulate", "-p", "steps=1" + "0" * 309, url=live.url), 2)
    assert "params.steps" in line and "(310 digits)" in line and "0" * 60 not in line and len(line) < 200


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("-p", "steps=1" + "0" * 4999), "params.steps"),
        (("-p", 'a={"b": 1' + "0" * 4999 + "}"), "params.a.b"),
        (("--params", '{"steps": 1' + "0" * 4999 + "}"), "params.steps"),
    ],
    ids=["-p steps", "-p a.b", "--params"],
)
def test_a_number_too_long_to_read_is_one_line_exit_2(live: ServerProcess, args: tuple[str, ...], field: str) -> None:
    """-p steps=<5000 digits> exits 2 with one line naming params.steps and its 5000 digits, in
    mangwale's words (not Python's "Exceeds the limit (4300 digits)", nor "must be an integer")."""
    line = error_line(cli("jobs", "create", "simulate", *args, url=live.url), 2)
    assert field in line and "5000 digits" in line and "at most 4300" in line, line
    assert "Exceeds" not in line and "integer" not in line and len(line) < 200


def test_logs_follow_of_a_job_that_fails_says_so(live: ServerProcess) -> None:
    """`jobs logs JOB -f` on a failing job exits 1 and its last stderr line says the job failed, and why."""
    job = quick_job(live.url, "steps=3", "failAt=2")
    proc = cli("jobs", "logs", job, "-f", url=live.url)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"mangwale: error: job {job} failed") and "simulated failure" in last


# --- careless input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("datasets", "create", "x"),  # missing --file
        ("jobs", "create"),  # missing KIND
        ("jobs", "creat", "simulate"),  # a typo
        ("jobs", "list", "--limit", "0"),
        ("jobs", "list", "--all", "--limit", "5"),
        ("jobs", "create", "simulate", "-p", "steps"),
        ("jobs", "create", "simulate", "--params", "[1]"),
    ],
    ids=lambda a: " ".join(a),
)
def test_usage_mistakes_are_one_line_exit_2(args: tuple[str, ...]) -> None:
    """A missing flag or argument, a typo or a bad value is one line and exit 2, naming what to fix."""
    url = f"http://127.0.0.1:{free_port()}"
    line = error_line(cli(*args, url=url), 2)
    assert len(line) < 200


def test_an_empty_data_file_is_one_line_exit_2(live: ServerProcess, tmp_path: Path) -> None:
    """`datasets create --file` of an empty file exits 2 with one line naming the file."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = error_line(cli("datasets", "create", "e", "--file", str(empty), url=live.url), 2)
    assert str(empty) in line


@pytest.mark.parametrize(
    "arg", ["message=caf\udce9", 'message="a\\udcff"', '{"message": "a\\ud800"}'], ids=["not UTF-8", "-p escape", "--params"]
)
def test_a_param_that_is_not_text_is_one_line_exit_2(live: ServerProcess, arg: str) -> None:
    """A -p value with bytes that are not UTF-8 (a Latin-1 shell), or a JSON string holding half
    a surrogate pair, exits 2 in one line naming params.message: never a bug report (exit 70)."""
    args = ("--params", arg) if arg.startswith("{") else ("-p", arg)
    line = error_line(cli("jobs", "create", "simulate", *args, url=live.url), 2)
    assert "params.message holds \\ud" in line and "surrogate pair" in line, line
