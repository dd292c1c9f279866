#!/usr/bin/env python3
"""CLI start-up: wall time of ``mangwale --help``, ``mangwale jobs list`` and
``mangwale jobs create simulate -q`` against a running server, next to ``curl`` doing the same
requests. Median (and min/max) of ``--runs`` runs; hyperfine (``-N``, no shell) when installed,
otherwise ``subprocess`` timing. The ``mangwale`` used is the one beside this Python.

    python bench/cli_startup.py --runs 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

BODY = '{"kind":"simulate","params":{"steps":1,"stepMs":0}}'


def commands(url: str) -> list[tuple[str, list[str]]]:
    exe = str(Path(sys.executable).with_name("mangwale"))
    if not Path(exe).exists():
        exe = shutil.which("mangwale") or exe
    curl = shutil.which("curl")
    out = [
        ("mangwale --help", [exe, "--help"]),
        ("mangwale jobs list", [exe, "jobs", "list", "--url", url]),
        ("mangwale jobs create simulate -q", [exe, "jobs", "create", "simulate", "-q", "-p", "steps=1", "-p", "stepMs=0", "--url", url]),
    ]
    if curl:
        out += [
            ("curl GET /training/jobs", [curl, "-sf", "-o", "/dev/null", url + "/training/jobs"]),
            ("curl POST /training/jobs", [curl, "-sf", "-o", "/dev/null", "-H", "Content-Type: application/json",
                                          "-d", BODY, url + "/training/jobs"]),
        ]
    return out


def with_hyperfine(cmds: list[tuple[str, list[str]]], runs: int, env: dict[str, str]) -> list[dict[str, Any]]:
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    argv = ["hyperfine", "-N", "--warmup", "2", "--runs", str(runs), "--export-json", path, "--style", "none"]
    for name, cmd in cmds:
        argv += ["-n", name, " ".join(cmd)]  # -N splits on whitespace; no argument here has a space...
    # ...except the curl header/body: give hyperfine a shell for those instead.
    if any(" " in a for _, c in cmds for a in c):
        argv = [a for a in argv if a != "-N"]
        argv = argv[:argv.index("-n")] + [x for name, cmd in cmds for x in ("-n", name, " ".join(_q(a) for a in cmd))]
        argv[1:1] = ["--shell", "sh"]
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    data = json.loads(Path(path).read_text())
    os.unlink(path)
    rows = []
    for (name, cmd), r in zip(cmds, data["results"]):
        rows.append({"command": name, "argv": cmd, "median_ms": r["median"] * 1000, "min_ms": r["min"] * 1000,
                     "max_ms": r["max"] * 1000, "runs": len(r["times"]),
                     "failures": sum(1 for c in r.get("exit_codes", []) if c)})
    return rows


def _q(a: str) -> str:
    import shlex
    return shlex.quote(a)


def with_subprocess(cmds: list[tuple[str, list[str]]], runs: int, env: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for name, cmd in cmds:
        times, failures = [], 0
        for i in range(runs + 1):
            t = time.perf_counter()
            rc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode
            dt = (time.perf_counter() - t) * 1000
            failures += rc != 0
            if i:  # first run is a warm-up
                times.append(dt)
        rows.append({"command": name, "argv": cmd, "median_ms": statistics.median(times), "min_ms": min(times),
                     "max_ms": max(times), "runs": len(times), "failures": failures})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--tool", choices=["auto", "hyperfine", "python"], default="auto")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tool = args.tool
    if tool == "auto":
        tool = "hyperfine" if shutil.which("hyperfine") else "python"
    pin = common.default_pin() and not args.no_pin
    with common.Server(pin_cpu=0 if pin else None) as server:
        if pin:
            common.pin_self(1)  # the commands inherit CPU 1
        env = {**os.environ, "MANGWALE_HOME": str(server.home)}
        env.pop("MANGWALE_URL", None)
        env.pop("MANGWALE_TOKEN", None)
        cmds = commands(server.url)
        rows = with_hyperfine(cmds, args.runs, env) if tool == "hyperfine" else with_subprocess(cmds, args.runs, env)
    by = {r["command"]: r for r in rows}
    for name, ref in (("mangwale jobs list", "curl GET /training/jobs"),
                      ("mangwale jobs create simulate -q", "curl POST /training/jobs")):
        if name in by and ref in by:
            by[name]["vs_curl_ms"] = by[name]["median_ms"] - by[ref]["median_ms"]
            by[name]["vs_curl_x"] = by[name]["median_ms"] / by[ref]["median_ms"]
    common.print_table(rows, ["command", "runs", "failures", "median_ms", "min_ms", "max_ms", "vs_curl_ms", "vs_curl_x"],
                       f"CLI start-up ({tool}, median of {args.runs})")
    common.write_result("cli_startup", {"tool": tool, "runs": args.runs, "pinned": pin, "results": rows}, args.out)
    return 0 if all(r["failures"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
