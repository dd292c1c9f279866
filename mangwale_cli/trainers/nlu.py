"""``nlu-train`` and ``fine-tune``: the built-in intent + entity trainers (scikit-learn).

The work runs in a child process (``run_in_process``); the model is saved in the job's
artifact directory and served by ``POST /training/jobs/{id}/predict``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, ClassVar

from ..errors import InvalidInput, ModelRefused, NotFound
from ..nlu import modelfile
from ..nlu.features import TrainingDataError, check_examples
from ..store.base import Store
from ..wire import Dataset, JobStatus
from .base import Param, Trainer, TrainingContext, validate_declared
from .process import Emit, run_in_process

MODEL_KINDS = ("nlu-train", "fine-tune")

COMMON = [
    Param("epochs", int, 8, 1, 200),
    Param("validationFraction", float, 0.1, 0.0, 0.5),
    Param("seed", int, 0, 0, 2**31 - 1),
    Param("alpha", float, None, 1e-8, 1.0),  # None: chosen from the data size
]


def _work(payload: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """Runs in the child process: imports scikit-learn there, not in the server."""
    from ..nlu.model import IntentModel, train

    base = IntentModel.load(Path(payload["baseDir"])) if payload.get("baseDir") else None
    return train(payload["examples"], payload["params"], emit, Path(payload["outDir"]), base=base)


class NluTrainer(Trainer):
    kind = "nlu-train"
    description = "Intent classifier (TF-IDF + linear model, by epochs) and entity extractor"
    requires_dataset = True
    requires_examples = True
    params: ClassVar[list[Param]] = COMMON

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        return validate_declared(params, self.params)

    def check_dataset(self, dataset: Dataset) -> None:
        """At least 2 intents with examples, and text with something to learn from (no
        scikit-learn here: ``nlu.features`` knows what the model keeps)."""
        try:
            check_examples(dataset.examples, what=f"dataset {dataset.name!r} ({dataset.id})")
        except TrainingDataError as exc:
            raise InvalidInput(str(exc), field="datasetId", code="unusable_dataset") from None

    async def run(self, ctx: TrainingContext) -> dict[str, Any] | None:
        assert ctx.dataset is not None
        payload = {
            "examples": ctx.dataset.examples,
            "params": ctx.params,
            "outDir": str(ctx.artifacts_dir),
            "baseDir": None,
        }
        return await run_in_process(_work, payload, ctx.reporter, kill_grace=ctx.kill_grace)


class FineTuneTrainer(NluTrainer):
    kind = "fine-tune"
    description = "Continue training a finished nlu-train job's model (params.baseJobId) on another dataset"
    params: ClassVar[list[Param]] = [*COMMON[:1], Param("baseJobId", str, None), *COMMON[1:]]

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        out = validate_declared({"epochs": 4, **params}, self.params)
        if not out.get("baseJobId"):
            raise InvalidInput("fine-tune needs params.baseJobId (a succeeded nlu-train job)", field="params.baseJobId")
        return out

    def check_dataset(self, dataset: Dataset) -> None:
        """Any examples do: the base model brings its intents and its vocabulary."""

    async def check(self, params: dict[str, Any], store: Store) -> None:
        base_id = params["baseJobId"]
        base = await store.get_job(base_id)
        if base is None:
            # 404, as for an unknown datasetId: the job named does not exist (exit 4 in the CLI)
            raise NotFound(f"params.baseJobId: job {base_id} does not exist", field="params.baseJobId", code="unknown_job")
        if base.kind not in MODEL_KINDS or base.status is not JobStatus.SUCCEEDED:
            raise InvalidInput(
                f"params.baseJobId: job {base_id} is a {base.status.value} {base.kind} job; "
                "it must be a succeeded nlu-train or fine-tune job",
                field="params.baseJobId",
            )
        # A shared store publishes models: fetch the base model into this instance's cache.
        directory = await store.load_artifacts(base_id)
        try:
            path = modelfile.model_file(directory)
            if not path.is_file():
                raise InvalidInput(f"params.baseJobId: job {base_id} has no saved model", field="params.baseJobId")
            await asyncio.to_thread(modelfile.check_file, path)
        except ModelRefused as exc:  # refused now, not after the job waited in the queue
            raise ModelRefused(f"params.baseJobId: {exc}", field="params.baseJobId", code=exc.code) from None

    async def run(self, ctx: TrainingContext) -> dict[str, Any] | None:
        assert ctx.dataset is not None
        base_dir = ctx.artifacts_dir.parent / ctx.params["baseJobId"]
        payload = {
            "examples": ctx.dataset.examples,
            "params": ctx.params,
            "outDir": str(ctx.artifacts_dir),
            "baseDir": str(base_dir),
        }
        return await run_in_process(_work, payload, ctx.reporter, kill_grace=ctx.kill_grace)
