"""Model files are not trusted code: skops models, refused pickles and versions, and the
artifact upload (``PUT /training/jobs/{id}/artifacts/{name}``) against real servers."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerProcess, wait_for

from mangwale_cli import wire
from mangwale_cli.datafile import load_sample_examples
from mangwale_cli.errors import ModelRefused
from mangwale_cli.nlu import modelfile
from mangwale_cli.nlu.model import IntentModel, train
from mangwale_cli.trainers.nlu import NluTrainer

TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    params = NluTrainer().validate_params({"epochs": 2})
    train(load_sample_examples(), params, lambda *a, **k: None, directory)
    return directory


class Boobytrap:
    """Unpickling this opens (creates) ``path``: what a malicious model.joblib would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def boobytrapped(marker: Path) -> bytes:
    return pickle.dumps(Boobytrap(marker), protocol=4)


def with_header(src: Path, dest: Path, **changes: Any) -> Path:
    """A copy of the model file ``src`` whose mangwale.json has ``changes``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == modelfile.HEADER:
                data = json.dumps({**json.loads(data), **changes}).encode()
            zout.writestr(item, data)
    return dest


# --- the model file, in process -----------------------------------------------------------------


def test_trusted_types_are_exactly_what_a_built_model_names(model_dir: Path) -> None:
    """The reviewed list covers every type a model built here names, and nothing in it is unused
    but the scalar kinds skops may or may not write (a changed pipeline shows up here)."""
    named = modelfile.schema_types(model_dir / modelfile.MODEL_FILE)
    assert named <= modelfile.ALLOWED, named - modelfile.ALLOWED
    assert set(modelfile.TRUSTED) <= named


def test_a_skops_model_round_trips(model_dir: Path, tmp_path: Path) -> None:
    """save then load gives the same predictions, entities included; the header says the versions."""
    model = IntentModel.load(model_dir)
    text = "I'd like a margherita pizza, where is ORD-48213?"
    again = IntentModel.load(Path(model.save(tmp_path)).parent).predict(text)
    assert again == model.predict(text)
    header = modelfile.read_header(tmp_path / "model.skops")
    assert header["formatVersion"] == modelfile.FORMAT_VERSION
    assert header["sklearn"] == modelfile.versions()["sklearn"]


def test_a_pickle_is_never_loaded(tmp_path: Path) -> None:
    """A pickle named model.skops, or an old model.joblib, is refused naming the problem, and
    the code in it never runs (the file it would create does not appear)."""
    marker = tmp_path / "pwned"
    as_skops = tmp_path / "a"
    as_skops.mkdir()
    (as_skops / "model.skops").write_bytes(boobytrapped(marker))
    with pytest.raises(ModelRefused, match="pickles and joblib files are never loaded"):
        IntentModel.load(as_skops)
    legacy = tmp_path / "job-old"
    legacy.mkdir()
    (legacy / "model.joblib").write_bytes(boobytrapped(marker))
    with pytest.raises(ModelRefused, match="retrain") as info:
        IntentModel.load(legacy)
    assert info.value.code == "legacy_model"
    assert not marker.exists()


def test_another_sklearn_or_format_version_is_refused(model_dir: Path, tmp_path: Path) -> None:
    """A model built under another scikit-learn, or in another format version, is refused with
    both versions named."""
    other = tmp_path / "sk"
    other.mkdir()
    with_header(model_dir / "model.skops", other / "model.skops", sklearn="0.24.2")
    with pytest.raises(ModelRefused, match=r"scikit-learn 0\.24\.2, this server has scikit-learn \d"):
        IntentModel.load(other)
    fmt = tmp_path / "fmt"
    fmt.mkdir()
    with_header(model_dir / "model.skops", fmt / "model.skops", formatVersion=99)
    with pytest.raises(ModelRefused, match="format version 99, this server reads version 2"):
        IntentModel.load(fmt)


def test_a_type_outside_the_list_is_refused(model_dir: Path, tmp_path: Path) -> None:
    """A skops file that holds any other type (here a scikit-learn estimator skops itself
    trusts) is refused by the audit before anything is built."""
    import skops.io
    from sklearn.linear_model import LogisticRegression

    path = tmp_path / "model.skops"
    skops.io.dump({"vectorizer": LogisticRegression(), "classifier": LogisticRegression()}, path)
    header = json.loads(zipfile.ZipFile(model_dir / "model.skops").read(modelfile.HEADER))
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(modelfile.HEADER, json.dumps(header))
    with pytest.raises(ModelRefused, match="LogisticRegression"):
        IntentModel.load(tmp_path)


# --- the upload route, against real servers ------------------------------------------------------


def running_job(http: httpx.Client, seconds: float = 60.0) -> dict[str, Any]:
    """A simulate job that runs for about ``seconds``, once it is running (with its lease)."""
    resp = http.post("/training/jobs", json={"kind": "simulate", "params": {"steps": 20, "stepMs": seconds * 50}})
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["id"]

    def started() -> dict[str, Any] | None:
        doc: dict[str, Any] = http.get(f"/training/jobs/{job_id}").json()
        return doc if doc["status"] == "running" and doc.get("lease") else None

    return wait_for(started, 20, 0.05, f"job {job_id} to run")


def lease_of(job: dict[str, Any]) -> str:
    return wire.format_lease(job["lease"]["holder"], job["lease"]["token"])


def put(http: httpx.Client, job: dict[str, Any], name: str, data: bytes | Iterator[bytes], *,
        sha: str | None = None, lease: str | None = None, length: int | None = None) -> httpx.Response:  # fmt: skip
    if isinstance(data, bytes):
        sha = sha or hashlib.sha256(data).hexdigest()
        length = len(data) if length is None else length
    headers = {wire.SHA256_HEADER: sha or "", wire.LEASE_HEADER: lease or lease_of(job)}
    if length is not None:
        headers["Content-Length"] = str(length)
    return http.put(f"/training/jobs/{job['id']}/artifacts/{name}", content=data, headers=headers, timeout=120)


def error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body: dict[str, Any] = resp.json()["error"]
    return body


def job_files(server: ServerProcess, job_id: str) -> list[str]:
    root = server.data_dir / "artifacts" / job_id
    return files_in(root, wire.RESERVED_ARTIFACTS)


def files_in(root: Path, ignore: frozenset[str] = frozenset()) -> list[str]:
    """The names in ``root``, without the sha256 sidecar of an uploaded file that is there
    (``.NAME.sha256``, artifacts.py): anything else left behind shows."""
    names = {p.name for p in root.iterdir() if p.name not in ignore} if root.is_dir() else set()
    return sorted(n for n in names if not (n.startswith(".") and n.endswith(".sha256") and n[1:-7] in names))


def wait_job(http: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        doc: dict[str, Any] = http.get(f"/training/jobs/{job_id}").json()
        return doc if doc["status"] in TERMINAL else None

    return wait_for(ended, timeout, 0.05, f"job {job_id} to end")


def test_an_uploaded_skops_model_predicts(server: ServerProcess, model_dir: Path) -> None:
    """201 for a model with its sha256: it is in the job's directory, complete, before the job
    ends, and the finished job predicts with it as the model does in process; the download
    route serves the same bytes as <job>-model.skops."""
    data = (model_dir / "model.skops").read_bytes()
    text = "where is my order ORD-48213"
    with server.client() as http:
        job = running_job(http, seconds=20)  # the first audit starts the predictor's child
        resp = put(http, job, "model.skops", data)
        assert resp.status_code == 201, resp.text
        assert resp.json() == {"jobId": job["id"], "name": "model.skops", "size": len(data),
                               "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
        assert (server.data_dir / "artifacts" / job["id"] / "model.skops").read_bytes() == data
        assert wait_job(http, job["id"])["status"] == "succeeded"
        got = http.post(f"/training/jobs/{job['id']}/predict", json={"text": text})
        assert got.status_code == 200, got.text
        want = IntentModel.load(model_dir).predict(text)
        assert (got.json()["intent"], got.json()["confidence"]) == (want["intent"], want["confidence"])
        dl = http.get(f"/training/jobs/{job['id']}/artifact")
        assert dl.status_code == 200 and dl.content == data
        assert f'{job["id"]}-model.skops' in dl.headers["content-disposition"]


def test_pickles_are_refused_at_upload_and_never_run(server: ServerProcess, tmp_path: Path) -> None:
    """A pickle uploaded as model.skops, under a pickle's name, or under any other name is 422,
    nothing is kept, and the code in it never runs on the server."""
    marker = tmp_path / "pwned-by-upload"
    evil = boobytrapped(marker)
    with server.client() as http:
        job = running_job(http)
        for name in ("model.skops", "model.joblib", "weights.pkl", "blob.bin"):
            body = error(put(http, job, name, evil), 422)
            assert body["code"] == "untrusted_artifact", body
        assert "pickle" in body["message"] or "never" in body["message"]
        assert job_files(server, job["id"]) == []
        http.post(f"/training/jobs/{job['id']}/cancel")
    assert not marker.exists()


def test_a_model_of_another_sklearn_is_refused_at_upload_and_predict(
    server: ServerProcess, model_dir: Path, tmp_path: Path
) -> None:
    """Upload: 422 naming both scikit-learn versions. A finished job whose stored model is of
    another version, or an old model.joblib: predict and download answer 409 saying why."""
    other = with_header(model_dir / "model.skops", tmp_path / "model.skops", sklearn="0.24.2")
    with server.client() as http:
        job = running_job(http, seconds=3)
        body = error(put(http, job, "model.skops", other.read_bytes()), 422)
        assert "scikit-learn 0.24.2" in body["message"], body
        assert wait_job(http, job["id"])["status"] == "succeeded"
        target = server.data_dir / "artifacts" / job["id"]
        target.mkdir(exist_ok=True)
        (target / "model.skops").write_bytes(other.read_bytes())
        body = error(http.post(f"/training/jobs/{job['id']}/predict", json={"text": "hi"}), 409)
        assert body["code"] == "incompatible_model" and "scikit-learn 0.24.2" in body["message"], body
        (target / "model.skops").unlink()
        (target / "model.joblib").write_bytes(boobytrapped(tmp_path / "pwned"))
        for resp in (http.post(f"/training/jobs/{job['id']}/predict", json={"text": "hi"}),
                     http.get(f"/training/jobs/{job['id']}/artifact")):  # fmt: skip
            body = error(resp, 409)
            assert body["code"] == "legacy_model" and "retrain" in body["message"], body
    assert not (tmp_path / "pwned").exists()


def test_upload_refusals_keep_nothing(server_factory: Callable[..., ServerProcess]) -> None:
    """422 for a sha256 mismatch, 413 over artifacts.max_size, 409 for a stale lease token or a
    finished job, 400 for bad headers and for names with path separators or a leading dot;
    after all of them the job's directory holds nothing uploaded and nothing outside it."""
    server = server_factory(env={"MANGWALE_ARTIFACTS_MAX_SIZE": "1000"})
    with server.client() as http:
        job = running_job(http)
        data = os.urandom(500)
        body = error(put(http, job, "a.bin", data, sha=hashlib.sha256(b"other").hexdigest()), 422)
        assert body["code"] == "sha256_mismatch"
        assert error(put(http, job, "a.bin", os.urandom(2000)), 413)["code"] == "too_large"
        stale = wire.format_lease(job["lease"]["holder"], job["lease"]["token"] + 1)
        body = error(put(http, job, "a.bin", data, lease=stale), 409)
        assert "lease" in body["message"], body
        body = error(put(http, job, "a.bin", data, lease=f"someone-else:{job['lease']['token']}"), 409)
        assert "lease" in body["message"], body
        assert error(put(http, job, "a.bin", data, sha="xyz"), 400)["field"] == wire.SHA256_HEADER
        assert error(put(http, job, "a.bin", data, lease="no-token"), 400)["field"] == wire.LEASE_HEADER
        for name in ("%2E%2E%2Fescaped", "sub%2Fa.bin", ".hidden", "logs.jsonl", "a%5Cb"):
            assert error(put(http, job, name, data), 400)["code"] == "bad_name", name
        assert job_files(server, job["id"]) == []
        assert not (server.data_dir / "artifacts" / "escaped").exists()
        ok = put(http, job, "a.bin", data)
        assert ok.status_code == 201, ok.text
        assert job_files(server, job["id"]) == ["a.bin"]
        http.post(f"/training/jobs/{job['id']}/cancel")
        wait_job(http, job["id"])
        body = error(put(http, job, "b.bin", data), 409)
        assert "cancelled" in body["message"], body


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_a_50_mb_upload_streams_without_growing_the_server(server: ServerProcess) -> None:
    """A 50 MB body streamed in 1 MB chunks is stored whole and checked, while the server's peak
    RSS (VmHWM) grows by far less than the body: it never holds the file in memory."""
    size, chunk = 50 * 1024 * 1024, os.urandom(1024 * 1024)
    sha = hashlib.sha256(chunk * 50).hexdigest()
    with server.client() as http:
        job = running_job(http, seconds=20)
        put(http, job, "warmup.bin", b"x" * 1024)  # the first upload's imports are not the body's
        before = peak_rss_mb(server.pid)
        resp = put(http, job, "big.bin", (chunk for _ in range(50)), sha=sha, length=size)
        after = peak_rss_mb(server.pid)
        assert resp.status_code == 201, resp.text
        assert (server.data_dir / "artifacts" / job["id"] / "big.bin").stat().st_size == size
        print(f"server peak RSS {before:.1f} MB before, {after:.1f} MB after a 50 MB upload")
        assert after - before < 16, (before, after)
        http.post(f"/training/jobs/{job['id']}/cancel")


