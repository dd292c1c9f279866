"""Predictions run in a child process that lives while they come: the server's memory never
holds scikit-learn or a model.

``Predictor`` is driven in-process with a short idle timeout; the memory of a real server
process is read from /proc.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from conftest import ServerProcess, wait_for

from mangwale_cli.datafile import load_sample_examples
from mangwale_cli.errors import ModelRefused
from mangwale_cli.nlu.model import IntentModel, train
from mangwale_cli.nlu.predictor import Predictor
from mangwale_cli.trainers.nlu import NluTrainer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    params = NluTrainer().validate_params({"epochs": 2})
    train(load_sample_examples(), params, lambda *a, **k: None, directory)
    return directory


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_predictor_answers_then_lets_its_child_go_when_idle(model_dir: Path) -> None:
    """The first prediction starts a child that answers as the model does; after the idle
    timeout the child exits; the next prediction starts another."""
    expected = IntentModel.load(model_dir).predict("cancel my order please")

    async def scenario() -> None:
        predictor = Predictor(idle=0.5)
        try:
            assert await predictor.predict("job-a", model_dir, "cancel my order please") == expected
            first = predictor.pid
            assert first is not None and alive(first)
            again = await predictor.predict("job-a", model_dir, "where is my food")
            assert again["intent"] == "track_order" and predictor.pid == first  # warm: the same child
            await asyncio.to_thread(wait_for, lambda: not alive(first), 5, 0.05, "the idle child to exit")
            assert predictor.pid is None
            assert (await predictor.predict("job-a", model_dir, "hi"))["intent"] == "greet"
            assert predictor.pid not in (None, first)
        finally:
            await predictor.close()

    asyncio.run(scenario())


def test_predictor_survives_a_bad_model_and_an_abandoned_request(model_dir: Path, tmp_path: Path) -> None:
    """A file that is not a model is refused (ModelRefused) naming the problem, and the child goes
    on serving; a request whose caller gave up does not leave its answer for the next one."""
    (tmp_path / "model.skops").write_text("not a model")

    async def scenario() -> None:
        predictor = Predictor(idle=30)
        try:
            with pytest.raises(ModelRefused) as info:
                await predictor.predict("job-bad", tmp_path, "hi")
            assert "model.skops is not a mangwale model file" in str(info.value), info.value
            abandoned = asyncio.create_task(predictor.predict("job-a", model_dir, "where is my food"))
            await asyncio.sleep(0)  # let it send its request
            abandoned.cancel()
            got = await predictor.predict("job-a", model_dir, "thank you so much")
            assert got["text"] == "thank you so much" and got["intent"] == "thanks"
        finally:
            await predictor.close()

    asyncio.run(scenario())


def test_server_memory_stays_flat_after_predict(server: ServerProcess) -> None:
    """A real server's RSS stays at most 100 MB after predictions (it was 165 MB when the server
    loaded scikit-learn itself): the model runs in the predictor's child."""
    with server.client() as http:
        ds = next(d["id"] for d in http.get("/training/datasets").json() if d["name"] == "food-delivery-sample")
        job = http.post("/training/jobs", json={"kind": "nlu-train", "datasetId": ds, "params": {"epochs": 2}}).json()
        wait_for(lambda: http.get(f"/training/jobs/{job['id']}").json()["status"] == "succeeded", 60, 0.1, "training")
        before = rss_mb(server.pid)
        for text in ("where is my order #48213", "cancel it", "thanks"):
            # The first one starts the predictor's child (scikit-learn and skops imports: about
            # 2 s of CPU, far more on a loaded machine); this test is about memory, not time.
            r = http.post(f"/training/jobs/{job['id']}/predict", json={"text": text}, timeout=90)
            assert r.status_code == 200, r.text
        assert r.json()["intent"] == "thanks"
        after = rss_mb(server.pid)
    print(f"\nserver RSS {before:.1f} MB before predict, {after:.1f} MB after")
    assert after <= 100 and after - before < 15, (before, after)
