"""``nlu-train`` and ``fine-tune`` as the seed ran them: its step sequence, in a child process.

The real scikit-learn trainers replace these (see the trainers issue); until then each step's
message says the real trainer is pending, so nobody mistakes these jobs for training.
"""

from __future__ import annotations

import time
from typing import Any

from .base import Param, Trainer, TrainingContext, validate_declared
from .process import Emit, run_in_process

PENDING = " (placeholder: the real trainer is pending)"

NLU_STEPS = [
    (20, "Preprocessing data..."),
    (30, "Training intent classifier..."),
    (50, "Training entity extractor..."),
    (70, "Validating model..."),
    (85, "Saving model..."),
    (95, "Finalizing..."),
]
FINE_TUNE_STEPS = [
    (10, "Loading base model..."),
    (25, "Preprocessing data..."),
    (40, "Fine-tuning..."),
    (60, "Fine-tuning..."),
    (80, "Validating model..."),
    (95, "Saving model..."),
]


def _work(payload: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """Runs in the child process."""
    step_s = payload["stepMs"] / 1000
    for pct, message in payload["steps"]:
        emit(pct, message + PENDING)
        time.sleep(step_s)
    return {"examples": payload["size"], "placeholder": True}


class SeedStepsTrainer(Trainer):
    requires_dataset = True
    requires_examples = True
    steps: list[tuple[int, str]] = []
    params = [Param("stepMs", float, 300.0, 0, 600_000)]

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        return validate_declared(params, self.params)

    async def run(self, ctx: TrainingContext) -> dict[str, Any] | None:
        payload = {
            "stepMs": ctx.params["stepMs"],
            "steps": self.steps,
            "size": ctx.dataset.size if ctx.dataset else 0,
        }
        return await run_in_process(_work, payload, ctx.reporter)


class NluTrainPlaceholder(SeedStepsTrainer):
    kind = "nlu-train"
    description = "Intent classifier (placeholder: the seed's step sequence)"
    steps = NLU_STEPS


class FineTunePlaceholder(SeedStepsTrainer):
    kind = "fine-tune"
    description = "Fine-tune a trained model (placeholder: the seed's step sequence)"
    steps = FINE_TUNE_STEPS