def test_on_redis_uploads_go_to_the_shared_artifacts_dir(
    server_factory: Callable[..., ServerProcess], redis_server: Any, tmp_path: Path
) -> None:
    """Two instances on one Redis with artifacts.dir: a file uploaded through either lands on
    the shared directory (Redis holds a small manifest); an instance without artifacts.dir
    answers 409 naming the setting instead of putting a file in a Redis hash."""
    shared = tmp_path / "shared-artifacts"
    env = {"MANGWALE_ARTIFACTS_DIR": str(shared), "MANGWALE_RUNNER_LEASE": "5"}
    a = server_factory(data_dir=tmp_path / "a", env=env, args=["--store", redis_server.url])
    b = server_factory(data_dir=tmp_path / "b", env=env, args=["--store", redis_server.url, "--concurrency", "0"])
    data = os.urandom(300_000)
    with a.client() as http_a, b.client() as http_b:
        job = running_job(http_a)
        for http in (http_a, http_b):
            resp = put(http, job, f"via-{http is http_b}.bin", data)
            assert resp.status_code == 201, resp.text
        assert files_in(shared / job["id"]) == ["via-False.bin", "via-True.bin"]
        http_a.post(f"/training/jobs/{job['id']}/cancel")
    c = server_factory(data_dir=tmp_path / "c", env={"MANGWALE_RUNNER_LEASE": "5"},
                       args=["--store", redis_server.url, "--concurrency", "0"])  # fmt: skip
    with c.client() as http_c, a.client() as http_a:
        job = running_job(http_a)
        body = error(put(http_c, job, "x.bin", data), 409)
        assert body["code"] == "no_shared_artifacts_dir" and "artifacts.dir" in body["message"], body
        http_a.post(f"/training/jobs/{job['id']}/cancel")


