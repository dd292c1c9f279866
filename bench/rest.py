#!/usr/bin/env python3
"""REST throughput: requests/s and latency for ``GET /training/jobs`` (with ``--jobs`` jobs in the
store) and ``POST /training/jobs`` (a ``simulate`` job of one 0 ms step per request).

Uses wrk (``wrk -t1 -cC -dD --latency``, closed loop, pinned to CPU 1) when it is installed,
otherwise a closed-loop Python generator (httpx + asyncio). The result names the tool. wrk's
closed loop gives maximum throughput; its p99 is the latency at saturation, not at a set rate.

    python bench/rest.py --jobs 20 --duration 10 --connections 64
    python bench/rest.py --tool python --requests 20        # tiny run, as the smoke test does
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import httpx

POST_BODY = '{"kind":"simulate","params":{"steps":1,"stepMs":0}}'
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    assert m, text
    return float(m.group(1)) * UNITS[m.group(2)]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_wrk(url: str, method: str, args: argparse.Namespace, pin: bool) -> dict[str, Any]:
    script = None
    cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    if args.connection_close:
        cmd += ["-H", "Connection: close"]
    if method == "POST":
        fd, script = tempfile.mkstemp(suffix=".lua")
        with os.fdopen(fd, "w") as f:
            f.write('wrk.method = "POST"\n'
                    f"wrk.body = '{POST_BODY}'\n"
                    'wrk.headers["Content-Type"] = "application/json"\n')
        cmd += ["-s", script]
    cmd.append(url)
    if pin:
        cmd = ["taskset", "-c", "1", *cmd]
    c0, t0 = children_cpu(), time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    wall, cpu = time.monotonic() - t0, children_cpu() - c0
    if script:
        os.unlink(script)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    pct = {m.group(1): _ms(m.group(2)) for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.MULTILINE)}
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return {"tool": "wrk", "command": " ".join(cmd), "requests": total, "errors": errors, "rps": rps,
            "p50_ms": pct.get("50"), "p99_ms": pct.get("99"), "client_cpu": cpu / wall if wall else 0.0, "raw": out}


async def _python_load(url: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    stop_at = time.monotonic() + args.duration
    remaining = [args.requests] if args.requests else None
    limits = httpx.Limits(max_connections=args.connections, max_keepalive_connections=args.connections)

    async with httpx.AsyncClient(limits=limits, timeout=30) as http:
        async def worker() -> None:
            nonlocal errors
            while True:
                if remaining is not None:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                elif time.monotonic() >= stop_at:
                    return
                t = time.perf_counter()
                if method == "POST":
                    r = await http.post(url, content=POST_BODY, headers={"Content-Type": "application/json"})
                else:
                    r = await http.get(url)
                lat.append((time.perf_counter() - t) * 1000)
                if r.status_code >= 300:
                    errors += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.connections)))
        wall = time.monotonic() - t0
    s = common.summarize(lat)
    return {"tool": "python-httpx", "command": f"closed loop, {args.connections} connections",
            "requests": len(lat), "errors": errors, "rps": len(lat) / wall if wall else 0.0,
            "p50_ms": s["p50"], "p99_ms": s["p99"], "wall_s": wall}


def run_python(url: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    me = common.CpuMeter(os.getpid()).start()
    res = asyncio.run(_python_load(url, method, args))
    res["client_cpu"] = me.stop()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=20, help="jobs in the store for GET /training/jobs")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per route")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--requests", type=int, default=0, help="python tool only: stop after this many requests")
    ap.add_argument("--tool", choices=["auto", "wrk", "python"], default="auto")
    ap.add_argument("--routes", default="get,post", help="comma-separated: get, post")
    ap.add_argument("--connection-close", action="store_true", help="wrk only: a new TCP connection per request")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tool = args.tool
    if tool == "auto":
        tool = "wrk" if shutil.which("wrk") else "python"
    if tool == "wrk":
        args.duration = max(1, round(args.duration))
    pin = common.default_pin() and not args.no_pin
    results: list[dict[str, Any]] = []
    with common.Server(pin_cpu=0 if pin else None, env={"MANGWALE_RUNNER_CONCURRENCY": "4"}) as server:
        if pin and tool == "python":
            common.pin_self(1)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            ids = [http.post("/training/jobs", content=POST_BODY, headers={"Content-Type": "application/json"}).json()["id"]
                   for _ in range(args.jobs)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if all(j["status"] == "succeeded" for j in http.get("/training/jobs").json()):
                    break
                time.sleep(0.1)
            n_listed = len(http.get("/training/jobs").json())
        assert n_listed == len(ids), (n_listed, len(ids))
        for route in [r.strip() for r in args.routes.split(",") if r.strip()]:
            method = route.upper()
            url = server.url + "/training/jobs"
            srv = common.CpuMeter(server.pid).start()
            res = run_wrk(url, method, args, pin) if tool == "wrk" else run_python(url, method, args)
            res["server_cpu"] = srv.stop()
            res["route"] = f"{method} /training/jobs"
            res["valid"], res["verdict"] = common.client_verdict(res["client_cpu"])
            res["rss_bytes"] = common.rss_bytes(server.pid)
            results.append(res)
    rows = [{"route": r["route"], "tool": r["tool"], "requests": r["requests"], "errors": r["errors"],
             "req/s": r["rps"], "p50 ms": r["p50_ms"], "p99 ms": r["p99_ms"],
             "srv CPU": f"{r['server_cpu']:.0%}", "gen CPU": f"{r['client_cpu']:.0%}", "valid": r["valid"]}
            for r in results]
    common.print_table(rows, list(rows[0]), f"REST ({args.jobs} jobs in the store, {args.connections} connections)")
    common.write_result("rest", {"tool": tool, "jobs": args.jobs, "connections": args.connections, "pinned": pin,
                                 "results": results}, args.out)
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
