"""Deleting and pruning finished jobs: the job_deleted event, what is never pruned, the admin
scope, the CLI, and the [retention] pass that prunes on its own."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST_ENV, ServerProcess, stored, wait_for
from fastapi.testclient import TestClient
from tokentools import auth_extra, new_token

from mangwale_cli import wire
from mangwale_cli.server.app import create_app
from mangwale_cli.service import Service
from mangwale_cli.settings import load
from mangwale_cli.store import archive
from mangwale_cli.wire import Job, JobStatus

TERMINAL = {"succeeded", "failed", "cancelled"}


def create(api: TestClient, **params: Any) -> str:
    r = api.post("/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 1, **params}})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def settled(api: TestClient, job_id: str) -> dict[str, Any]:
    return wait_for(lambda: (j := api.get(f"/training/jobs/{job_id}").json())["status"] in TERMINAL and j,
                    what=f"{job_id} to finish")  # fmt: skip


def test_prune_by_age_deletes_finished_jobs_with_their_files_and_says_so(api: TestClient, settings: Any) -> None:
    """Pruning finished jobs older than an age deletes them, their files and stored lines, with one
    job_deleted event; a queued or running job is never pruned; a dry run deletes nothing."""
    done = [create(api) for _ in range(3)]
    failed = create(api, failAt=1)
    for job in [*done, failed]:
        settled(api, job)
    running = create(api, steps=2, stepMs=60_000)
    wait_for(lambda: api.get(f"/training/jobs/{running}").json()["status"] == "running", what="running")
    files = settings.data_dir / "artifacts" / done[0]
    files.mkdir(parents=True, exist_ok=True)
    (files / "model.bin").write_bytes(b"x")
    head = api.get("/healthz").json()["headSeq"]

    dry = api.post("/training/jobs/prune", json={"olderThan": "0s", "dryRun": True}).json()
    assert dry == {"deleted": sorted([*done, failed]), "count": 4, "dryRun": True, "kept": []}
    assert api.get("/healthz").json()["headSeq"] == head and files.exists()

    only_failed = api.post("/training/jobs/prune", json={"olderThan": "0s", "status": ["failed"]}).json()
    assert only_failed["deleted"] == [failed] and api.get(f"/training/jobs/{failed}").status_code == 404
    result = api.post("/training/jobs/prune", json={"olderThan": "0s"}).json()
    assert result == {"deleted": sorted(done), "count": 3, "dryRun": False, "kept": []}
    assert not files.exists()
    assert api.get(f"/training/jobs/{running}").json()["status"] == "running"
    assert [j["id"] for j in api.get("/training/jobs").json()] == [running]
    events = stored(settings.data_dir).events
    pruned = [e for e in events if e["type"] == "job_deleted"]
    assert [(e["jobIds"], e["reason"]) for e in pruned] == [([failed], "pruned"), (sorted(done), "pruned")]
    assert api.post("/training/jobs/prune", json={"olderThan": "30d"}).json()["count"] == 0


def test_prune_keeps_the_newest_and_the_base_of_an_active_fine_tune(tmp_path: Path) -> None:
    """--keep N keeps the newest N finished jobs; a finished job that a queued fine-tune starts from
    is kept (and named), whatever its age."""
    cfg = load({}, env={**FAST_ENV, "MANGWALE_DATA_DIR": str(tmp_path / "d"), "MANGWALE_RUNNER_CONCURRENCY": "1"})
    with TestClient(create_app(cfg)) as api:
        keeps_its_base(api)


def keeps_its_base(api: TestClient) -> None:
    ds = api.get("/training/datasets").json()[0]["id"]
    base = api.post("/training/jobs", json={"kind": "nlu-train", "datasetId": ds, "params": {"epochs": 2}}).json()["id"]
    assert settled(api, base)["status"] == "succeeded"
    blocker = create(api, steps=2, stepMs=60_000)  # concurrency 1: what follows stays queued
    wait_for(lambda: api.get(f"/training/jobs/{blocker}").json()["status"] == "running", what="the blocker")
    jobs = [create(api) for _ in range(4)]
    tune = api.post("/training/jobs", json={"kind": "fine-tune", "datasetId": ds, "params": {"baseJobId": base}})
    assert tune.status_code == 201, tune.text
    jobs.append(blocker)
    api.post(f"/training/jobs/{blocker}/cancel")  # the queue moves: 4 simulate jobs, then the fine-tune
    for job in jobs[:4]:
        settled(api, job)
    assert api.get(f"/training/jobs/{tune.json()['id']}").json()["status"] in ("queued", "running")
    # Keep the newest 2 finished; of the older ones, the fine-tune's base is kept and said so.
    result = api.post("/training/jobs/prune", json={"keep": 2}).json()
    by_finish = sorted(api.get("/training/jobs", params={"status": "succeeded,failed,cancelled"}).json(),
                       key=lambda j: (j["finishedAt"], j["id"]))  # fmt: skip
    assert result["kept"] == [base] and base not in result["deleted"]
    assert {j["id"] for j in by_finish} == {base, *[j for j in jobs if j not in result["deleted"]]}
    assert len(result["deleted"]) == len(jobs) - 2
    assert api.get(f"/training/jobs/{base}").status_code == 200


def test_prune_needs_an_admin_token_and_good_input(tmp_path: Path) -> None:
    """With tokens configured, pruning needs the admin scope (write is 403); bad input is a 422
    naming the field."""
    admin, writer = new_token(), new_token()
    cfg = load({}, env={**FAST_ENV, "MANGWALE_DATA_DIR": str(tmp_path / "d")})
    cfg.extra = {"auth": auth_extra({"admin": (admin, ["admin"]), "writer": (writer, ["read", "write"])})}
    with TestClient(create_app(cfg)) as api:
        body = {"olderThan": "1d"}
        assert api.post("/training/jobs/prune", json=body).status_code == 401
        denied = api.post("/training/jobs/prune", json=body, headers={"Authorization": f"Bearer {writer}"})
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_scope"
        ok = api.post("/training/jobs/prune", json=body, headers={"Authorization": f"Bearer {admin}"})
        assert ok.status_code == 200 and ok.json()["count"] == 0
        auth = {"Authorization": f"Bearer {admin}"}
        for bad, field in ((  {}, "olderThan"), ({"olderThan": "3 fortnights"}, "olderThan"),
                           ({"keep": -1}, "keep"), ({"olderThan": "1d", "status": ["running"]}, "status")):  # fmt: skip
            r = api.post("/training/jobs/prune", json=bad, headers=auth)
            assert r.status_code == 422 and r.json()["error"]["field"].startswith(field), (bad, r.text)


def run_cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mangwale_cli", *args, "--url", url],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip


def test_cli_prune(server: ServerProcess) -> None:
    """`mangwale jobs prune` lists what it deletes (stdout: ids, stderr: the count), `--dry-run`
    deletes nothing, `--json` is the REST body, and a bad age is one line and exit 2."""
    with server.client() as http:
        ids = [http.post("/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 1}}).json()["id"]
               for _ in range(2)]  # fmt: skip
        for job in ids:
            wait_for(lambda j=job: http.get(f"/training/jobs/{j}").json()["status"] in TERMINAL, what="finished")
    dry = run_cli("jobs", "prune", "--older-than", "0s", "--dry-run", url=server.url)
    assert dry.returncode == 0 and dry.stdout.split() == sorted(ids)
    assert dry.stderr.strip() == "would delete 2 finished job(s)"
    real = run_cli("jobs", "prune", "--older-than", "0s", "--json", url=server.url)
    assert real.returncode == 0 and json.loads(real.stdout)["deleted"] == sorted(ids)
    bad = run_cli("jobs", "prune", "--older-than", "soon", url=server.url)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "duration" in bad.stderr
    nothing = run_cli("jobs", "prune", url=server.url)
    assert nothing.returncode == 2 and "--older-than" in nothing.stderr


@pytest.mark.parametrize("env", [{"MANGWALE_RETENTION_MAX_FINISHED": "2", "MANGWALE_RETENTION_INTERVAL": "1"}])
def test_retention_prunes_by_itself(server_factory: Any, env: dict[str, str]) -> None:
    """[retention] max_finished keeps the newest finished jobs and prunes the rest on its own."""
    server = server_factory(env={**env, "MANGWALE_RUNNER_SAMPLE_DATASET": "false"})
    with server.client() as http:
        ids = []
        for _ in range(5):
            job = http.post("/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 1}}).json()["id"]
            wait_for(lambda j=job: http.get(f"/training/jobs/{j}").json()["status"] in TERMINAL, what="finished")
            ids.append(job)
        wait_for(lambda: len(http.get("/training/jobs").json()) == 2, what="retention to prune", timeout=15)
        assert [j["id"] for j in http.get("/training/jobs").json()] == ids[:-3:-1]


# --- the prune itself, in-process on both stores ------------------------------------------------


@asynccontextmanager
async def service(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> AsyncIterator[Service]:
    """A Service whose store is open (no runner): what ``prune`` needs, on ``kind``'s store."""
    env = {**FAST_ENV, "MANGWALE_DATA_DIR": str(tmp_path / "d"), "MANGWALE_RUNNER_SAMPLE_DATASET": "false"}
    if kind == "redis":
        server = request.getfixturevalue("redis_server_module")
        env |= {"MANGWALE_STORE_BACKEND": server.url, "MANGWALE_STORE_PREFIX": f"t-{uuid.uuid4().hex[:8]}:"}
    svc = Service(load({}, env=env))
    if not svc.shared:
        svc.datadir.prepare()
    await svc.store.open()
    try:
        yield svc
    finally:
        await svc.store.close()
        if not svc.shared:
            svc.datadir.unlock()


