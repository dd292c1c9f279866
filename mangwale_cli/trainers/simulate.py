"""``simulate``: the seed's "default simulation", with timings a test or benchmark can choose.

Steps are spread evenly from 0 to 100 %. ``params.failAt`` makes the job fail at that step,
which is how clients and tests exercise the failure path. The job's log gets a line when it
starts and one when it ends (not one per step: benchmarks run simulate jobs for their events,
and the progress of each step is in its ``training_update`` already).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

from .base import Param, Trainer, TrainingContext, validate_declared


class TrainerFailure(RuntimeError):
    pass


class SimulateTrainer(Trainer):
    kind = "simulate"
    description = "No training: steps through progress on a timer (params: steps, stepMs, failAt)"
    requires_dataset = False
    params: ClassVar[list[Param]] = [
        Param("steps", int, 4, 1, 10_000),
        Param("stepMs", float, 500.0, 0, 3_600_000),
        Param("failAt", int, None, 1, 10_000),
        Param("message", str, None),
    ]

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        return validate_declared(params, self.params)

    async def run(self, ctx: TrainingContext) -> dict[str, Any] | None:
        steps: int = ctx.params["steps"]
        step_s: float = ctx.params["stepMs"] / 1000
        fail_at = ctx.params.get("failAt")
        label = ctx.params.get("message") or "Simulating step"
        started = time.monotonic()
        plan = f"simulating {steps} step{'s' if steps != 1 else ''} of {ctx.params['stepMs']:g} ms"
        if fail_at is not None:
            plan += f", failing at step {fail_at}"
        await ctx.reporter.log("stdout", plan)
        for i in range(1, steps + 1):
            await asyncio.sleep(step_s)
            if fail_at is not None and i >= fail_at:
                await ctx.reporter.log("stdout", f"failing at step {i} of {steps}, as params.failAt asks")
                raise TrainerFailure(f"simulated failure at step {i} of {steps}")
            pct = round(100 * i / steps, 2) if i < steps else 99.0
            eta = (steps - i) * step_s
            await ctx.reporter.progress(pct, f"{label} {i}/{steps}", eta=round(eta, 3))
        seconds = round(time.monotonic() - started, 3)
        await ctx.reporter.log("stdout", f"done: {steps} steps in {seconds:.2f} s")
        return {"steps": steps, "seconds": seconds}
