#!/usr/bin/env python3
"""CLI start-up: wall time of one-shot ``mangwale`` commands against a running server, each row
next to its target (issue 14), and ``curl`` doing the same requests.

Rows: ``jobs create simulate -q`` (target <= 100 ms, stretch <= 60 ms), ``--help`` (<= 100 ms),
one Tab completion (<= 80 ms) driven the way bash's completion function does it
(``_MANGWALE_COMPLETE=complete_bash`` with ``COMP_WORDS`` / ``COMP_CWORD`` in the environment,
see completions/mangwale.bash), ``--version`` and ``jobs list``. Median (and min/max) of ``--runs``
runs, plus the mean user+system CPU time, which a busy machine inflates less than wall time.
hyperfine (``-N``: no shell between) when installed, otherwise ``subprocess`` timing. The
``mangwale`` used is the console script beside this Python.

``--importtime N`` adds, per mangwale row, the N modules with the most import time of their own
(``python -X importtime``, the least of ``--importtime-runs`` runs per module): where the
milliseconds go.

    python bench/cli_startup.py --runs 15 --importtime 15
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

BODY = '{"kind":"simulate","params":{"steps":1,"stepMs":0}}'
CREATE = "mangwale jobs create simulate -q"


@dataclass
class Row:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    target_ms: float | None = None
    stretch_ms: float | None = None
    mangwale: bool = True


def compile_package() -> None:
    """Byte-compile mangwale_cli as an install does: with PYTHONDONTWRITEBYTECODE set (or a first
    run), every run would compile the package's sources again and measure that instead."""
    import compileall

    compileall.compile_dir(str(common.ROOT / "mangwale_cli"), quiet=1)


def mangwale_exe() -> str:
    exe = Path(sys.executable).with_name("mangwale")
    return str(exe) if exe.exists() else shutil.which("mangwale") or str(exe)


