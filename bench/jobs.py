#!/usr/bin/env python3
"""Jobs end to end: time to run K short ``simulate`` jobs (``--steps`` steps of ``--step-ms``),
with the store and the event log on disk (the default ``tinydb`` store in a fresh data dir) and
one WebSocket watcher counting every event. The watcher checks ``seq`` for gaps: sent (events
logged after it connected) = received + losses, and losses must be 0. The clock runs from the
first POST to the watcher's receipt of the last job's terminal ``training_update``.

    python bench/jobs.py --jobs 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import httpx
from websockets.asyncio.client import connect

TERMINAL = {"succeeded", "failed", "cancelled"}


async def run(args: argparse.Namespace, server: common.Server) -> dict[str, Any]:
    ws = await connect(server.ws_url, compression=None, ping_interval=None, max_queue=None)
    hello = json.loads(await ws.recv())
    head0 = last = hello["headSeq"]
    received = gaps = dupes = 0
    types: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    done: set[str] = set()
    ids: list[str] = []
    all_posted = asyncio.Event()
    finished = asyncio.Event()
    t_end = 0.0

    async def watch() -> None:
        nonlocal last, received, gaps, dupes, t_end
        async for raw in ws:
            ev = json.loads(raw)
            seq = ev.get("seq")
            if seq is None:
                continue
            if seq <= last:
                dupes += 1
                continue
            gaps += seq - last - 1
            last = seq
            received += 1
            types[ev["type"]] = types.get(ev["type"], 0) + 1
            if ev["type"] == "training_update" and ev.get("status") in TERMINAL and ev["jobId"] not in done:
                done.add(ev["jobId"])
                outcomes[ev["status"]] = outcomes.get(ev["status"], 0) + 1
                if all_posted.is_set() and len(done) >= len(ids):
                    t_end = time.monotonic()
                    finished.set()

    me = common.CpuMeter(os.getpid()).start()
    srv = common.CpuMeter(server.pid).start()
    watcher = asyncio.create_task(watch())
    body = {"kind": "simulate", "params": {"steps": args.steps, "stepMs": args.step_ms}}
    t0 = time.monotonic()
    posted = 0
    async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                 limits=httpx.Limits(max_connections=args.in_flight)) as http:
        async def poster() -> None:
            nonlocal posted
            while posted < args.jobs:
                posted += 1
                r = await http.post("/training/jobs", json=body)
                r.raise_for_status()
                ids.append(r.json()["id"])

        await asyncio.gather(*(poster() for _ in range(args.in_flight)))
        t_posted = time.monotonic()
        all_posted.set()
        if len(done) >= len(ids):
            t_end = time.monotonic()
            finished.set()
        timed_out = False
        try:
            await asyncio.wait_for(finished.wait(), timeout=args.timeout)
        except TimeoutError:
            timed_out = True
        head = (await http.get("/healthz")).json()["headSeq"]
    deadline = time.monotonic() + 5
    while last < head and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    srv_frac, me_frac = srv.stop(), me.stop()
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    await ws.close()
    sent = head - head0
    losses = gaps + max(0, head - last)
    elapsed = (t_end or time.monotonic()) - t0
    valid, verdict = common.client_verdict(me_frac)
    return {
        "params": vars(args),
        "jobs": len(ids),
        "jobs_finished": len(done),
        "outcomes": outcomes,
        "timed_out": timed_out,
        "elapsed_s": elapsed,
        "post_s": t_posted - t0,
        "jobs_per_s": len(done) / elapsed if elapsed else 0.0,
        "sent": sent,
        "received": received,
        "lost": losses,
        "duplicates": dupes,
        "event_types": types,
        "accounting_ok": received + losses == sent,
        "server_cpu": srv_frac,
        "client_cpu": me_frac,
        "valid": valid,
        "verdict": verdict,
        "rss_end_bytes": common.rss_bytes(server.pid),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--step-ms", type=float, default=0.0)
    ap.add_argument("--in-flight", type=int, default=8, help="concurrent POSTs")
    ap.add_argument("--concurrency", type=int, default=0, help="runner.concurrency (0 = server default)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    pin = common.default_pin() and not args.no_pin
    env = {"MANGWALE_RUNNER_CONCURRENCY": str(args.concurrency)} if args.concurrency else {}
    with common.Server(pin_cpu=0 if pin else None, env=env) as server:
        if pin:
            common.pin_self(1)
        res = asyncio.run(run(args, server))
    res["pinned"] = pin
    rows = [{"jobs": res["jobs"], "finished": res["jobs_finished"], "elapsed s": res["elapsed_s"],
             "jobs/s": res["jobs_per_s"], "events sent": res["sent"], "received": res["received"],
             "lost": res["lost"], "srv CPU": f"{res['server_cpu']:.0%}", "gen CPU": f"{res['client_cpu']:.0%}",
             "RSS MB": res["rss_end_bytes"] / 1e6}]
    common.print_table(rows, list(rows[0]), f"jobs end to end (simulate steps={args.steps} stepMs={args.step_ms}, store on disk)")
    print(res["verdict"], "| accounting", "ok" if res["accounting_ok"] else "BROKEN", "| outcomes", res["outcomes"])
    common.write_result("jobs", res, args.out)
    ok = res["accounting_ok"] and not res["timed_out"] and res["jobs_finished"] == res["jobs"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
