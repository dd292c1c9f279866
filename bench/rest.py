#!/usr/bin/env python3
"""REST throughput: requests/s and latency for ``GET /training/jobs`` (with ``--jobs`` jobs in the
store) and ``POST /training/jobs`` (a ``simulate`` job of one 0 ms step per request).

Routes (``--routes``, comma-separated): ``get`` (the whole list), ``post``, and the list's query
forms: ``page`` (``?limit=P``), ``status`` (``?status=S&limit=P``), ``cursor`` (the second page:
``?limit=P&cursor=C``, C from the first page's ``X-Next-Cursor``; needs ``--jobs`` > P) and
``mix`` (those three in turn, one request each). ``--creates-per-s R`` keeps R creates a second
running during every GET route, so a server that caches the list sees it go stale.

Uses wrk (``wrk -t1 -cC -dD --latency``, closed loop, pinned to CPU 1) when it is installed,
otherwise a closed-loop Python generator (httpx + asyncio). The result names the tool. wrk's
closed loop gives maximum throughput; its p99 is the latency at saturation, not at a set rate.

``--target node`` measures the Node reference (``bench/node-ref/``, the seed's Express design),
``--target both`` mangwale and then the Node reference in one run, and prints mangwale / node
ratios per route. Each server answers its own cursor. The Node reference has no authentication
(the seed had none), so run mangwale without tokens for a like-for-like figure.

    python bench/rest.py --jobs 20 --duration 10 --connections 64
    python bench/rest.py --target both --jobs 100 --routes mix,post --creates-per-s 20
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
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

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


def run_wrk(base: str, method: str, paths: list[str], args: argparse.Namespace, pin: bool) -> dict[str, Any]:
    script = None
    cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    if args.connection_close:
        cmd += ["-H", "Connection: close"]
    lua = ""
    if method == "POST":
        lua = ('wrk.method = "POST"\n'
               f"wrk.body = '{POST_BODY}'\n"
               'wrk.headers["Content-Type"] = "application/json"\n')
    elif len(paths) > 1:  # one request to each path in turn
        quoted = ", ".join(f'"{p}"' for p in paths)
        lua = (f"local paths = {{{quoted}}}\nlocal i = 0\n"
               "request = function()\n  i = i % #paths + 1\n  return wrk.format(nil, paths[i])\nend\n")
    if lua:
        fd, script = tempfile.mkstemp(suffix=".lua")
        with os.fdopen(fd, "w") as f:
            f.write(lua)
        cmd += ["-s", script]
    cmd.append(base + paths[0])
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


async def _python_load(urls: list[str], method: str, args: argparse.Namespace) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    stop_at = time.monotonic() + args.duration
    remaining = [args.requests] if args.requests else None
    turn = [0]
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
                url = urls[turn[0] % len(urls)]
                turn[0] += 1
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


def run_python(urls: list[str], method: str, args: argparse.Namespace) -> dict[str, Any]:
    me = common.CpuMeter(os.getpid()).start()
    res = asyncio.run(_python_load(urls, method, args))
    res["client_cpu"] = me.stop()
    return res


class Creator(threading.Thread):
    """``rate`` creates a second on their own connection, on a fixed schedule, until stopped."""

    def __init__(self, url: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.url, self.rate = url, rate
        self.created = self.errors = 0
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            t0 = time.monotonic()
            k = 0
            while not self.halt.wait(max(0.0, t0 + k / self.rate - time.monotonic())):
                k += 1
                try:
                    r = http.post("/training/jobs", content=POST_BODY, headers={"Content-Type": "application/json"})
                    ok = r.status_code == 201
                except httpx.HTTPError:
                    ok = False
                self.created += ok
                self.errors += not ok

    def stop(self) -> dict[str, Any]:
        self.halt.set()
        self.join(30)
        return {"rate": self.rate, "created": self.created, "errors": self.errors}


def route_paths(route: str, args: argparse.Namespace, cursor: str | None) -> tuple[str, str, list[str]]:
    """(label, method, paths) of a ``--routes`` entry."""
    page = f"/training/jobs?limit={args.page}"
    status = f"/training/jobs?status={args.status}&limit={args.page}"
    nxt = f"/training/jobs?limit={args.page}&cursor={quote(cursor or '', safe='')}"
    table = {
        "get": ("GET /training/jobs", "GET", ["/training/jobs"]),
        "post": ("POST /training/jobs", "POST", ["/training/jobs"]),
        "page": (f"GET {page}", "GET", [page]),
        "status": (f"GET {status}", "GET", [status]),
        "cursor": (f"GET /training/jobs?limit={args.page}&cursor=(page 2)", "GET", [nxt]),
        "mix": (f"GET mix: page, status={args.status}, cursor (limit={args.page})", "GET", [page, status, nxt]),
    }
    if route not in table:
        raise SystemExit(f"unknown route {route!r} (known: {', '.join(table)})")
    if route in ("cursor", "mix") and not cursor:
        raise SystemExit(f"route {route!r} needs a second page: --jobs must exceed --page")
    return table[route]


def run_target(target: str, tool: str, args: argparse.Namespace, pin: bool) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    load = common.loadavg()
    with common.make_server(target, pin_cpu=0 if pin else None, env={"MANGWALE_RUNNER_CONCURRENCY": "4"}) as server:
        if pin:
            common.pin_self(1)  # this process's creates and python load run beside wrk on CPU 1
        with httpx.Client(base_url=server.url, timeout=30) as http:
            ids = [http.post("/training/jobs", content=POST_BODY, headers={"Content-Type": "application/json"}).json()["id"]
                   for _ in range(args.jobs)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if all(j["status"] == "succeeded" for j in http.get("/training/jobs").json()):
                    break
                time.sleep(0.1)
            n_listed = len(http.get("/training/jobs").json())
            cursor = http.get(f"/training/jobs?limit={args.page}").headers.get("X-Next-Cursor")
        assert n_listed == len(ids), (n_listed, len(ids))
        for route in [r.strip() for r in args.routes.split(",") if r.strip()]:
            label, method, paths = route_paths(route, args, cursor)
            creator = Creator(server.url, args.creates_per_s) if args.creates_per_s > 0 and method == "GET" else None
            if creator:
                creator.start()
            if args.warmup > 0:  # the same load, unmeasured: V8 optimises hot code after a few thousand calls
                warm = argparse.Namespace(**{**vars(args), "duration": max(1, round(args.warmup)), "requests": 0})
                if tool == "wrk":
                    run_wrk(server.url, method, paths, warm, pin)
                else:
                    run_python([server.url + p for p in paths], method, warm)
            srv = common.CpuMeter(server.pid).start()
            if tool == "wrk":
                res = run_wrk(server.url, method, paths, args, pin)
            else:
                res = run_python([server.url + p for p in paths], method, args)
            res["server_cpu"] = srv.stop()
            if creator:
                res["creates"] = creator.stop()
            res["route"] = label
            res["paths"] = paths
            res["valid"], res["verdict"] = common.client_verdict(res["client_cpu"])
            res["rss_bytes"] = common.rss_bytes(server.pid)
            results.append(res)
        described = server.describe()
    return {"target": target, "server": described, "loadavg_before": load, "results": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=20, help="jobs in the store for GET /training/jobs")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per route")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--requests", type=int, default=0, help="python tool only: stop after this many requests")
    ap.add_argument("--tool", choices=["auto", "wrk", "python"], default="auto")
    ap.add_argument("--routes", default="get,post", help="comma-separated: get, post, page, status, cursor, mix")
    ap.add_argument("--page", type=int, default=20, help="limit= of the page, status, cursor and mix routes")
    ap.add_argument("--status", default="succeeded", help="status= of the status and mix routes")
    ap.add_argument("--creates-per-s", type=float, default=0.0,
                    help="creates a second running during each GET route (from this process, not counted in gen CPU)")
    ap.add_argument("--warmup", type=float, default=2.0,
                    help="seconds of the same load before each route's measurement (0: none)")
    ap.add_argument("--connection-close", action="store_true", help="wrk only: a new TCP connection per request")
    ap.add_argument("--no-pin", action="store_true")
    common.add_target_arg(ap)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tool = args.tool
    if tool == "auto":
        tool = "wrk" if shutil.which("wrk") else "python"
    if tool == "wrk":
        args.duration = max(1, round(args.duration))
    pin = common.default_pin() and not args.no_pin
    runs = {t: run_target(t, tool, args, pin) for t in common.targets(args.target)}
    rows = [{"target": t, "route": r["route"], "tool": r["tool"], "requests": r["requests"], "errors": r["errors"],
             "req/s": r["rps"], "p50 ms": r["p50_ms"], "p99 ms": r["p99_ms"],
             "srv CPU": f"{r['server_cpu']:.0%}", "gen CPU": f"{r['client_cpu']:.0%}", "valid": r["valid"]}
            for t, run in runs.items() for r in run["results"]]
    common.print_table(rows, list(rows[0]), f"REST ({args.jobs} jobs in the store, {args.connections} connections)")
    ok = all(r["errors"] == 0 for run in runs.values() for r in run["results"])
    doc: dict[str, Any] = {"tool": tool, "jobs": args.jobs, "connections": args.connections, "pinned": pin,
                           "page": args.page, "creates_per_s": args.creates_per_s}
    if args.target != "both":
        run = runs[args.target]
        common.write_result("rest" if args.target == "mangwale" else "rest-node",
                            {**doc, "target": args.target, "server": run["server"], "results": run["results"]}, args.out)
        return 0 if ok else 1
    by_route = {t: {r["route"]: r for r in run["results"]} for t, run in runs.items()}
    ratios = {route: common.ratios({t: by_route[t][route] for t in by_route},
                                   {"req/s": lambda r: r["rps"], "p99": lambda r: r["p99_ms"]})
              for route in by_route["mangwale"]}
    for route, rt in ratios.items():
        print(f"{route}: ", end="")
        common.print_ratios(rt)
    common.write_result("rest-both", {**doc, "target": "both", "targets": runs, "ratios": ratios,
                                      "ratio_basis": "mangwale / node",
                                      "valid": all(r["valid"] for run in runs.values() for r in run["results"])},
                        args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