def tab(words: str) -> dict[str, str]:
    """The environment bash's ``_mangwale_completion`` gives ``mangwale`` for a Tab after ``words``
    (the word under the cursor last, maybe empty)."""
    return {"_MANGWALE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}


def rows(url: str, scratch: Path) -> list[Row]:
    exe = mangwale_exe()
    out = [
        Row(CREATE, [exe, "jobs", "create", "simulate", "-q", "-p", "steps=1", "-p", "stepMs=0", "--url", url],
            target_ms=100, stretch_ms=60),
        Row("mangwale --help", [exe, "--help"], target_ms=100),
        Row("Tab: mangwale jobs create --", [exe], tab("mangwale jobs create --"), target_ms=80),
        Row("Tab: mangwale ", [exe], tab("mangwale "), target_ms=80),
        Row("mangwale --version", [exe, "--version"]),
        Row("mangwale jobs list", [exe, "jobs", "list", "--url", url]),
    ]
    curl = shutil.which("curl")
    if curl:
        body = scratch / "create.json"  # a file: hyperfine -N would strip the JSON's quotes
        body.write_text(BODY)
        out += [
            Row("curl GET /training/jobs", [curl, "-sf", "-o", "/dev/null", url + "/training/jobs"], mangwale=False),
            Row("curl POST /training/jobs", [curl, "-sf", "-o", "/dev/null", "-H", "Content-Type:application/json",
                                             "--data-binary", f"@{body}", url + "/training/jobs"], mangwale=False),
        ]
    return out


def with_hyperfine(row: Row, runs: int, env: dict[str, str]) -> dict[str, Any]:
    """One hyperfine run for ``row``: ``-N`` runs it without a shell, so no argument may hold a
    space (the environment carries what does)."""
    assert not any(" " in a for a in row.argv), row.argv
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        subprocess.run(["hyperfine", "-N", "--warmup", "2", "--runs", str(runs), "--export-json", path,
                        "--style", "none", "-n", row.name, " ".join(row.argv)],
                       check=True, env={**env, **row.env}, stdout=subprocess.DEVNULL)
        r = json.loads(Path(path).read_text())["results"][0]
    finally:
        os.unlink(path)
    return {"median_ms": r["median"] * 1000, "min_ms": r["min"] * 1000, "max_ms": r["max"] * 1000,
            "cpu_ms": (r["user"] + r["system"]) * 1000, "runs": len(r["times"]),
            "failures": sum(1 for c in r.get("exit_codes", []) if c)}


def with_subprocess(row: Row, runs: int, env: dict[str, str]) -> dict[str, Any]:
    times, cpu, failures = [], [], 0
    for i in range(runs + 1):
        before = os.times()
        t = time.perf_counter()
        rc = subprocess.run(row.argv, env={**env, **row.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            check=False).returncode
        dt = (time.perf_counter() - t) * 1000
        after = os.times()
        if i:  # the first run is a warm-up
            failures += rc != 0
            times.append(dt)
            cpu.append((after.children_user - before.children_user + after.children_system
                        - before.children_system) * 1000)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "cpu_ms": statistics.mean(cpu), "runs": len(times), "failures": failures}


IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", re.MULTILINE)


def import_profile(row: Row, env: dict[str, str], top: int, repeat: int) -> dict[str, Any]:
    """``python -X importtime`` of the row's command: per module the least self and cumulative
    time of ``repeat`` runs (noise only adds), the ``top`` modules by self time, and the total."""
    self_us: dict[str, int] = {}
    cum_us: dict[str, int] = {}
    depth: dict[str, int] = {}
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, "-X", "importtime", *row.argv], env={**env, **row.env},
                              capture_output=True, text=True, check=False)
        for m in IMPORT_LINE.finditer(proc.stderr):
            name = m[4]
            self_us[name] = min(self_us.get(name, 1 << 62), int(m[1]))
            cum_us[name] = min(cum_us.get(name, 1 << 62), int(m[2]))
            depth.setdefault(name, len(m[3]) // 2)
    ranked = sorted(self_us, key=lambda n: -self_us[n])[:top]
    roots = sorted((n for n in cum_us if depth[n] == 0), key=lambda n: -cum_us[n])
    return {
        "modules": len(self_us),
        "total_self_ms": sum(self_us.values()) / 1000,
        "top_self": [{"module": n, "self_ms": self_us[n] / 1000, "cumulative_ms": cum_us[n] / 1000} for n in ranked],
        "top_level": [{"module": n, "cumulative_ms": cum_us[n] / 1000} for n in roots[:top]],
    }


def verdict(row: Row, median: float) -> str | None:
    if row.target_ms is None:
        return None
    if median > row.target_ms:
        return "MISSED"
    if row.stretch_ms is not None:
        return "stretch met" if median <= row.stretch_ms else "met (stretch missed)"
    return "met"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15, help="timed runs per row (the target is a median of 15)")
    ap.add_argument("--tool", choices=["auto", "hyperfine", "python"], default="auto")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--importtime", type=int, default=0, metavar="N",
                    help="also print the N modules with the most import time of each mangwale row")
    ap.add_argument("--importtime-runs", type=int, default=5, metavar="R", help="runs per row for --importtime")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tool = args.tool
    if tool == "auto":
        tool = "hyperfine" if shutil.which("hyperfine") else "python"
    pin = common.default_pin() and not args.no_pin
    compile_package()
    load_before = common.loadavg()
    with common.Server(pin_cpu=0 if pin else None) as server:
        if pin:
            common.pin_self(1)  # the commands inherit CPU 1
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("_MANGWALE")
               and k not in ("MANGWALE_URL", "MANGWALE_TOKEN", "COMP_WORDS", "COMP_CWORD", "PYTHONDONTWRITEBYTECODE")}
        env["MANGWALE_HOME"] = str(server.home)
        todo = rows(server.url, server.home)
        measure = with_hyperfine if tool == "hyperfine" else with_subprocess
        results = []
        for row in todo:
            r = {"command": row.name, "argv": row.argv, "env": row.env, **measure(row, args.runs, env),
                 "target_ms": row.target_ms, "stretch_ms": row.stretch_ms}
            r["verdict"] = verdict(row, r["median_ms"])
            if args.importtime and row.mangwale:
                r["imports"] = import_profile(row, env, args.importtime, args.importtime_runs)
            results.append(r)
    by = {r["command"]: r for r in results}
    for name, ref in (("mangwale jobs list", "curl GET /training/jobs"), (CREATE, "curl POST /training/jobs")):
        if name in by and ref in by:
            by[name]["vs_curl_ms"] = by[name]["median_ms"] - by[ref]["median_ms"]
    common.print_table(results, ["command", "runs", "failures", "median_ms", "min_ms", "max_ms", "cpu_ms",
                                 "target_ms", "verdict", "vs_curl_ms"],
                       f"CLI start-up ({tool}, median of {args.runs}; load average {load_before} before)")
    for r in results:
        if "imports" in r:
            imp = r["imports"]
            print(f"\n{r['command']}: {imp['modules']} modules, {imp['total_self_ms']:.1f} ms of import time"
                  " (least per module of its runs)")
            common.print_table(imp["top_self"], ["module", "self_ms", "cumulative_ms"])
    common.write_result("cli_startup", {"tool": tool, "runs": args.runs, "pinned": pin, "loadavg_before": load_before,
                                        "results": results}, args.out)
    return 0 if all(r["failures"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
