#!/usr/bin/env python3
"""History: what a store of many finished jobs costs a running server (issue 12's targets).

Builds stores of N finished jobs (default 0, 1k, 10k, 100k), each a real ``nlu-train``-shaped
record (~1.1 KB: params, final metrics, per-intent figures) with ~15 events (job_created,
running, 12 epoch reports with metrics, a log line, the end), through the store's own write
path, retention off. Then, on a real ``mangwale serve`` over each store, it measures:

- start: process spawn to the first ``/healthz`` 200;
- idle RSS after start;
- ``POST /training/jobs`` p50/p99 (sequential, one keep-alive connection);
- ``GET /training/jobs?limit=20``, ``?status=succeeded&limit=20`` and a cursor page 50 pages
  deep, p50/p99;
- the event loop's worst lag (``mangwale_event_loop_lag_seconds``) while ``--lag-rate`` creates/s
  (default 50) arrive for ``--lag-seconds``, with ``--lag-watchers`` WebSocket watchers of every
  event attached (default none).

    python bench/history.py                          # 0, 1k, 10k, 100k on the embedded store
    python bench/history.py --sizes 0,1000 --requests 100
    python bench/history.py --store redis://127.0.0.1:6379/0   # the same on Redis (a prefix per size)
    python bench/history.py --sizes 100000 --lag-rate 100 --lag-watchers 1000   # issue 14's lag row

Built stores are cached under ``bench/results/history-stores`` (``--rebuild`` to start over).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import httpx

from mangwale_cli import wire
from mangwale_cli.store.base import Expect, Store
from mangwale_cli.wire import Job, JobStatus

CACHE = common.RESULTS / "history-stores"
EPOCHS = 12
INTENTS = [f"intent_{i:02d}" for i in range(12)]


def record(n: int, t: int) -> Job:
    """A finished-job-to-be shaped like a real nlu-train record."""
    return Job(
        id=f"job-{t}-{n:06x}",
        kind="nlu-train",
        dataset_id="ds-1796188926919-4b629b",
        agent_id="support-bot",
        params={"epochs": EPOCHS, "validationFraction": 0.2, "seed": n % 7, "alpha": 0.0001},
        created_at=t,
        updated_at=t,
    )


async def one_job(store: Store, n: int, t: int) -> None:
    job, _ = await store.create_job(record(n, t))
    job.status, job.attempt = JobStatus.RUNNING, 1
    job.lease = {"holder": "bench", "token": 1}
    job.started_at = job.updated_at = t + 10
    await store.begin_attempt(job, 0, wire.training_update(job))
    expect = Expect.lease_of(job)
    for epoch in range(1, EPOCHS + 1):
        job.progress = round(5 + 90 * epoch / EPOCHS, 2)
        job.message = f"Training intent classifier... epoch {epoch}/{EPOCHS}"
        metrics = {"epoch": epoch, "epochs": EPOCHS, "loss": round(1.5 / epoch, 6), "valAccuracy": round(0.5 + epoch / 30, 6)}
        point = {**metrics, "progress": job.progress, "attempt": 1, "timestamp": t + 10 + epoch, "pointNo": epoch}
        await store.write_job(job, wire.training_update(job, metrics=metrics, eta=EPOCHS - epoch), expect=expect,
                              lines=("metrics", [point]))  # fmt: skip
    await store.append_log(job.id, {"lineNo": 1, "line": "trained 12 intents", "attempt": 1},
                           wire.job_log(job.id, "trainer", "trained 12 intents", 1, 1), expect)  # fmt: skip
    job.status, job.progress, job.message = JobStatus.SUCCEEDED, 100, "Training completed"
    job.finished_at = job.updated_at = t + 100
    job.metrics = {
        "accuracy": 0.91, "valAccuracy": 0.88, "loss": 0.12, "epochs": EPOCHS, "examples": 300,
        "perIntent": {name: {"precision": 0.9, "recall": 0.87, "f1": 0.885} for name in INTENTS},
    }  # fmt: skip
    job.lease = None
    await store.write_job(job, wire.training_update(job, metrics=job.metrics), expect=expect, durable=True)


def open_store(url: str, data_dir: Path, prefix: str) -> Store:
    if url == "tinydb":
        from mangwale_cli.store.datadir import DataDir
        from mangwale_cli.store.tinydb_store import TinyDBStore

        datadir = DataDir(data_dir)
        datadir.prepare()
        return TinyDBStore(datadir, retention=100_000, fsync_interval=1.0)
    from mangwale_cli.store.redis_store import RedisStore

    return RedisStore(url, cache_dir=data_dir / "cache", prefix=prefix)


async def build(url: str, data_dir: Path, prefix: str, n: int) -> float:
    store = open_store(url, data_dir, prefix)
    await store.open()
    started = time.monotonic()
    base = wire.now_ms() - 10 * n - 86_400_000
    in_flight = 256  # concurrent jobs: their durable writes share fsyncs, as a busy server's do
    for lo in range(0, n, in_flight):
        await asyncio.gather(*(one_job(store, i, base + 10 * i) for i in range(lo, min(n, lo + in_flight))))
        if lo and lo % 10_000 == 0:
            print(f"  built {lo}/{n} jobs ({time.monotonic() - started:.0f} s)", flush=True)
    if hasattr(store, "snapshot"):
        await store.snapshot()  # what a long-running server would have done by now
    await store.close()
    if hasattr(store, "datadir"):
        store.datadir.unlock()
    return time.monotonic() - started


def timed(http: httpx.Client, method: str, path: str, count: int, **kw: Any) -> list[float]:
    out = []
    for _ in range(count):
        t = time.perf_counter()
        r = http.request(method, path, **kw)
        out.append(time.perf_counter() - t)
        assert r.status_code < 300, r.text
    return sorted(out)


async def paced_creates(url: str, rate: float, seconds: float) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        tasks = []
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.ensure_future(http.post("/training/jobs", json=SIMULATE)))
        done = await asyncio.gather(*tasks)
    return sum(r.status_code == 201 for r in done)


SIMULATE = {"kind": "simulate", "params": {"steps": 1, "stepMs": 1}}


async def lag_phase(server: common.Server, args: argparse.Namespace) -> int:
    """``--lag-watchers`` WebSocket watchers of every event attached (fanout.py's cheap client),
    then ``--lag-rate`` creates/s for ``--lag-seconds``, the lag window starting after they
    connected. Returns the creates answered 201."""
    from fanout import RawWatcher

    watchers = [RawWatcher() for _ in range(args.lag_watchers)]
    for i in range(0, len(watchers), 50):
        await asyncio.gather(*(w.open(server.ws_url) for w in watchers[i : i + 50]))
    await asyncio.sleep(0.5 if watchers else 0)
    server.metrics()  # starts a fresh lag window
    spy = common.profile(server.pid, args.profile, args.lag_seconds) if args.profile else None
    created = await paced_creates(server.url, args.lag_rate, args.lag_seconds)
    if spy is not None:
        spy.wait(30)
    await asyncio.gather(*(w.aclose() for w in watchers), return_exceptions=True)
    return created


def measure(args: argparse.Namespace, base: Path, n: int) -> dict[str, Any]:
    env = {"MANGWALE_RUNNER_SAMPLE_DATASET": "false", "MANGWALE_EVENTS_RETENTION": "100000",
           "MANGWALE_WS_MAX_CONNECTIONS": str(max(10000, args.lag_watchers + 100))}
    if args.store != "tinydb":
        env |= {"MANGWALE_STORE_BACKEND": args.store, "MANGWALE_STORE_PREFIX": f"bench-history-{n}:"}
    server = common.Server(data_dir=base, env=env, pin_cpu=0 if args.pin else None)
    t0 = time.monotonic()
    server.start(timeout=120)
    start_s = time.monotonic() - t0
    time.sleep(2)
    rss = common.rss_bytes(server.pid)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            post = timed(http, "POST", "/training/jobs", args.requests, json=SIMULATE)
            get = timed(http, "GET", "/training/jobs", args.requests, params={"limit": 20})
            status = timed(http, "GET", "/training/jobs", args.requests, params={"status": "succeeded", "limit": 20})
            cursor = None
            deep = min(50, max(1, n // 20 - 1))
            for _ in range(deep):  # walk to a page ~50 pages deep
                r = http.get("/training/jobs", params={"limit": 20, **({"cursor": cursor} if cursor else {})})
                cursor = r.headers.get("X-Next-Cursor") or cursor
            page = timed(http, "GET", "/training/jobs", args.requests,
                         params={"limit": 20, **({"cursor": cursor} if cursor else {})})  # fmt: skip
            created = asyncio.run(lag_phase(server, args))
            lag = server.metrics().get("mangwale_event_loop_lag_seconds", float("nan"))
            worst = server.metrics().get("mangwale_event_loop_lag_max_seconds", float("nan"))
    finally:
        server.stop()
    ms = lambda v: None if v is None else round(v * 1000, 2)
    return {
        "jobs": n,
        "start_s": round(start_s, 2),
        "idle_rss_mb": round(rss / 2**20, 1),
        "post_p50_ms": ms(common.percentile(post, 50)),
        "post_p99_ms": ms(common.percentile(post, 99)),
        "get20_p50_ms": ms(common.percentile(get, 50)),
        "get20_p99_ms": ms(common.percentile(get, 99)),
        "status20_p50_ms": ms(common.percentile(status, 50)),
        "cursor_p50_ms": ms(common.percentile(page, 50)),
        "lag_rate": args.lag_rate,
        "lag_watchers": args.lag_watchers,
        "lag_ms": ms(lag),
        "lag_max_ms": ms(worst),
        "creates_ok": created,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0,1000,10000,100000", help="finished jobs per store, comma-separated")
    ap.add_argument("--store", default="tinydb", help="tinydb, or a redis:// URL")
    ap.add_argument("--requests", type=int, default=200, help="requests per latency figure")
    ap.add_argument("--lag-seconds", type=float, default=10.0, help="seconds of creates for the lag figure")
    ap.add_argument("--lag-rate", type=float, default=50.0, help="creates/s during the lag figure")
    ap.add_argument("--lag-watchers", type=int, default=0,
                    help="WebSocket watchers of every event attached during the lag figure (issue 14: 1000)")
    ap.add_argument("--rebuild", action="store_true", help="build the stores again")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=common.default_pin(),
                    help="pin the server to CPU 0 (and this process to CPU 1)")  # fmt: skip
    ap.add_argument("--out", type=Path, help="result JSON (default bench/results/history.json)")
    ap.add_argument("--profile", type=Path, metavar="FILE",
                    help="py-spy record the server during the lag window, collapsed stacks to FILE")  # fmt: skip
    args = ap.parse_args()
    if args.pin:
        common.pin_self(1)
    common.raise_nofile(2 * args.lag_watchers + 200)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        kind = "tinydb" if args.store == "tinydb" else "redis"
        base = CACHE / f"{kind}-{n}"
        ready = base / "built"
        if args.rebuild or not ready.exists():
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir(parents=True)
            print(f"building a store of {n} finished jobs ...", flush=True)
            took = asyncio.run(build(args.store, base / "data", f"bench-history-{n}:", n))
            ready.write_text(f"{took:.1f}\n")
            print(f"  built in {took:.1f} s", flush=True)
        rows.append(measure(args, base, n))
        common.print_table(rows[-1:], list(rows[-1]))
    common.print_table(rows, list(rows[0]), title=f"history ({args.store})")
    common.write_result("history" if args.store == "tinydb" else "history-redis", {"rows": rows}, args.out)


if __name__ == "__main__":
    main()
