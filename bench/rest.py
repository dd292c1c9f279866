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

mangwale runs with a token configured and sent on every request (``--no-auth`` to drop it) and
on ``--http`` (httptools, its default, or h11). ``--concurrency 0`` starts it as an instance that
only serves (``serve --concurrency 0``: creates stay queued), the setting of the POST target.
POST rows report the embedded store's fsyncs during the run and the creates per fsync (group
commit); every run ends with this machine's fsync p50/p99 (200 appends + fsync in the temp dir,
where the bench's data dirs are). ``--bare`` measures the GET routes again on a bare ASGI app
(``bench/bare_asgi.py``) that answers the very bytes mangwale answered, on each server of
``--bare-server`` (uvicorn-h11, uvicorn-httptools, granian): the ceiling of the server itself.

``--target node`` measures the Node reference (``bench/node-ref/``, the seed's Express design),
``--target both`` mangwale and then the Node reference in one run, and prints mangwale / node
ratios per route. Each server answers its own cursor. The Node reference has no authentication
(the seed had none), so run mangwale without tokens for a like-for-like figure.

    python bench/rest.py --jobs 20 --duration 10 --connections 64
    python bench/rest.py --target both --jobs 100 --routes mix,post --creates-per-s 20
    python bench/rest.py --tool python --requests 20        # tiny run, as the smoke test does
    python bench/rest.py --jobs 100 --routes mix --creates-per-s 20 --bare --bare-server uvicorn-httptools,granian
    python bench/rest.py --target both --jobs 20 --routes post --concurrency 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def run_wrk(base: str, method: str, paths: list[str], args: argparse.Namespace, pin: bool,
            headers: dict[str, str] | None = None) -> dict[str, Any]:
    script = None
    cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
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
    shown = " ".join(cmd).replace(next(iter((headers or {"": ""}).values())) or "\0", "<token>")
    return {"tool": "wrk", "command": shown, "requests": total, "errors": errors, "rps": rps,
            "p50_ms": pct.get("50"), "p99_ms": pct.get("99"), "client_cpu": cpu / wall if wall else 0.0, "raw": out}


async def _python_load(urls: list[str], method: str, args: argparse.Namespace,
                       headers: dict[str, str]) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    stop_at = time.monotonic() + args.duration
    remaining = [args.requests] if args.requests else None
    turn = [0]
    limits = httpx.Limits(max_connections=args.connections, max_keepalive_connections=args.connections)

    async with httpx.AsyncClient(limits=limits, timeout=30, headers=headers) as http:
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


def run_python(urls: list[str], method: str, args: argparse.Namespace,
               headers: dict[str, str] | None = None) -> dict[str, Any]:
    me = common.CpuMeter(os.getpid()).start()
    res = asyncio.run(_python_load(urls, method, args, headers or {}))
    res["client_cpu"] = me.stop()
    return res


class Creator(threading.Thread):
    """``rate`` creates a second on their own connection, on a fixed schedule, until stopped."""

    def __init__(self, url: str, rate: float, headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.rate, self.headers = url, rate, headers or {}
        self.created = self.errors = 0
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30, headers=self.headers) as http:
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


class BareServer(common._ServerProcess):
    """``bench/bare_asgi.py``: the same bytes as mangwale's answers, from a bare ASGI app."""

    name = "bare"

    def __init__(self, bodies: dict[str, bytes], server: str, *, pin_cpu: int | None = None) -> None:
        super().__init__(pin_cpu=pin_cpu)
        fd, self.bodies_file = tempfile.mkstemp(prefix="bench-bare-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({k: v.decode() for k, v in bodies.items()}, f)
        self.env["BARE_BODIES"] = self.bodies_file
        self.server = server

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve().parent / "bare_asgi.py"), "--port", str(self.port),
                "--server", self.server]

    def cwd(self) -> Path | None:
        return Path(__file__).resolve().parent

    def stop(self) -> None:
        super().stop()
        Path(self.bodies_file).unlink(missing_ok=True)