def test_uploads_need_the_worker_route_scope(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """The upload's scope is decided by worker_route_scope (worker): read and write tokens are 403
    before the body is read, a worker token reaches the lease check."""
    from tokentools import new_token, write_config

    from mangwale_cli.server.auth import required_scope, worker_route_scope
    from mangwale_cli.tokens import Scope

    assert required_scope("PUT", "/training/jobs/j/artifacts/model.skops") is worker_route_scope() is Scope.WORKER
    reader, writer, worker = new_token(), new_token(), new_token()
    cfg = write_config(tmp_path / "c.toml", {"r": (reader, ["read"]), "w": (writer, ["read", "write"]), "k": (worker, ["worker"])})
    server = server_factory(args=["--config", str(cfg)])
    with server.client() as http:
        http.headers["Authorization"] = f"Bearer {writer}"
        job = running_job(http)
        for token in (reader, writer):
            http.headers["Authorization"] = f"Bearer {token}"
            assert error(put(http, job, "a.bin", b"x"), 403)["code"] == "insufficient_scope"
        http.headers["Authorization"] = f"Bearer {worker}"
        stale = wire.format_lease("nobody", 1)
        assert error(put(http, job, "a.bin", b"x", lease=stale), 409)["code"] == "stale"
        http.headers["Authorization"] = f"Bearer {writer}"
        http.post(f"/training/jobs/{job['id']}/cancel")
