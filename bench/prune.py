#!/usr/bin/env python3
"""Prune: what pruning N finished jobs costs the event loop (issue 12: cost flat at 100k jobs).

Builds a store of N finished ``nlu-train``-shaped jobs (create, start, end: three records each)
through the store's own write path, then runs ``Service.prune`` (by age, everything) on it while
a ticker task measures the event loop's longest stall. Prints the prune's wall time and that
stall: the time every other client of the server waited at worst.

    python bench/prune.py                                  # 100k on the embedded store
    python bench/prune.py --jobs 10000
    python bench/prune.py --store redis://127.0.0.1:6379/0  # the same on Redis (prefix bench-prune:)
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from mangwale_cli import wire
from mangwale_cli.service import Service
from mangwale_cli.settings import load
from mangwale_cli.store.base import Expect, Store
from mangwale_cli.wire import Job, JobStatus

INTENTS = [f"intent_{i:02d}" for i in range(12)]


async def one_job(store: Store, n: int, t: int) -> None:
    job = Job(id=f"job-{t}-{n:06x}", kind="nlu-train", dataset_id="ds-1", agent_id="support-bot",
              params={"epochs": 12, "validationFraction": 0.2, "seed": n % 7}, created_at=t, updated_at=t)  # fmt: skip
    job, _ = await store.create_job(job)
    job.status, job.attempt, job.lease = JobStatus.RUNNING, 1, {"holder": "bench", "token": 1}
    await store.begin_attempt(job, 0, wire.training_update(job))
    expect = Expect.lease_of(job)
    job.status, job.progress, job.lease = JobStatus.SUCCEEDED, 100, None
    job.finished_at = job.updated_at = t + 100
    job.metrics = {"accuracy": 0.91, "loss": 0.12, "perIntent": {i: {"precision": 0.9, "recall": 0.87} for i in INTENTS}}
    await store.write_job(job, wire.training_update(job, metrics=job.metrics), expect=expect, durable=True)


async def measure(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    env = {"MANGWALE_DATA_DIR": str(data_dir), "MANGWALE_RUNNER_SAMPLE_DATASET": "false"}
    if args.store != "tinydb":
        env |= {"MANGWALE_STORE_BACKEND": args.store, "MANGWALE_STORE_PREFIX": "bench-prune:"}
    svc = Service(load({}, env=env))
    store = svc.store
    if args.store == "tinydb":
        svc.datadir.prepare()
    await store.open()
    if args.store != "tinydb":
        await store.client.eval("for _, k in ipairs(redis.call('KEYS', 'bench-prune:*')) do redis.call('DEL', k) end", 0)  # type: ignore[attr-defined]
        await store.close()
        await store.open()
    started = time.monotonic()
    base = wire.now_ms() - 10 * args.jobs - 86_400_000
    for lo in range(0, args.jobs, 256):
        await asyncio.gather(*(one_job(store, i, base + 10 * i) for i in range(lo, min(args.jobs, lo + 256))))
    if hasattr(store, "snapshot"):
        await store.snapshot()  # the finished jobs go to the archive, as on a long-running server
    built = time.monotonic() - started

    stall = 0.0
    done = False

    async def ticker() -> None:
        nonlocal stall
        last = time.monotonic()
        while not done:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            stall = max(stall, now - last - 0.005)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    t0 = time.monotonic()
    result = await svc.prune(older_than=0)
    took = time.monotonic() - t0
    done = True
    await tick
    await store.close()
    if args.store == "tinydb":
        svc.datadir.unlock()
    return {"jobs": args.jobs, "store": args.store, "build_s": round(built, 1), "pruned": result["count"],
            "prune_s": round(took, 2), "worst_loop_stall_ms": round(stall * 1000, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100_000, help="finished jobs in the store")
    ap.add_argument("--store", default="tinydb", help="tinydb, or a redis:// URL")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mangwale-prune-") as tmp:
        print(asyncio.run(measure(args, Path(tmp))))


if __name__ == "__main__":
    main()