def auth_env(home: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(server env, request headers) for a server with one read+write token."""
    from mangwale_cli.tokens import hash_token, mint, parse_scopes, toml_line

    token = mint()
    path = home / "bench-tokens.toml"
    path.write_text("[auth.tokens]\n" + toml_line("bench", hash_token(token), parse_scopes(["read", "write"])) + "\n")
    return {"MANGWALE_TOKENS_FILE": str(path)}, {"Authorization": f"Bearer {token}"}


def store_figures(url: str, headers: dict[str, str]) -> dict[str, float]:
    """The embedded store's fsync count and the creates among its records (``GET /metrics``)."""
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    m = common.parse_metrics(text)
    return {"fsyncs": m.get("mangwale_store_fsyncs_total", 0.0),
            "durable_records": m.get("mangwale_store_durable_records_total", 0.0)}


def run_target(target: str, tool: str, args: argparse.Namespace, pin: bool) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    load = common.loadavg()
    env = {"MANGWALE_RUNNER_CONCURRENCY": str(args.concurrency)}
    headers: dict[str, str] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-rest-"))
    if target == "mangwale" and args.auth:
        more, headers = auth_env(tmp)
        env |= more
    if target == "mangwale":
        env["MANGWALE_HTTP"] = args.http
    bodies: dict[str, bytes] = {}
    get_paths: dict[str, tuple[str, list[str]]] = {}
    with common.make_server(target, pin_cpu=0 if pin else None, env=env) as server:
        if pin:
            common.pin_self(1)  # this process's creates and python load run beside wrk on CPU 1
        with httpx.Client(base_url=server.url, timeout=30, headers=headers) as http:
            ids = [http.post("/training/jobs", content=POST_BODY, headers={"Content-Type": "application/json"}).json()["id"]
                   for _ in range(args.jobs)]
            deadline = time.monotonic() + (60 if args.concurrency or target != "mangwale" else 0)
            while time.monotonic() < deadline:
                if all(j["status"] == "succeeded" for j in http.get("/training/jobs").json()):
                    break
                time.sleep(0.1)
            n_listed = len(http.get("/training/jobs").json())
            cursor = http.get(f"/training/jobs?limit={args.page}").headers.get("X-Next-Cursor")
        assert n_listed == len(ids), (n_listed, len(ids))
        for route in [r.strip() for r in args.routes.split(",") if r.strip()]:
            label, method, paths = route_paths(route, args, cursor)
            if method == "GET":
                get_paths[route] = (label, paths)
                with httpx.Client(base_url=server.url, timeout=30, headers=headers) as http:
                    bodies |= {p: http.get(p).content for p in paths}
            creator = (Creator(server.url, args.creates_per_s, headers)
                       if args.creates_per_s > 0 and method == "GET" else None)
            if creator:
                creator.start()
            if args.warmup > 0:  # the same load, unmeasured: V8 optimises hot code after a few thousand calls
                warm = argparse.Namespace(**{**vars(args), "duration": max(1, round(args.warmup)), "requests": 0})
                if tool == "wrk":
                    run_wrk(server.url, method, paths, warm, pin, headers)
                else:
                    run_python([server.url + p for p in paths], method, warm, headers)
            before = store_figures(server.url, headers) if target == "mangwale" and method == "POST" else None
            srv = common.CpuMeter(server.pid).start()
            spy = (common.profile(server.pid, args.profile.with_name(f"{args.profile.stem}-{route}{args.profile.suffix}"),
                                  args.duration) if args.profile and target == "mangwale" else None)  # fmt: skip
            if tool == "wrk":
                res = run_wrk(server.url, method, paths, args, pin, headers)
            else:
                res = run_python([server.url + p for p in paths], method, args, headers)
            res["server_cpu"] = srv.stop()
            if spy is not None:
                spy.wait(30)
            if before is not None:
                after = store_figures(server.url, headers)
                fsyncs = after["fsyncs"] - before["fsyncs"]
                res["fsyncs"] = fsyncs
                res["creates_per_fsync"] = res["requests"] / fsyncs if fsyncs else None
            if creator:
                res["creates"] = creator.stop()
            res["route"] = label
            res["paths"] = paths
            res["valid"], res["verdict"] = common.client_verdict(res["client_cpu"])
            res["rss_bytes"] = common.rss_bytes(server.pid)
            results.append(res)
        described = server.describe()
    out = {"target": target, "server": described, "auth": bool(headers), "loadavg_before": load, "results": results}
    if target == "mangwale" and args.bare and get_paths:
        out["bare"] = run_bare(bodies, get_paths, tool, args, pin)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_bare(bodies: dict[str, bytes], get_paths: dict[str, tuple[str, list[str]]], tool: str,
             args: argparse.Namespace, pin: bool) -> list[dict[str, Any]]:
    """The GET routes again, on a bare ASGI app serving the very bytes mangwale answered, on each
    server of ``--bare-server``."""
    results = []
    for name in args.bare_server.split(","):
        with BareServer(bodies, name, pin_cpu=0 if pin else None) as server:
            for label, paths in get_paths.values():
                if args.warmup > 0:
                    warm = argparse.Namespace(**{**vars(args), "duration": max(1, round(args.warmup)), "requests": 0})
                    run_wrk(server.url, "GET", paths, warm, pin) if tool == "wrk" else run_python(
                        [server.url + p for p in paths], "GET", warm)
                srv = common.CpuMeter(server.pid).start()
                res = run_wrk(server.url, "GET", paths, args, pin) if tool == "wrk" else run_python(
                    [server.url + p for p in paths], "GET", args)
                res["server_cpu"] = srv.stop()
                res["route"] = label
                res["server"] = name
                res["valid"], res["verdict"] = common.client_verdict(res["client_cpu"])
                results.append(res)
    return results


def fsync_probe(directory: Path, n: int = 200) -> dict[str, float]:
    """This machine's fsync: p50/p99 of ``n`` 200-byte appends each followed by fsync, in ``directory``."""
    lat = []
    fd, name = tempfile.mkstemp(dir=directory, prefix="fsync-probe-")
    try:
        for _ in range(n):
            os.write(fd, b"x" * 200)
            t = time.perf_counter()
            os.fsync(fd)
            lat.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        os.unlink(name)
    s = common.summarize(lat)
    return {"n": n, "p50_ms": s["p50"], "p99_ms": s["p99"]}


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
    ap.add_argument("--concurrency", type=int, default=4,
                    help="mangwale's runner.concurrency; 0: an instance that only serves (creates stay queued)")
    ap.add_argument("--auth", action=argparse.BooleanOptionalAction, default=True,
                    help="mangwale with a token configured and sent on every request (the Node reference has none)")
    ap.add_argument("--bare", action="store_true",
                    help="also measure the GET routes on a bare ASGI app serving mangwale's bytes (bench/bare_asgi.py)")
    ap.add_argument("--bare-server", default="uvicorn-httptools",
                    help="comma-separated servers of the bare app: uvicorn-h11, uvicorn-httptools, granian")
    ap.add_argument("--http", choices=("h11", "httptools"), default="httptools",
                    help="mangwale's HTTP parser (MANGWALE_HTTP; server.http)")
    common.add_target_arg(ap)
    ap.add_argument("--profile", type=Path, metavar="FILE",
                    help="py-spy record mangwale during each route, collapsed stacks to FILE-ROUTE")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tool = args.tool
    if tool == "auto":
        tool = "wrk" if shutil.which("wrk") else "python"
    if tool == "wrk":
        args.duration = max(1, round(args.duration))
    for name in args.bare_server.split(","):
        if name not in ("uvicorn-h11", "uvicorn-httptools", "granian"):
            raise SystemExit(f"unknown --bare-server {name!r} (uvicorn-h11, uvicorn-httptools, granian)")
    pin = common.default_pin() and not args.no_pin
    runs = {t: run_target(t, tool, args, pin) for t in common.targets(args.target)}
    measured = [(t, r) for t, run in runs.items() for r in run["results"]]
    measured += [(f"bare ({r['server']})", r) for run in runs.values() for r in run.get("bare") or []]
    rows = [{"target": t, "route": r["route"], "tool": r["tool"], "requests": r["requests"], "errors": r["errors"],
             "req/s": r["rps"], "p50 ms": r["p50_ms"], "p99 ms": r["p99_ms"],
             "srv CPU": f"{r['server_cpu']:.0%}", "gen CPU": f"{r['client_cpu']:.0%}", "valid": r["valid"],
             "creates/fsync": f"{r['creates_per_fsync']:.1f}" if r.get("creates_per_fsync") else ""}
            for t, r in measured]
    auth = "auth on" if runs.get("mangwale", {}).get("auth") else "auth off"
    common.print_table(rows, list(rows[0]),
                       f"REST ({args.jobs} jobs in the store, {args.connections} connections, mangwale {auth}, "
                       f"http {args.http}, {args.creates_per_s:g} creates/s during GETs)")
    probe = fsync_probe(Path(tempfile.gettempdir()))
    print(f"fsync on {tempfile.gettempdir()} (where the bench data dirs are): p50 {probe['p50_ms']:.2f} ms, "
          f"p99 {probe['p99_ms']:.2f} ms over {probe['n']}")
    if "mangwale" in runs and runs["mangwale"].get("bare"):
        own = {r["route"]: r for r in runs["mangwale"]["results"]}
        for r in runs["mangwale"]["bare"]:
            print(f"{r['route']}: mangwale / bare ASGI ({r['server']}):  req/s {own[r['route']]['rps'] / r['rps']:.2f}x")
    ok = all(r["errors"] == 0 for _, r in measured)
    doc: dict[str, Any] = {"tool": tool, "jobs": args.jobs, "connections": args.connections, "pinned": pin,
                           "page": args.page, "creates_per_s": args.creates_per_s, "http": args.http,
                           "fsync": probe}
    if args.target != "both":
        run = runs[args.target]
        common.write_result("rest" if args.target == "mangwale" else "rest-node",
                            {**doc, "target": args.target, "server": run["server"], "auth": run["auth"],
                             "results": run["results"], "bare": run.get("bare")}, args.out)
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
