#!/usr/bin/env python3
"""Connects: N WebSocket handshakes on /ws/training as fast as the server takes them, then the
memory the N idle connections hold.

A handshake is one connection of fanout.py's raw client: TCP connect, the HTTP upgrade, the 101
and the server's ``connected`` greeting (the server has registered the watcher once it greets).
``--concurrency C`` handshakes are in flight at once: a new one starts as soon as one finishes,
with no pauses (fanout.py's ``connect s`` includes its 10 ms pause per batch; this does not).
Reported: the wall time for all N and handshakes/s, the time of each handshake (connect start to
greeting: p50/p99/max), the server's CPU over the connect phase and per handshake, the load
generator's CPU (the run is ``valid`` only under 80 % of its core), and server RSS before, after
connecting and after ``--idle`` seconds: idle bytes per connection = (RSS idle - RSS before) / N.
``/healthz`` must count N streams; a handshake that fails is an error and fails the run.

``--target node`` measures the Node reference (``bench/node-ref/``, the seed's Express + ``ws``
design), ``--target both`` mangwale and then the Node reference in one run, with mangwale / node
ratios.

    python bench/connects.py --target both --connections 5000
    python bench/connects.py --target both --connections 1000 --idle 5   # idle memory at 1,000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from fanout import RawWatcher


async def run(args: argparse.Namespace, server: Any) -> dict[str, Any]:
    me = common.CpuMeter(os.getpid())
    watchers = [RawWatcher() for _ in range(args.connections)]
    times: list[float] = []
    errors: list[str] = []
    gate = asyncio.Semaphore(args.concurrency)

    async def one(w: RawWatcher) -> None:
        async with gate:
            t = time.perf_counter()
            try:
                await w.open(server.ws_url)
            except (OSError, TimeoutError, AssertionError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            times.append((time.perf_counter() - t) * 1000)

    rss_before = common.rss_bytes(server.pid)
    tcp_before = common.tcp_mem_pages()
    spy = common.profile(server.pid, args.profile, max(1.0, args.connections / 1000)) if args.profile and server.name == "mangwale" else None
    srv = common.CpuMeter(server.pid).start()
    me.start()
    t0 = time.monotonic()
    await asyncio.gather(*(one(w) for w in watchers))
    wall = time.monotonic() - t0
    srv_frac = srv.stop()
    if spy is not None:
        spy.wait(60)
    me_frac = me.stop()
    rss_connected = common.rss_bytes(server.pid)
    await asyncio.sleep(args.idle)
    rss_idle = common.rss_bytes(server.pid)
    tcp_idle = common.tcp_mem_pages()
    streams = server.health()["streams"]
    opened = len(times)
    await asyncio.gather(*(w.aclose() for w in watchers if w.transport is not None), return_exceptions=True)
    valid, verdict = common.client_verdict(me_frac)
    return {
        "params": vars(args),
        "connections": args.connections,
        "concurrency": args.concurrency,
        "opened": opened,
        "errors": len(errors),
        "error_samples": errors[:5],
        "streams": streams,
        "wall_s": wall,
        "handshakes_per_s": opened / wall if wall else 0.0,
        "handshake_ms": common.summarize(times),
        "server_cpu": srv_frac,
        "server_cpu_s": srv.cpu,
        "server_cpu_us_per_handshake": srv.cpu / opened * 1e6 if opened else None,
        "client_cpu": me_frac,
        "valid": valid,
        "verdict": verdict,
        "rss_before_bytes": rss_before,
        "rss_connected_bytes": rss_connected,
        "rss_idle_bytes": rss_idle,
        "idle_bytes_per_connection": (rss_idle - rss_before) / opened if opened else None,
        "kernel_tcp_mem_pages": {"before": tcp_before, "idle": tcp_idle},
    }


def run_target(target: str, args: argparse.Namespace, pin: bool) -> dict[str, Any]:
    env = {"MANGWALE_WS_MAX_CONNECTIONS": str(max(10000, args.connections + 100))}
    load = common.loadavg()
    with common.make_server(target, pin_cpu=0 if pin else None, env=env) as server:
        if pin:
            common.pin_self(1)
        gc.collect()
        res = asyncio.run(run(args, server))
        res["server"] = server.describe()
    return {**res, "target": target, "pinned": pin, "loadavg_before": load}


RATIOS = {
    "wall s": lambda r: r["wall_s"],
    "handshakes/s": lambda r: r["handshakes_per_s"],
    "p50": lambda r: r["handshake_ms"]["p50"],
    "p99": lambda r: r["handshake_ms"]["p99"],
    "srv us/handshake": lambda r: r["server_cpu_us_per_handshake"],
    "idle B/conn": lambda r: r["idle_bytes_per_connection"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=50, help="handshakes in flight at once")
    ap.add_argument("--idle", type=float, default=1.0, help="seconds idle after connecting, before the RSS reading")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server to CPU 0 and generator to CPU 1")
    common.add_target_arg(ap)
    ap.add_argument("--profile", type=Path, metavar="FILE",
                    help="py-spy record mangwale while it is measured, collapsed stacks to FILE")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    pin = common.default_pin() and not args.no_pin
    common.raise_nofile(2 * args.connections + 200)
    results = {t: run_target(t, args, pin) for t in common.targets(args.target)}
    rows = [{"target": t, "connections": r["connections"], "opened": r["opened"], "errors": r["errors"],
             "streams": r["streams"], "wall s": r["wall_s"], "handshakes/s": r["handshakes_per_s"],
             "p50 ms": r["handshake_ms"]["p50"], "p99 ms": r["handshake_ms"]["p99"], "max ms": r["handshake_ms"]["max"],
             "srv CPU": f"{r['server_cpu']:.0%}", "srv us/hs": r["server_cpu_us_per_handshake"],
             "gen CPU": f"{r['client_cpu']:.0%}", "RSS MB": r["rss_idle_bytes"] / 1e6,
             "KB/idle conn": (r["idle_bytes_per_connection"] or 0) / 1024}
            for t, r in results.items()]
    common.print_table(rows, list(rows[0]), f"WebSocket connects ({args.concurrency} in flight)")
    for r in results.values():
        print(f"{r['target']}: {r['verdict']}")
    ok = all(r["errors"] == 0 and r["opened"] == r["connections"] and r["streams"] >= r["opened"]
             for r in results.values())
    if args.target != "both":
        common.write_result(f"connects-{args.connections}" + ("" if args.target == "mangwale" else "-node"),
                            results[args.target], args.out)
        return 0 if ok else 1
    ratios = common.ratios(results, RATIOS)
    common.print_ratios(ratios)
    common.write_result(f"connects-{args.connections}-both", {
        "target": "both", "targets": results, "ratios": ratios, "ratio_basis": "mangwale / node",
        "valid": all(r["valid"] for r in results.values()),
    }, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