async def finished(svc: Service, n: int, status: JobStatus = JobStatus.SUCCEEDED, **params: Any) -> Job:
    t = 1_000 + n
    job = Job(id=f"job-{n:04d}", kind="simulate", dataset_id=None, status=status, attempt=1, params=params,
              created_at=t, updated_at=t + 10, finished_at=t + 10 if status.terminal else None)  # fmt: skip
    return (await svc.store.create_job(job))[0]


@pytest.mark.parametrize("kind", ["tinydb", "redis"])
def test_prune_spares_a_base_that_a_fine_tune_created_meanwhile_starts_from(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    """A fine-tune queued after prune chose its candidates, before it deletes them, still keeps
    its base: the check is inside each deletion, and the prune names the base as kept."""

    async def main() -> None:
        async with service(request, tmp_path, kind) as svc:
            for n in range(1, 6):
                await finished(svc, n)
            real_delete = svc.store.delete_jobs
            meanwhile: list[str] = []

            async def delete_jobs(job_ids: list[str], reason: str = "deleted") -> list[str]:
                if not meanwhile:  # the candidates are chosen: a fine-tune of one of them arrives
                    tune = Job(id="job-tune", kind="fine-tune", dataset_id=None, params={"baseJobId": "job-0002"},
                               created_at=5_000, updated_at=5_000)  # fmt: skip
                    await svc.store.create_job(tune)
                    meanwhile.append(tune.id)
                return await real_delete(job_ids, reason)

            svc.store.delete_jobs = delete_jobs  # type: ignore[method-assign]  # a spy in place of the real method
            result = await svc.prune(older_than=0)
            assert meanwhile and result["deleted"] == ["job-0001", "job-0003", "job-0004", "job-0005"]
            assert result["kept"] == ["job-0002"]
            assert await svc.store.get_job("job-0002") is not None

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["tinydb", "redis"])
def test_prune_decodes_no_finished_job_document(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Choosing what to prune (by age or by count) reads (finishedAt, id) from an index: no
    finished job's document is read back or decoded, archived or not."""

    async def main() -> None:
        async with service(request, tmp_path, kind) as svc:
            for n in range(1, 31):
                await finished(svc, n, JobStatus.FAILED if n % 3 else JobStatus.SUCCEEDED)
            await finished(svc, 40, JobStatus.QUEUED)
            if hasattr(svc.store, "snapshot"):
                await svc.store.snapshot()  # the finished ones go to the archive
            decoded: list[str] = []
            real_from_dict, real_read = Job.from_dict.__func__, archive.Reader.read  # type: ignore[attr-defined]  # a classmethod's function, to call it unbound

            def from_dict(cls: type[Job], d: dict[str, Any]) -> Job:
                if d.get("status") in {s.value for s in wire.TERMINAL}:
                    decoded.append(d["id"])
                return real_from_dict(cls, d)  # type: ignore[no-any-return]  # the unbound function is untyped

            def read(self: archive.Reader, *args: Any) -> Any:
                decoded.append("archived")
                return real_read(self, *args)

            monkeypatch.setattr(Job, "from_dict", classmethod(from_dict))
            monkeypatch.setattr(archive.Reader, "read", read)
            kept = await svc.prune(keep=10, dry_run=True)
            assert kept["count"] == 20
            assert (await svc.prune(older_than=0, keep=25))["count"] == 5
            assert (await svc.prune(older_than=0))["count"] == 25
            assert decoded == []
            monkeypatch.undo()
            assert [j.id for j in await svc.store.list_jobs()] == ["job-0040"]

    asyncio.run(main())
