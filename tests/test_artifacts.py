"""Reading a job's files back: ``GET /training/jobs/{id}/artifacts[/{name}]`` and
``mangwale jobs artifacts`` / ``jobs download``, against a real server and a real worker that
uploaded them, on a server with API tokens."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from conftest import ServerProcess
from test_workers import FAST, WorkerProcess, workers  # noqa: F401 - workers: a fixture, used by name

TRAINER = """\
import json, os
out = os.environ["MANGWALE_OUTPUT_DIR"]
with open(os.path.join(out, "report.txt"), "w") as f:
    f.write("accuracy 0.97\\n" * 1000)
with open(os.path.join(out, "curve.csv"), "wb") as f:
    f.write(bytes(range(256)) * 64)
print(json.dumps({"progress": 100, "message": "done"}), flush=True)
"""


def cli(*args: str, token: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("MANGWALE_URL", None)
    env.pop("MANGWALE_TOKEN", None)
    if token is not None:
        env["MANGWALE_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "mangwale_cli", *args], capture_output=True, timeout=30,
                          check=False, env=env, stdin=subprocess.DEVNULL, cwd=cwd)  # fmt: skip


def test_a_workers_uploads_are_listed_and_downloaded(server_factory: Callable[..., ServerProcess],
                                                     workers: Callable[..., WorkerProcess], tmp_path: Path) -> None:  # noqa: F811 - the fixture imported above  # fmt: skip
    """A worker's job leaves two files: GET .../artifacts lists them with size and sha256, GET
    .../artifacts/{name} streams each with Content-Length and its sha256 as ETag (304 on a
    match), 404 names jobId or name, 400 a bad name; a read token may, a worker token may not.
    jobs artifacts lists them (--json, -q) and jobs download saves one (-o FILE atomically,
    -o - to stdout, exit 2 for an existing FILE, 4 for an unknown file or job)."""
    from tokentools import new_token, write_config

    keys = {"box": new_token(), "ci": new_token()}
    cfg = write_config(tmp_path / "auth.toml", {"box": (keys["box"], ["worker"]), "ci": (keys["ci"], ["read", "write"])})
    server = server_factory(env=FAST, args=["--concurrency", "0", "--config", str(cfg)])
    url = server.url
    script = tmp_path / "files.py"
    script.write_text(TRAINER)
    config = tmp_path / "worker.toml"
    config.write_text(f"[trainers.files]\ncommand = [{json.dumps(sys.executable)}, {json.dumps(str(script))}]\n"
                      "requires_dataset = false\n")  # fmt: skip
    workers(url, "--token", keys["box"], "--config", str(config), "--name", "box")
    ci = {"Authorization": f"Bearer {keys['ci']}"}
    made = httpx.post(url + "/training/jobs", headers=ci, json={"kind": "files"}, timeout=10)
    assert made.status_code == 201, made.text
    job_id = made.json()["id"]
    done = wait_for_job(url, job_id, ci)
    assert done["status"] == "succeeded", done

    report = b"accuracy 0.97\n" * 1000
    curve = bytes(range(256)) * 64
    digest = {"report.txt": hashlib.sha256(report).hexdigest(), "curve.csv": hashlib.sha256(curve).hexdigest()}
    listed = httpx.get(f"{url}/training/jobs/{job_id}/artifacts", headers=ci, timeout=10)
    assert listed.status_code == 200
    assert listed.json() == [{"name": "curve.csv", "size": len(curve), "sha256": digest["curve.csv"]},
                             {"name": "report.txt", "size": len(report), "sha256": digest["report.txt"]}]  # fmt: skip
    got = httpx.get(f"{url}/training/jobs/{job_id}/artifacts/report.txt", headers=ci, timeout=10)
    assert got.status_code == 200 and got.content == report
    assert got.headers["content-length"] == str(len(report)) and got.headers["etag"] == f'"{digest["report.txt"]}"'
    again = httpx.get(f"{url}/training/jobs/{job_id}/artifacts/report.txt", timeout=10,
                      headers={**ci, "If-None-Match": got.headers["etag"]})  # fmt: skip
    assert again.status_code == 304 and again.content == b""
    for path, field in ((f"/training/jobs/{job_id}/artifacts/nope.bin", "name"), ("/training/jobs/job-nope/artifacts/report.txt", "jobId"),
                        ("/training/jobs/job-nope/artifacts", "jobId")):  # fmt: skip
        miss = httpx.get(url + path, headers=ci, timeout=10)
        assert miss.status_code == 404 and miss.json()["error"]["field"] == field, (path, miss.text)
    bad = httpx.get(f"{url}/training/jobs/{job_id}/artifacts/.report.txt.sha256", headers=ci, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "name"
    box = {"Authorization": f"Bearer {keys['box']}"}
    for path in (f"/training/jobs/{job_id}/artifacts", f"/training/jobs/{job_id}/artifacts/report.txt"):
        refused = httpx.get(url + path, headers=box, timeout=10)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_scope"
        assert httpx.get(url + path, timeout=10).status_code == 401

    token = keys["ci"]
    r = cli("jobs", "artifacts", job_id, "--json", "--url", url, token=token)
    assert r.returncode == 0 and json.loads(r.stdout) == listed.json()
    r = cli("jobs", "artifacts", job_id, "-q", "--url", url, token=token)
    assert r.stdout.decode().split() == ["curve.csv", "report.txt"]
    r = cli("jobs", "artifacts", job_id, "--url", url, token=token)
    assert r.returncode == 0 and digest["report.txt"] in r.stdout.decode() and str(len(curve)) in r.stdout.decode()
    target = tmp_path / "out" / "report.txt"
    target.parent.mkdir()
    r = cli("jobs", "download", job_id, "report.txt", "-o", str(target), "--url", url, token=token)
    assert r.returncode == 0 and target.read_bytes() == report, r.stderr
    assert r.stderr.decode() == f"saved report.txt of {job_id} to {target} ({len(report)} bytes)\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.txt"]  # no temp file left
    r = cli("jobs", "download", job_id, "report.txt", "-o", str(target), "--url", url, token=token)
    assert r.returncode == 2 and r.stderr.decode() == f"mangwale: error: {target} already exists; pass --force to replace it\n"
    r = cli("jobs", "download", job_id, "curve.csv", "-o", str(target), "--force", "-q", "--url", url, token=token)
    assert r.returncode == 0 and r.stderr == b"" and target.read_bytes() == curve
    r = cli("jobs", "download", job_id, "curve.csv", "-o", "-", "--url", url, token=token)
    assert r.returncode == 0 and r.stdout == curve and r.stderr == b""
    r = cli("jobs", "download", job_id, "nope.bin", "-o", str(tmp_path / "nope"), "--url", url, token=token)
    assert r.returncode == 4 and r.stderr.decode().count("\n") == 1 and "no artifact 'nope.bin'" in r.stderr.decode()
    assert not (tmp_path / "nope").exists()
    r = cli("jobs", "download", "job-nope", "report.txt", "-o", "-", "--url", url, token=token)
    assert (r.returncode, r.stdout, r.stderr) == (4, b"", b"mangwale: error: job job-nope not found\n")
    r = cli("jobs", "artifacts", job_id, "--url", url, token=keys["box"])
    assert r.returncode == 5 and r.stderr.decode().count("\n") == 1


def wait_for_job(url: str, job_id: str, headers: dict[str, str]) -> dict[str, object]:
    from conftest import wait_for

    def ended() -> dict[str, object] | None:
        doc = httpx.get(f"{url}/training/jobs/{job_id}", headers=headers, timeout=10).json()
        return doc if doc["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(ended, 30, 0.05, f"job {job_id} to end")


def test_uploads_are_read_back_through_another_instance(server_factory: Callable[..., ServerProcess], redis_server: Any,
                                                         tmp_path: Path) -> None:  # fmt: skip
    """Two instances on one Redis with artifacts.dir: a file uploaded through one is listed and
    downloaded through the other, with its sha256, also after the job ended; jobs download
    without -o writes ./NAME."""
    from test_models import put, running_job

    env = {"MANGWALE_ARTIFACTS_DIR": str(tmp_path / "shared-artifacts"), "MANGWALE_RUNNER_LEASE": "5"}
    a = server_factory(data_dir=tmp_path / "a", env=env, args=["--store", redis_server.url])
    b = server_factory(data_dir=tmp_path / "b", env=env, args=["--store", redis_server.url, "--concurrency", "0"])
    data = os.urandom(200_000)
    with a.client() as http_a, b.client() as http_b:
        job = running_job(http_a)
        assert put(http_a, job, "weights.bin", data).status_code == 201
        entry = {"name": "weights.bin", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert http_b.get(f"/training/jobs/{job['id']}/artifacts").json() == [entry]
        http_a.post(f"/training/jobs/{job['id']}/cancel")
        got = http_b.get(f"/training/jobs/{job['id']}/artifacts/weights.bin")
        assert got.status_code == 200 and got.content == data and got.headers["etag"] == f'"{entry["sha256"]}"'
    here = tmp_path / "here"
    here.mkdir()
    r = cli("jobs", "download", job["id"], "weights.bin", "-q", "--url", b.url, cwd=here)
    assert r.returncode == 0 and (here / "weights.bin").read_bytes() == data, r.stderr
